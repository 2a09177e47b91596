"""The main job end to end on the tiny config: phases, report, resume after a kill, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from limits import hang_limit

from rlm_jax.tasks.base import split_of
from rlm_jax.training import control, search_free, search_rl

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "experiments" / "train.py"), "--config=" + str(ROOT / "configs" / "tiny.py")]
EVALUATE = [sys.executable, str(ROOT / "experiments" / "evaluate.py")]  # the run's config.json, no --config
ENV = {**os.environ, "RLM_NO_PROGRESS": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _progress(workdir):
    return json.loads((Path(workdir) / "progress.json").read_text())["phases"]


def _metrics(workdir, prefix):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r["prefix"] == prefix]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    t0 = time.time()
    # PPO: the tiny search verifies few paths, but every searched node is a PPO sample, so RL's update (and the
    # control, which copies its step count) always trains.
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.rl.algorithm=ppo",
                                   "--config.rl.search_free_baseline=True"], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, time.time() - t0, proc.stdout


@pytest.mark.slow
def test_pipeline_runs_every_phase_and_learns(finished_run):
    workdir, seconds, stdout = finished_run
    print(f"tiny pipeline: {seconds:.0f}s")  # timing is reported, not asserted (machines here are noisy)
    progress = _progress(workdir)
    for phase in ("data", "tokenizer", "pretrain", "sft", "value", "rl", "value_refit", "eval"):
        assert phase in progress, phase
    pre = _metrics(workdir, "pretrain")
    assert [m["step"] for m in pre] == [10, 20] and pre[-1]["loss"] < pre[0]["loss"], pre
    sft = _metrics(workdir, "sft")
    assert sft[-1]["loss"] < 0.8 * sft[0]["loss"], (sft[0]["loss"], sft[-1]["loss"])
    value_eval = _metrics(workdir, "value_eval")[0]
    assert value_eval["labelled_states"] > 20
    assert value_eval["value_accuracy"] > value_eval["constant_accuracy"], value_eval
    # The final value model: refit on exact labels, checked on held-out states before and after.
    refit = progress["value_refit"]["info"]
    assert refit["rl_iterations"] == 1 and (workdir / "value_refit" / "after_rl_1" / "final").exists()
    assert [m["step"] for m in _metrics(workdir, "value_refit")] == [10, 20]
    assert refit["labelled_states"] > 20 and refit["finished_auc"] == _metrics(workdir, "value_refit_eval")[0]["finished_auc"]
    # RL's policy update trained (PPO with SFT rehearsal), and the control took exactly as many steps.
    last_step = lambda prefix: ([0] + [m["step"] for m in _metrics(workdir, prefix)])[-1]  # noqa: E731
    updates = progress["rl_0"]["info"]["policy_updates"]
    assert updates > 0 and last_step("rl_control_0") == updates == last_step("rl_policy_0")
    assert all("sft_loss" in m and "clip_fraction" in m for m in _metrics(workdir, "rl_policy_0"))
    png = (workdir / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    evaluated = json.loads((workdir / "eval.json").read_text())
    results = evaluated["results"]
    configured = [("greedy", 1), ("best_of_n", 2), ("self_consistency", 2), ("beam", 2), ("mcts", 3)]
    # best-of-N runs added at budgets that cover MCTS's tokens (honest equal-token pairing) come last.
    assert [(r["strategy"], r["budget"]) for r in results] == configured + [
        tuple(a) for a in evaluated["added_for_pairing"]]
    # The strategies ran on the first eval.strategy_problems (8), the phases' greedy on all 16 problems.
    for r in results:
        assert len(r["solved"]) == 8 and r["accuracy"] == pytest.approx(sum(r["solved"]) / 8)
        assert r["tokens_per_problem"] > 0
    greedy = evaluated["greedy_by_phase"]
    assert set(greedy) == {"SFT", control.LABEL, search_free.LABEL, "RL"}
    pairs = {(d["a"], d["b"]): d for d in evaluated["paired_differences"]}
    assert set(pairs) == {(control.LABEL, "SFT"), (search_free.LABEL, "SFT"), ("RL", "SFT"), ("RL", control.LABEL),
                          ("RL", search_free.LABEL)}
    for (a, b), d in pairs.items():
        assert d["mean"] == pytest.approx(greedy[a] - greedy[b]) and d["se"] >= 0
    # The final policy's samples at the largest sampling budget (best_of_n:2): the selection ceiling.
    ceiling = evaluated["selection_ceiling"]
    assert ceiling["samples"] == 2 and 0 <= ceiling["distinct_finished"] <= 2
    assert ceiling["value_pick"] <= ceiling["pass_at_n"]
    # MCTS (mcts:3) against the best-of-N budget with the fewest tokens at or above its own (added if needed).
    by_name = {(r["strategy"], r["budget"]): r for r in results}
    (versus,) = evaluated["mcts_vs_best_of_n"]
    assert versus["mcts"] == 3 and versus["best_of_n"] is not None
    assert versus["best_of_n_tokens"] >= versus["mcts_tokens"]
    assert versus["mean"] == pytest.approx(by_name["mcts", 3]["accuracy"]
                                           - by_name["best_of_n", versus["best_of_n"]]["accuracy"])
    # The report holds the tables tools read (its prose is free to change).
    report = (workdir / "report.md").read_text()
    # The search-free baseline (sampled GRPO) generated no more tokens than RL's search, and the report says both.
    baseline = progress[search_free.NAME]["info"]
    assert 0 < baseline["generated_tokens"] <= baseline["search_generated_tokens"] \
        == progress["rl_0"]["info"]["generated_tokens"]
    assert evaluated["search_free_baseline"]["generated_tokens"] == baseline["generated_tokens"]
    assert f"| {baseline['generated_tokens']:,} |" in report and f"| {baseline['search_generated_tokens']:,} |" in report
    for heading in ("## Greedy accuracy by phase", "## Strategies (final models)",
                    "## RL from search against search-free GRPO at equal training tokens",
                    "## MCTS against best-of-N at equal tokens", "## Accuracy per level"):
        assert heading in report
    # The run recorded its config, which evaluate.py and solve.py read.
    assert json.loads((workdir / "config.json").read_text())["rl"]["algorithm"] == "ppo"


@pytest.mark.slow
def test_rl_problems_are_training_split_problems_sft_never_saw(finished_run):
    workdir = finished_run[0]
    load = lambda name: json.loads((workdir / "data" / name).read_text())["data"]
    train, rl_pool, ev = ({p["problem"] for p in load(n)} for n in ("train.json", "rl.json", "eval.json"))
    assert len(rl_pool) == 16
    assert not rl_pool & train and not rl_pool & ev
    assert all(split_of(p, 0.1) == "train" for p in load("rl.json"))


def test_rl_iterations_cycle_through_the_pool():
    assert search_rl.iteration_problems(10, 0, 4) == [0, 1, 2, 3]
    assert search_rl.iteration_problems(10, 2, 4) == [8, 9, 0, 1]  # wraps around
    assert sorted(search_rl.iteration_problems(10, 1, 32)) == list(range(10))  # the whole pool, never more


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_no_work(finished_run):
    workdir, seconds, _ = finished_run
    before = (workdir / "metrics.jsonl").read_text()
    evaluated = (workdir / "eval.json").read_text()
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.rl.algorithm=ppo",
                                   "--config.rl.search_free_baseline=True"], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every phase was skipped, the evaluation included (its config did not change).
    assert (workdir / "metrics.jsonl").read_text() == before
    assert (workdir / "eval.json").read_text() == evaluated


@pytest.mark.slow
def test_more_rl_iterations_resume_with_the_replay_buffers(finished_run, tmp_path):
    """Rerunning a finished run with one more RL iteration loads iteration 0 (models and replay buffers)
    and runs only iteration 1, whose buffer holds iteration 0's rows too."""
    import shutil
    src, _, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.rl.algorithm=ppo", "--config.rl.iterations=2",
                                   "--config.eval.strategies=greedy:1"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rl_1" in _progress(workdir)
    iters = _metrics(workdir, "rl_iteration")
    assert [r["step"] for r in iters] == [0, 1]  # iteration 0 was not run again
    assert iters[1]["value_rows"] == iters[0]["value_rows"] + iters[1]["samples"]
    # The value refit belongs to the policy it was fit on: the new final policy gets its own.
    assert _progress(workdir)["value_refit"]["info"]["rl_iterations"] == 2
    assert (workdir / "value_refit" / "after_rl_1" / "final").exists()
    assert (workdir / "value_refit" / "after_rl_2" / "final").exists()


@pytest.mark.slow
def test_evaluate_on_a_file_reports_accuracy_per_level(finished_run, tmp_path):
    """experiments/evaluate.py --data: a problem file in x1's format (two levels, bz2) -> report.md with a
    column per level and eval.json whose per-level accuracies average to the overall one."""
    from rlm_jax.tasks import get_task, io as task_io
    workdir, _, _ = finished_run
    task = get_task("countdown3")
    problems = task_io.generate_dataset(task, [2, 7], 12, seed=123, progress=False)
    data = tmp_path / "problems.json.bz2"
    task_io.save_records(data, problems)
    out = tmp_path / "eval"
    proc = subprocess.run(EVALUATE + [f"--workdir={workdir}", f"--data={data}", "--strategies=greedy:1,best_of_n:2",
                                      f"--out={out}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating RL iteration 0 + value refit models on 12 problems" in proc.stdout  # the final value model
    report = (out / "report.md").read_text()
    assert "| L2 | L7 |" in report and "| best_of_n | 2 |" in report
    results = json.loads((out / "eval.json").read_text())["results"]
    levels = [int(p["level"]) for p in problems]
    for r in results:
        assert sorted(int(k) for k in r["per_level"]) == [2, 7]
        weighted = sum(levels.count(int(k)) * v for k, v in r["per_level"].items()) / len(levels)
        assert abs(weighted - r["accuracy"]) < 1e-9


@pytest.mark.slow
def test_re_evaluating_a_run_reproduces_its_report(finished_run, tmp_path):
    """experiments/evaluate.py --workdir (no --data, no --config): the run's strategies on its held-out split,
    with its evaluation phase's key, give the figures of its eval.json to the last digit."""
    workdir, _, _ = finished_run
    out = tmp_path / "again"
    proc = subprocess.run(EVALUATE + [f"--workdir={workdir}", f"--out={out}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = lambda path: [(r["strategy"], r["budget"], r["accuracy"], r["tokens_per_problem"])  # noqa: E731
                            for r in json.loads(path.read_text())["results"]]
    assert figures(out / "eval.json") == figures(workdir / "eval.json")


def test_evaluate_without_a_trained_run_says_what_to_run(tmp_path):
    proc = subprocess.run(EVALUATE + [f"--workdir={tmp_path}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0 and "run experiments/train.py first" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_killed_mid_sft_resumes_and_finishes(tmp_path):
    workdir = tmp_path / "run"
    cmd = TRAIN + [f"--workdir={workdir}", "--config.sft.steps=120", "--config.sft.save_every=20",
                   "--config.rl.iterations=0", "--config.eval.strategies=greedy:1"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ckpt = workdir / "sft" / "ckpt"
    deadline = time.time() + hang_limit(240)  # only a stuck run should reach it
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 40:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    progress = _progress(workdir)
    assert "sft" not in progress and "data" in progress
    killed_at = max(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())
    assert killed_at < 120

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = _progress(workdir)
    assert {"sft", "value", "eval"} <= set(progress)
    steps = [r["step"] for r in _metrics(workdir, "sft")]
    # The resumed run continued after the checkpoint instead of starting over.
    assert steps[-1] == 120 and steps.count(10) == 1, steps
    assert (workdir / "report.md").exists()


def test_bad_config_fails_at_start_with_one_line():
    """The CLI wiring of config validation (every field's checks are in tests/test_configs.py, in-process)."""
    proc = subprocess.run(TRAIN + ["--workdir=/nonexistent/never-created", "--config.rl.algorithm=a2c"], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "rl.algorithm='a2c'" in line]
    assert len(errors) == 1 and "use one of" in errors[0] and "Traceback" not in proc.stderr
    assert not Path("/nonexistent/never-created").exists()  # failed before any work


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run(TRAIN + [f"--workdir={blocker / 'run'}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "is not writable" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_control_takes_rl_update_steps_on_sft_traces(tmp_path):
    """The control phase in-process, with RL's record of 3 update steps: 3 steps, each with the rehearsal's SFT
    loss, from the given policy."""
    import dataclasses

    import jax
    import numpy as np

    from rlm_jax import progress as progress_lib
    from rlm_jax import config, parallel
    from rlm_jax.config_utils import load_config
    from rlm_jax.training import phases, pipeline

    c = config.from_configdict(load_config(ROOT / "configs" / "tiny.py"))
    c = dataclasses.replace(c, rl=dataclasses.replace(c.rl, policy_update=c.rl.policy_update.replace(log_every=1)))
    run, results = phases.run_phases(c, tmp_path, pipeline.PHASES[:2])  # data and tokenizer
    cfg = run.model_config(results)
    progress_lib.mark_done(tmp_path, "rl_0", {"policy_updates": 3})
    policy = parallel.init_sharded_params(cfg, jax.random.key(0), run.mesh)
    before = jax.tree.map(np.asarray, policy)
    run = phases.Run(c, tmp_path)
    trained = phases.run_phase(run, control.PHASE, {**results, "sft": policy})
    run.writer.close()
    rows = _metrics(tmp_path, "rl_control_0")
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["sft_loss"] > 0 and m["loss"] > m["sft_loss"] for m in rows)
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained)))
    assert _progress(tmp_path)["rl_control"]["info"] == {"iterations": c.rl.iterations}


@pytest.mark.slow
def test_search_free_grpo_samples_groups_and_updates_the_policy(tmp_path):
    """rl.algorithm=grpo_sampled: no search; G completions per RL problem, each a replay row, and the tokens
    it generated logged as MCTS iterations log theirs."""
    workdir = tmp_path / "run"
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.rl.algorithm=grpo_sampled", "--config.rl.group_size=4",
                                   "--config.rl.control=False", "--config.eval.strategies=greedy:1"],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    it = _metrics(workdir, "rl_iteration")[0]
    assert it["samples"] == 8 * 4  # rl.problems_per_iteration=8 problems x 4 completions
    assert 8 * 4 <= it["generated_tokens"] <= 8 * 4 * 36  # at least one token each, at most D * L
    assert it["policy_updates"] > 0 and it["replay_rows"] == 32 and it["value_rows"] == 32
