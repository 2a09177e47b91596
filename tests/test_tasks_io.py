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
from rlm_jax.tasks import einstein, sat
from rlm_jax.tasks.base import LEVEL_SPAN, Score, as_record, difficulty_to_level, problem_hash, split_of
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


class RecordingTask:
    """Distinct dummy problems that record the difficulty each was generated at."""
    name = "Recording"

    def __init__(self):
        self.difficulties = []

    def generate(self, seed, difficulty):
        self.difficulties.append(difficulty)
        return as_record(self.name, difficulty_to_level(difficulty), f"problem {seed}", True, None)


def sizes_over(difficulties):
    """Problem sizes that change inside a level: Einstein (houses, types), SAT clause count."""
    return {(einstein.size_for(d), sat.num_clauses_for(d)) for d in difficulties}


def test_dataset_difficulties_cover_whole_levels():
    for level in range(1, 11):
        task = RecordingTask()
        # 1,000 draws: the rarest size of a level spans 2.4% of it, missed by 200 draws about once in 120.
        generate_dataset(task, [level], 1000, seed=random.randrange(2**32), progress=False)
        low = (level - 1) / 10
        assert all(low <= d <= low + LEVEL_SPAN and difficulty_to_level(d) == level for d in task.difficulties)
        assert min(task.difficulties) < low + 0.01 and max(task.difficulties) > low + 0.09
        # Every size the level allows occurs (the lowest difficulty alone misses most of them).
        sizes = sizes_over(task.difficulties)
        assert sizes == sizes_over(low + LEVEL_SPAN * k / 1000 for k in range(1001))
        if level == 10:  # 7 houses with 3, 4 ... 7 attribute types (Position included)
            assert {size[0] for size in sizes} == {(7, 5), (7, 6), (7, 7)}


def test_level_10_datasets_reach_the_largest_sizes():
    seed = random.randrange(2**32)
    knapsack = generate_dataset(get_task("knapsack"), [10], 30, seed, progress=False)
    assert {len(r["meta"]["items"]) for r in knapsack} == {27, 28, 29}  # 3 + int(27 d), d in [0.9, 0.9999]
    formulas = generate_dataset(get_task("sat"), [10], 30, seed, progress=False)
    assert max(len(r["meta"]["clauses"]) for r in formulas) == 21  # int(5 (1 + 3.4 d)) at d >= 0.942


def split_like_the_pipeline(records, eval_fraction):
    """rlm_jax/training/data.py `split_problems`'s filter."""
    return ([p for p in records if split_of(p, eval_fraction) == "train"],
            [p for p in records if split_of(p, eval_fraction) == "eval"])


def test_splits_are_disjoint_across_seeds_and_follow_the_problem():
    tiny = Countdown3Task(number_range=(1, 4), target_range=(2, 9))  # few problems: seeds repeat them
    split_of_text, regenerated = {}, 0
    for seed in random.sample(range(2**32), 3):
        records = generate_dataset(tiny, list(range(1, 11)), 30, seed, progress=False)
        train, evals = split_like_the_pipeline(records, eval_fraction=0.3)
        assert train and evals
        for split, part in (("train", train), ("eval", evals)):
            for p in part:
                regenerated += p["problem"] in split_of_text
                # A problem met again (from another seed, often at another level) keeps its split,
                # so no eval problem text is ever in train.
                assert split_of_text.setdefault(p["problem"], split) == split, p["problem"]
    assert regenerated > 10
    records = generate_dataset(get_task("countdown3"), list(range(1, 11)), 400, seed=random.randrange(2**32),
                               progress=False)
    assert 0.03 < len(split_like_the_pipeline(records, 0.1)[1]) / len(records) < 0.2


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
                          capture_output=True, text=True, env=env, cwd=REPO)


def test_make_dataset_cli(tmp_path):
    out = tmp_path / "sub" / "countdown3.json.bz2"
    seed = random.randrange(1000)
    result = _cli("--domain=countdown3", "--levels=2,7-8", "--n=12", f"--seed={seed}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    records = load_records(str(out))
    assert Counter(r["level"] for r in records) == {2: 4, 7: 4, 8: 4}
    assert records == generate_dataset(get_task("countdown3"), [2, 7, 8], 12, seed, progress=False)
    assert "12/12" in result.stderr  # the tqdm bar ran to the end

    bad_flags = {"--domain=chess": "--domain", "--domain=jsonl_math": "--domain", "--levels=0-3": "--levels", "--levels=3-1": "--levels",
                 "--levels=1-x": "--levels", "--n=0": "--n", f"--out={tmp_path}/x.txt": "--out"}
    for flag, name in bad_flags.items():
        args = {"--domain": "--domain=countdown3", "--out": f"--out={tmp_path}/y.json"}
        args[name] = flag
        result = _cli(*args.values())
        assert result.returncode != 0
        assert f"flag {flag}:" in result.stderr and "Traceback" not in result.stderr
        if flag == "--domain=jsonl_math":
            assert "jsonl_math reads a file; nothing to generate" in result.stderr
    assert not (tmp_path / "y.json").exists()


@pytest.mark.parametrize("domain", ["sat", "countdown", "game24"])
def test_the_readmes_make_dataset_example_runs_for_every_generating_domain(tmp_path, domain):
    """README: `make_dataset.py --domain=sat --levels=1-10 --n=1000 --out=sat.json.bz2` (seconds for every domain,
    countdown and game24 included); here at n=200 (each level 20 times)."""
    out = tmp_path / f"{domain}.json.bz2"
    result = _cli(f"--domain={domain}", "--levels=1-10", "--n=200", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Counter(r["level"] for r in load_records(str(out))) == {level: 20 for level in range(1, 11)}
