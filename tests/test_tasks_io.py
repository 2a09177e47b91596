"""x1 files (round trip, validation), dataset generation, splits, the registry and the CLI."""
import copy
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from rlm_jax.tasks import TASK_NAMES, get_task, name_for_type, task_for_record
from rlm_jax.tasks.base import Score, problem_hash, split_of
from rlm_jax.tasks.countdown import Countdown3Task
from rlm_jax.tasks.io import generate_dataset, load_records, parse_levels, save_records

X1_DIR = Path("/work/shared/data/x1")
X1_FILES = sorted(X1_DIR.glob("*.json.bz2"))
REPO = Path(__file__).resolve().parents[1]
MINE = ["countdown", "countdown3", "game24", "arithmetic"]  # generators defined next to this test


@pytest.mark.skipif(not X1_FILES, reason=f"x1 data files not found in {X1_DIR}")
@pytest.mark.parametrize("suffix", [".json", ".json.bz2"])
def test_x1_files_round_trip(tmp_path, suffix):
    for source in X1_FILES:
        records = load_records(str(source))
        assert len(records) > 0 and all(1 <= r["level"] <= 10 for r in records)
        name_for_type(records[0]["type"])  # every x1 type has a registered task
        out = tmp_path / (source.name.split(".")[0] + suffix)
        save_records(str(out), records)
        assert load_records(str(out)) == records
        assert out.read_bytes().startswith(b"BZh") == suffix.endswith(".bz2")
        assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary left behind


CORRUPTIONS = [("level", 0), ("level", 11), ("level", "3"), ("level", True), ("type", ""),
               ("problem", None), ("unique_solution", "yes"), ("meta", [1]), ("solution", KeyError)]


@given(seed=st.integers(0, 2**32), corruption=st.sampled_from(CORRUPTIONS))
@settings(max_examples=20, deadline=None)
def test_bad_records_are_named_by_file_and_index(tmp_path_factory, seed, corruption):
    rng = random.Random(seed)
    records = generate_dataset(get_task("arithmetic"), [1, 2], rng.randint(2, 12), seed, progress=False)
    path = tmp_path_factory.mktemp("io") / "data.json"
    save_records(str(path), records)
    bad = copy.deepcopy(records)
    index = rng.randrange(len(bad))
    field, value = corruption
    if value is KeyError:
        del bad[index][field]
    else:
        bad[index][field] = value
    with pytest.raises(ValueError, match=f"record {index}") as info:
        save_records(str(path), bad)
    assert field in str(info.value)
    # Written by someone else: the reader names the file and the record.
    path.write_text(__import__("json").dumps({"version": 1, "data": bad}))
    with pytest.raises(ValueError, match=f"{path}: record {index}: .*{field}"):
        load_records(str(path))
    path.write_text('{"version": 2, "data": []}')
    with pytest.raises(ValueError, match="version"):
        load_records(str(path))
    path.write_text('[1, 2]')
    with pytest.raises(ValueError, match='"data"'):
        load_records(str(path))


@given(name=st.sampled_from(["countdown3", "arithmetic"]),  # the fast generators; all are deterministic
       seed=st.integers(0, 2**32), levels=st.sets(st.integers(1, 10), min_size=1, max_size=4),
       per_level=st.integers(1, 4))
@settings(max_examples=10, deadline=None)
def test_generate_dataset_is_deterministic_and_spread_over_levels(name, seed, levels, per_level):
    task = get_task(name)
    levels = sorted(levels)
    n = per_level * len(levels)
    records = generate_dataset(task, levels, n, seed, progress=False)
    assert records == generate_dataset(task, levels, n, seed, progress=False)
    assert Counter(r["level"] for r in records) == {level: per_level for level in levels}
    assert len({problem_hash(r) for r in records}) == n
    assert all(task.verify(r, r["solution"]) == Score.SOLVED for r in records)
    assert generate_dataset(task, levels, n, seed + 1, progress=False) != records


@given(seed=st.integers(0, 2**32))
@settings(max_examples=5, deadline=None)
def test_generate_dataset_redraws_duplicates_and_reports_exhaustion(seed):
    tiny = Countdown3Task(number_range=(1, 3), target_range=(2, 6))  # under 50 distinct problems
    records = generate_dataset(tiny, [1, 10], 12, seed, progress=False)
    assert len({problem_hash(r) for r in records}) == 12
    assert Counter(r["level"] for r in records) == {1: 6, 10: 6}
    with pytest.raises(RuntimeError, match="distinct problems"):
        generate_dataset(tiny, [1], 60, seed, progress=False)


def test_splits_are_disjoint_and_stable():
    records = generate_dataset(get_task("countdown3"), list(range(1, 11)), 400, seed=random.randrange(2**32),
                               progress=False)
    splits = {problem_hash(r): split_of(r) for r in records}
    train = {h for h, s in splits.items() if s == "train"}
    evals = {h for h, s in splits.items() if s == "eval"}
    assert not train & evals and len(train) + len(evals) == len(records)
    assert 0.03 < len(evals) / len(records) < 0.2  # eval_fraction 0.1
    # The split follows the problem, not the seed or level that produced it.
    for r in records[:50]:
        assert split_of(dict(r, level=11 - r["level"], meta={})) == splits[problem_hash(r)]


@given(parts=st.lists(st.tuples(st.integers(1, 10), st.integers(0, 9)), min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_parse_levels(parts):
    spec = ",".join(f"{lo}-{min(lo + span, 10)}" if span else str(lo) for lo, span in parts)
    expected = sorted({level for lo, span in parts for level in range(lo, min(lo + span, 10) + 1)})
    assert parse_levels(spec) == expected
    for bad in ["0", "11", f"{expected[-1]}-{expected[0] - 1}" if expected[0] > 1 else "5-4", "a", "1,,2", "1-"]:
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_registry():
    assert set(MINE) | {"jsonl_math", "sat", "knapsack", "einstein", "prontoqa"} == set(TASK_NAMES)
    with pytest.raises(ValueError, match="valid names: " + ", ".join(TASK_NAMES)):
        get_task("chess")
    for name in MINE:
        task = get_task(name.upper())
        record = task.generate(random.randrange(2**32), random.random())
        found = task_for_record(record)
        assert type(found) is type(task) and found.verify(record, record["solution"]) == Score.SOLVED
    assert name_for_type("SAT") == "sat" and name_for_type("PrOntoQA") == "prontoqa"
    assert get_task("jsonl_math").problems == []
    with pytest.raises(ValueError, match="known types"):
        name_for_type("Chess")


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "experiments" / "make_dataset.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_make_dataset_cli(tmp_path):
    out = tmp_path / "sub" / "countdown3.json.bz2"
    seed = random.randrange(1000)
    result = _cli("--domain=countdown3", "--levels=2,7-8", "--n=12", f"--seed={seed}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    records = load_records(str(out))
    assert Counter(r["level"] for r in records) == {2: 4, 7: 4, 8: 4}
    assert records == generate_dataset(get_task("countdown3"), [2, 7, 8], 12, seed, progress=False)
    assert "12/12" in result.stderr  # the tqdm bar ran to the end

    bad_flags = {"--domain=chess": "--domain", "--levels=0-3": "--levels", "--levels=3-1": "--levels",
                 "--levels=1-x": "--levels", "--n=0": "--n", f"--out={tmp_path}/x.txt": "--out"}
    for flag, name in bad_flags.items():
        args = {"--domain": "--domain=countdown3", "--out": f"--out={tmp_path}/y.json"}
        args[name] = flag
        result = _cli(*args.values())
        assert result.returncode != 0
        assert f"flag {flag}:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "y.json").exists()
