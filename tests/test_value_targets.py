"""value.targets=exact: phase 1's value model fits the task's exact step labels (no rollouts), as a PRM is fit."""
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from rlm_jax import config, parallel
from rlm_jax.config_utils import load_config
from rlm_jax.tasks.base import Score
from rlm_jax.training import phases, pipeline, rollouts, value

ROOT = Path(__file__).resolve().parents[1]


def test_exact_targets_are_the_task_labels_of_every_collected_state(tmp_path, monkeypatch):
    c = config.from_configdict(load_config(ROOT / "configs" / "tiny.py"))
    c = dataclasses.replace(c, value=dataclasses.replace(c.value, targets="exact", loss="bce", problems=16))
    run, results = phases.run_phases(c, tmp_path, pipeline.PHASES[:2])  # data and tokenizer
    policy = parallel.init_sharded_params(run.model_config(results), jax.random.key(1), run.mesh)
    seen = {}

    def no_rollouts(*a, **k):
        raise AssertionError("value.targets=exact ran rollouts")

    def fit(run_, name, tc, cfg, vparams, arrays, targets, ckpt_dir):
        seen.update(arrays=arrays, targets=targets, loss=tc.loss)
        return vparams, {}

    collect = value.collect_states
    monkeypatch.setattr(value, "collect_states", lambda *a, **k: seen.setdefault("states", collect(*a, **k)))
    monkeypatch.setattr(rollouts, "rollout_values", no_rollouts)
    monkeypatch.setattr(value, "fit", fit)
    run = phases.Run(c, tmp_path)
    value.PHASE.body(run, {**results, "sft": policy})
    run.writer.close()
    states, targets = seen["states"], seen["targets"]
    # every collected state of a countdown problem has an exact label: a finished one the verifier's,
    # an open one whether its numbers can still reach the target
    assert len(targets) == len(states) == len(seen["arrays"]["tokens"]) and seen["loss"] == "bce"
    for (p, steps, finished, _), y in zip(states, targets):
        if finished:
            assert y == (1.0 if run.task.verify(p, "\n".join(steps)) == Score.SOLVED else -1.0)
        else:
            assert y == (1.0 if run.task.can_succeed(p, steps) else -1.0)
    assert set(np.unique(targets)) == {-1.0, 1.0}  # a random policy's samples fail, reference prefixes succeed


def test_targets_must_be_a_known_kind():
    with pytest.raises(ValueError, match="value.targets='mc'"):
        config.ValueConfig(targets="mc")


def test_phase_one_samples_at_its_temperature_and_reaches_into_the_rl_pool(tmp_path, monkeypatch):
    """value.problems beyond task.num_train take RL's problems (no reference solution needed); value.temperature
    is the temperature the SFT policy's states are sampled at."""
    c = config.from_configdict(load_config(ROOT / "configs" / "tiny.py"))
    extra = 5
    c = dataclasses.replace(c, value=dataclasses.replace(c.value, targets="exact", loss="bce", temperature=0.7,
                                                         problems=c.task.num_train + extra, samples_per_problem=1))
    run, results = phases.run_phases(c, tmp_path, pipeline.PHASES[:2])  # data and tokenizer
    policy = parallel.init_sharded_params(run.model_config(results), jax.random.key(1), run.mesh)
    seen = {}

    def collect(cfg, policy_params, tok, task, problems, key, samples_per_problem, max_new_tokens, temperature=1.0):
        seen.setdefault("calls", []).append((list(problems), temperature))
        return [(problems[0], [], False, None)]

    monkeypatch.setattr(value, "collect_states", collect)
    monkeypatch.setattr(value, "fit", lambda run_, name, tc, cfg, vparams, *a: (vparams, {}))
    run = phases.Run(c, tmp_path)
    value.PHASE.body(run, {**results, "sft": policy})
    run.writer.close()
    data = results["data"]
    (problems, temperature), held_out = seen["calls"]  # the training states, then the held-out check's
    assert temperature == 0.7 and problems == data["train"] + data["rl"][:extra]
    assert held_out[0] == data["eval"]


@pytest.mark.parametrize("init,samples_from", [("rl", "rl"), ("phase1", "rl"), ("rl", "sft"), ("phase1", "sft")])
def test_the_refit_starts_from_and_samples_with_the_models_asked_for(tmp_path, monkeypatch, init, samples_from):
    """value_refit.init picks the value model the refit starts from (RL's or phase 1's), value_refit.samples_from the
    policy whose samples it labels and is checked on (the final one or SFT's)."""
    c = config.from_configdict(load_config(ROOT / "configs" / "tiny.py"))
    c = dataclasses.replace(c, value_refit=dataclasses.replace(c.value_refit, steps=5, init=init,
                                                               samples_from=samples_from))
    run, results = phases.run_phases(c, tmp_path, pipeline.PHASES[:2])
    models = {name: {"tag": np.float32(i)} for i, name in enumerate(("sft", "value", "rl_policy", "rl_value"))}
    seen = {}

    def collect(cfg, policy_params, tok, task, problems, key, samples_per_problem, max_new_tokens, temperature=1.0):
        seen.setdefault("policies", []).append(policy_params)
        return [(problems[0], [], False, None)]

    def fit(run_, name, tc, cfg, vparams, *a):
        seen["start"] = vparams
        return vparams, {}

    monkeypatch.setattr(value, "collect_states", collect)
    monkeypatch.setattr(value, "labelled_states", lambda run_, why, states: (states, np.ones(len(states))))
    monkeypatch.setattr(value, "held_out_check", lambda *a: {"finished_auc": 0.5, "value_accuracy": 0.5})
    monkeypatch.setattr(value, "fit", fit)
    run = phases.Run(c, tmp_path)
    value.REFIT_PHASE.body(run, {**results, "sft": models["sft"], "value": models["value"],
                                 "rl": {"policy": models["rl_policy"], "value": models["rl_value"]}})
    run.writer.close()
    want_policy = models["sft" if samples_from == "sft" else "rl_policy"]
    assert seen["policies"] == [want_policy, want_policy]  # the training states, then the held-out ones
    assert seen["start"] is models["value" if init == "phase1" else "rl_value"]
