"""The main job end to end on the tiny config: phases, report, resume after a kill, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlm_jax.tasks.base import split_of
from rlm_jax.training import pipeline

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "experiments" / "train.py"), "--config=" + str(ROOT / "configs" / "tiny.py")]
EVALUATE = [sys.executable, str(ROOT / "experiments" / "evaluate.py"), "--config=" + str(ROOT / "configs" / "tiny.py")]
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
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}"], env=ENV, capture_output=True, text=True, timeout=600)
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
    report = (workdir / "report.md").read_text()
    # The final value model: refit on exact labels, checked on held-out states before and after.
    refit = progress["value_refit"]["info"]
    assert refit["rl_iterations"] == 1 and (workdir / "value_refit" / "after_rl_1" / "final").exists()
    assert [m["step"] for m in _metrics(workdir, "value_refit")] == [10, 20]
    assert refit["labelled_states"] > 20 and 0 <= refit["auc_before"] <= 1 and 0 <= refit["finished_auc"] <= 1
    assert f"{refit['accuracy_before']:.3f} before, {refit['value_accuracy']:.3f} after" in report
    assert "rl_control" in progress and f"| {pipeline.CONTROL} |" in report and "| RL |" in report
    # The control took exactly RL's number of update steps (none if the tiny search verified nothing; see
    # test_control_takes_rl_update_steps_on_sft_traces for a control that trains).
    last_step = lambda prefix: ([0] + [m["step"] for m in _metrics(workdir, prefix)])[-1]
    updates = progress["rl_0"]["info"].get("policy_updates", 0)
    assert last_step("rl_control_0") == updates == last_step("rl_policy_0")
    assert all("sft_loss" in m for m in _metrics(workdir, "rl_policy_0"))  # SFT rehearsal in the RL update
    for strategy in ("greedy", "best_of_n", "self_consistency", "beam", "mcts"):
        assert f"| {strategy} |" in report
    png = (workdir / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    evaluated = json.loads((workdir / "eval.json").read_text())
    results = evaluated["results"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_problem"] > 0 for r in results)
    # The strategies ran on the first eval.strategy_problems (8), the phases' greedy on all 16 problems.
    assert all(len(r["solved"]) == 8 for r in results) and "strategies: the first 8" in report
    greedy = evaluated["greedy_by_phase"]
    pairs = {(d["a"], d["b"]): d for d in evaluated["paired_differences"]}
    assert set(pairs) == {(pipeline.CONTROL, "SFT"), ("RL", "SFT"), ("RL", pipeline.CONTROL)}
    for (a, b), d in pairs.items():
        assert d["mean"] == pytest.approx(greedy[a] - greedy[b]) and d["se"] >= 0
        assert f"| {a} - {b} | {d['mean']:+.3f} +- {d['se']:.3f} |" in report
    # The final policy's samples at the largest sampling budget (best_of_n:2): the selection ceiling.
    ceiling = evaluated["selection_ceiling"]
    assert ceiling["samples"] == 2 and 0 <= ceiling["distinct_finished"] <= 2
    assert ceiling["value_pick"] <= ceiling["pass_at_n"]
    assert f"A perfect verifier's pick among them solves {ceiling['pass_at_n']:.3f}" in report.replace("\n", " ")
    # MCTS (mcts:3) against the best-of-N budget with at least its tokens (best_of_n:2, else the largest).
    by_name = {(r["strategy"], r["budget"]): r for r in results}
    (versus,) = evaluated["mcts_vs_best_of_n"]
    assert (versus["mcts"], versus["best_of_n"]) == (3, 2)
    assert versus["mean"] == pytest.approx(by_name["mcts", 3]["accuracy"] - by_name["best_of_n", 2]["accuracy"])
    assert f"| mcts:3 ({versus['mcts_tokens']:.0f}) | best_of_n:2 ({versus['best_of_n_tokens']:.0f}) | " \
           f"{versus['mean']:+.3f} +- {versus['se']:.3f} |" in report


@pytest.mark.slow
def test_rl_problems_are_training_split_problems_sft_never_saw(finished_run):
    workdir = finished_run[0]
    load = lambda name: json.loads((workdir / "data" / name).read_text())["data"]
    train, rl_pool, ev = ({p["problem"] for p in load(n)} for n in ("train.json", "rl.json", "eval.json"))
    assert len(rl_pool) == 16
    assert not rl_pool & train and not rl_pool & ev
    assert all(split_of(p, 0.1) == "train" for p in load("rl.json"))


def test_rl_iterations_cycle_through_the_pool():
    pool = list(range(10))
    assert pipeline.iteration_problems(pool, 0, 4) == [0, 1, 2, 3]
    assert pipeline.iteration_problems(pool, 2, 4) == [8, 9, 0, 1]  # wraps around
    assert sorted(pipeline.iteration_problems(pool, 1, 32)) == pool  # the whole pool, never more


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_no_work(finished_run):
    workdir, seconds, _ = finished_run
    before = (workdir / "metrics.jsonl").read_text()
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.eval.strategies=greedy:1"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Training phases were skipped: no new training metrics.
    after = (workdir / "metrics.jsonl").read_text()
    new = [json.loads(x) for x in after[len(before):].splitlines() if x]
    assert not [r for r in new if r["prefix"] in ("sft", "value")]


@pytest.mark.slow
def test_more_rl_iterations_resume_with_the_replay_buffers(finished_run, tmp_path):
    """Rerunning a finished run with one more RL iteration loads iteration 0 (models and replay buffers)
    and runs only iteration 1, whose buffer holds iteration 0's rows too."""
    import shutil
    src, _, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    proc = subprocess.run(TRAIN + [f"--workdir={workdir}", "--config.rl.iterations=2",
                                   "--config.eval.strategies=greedy:1"], env=ENV, capture_output=True, text=True,
                          timeout=400)
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
                                      f"--out={out}"], env=ENV, capture_output=True, text=True, timeout=300)
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


def test_evaluate_without_a_trained_run_says_what_to_run(tmp_path):
    proc = subprocess.run(EVALUATE + [f"--workdir={tmp_path}"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "run experiments/train.py first" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_killed_mid_sft_resumes_and_finishes(tmp_path):
    workdir = tmp_path / "run"
    cmd = TRAIN + [f"--workdir={workdir}", "--config.sft.steps=120", "--config.sft.save_every=20",
                   "--config.rl.iterations=0", "--config.eval.strategies=greedy:1"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ckpt = workdir / "sft" / "ckpt"
    deadline = time.time() + 240
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

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = _progress(workdir)
    assert {"sft", "value", "eval"} <= set(progress)
    steps = [r["step"] for r in _metrics(workdir, "sft")]
    # The resumed run continued after the checkpoint instead of starting over.
    assert steps[-1] == 120 and steps.count(10) == 1, steps
    assert (workdir / "report.md").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.eval.strategies=greedy:1,bogus:3", "unknown strategy 'bogus'"),
    ("--config.eval.strategies=mcts:0", "budget must be >= 1"),
    ("--config.task.name=chess", "unknown task 'chess'"),
    ("--config.rl.algorithm=a2c", "rl.algorithm='a2c' unknown"),
    ("--config.rl.sft_mix=1.5", "rl.sft_mix=1.5 must be in [0, 1)"),
    ("--config.eval.strategy_problems=-1", "eval.strategy_problems=-1 must be >= 0"),
    ("--config.task.traces_per_problem=0", "task.traces_per_problem=0 must be >= 1"),
    ("--config.search.proposals=unique", "search.proposals='unique' unknown"),
    ("--config.eval.proposals=unique", "eval.proposals='unique' unknown"),
    ("--config.model.num_heads=3", "does not divide d_model"),
    ("--config.pretrain.steps=-1", "pretrain.steps=-1 must be >= 0"),
    ("--config.task.name=prontoqa", "task prontoqa has no random steps to pretrain on; set pretrain.steps=0"),
    ("--config.pretrain.batch_size=0", "pretrain.batch_size=0 must be a positive multiple"),
    ("--config.value_refit.steps=-1", "value_refit.steps=-1 must be >= 0"),
    ("--config.value_refit.loss=hinge", "value_refit.loss='hinge' unknown"),
])
def test_bad_config_fails_at_start(tmp_path, override, message):
    proc = subprocess.run(TRAIN + [f"--workdir={tmp_path / 'w'}", override], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "w" / "progress.json").exists()  # failed before any work


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run(TRAIN + [f"--workdir={blocker / 'run'}"], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "is not writable" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_control_takes_rl_update_steps_on_sft_traces(tmp_path):
    """Run.rl_control in-process, with RL's record of 3 update steps (the tiny run's search may verify
    nothing, so its own control may take no step): 3 steps, each with the rehearsal's SFT loss."""
    import jax
    import numpy as np

    from rlm_jax import checkpoint as ckpt_lib
    from rlm_jax import parallel
    from rlm_jax.config_utils import load_config

    c = load_config(ROOT / "configs" / "tiny.py")
    c.rl.log_every = 1
    r = pipeline.Run(c, tmp_path)
    train, _ = r.data()
    tok = r.tokenizer(train)
    cfg = pipeline.model_config(c, tok.vocab_size)
    ckpt_lib.mark_done(tmp_path, "rl_0", {"policy_updates": 3})
    policy = parallel.init_sharded_params(cfg, jax.random.key(0), r.mesh)
    before = jax.tree.map(np.asarray, policy)
    control = r.rl_control(tok, cfg, policy, train)
    r.writer.close()
    rows = _metrics(tmp_path, "rl_control_0")
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all(m["sft_loss"] > 0 and m["loss"] > m["sft_loss"] for m in rows)
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(control)))
    assert _progress(tmp_path)["rl_control"]["info"] == {"iterations": c.rl.iterations}

