"""Problem files in x1's format, and deterministic dataset generation.

File format (x1's `datasets/*.json.bz2`): `{"version": 1, "data": [record, ...]}`, plain JSON, or
bz2-compressed when the path ends in `.bz2`. A record is
`{"type": str, "level": int 1..10, "problem": str, "unique_solution": bool, "solution": any}`
plus an optional `"meta"` dict (see `rlm_jax.tasks.base`).
"""
from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
from typing import IO, Sequence

from tqdm import tqdm

from rlm_jax.tasks.base import Problem, Task, difficulty_for, problem_hash

VERSION = 1


def open_text(path: str, mode: str = "r") -> IO[str]:
    """Opens a UTF-8 text file, through bz2 when the name ends in `.bz2`."""
    if str(path).endswith(".bz2"):
        return bz2.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def validate_record(record) -> None:
    """Raises ValueError naming the first field of `record` that breaks the x1 format."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("type", "level", "problem", "unique_solution", "solution") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(record["type"], str) or not record["type"]:
        raise ValueError(f"'type' must be a non-empty string, got {record['type']!r}")
    level = record["level"]
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 10:
        raise ValueError(f"'level' must be an int in 1..10, got {level!r}")
    if not isinstance(record["problem"], str):
        raise ValueError(f"'problem' must be a string, got {type(record['problem']).__name__}")
    if not isinstance(record["unique_solution"], bool):
        raise ValueError(f"'unique_solution' must be true/false, got {record['unique_solution']!r}")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise ValueError(f"'meta' must be an object, got {type(record['meta']).__name__}")


def load_records(path: str) -> list[Problem]:
    """Reads and validates an x1 file; errors name the file and the index of the bad record."""
    try:
        with open_text(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no problem file at {path}; pass an x1 file ({{\"version\": 1, \"data\": [...]}}, "
                                "e.g. one experiments/make_dataset.py writes)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:  # OSError: bad bz2 data
        raise ValueError(f"{path}: not a readable x1 JSON file ({e})") from e
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise ValueError(f'{path}: expected {{"version": {VERSION}, "data": [records]}} at the top level')
    if content.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported version {content.get('version')!r} (this reader knows {VERSION})")
    if not content["data"]:
        raise ValueError(f"{path}: holds no problems (\"data\" is empty); pass a file with at least one record")
    for i, record in enumerate(content["data"]):
        try:
            validate_record(record)
        except ValueError as e:
            raise ValueError(f"{path}: record {i}: {e}") from None
    return content["data"]


def save_records(path: str, records: Sequence[Problem]) -> None:
    """Writes records in x1's format (bz2 when `path` ends in `.bz2`); validates first and writes
    through a temporary file so an interrupted run never leaves a truncated dataset."""
    for i, record in enumerate(records):
        try:
            validate_record(record)
        except ValueError as e:
            raise ValueError(f"record {i} cannot be written to {path}: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{'.bz2' if str(path).endswith('.bz2') else ''}"
    with open_text(tmp, "w") as f:
        json.dump({"version": VERSION, "data": list(records)}, f)
    os.replace(tmp, path)


def parse_levels(spec: str) -> list[int]:
    """`"1-10"`, `"3"` or `"1,4,7"` (ranges and lists mix: `"1-3,8"`) -> sorted distinct levels."""
    levels = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if m is None:
            raise ValueError(f"malformed levels {spec!r}: use a level (3), a range (1-10) or a list (1,4,7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise ValueError(f"malformed level range {part.strip()!r}: write it low-high, e.g. {hi}-{lo}")
        if lo < 1 or hi > 10:
            raise ValueError(f"levels must be within 1..10 (e.g. 1-10), got {part.strip()!r}")
        levels.update(range(lo, hi + 1))
    return sorted(levels)


def problem_seed(seed: int, index: int) -> int:
    """A per-problem seed: independent streams for (seed, index) without global random state."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def generate_dataset(task: Task, levels: Sequence[int], n: int, seed: int,
                     progress: bool = True) -> list[Problem]:
    """`n` distinct problems, problem i at level `levels[i % len(levels)]`, deterministic in `seed`.
    Each draw's difficulty is spread over its level (`difficulty_for` on the draw's seed), as in x1's
    data. Duplicates (same problem text) are redrawn; raises if the task's problem space runs out."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not levels:
        raise ValueError("levels must name at least one level in 1..10")
    records, seen, attempt = [], set(), 0
    with tqdm(total=n, desc=f"generating {task.name}", disable=not progress) as bar:
        while len(records) < n:
            if attempt >= 20 * n + 100:
                raise RuntimeError(f"{task.name}: only {len(records)} distinct problems after {attempt} "
                                   f"draws at levels {list(levels)}; ask for fewer or for harder levels")
            level = levels[len(records) % len(levels)]
            draw_seed = problem_seed(seed, attempt)
            record = task.generate(draw_seed, difficulty_for(level, draw_seed))
            attempt += 1
            key = problem_hash(record)
            if key not in seen:
                seen.add(key)
                records.append(record)
                bar.update(1)
    return records
