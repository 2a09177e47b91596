"""`workdir/progress.json`: which phases of a run are finished, with what they recorded (`mark_done`).

Written atomically by the primary process only; read by every process (`training/phases.py` agrees on it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from rlm_jax.checkpoint import check_json

PROGRESS_FILE = "progress.json"


def phase_dir(workdir: str | os.PathLike, phase: str) -> Path:
    """`workdir/<phase>`: the directory of one pipeline phase (its checkpoints, samples, ...).

    `phase` must be a plain name (letters, digits, `-`, `_`, `.`), so phases cannot escape the workdir.
    Pure: creates nothing.
    """
    _check_phase(phase)
    return Path(workdir) / phase


def _check_phase(phase: str) -> None:
    ok = isinstance(phase, str) and phase not in ("", ".", "..") and all(c.isalnum() or c in "-_." for c in phase)
    if not ok:
        raise ValueError(f"phase name {phase!r} is not a plain name; use letters, digits, '-', '_' or '.' "
                         "(e.g. 'sft', 'value', 'rl_iter3')")


def read_progress(workdir: str | os.PathLike) -> dict[str, dict]:
    """`{phase: {"done": True, "time": unix seconds, "info": {...}}}` from `workdir/progress.json` ({} if none)."""
    path = Path(workdir) / PROGRESS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
        phases = data["phases"]
        if not isinstance(phases, dict):
            raise TypeError("'phases' is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"progress file {path} is corrupt ({e}); fix it by hand or delete it to re-run every "
                         "phase (phase checkpoints are kept and resume)") from e
    return phases


def is_done(workdir: str | os.PathLike, phase: str) -> bool:
    """True if `mark_done(workdir, phase, ...)` was recorded: the pipeline skips that phase on a re-run."""
    _check_phase(phase)
    return bool(read_progress(workdir).get(phase, {}).get("done", False))


def mark_done(workdir: str | os.PathLike, phase: str, info: Mapping[str, Any] | None = None, *,
              is_primary: bool | None = None) -> None:
    """Record `phase` as complete in `workdir/progress.json`, with a JSON-able `info` (final step, metrics).

    Call it after the phase's last checkpoint is committed (`Checkpointer.wait()`), so "done" never
    points at a checkpoint that is not on disk. The file is replaced atomically (write a temp file, fsync,
    rename), so a crash leaves either the old or the new progress, never a torn file. Only the primary
    process (`jax.process_index() == 0`, or `is_primary`) writes; call it on every process.
    """
    _check_phase(phase)
    info = dict(info or {})
    check_json(info, f"info of phase {phase!r}")
    if is_primary is None:
        is_primary = jax.process_index() == 0
    if not is_primary:
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    phases = read_progress(workdir)
    phases[phase] = {"done": True, "time": time.time(), "info": info}
    _atomic_write_json(workdir / PROGRESS_FILE, {"version": 1, "phases": phases})


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    try:  # persist the rename itself (the directory entry) across a power loss
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
