"""Every shipped experiment config runs the whole main job as documented (`train.py --config=configs/<x>.py`),
at a small size: the config's own task, sequence lengths and search shape, with fewer problems, a smaller
model and fewer steps (configs/tiny.py is configs/countdown.py shrunk the same way: tests/test_pipeline.py).
configs/math.py needs a pretrained folder and a problems file: tests/test_hf_init.py trains from both."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_jax.config_utils import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RLM_NO_PROGRESS": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
SMALL = {
    "task.num_train": 40, "task.num_rl": 8, "task.num_eval": 8, "task.eval_fraction": 0.2,
    "tokenizer.corpus_problems": 100,
    "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.mlp_dim": 64,
    "value_head.hidden": "(16,)",
    "sft.steps": 6, "sft.batch_size": 8, "value.problems": 8, "value.samples_per_problem": 1, "value.rollouts": 1,
    "value.steps": 4, "value.batch_size": 8,
    "rl.iterations": 1, "rl.problems_per_iteration": 4, "rl.simulations": 2, "rl.batch_size": 4,
    "rl.policy_update.steps": 2, "rl.policy_update.batch_size": 4, "rl.value_update.steps": 2,
    "rl.value_update.batch_size": 4,
    "eval.batch_size": 8, "eval.strategy_problems": 4, "eval.strategies": "greedy:1,best_of_n:2,beam:2,mcts:2",
}


# What a config turns on beyond SMALL's phases, shrunk too: countdown pretrains and refits its value model.
EXTRA = {"countdown": {"pretrain.steps": 4, "pretrain.documents": 64, "pretrain.batch_size": 8,
                       "value_refit.steps": 4, "value_refit.problems": 8, "value_refit.samples_per_problem": 1,
                       "value_refit.batch_size": 8, "task.traces_per_problem": 2},
         # countdown_quick: pretraining, exact value targets kept through RL, ToT-DFS in the evaluation
         "countdown_quick": {"pretrain.steps": 4, "pretrain.documents": 64, "pretrain.batch_size": 8,
                             "task.traces_per_problem": 2, "rl.value_update.steps": 0,
                             "eval.strategies": "greedy:1,best_of_n:2,beam:2,mcts:2,tot_dfs:4"}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["countdown", "countdown_quick", "knapsack", "prontoqa"])
def test_shipped_config_runs_every_phase(tmp_path, name):
    workdir = tmp_path / name
    flags = [f"--config.{k}={v}" for k, v in {**SMALL, **EXTRA.get(name, {})}.items()]
    proc = subprocess.run([sys.executable, "experiments/train.py", f"--config=configs/{name}.py",
                           f"--workdir={workdir}", *flags], env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    phases = json.loads((workdir / "progress.json").read_text())["phases"]
    for phase in ("data", "tokenizer", "sft", "value", "rl_0", "eval"):
        assert phases[phase]["done"], phase
    task = load_config(ROOT / "configs" / f"{name}.py").task.name
    assert json.loads((workdir / "config.json").read_text())["task"]["name"] == task
    assert (workdir / "report.md").read_text().startswith(f"# rlm_jax report: {task}")
    strategies = {r["strategy"] for r in json.loads((workdir / "eval.json").read_text())["results"]}
    assert {"greedy", "best_of_n", "beam", "mcts"} <= strategies
    # the run evaluates from its own files, without --config (as the README writes it)
    proc = subprocess.run([sys.executable, "experiments/evaluate.py", f"--workdir={workdir}",
                           "--strategies=greedy:1", f"--out={tmp_path / 'reeval'}"], env=ENV, capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
