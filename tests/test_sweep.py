"""experiments/sweep.py: one run per seed and summary.md. The summary writer on synthetic finished runs (default
suite); the whole sweep on the tiny config, 2 seeds, killed nothing, rerun skipping both (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_jax import report

ROOT = Path(__file__).resolve().parents[1]
CONTROL = "SFT + RL's update steps on SFT traces only (control)"


def _fake_run(wd: Path, sft, control, rl, diff, auc, versus, refit_auc=None):
    """The two files of a finished run that the summary reads, as the pipeline writes them."""
    wd.mkdir(parents=True)
    ev = {"greedy_by_phase": {"SFT": sft, CONTROL: control, "RL": rl},
          "paired_differences": [{"a": CONTROL, "b": "SFT", "mean": control - sft, "se": 0.01},
                                 {"a": "RL", "b": "SFT", "mean": rl - sft, "se": 0.012},
                                 {"a": "RL", "b": CONTROL, "mean": diff[0], "se": diff[1]}],
          "mcts_vs_best_of_n": versus, "results": []}
    (wd / "eval.json").write_text(json.dumps(ev))
    phases = {"value": {"done": True, "info": {"finished_auc": auc}}, "eval": {"done": True, "info": {}}}
    if refit_auc is not None:
        phases["value_refit"] = {"done": True, "info": {"finished_auc": refit_auc}}
    (wd / "progress.json").write_text(json.dumps({"phases": phases}))


def _pair(mcts, tokens, bon, bon_tokens, mean, se):
    return {"mcts": mcts, "mcts_tokens": tokens, "best_of_n": bon, "best_of_n_tokens": bon_tokens,
            "best_of_n_added": False, "mean": mean, "se": se, "covering_budget": None, "rule": "r"}


def test_summary_lists_each_seeds_figures_and_their_mean_and_standard_error(tmp_path):
    _fake_run(tmp_path / "seed0", 0.30, 0.29, 0.35, (0.06, 0.014), 0.80, [_pair(8, 122, 8, 125, 0.10, 0.014)],
              refit_auc=0.94)
    _fake_run(tmp_path / "seed1", 0.31, 0.33, 0.33, (0.005, 0.015), 0.70, [
        _pair(8, 116, 8, 125, 0.03, 0.015),
        {**_pair(16, 134, None, None, None, None), "covering_budget": 9}], refit_auc=0.78)
    text = report.sweep_summary({0: tmp_path / "seed0", 1: tmp_path / "seed1"})
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| figure")}
    assert rows["SFT greedy"][1:4] == ["0.300", "0.310", "0.305 +- 0.005 (2 seeds)"]
    assert rows["RL greedy"][1:4] == ["0.350", "0.330", "0.340 +- 0.010 (2 seeds)"]
    assert rows["control greedy"][1:3] == ["0.290", "0.330"]
    # RL - control: each seed's own paired SE; the mean over seeds with its SE; only seed 0 clears 2 SE
    assert rows["RL - control"][1:] == ["+0.060 +- 0.014", "+0.005 +- 0.015", "+0.033 +- 0.028 (2 seeds)", "1/2"]
    # the final value model is the refit one in both runs
    assert rows["value AUC (value_refit, finished held-out states)"][1:4] == ["0.940", "0.780",
                                                                            "0.860 +- 0.080 (2 seeds)"]
    m8 = rows["MCTS:8 - best-of-N at >= its tokens"]
    assert m8[1] == "+0.100 +- 0.014 (best-of-8; 122 vs 125 tokens)" and m8[3].endswith("(2 seeds)") and m8[4] == "1/2"
    m16 = rows["MCTS:16 - best-of-N at >= its tokens"]
    assert m16[1] == "-" and m16[2] == "not paired: no best-of-N with >= 134 tokens" and m16[3] == "-"


def test_summary_reads_the_value_phase_auc_without_a_refit(tmp_path):
    _fake_run(tmp_path / "seed3", 0.3, 0.3, 0.3, (0.0, 0.01), 0.81, [])
    text = report.sweep_summary({3: tmp_path / "seed3"})
    assert "| value AUC (value, finished held-out states) | 0.810 | 0.810 (1 seed) |" in text
    assert "| seed 3 |" in text


ENV = {**os.environ, "RLM_NO_PROGRESS": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
SWEEP = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--config=" + str(ROOT / "configs" / "tiny.py"),
         "--seeds=0,1", "--config.rl.algorithm=ppo"]


@pytest.mark.slow
def test_sweep_runs_each_seed_writes_the_summary_and_resumes(tmp_path):
    proc = subprocess.run(SWEEP + [f"--workdir={tmp_path}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    evals = {s: json.loads((tmp_path / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)}
    configs = {s: json.loads((tmp_path / f"seed{s}" / "config.json").read_text()) for s in (0, 1)}
    assert [configs[s]["seed"] for s in (0, 1)] == [0, 1]
    assert configs[0]["rl"]["algorithm"] == "ppo"  # the override reached every seed
    assert evals[0]["results"] != evals[1]["results"]  # other seeds: other problems, other models
    summary = (tmp_path / "summary.md").read_text()
    assert "| figure | seed 0 | seed 1 | mean +- SE across seeds |" in summary
    sft = [evals[s]["greedy_by_phase"]["SFT"] for s in (0, 1)]
    assert f"| SFT greedy | {sft[0]:.3f} | {sft[1]:.3f} | " in summary
    for name in ("RL greedy", "control greedy", "RL - control", "RL - SFT", "value AUC", "MCTS:3"):
        assert f"| {name}" in summary, name
    before = {s: (tmp_path / f"seed{s}" / "metrics.jsonl").read_text() for s in (0, 1)}
    proc = subprocess.run(SWEEP + [f"--workdir={tmp_path}"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("skipped") == 2
    assert {s: (tmp_path / f"seed{s}" / "metrics.jsonl").read_text() for s in (0, 1)} == before
