"""The phase driver: done phases load instead of running, stamps rerun what changed, disabled phases are skipped."""
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import config, evaluation
from rlm_jax.config_utils import load_config
from rlm_jax.training import phases

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"


def _phases(calls: list):
    """Three toy phases: `a` draws from its key, `b` adds to `a`'s result and is stamped by rl.iterations,
    `c` only runs with pretraining on."""
    like = lambda run, results: {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}  # noqa: E731

    def a(run, results):
        calls.append("a")
        return {"x": jax.random.normal(run.phase_key("a"), (3,))}, {"n": 3}

    def b(run, results):
        calls.append("b")
        return {"x": results["a"]["x"] + 1.0}, {}

    def c(run, results):
        calls.append("c")
        return {"x": jnp.zeros(3)}, {}

    return (phases.Phase("a", a, like=like),
            phases.Phase("b", b, like=like, stamp=lambda run: {"iterations": run.c.rl.iterations}),
            phases.Phase("c", c, like=like, enabled=lambda cfg: cfg.pretrain.steps > 0,
                         skipped=lambda results: "skipped"))


def test_done_phases_load_their_saved_result(tmp_path):
    c = dataclasses.replace(config.from_configdict(load_config(TINY)),
                            pretrain=config.PretrainConfig(steps=0))
    calls = []
    _, first = phases.run_phases(c, tmp_path, _phases(calls))
    assert calls == ["a", "b"] and first["c"] == "skipped"
    np.testing.assert_allclose(np.asarray(first["b"]["x"]), np.asarray(first["a"]["x"]) + 1.0)
    calls.clear()
    _, again = phases.run_phases(c, tmp_path, _phases(calls))
    assert calls == []  # nothing recomputed
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(again[name]["x"]), np.asarray(first[name]["x"]))
    progress = json.loads((tmp_path / "progress.json").read_text())["phases"]
    assert progress["a"]["info"] == {"n": 3} and progress["b"]["info"] == {"iterations": c.rl.iterations}
    assert config.from_configdict(json.loads((tmp_path / "config.json").read_text())) == c


def test_a_changed_stamp_reruns_only_that_phase(tmp_path):
    c = config.from_configdict(load_config(TINY))
    phases.run_phases(c, tmp_path, _phases([]))
    more = dataclasses.replace(c, rl=dataclasses.replace(c.rl, iterations=c.rl.iterations + 1))
    calls = []
    _, results = phases.run_phases(more, tmp_path, _phases(calls))
    assert calls == ["b"]
    assert json.loads((tmp_path / "progress.json").read_text())["phases"]["b"]["info"]["iterations"] == 2


def test_phase_keys_are_distinct_and_keep_the_legacy_indices(tmp_path):
    run = phases.Run(config.from_configdict(load_config(TINY)), tmp_path)
    keys = {name: jax.random.key_data(run.phase_key(name)).tolist() for name in ("sft", "value", "new_phase")}
    assert len({json.dumps(k) for k in keys.values()}) == 3
    assert keys["sft"] == jax.random.key_data(jax.random.fold_in(jax.random.key(run.c.seed), 2)).tolist()
    # experiments/evaluate.py re-evaluates with the evaluation phase's own key: the report's draws come back
    assert (jax.random.key_data(run.phase_key("eval")).tolist()
            == jax.random.key_data(evaluation.run_eval_key(run.c.seed)).tolist()
            == jax.random.key_data(jax.random.fold_in(jax.random.key(run.c.seed), 5)).tolist())
    run.writer.close()


def test_a_rerun_with_a_changed_result_field_is_refused_by_name(tmp_path):
    c = config.from_configdict(load_config(TINY))
    phases.run_phases(c, tmp_path, _phases([]))
    changed = dataclasses.replace(c, sft=c.sft.replace(lr=1e-2))
    calls = []
    try:
        phases.run_phases(changed, tmp_path, _phases(calls))
        raise AssertionError("a changed sft.lr was accepted")
    except ValueError as e:
        assert "sft.lr: 0.003 in the run, 0.01 now" in str(e) and "new --workdir" in str(e)
    assert calls == []  # refused before any work
    # Evaluation settings may change: only what they affect reruns, and config.json records the new value.
    relaxed = dataclasses.replace(c, eval=dataclasses.replace(c.eval, batch_size=8))
    phases.run_phases(relaxed, tmp_path, _phases(calls))
    assert calls == [] and json.loads((tmp_path / "config.json").read_text())["eval"]["batch_size"] == 8


def test_a_stamp_with_tuples_matches_what_progress_json_stored(tmp_path):
    """Stamps are compared as JSON stores them: a config stamp (tuples inside) must not rerun a finished phase."""
    c = config.from_configdict(load_config(TINY))
    calls = []
    phase = phases.Phase("a", _phases(calls)[0].body, like=_phases(calls)[0].like,
                         stamp=lambda run: {"config": config.to_dict(run.c)})
    phases.run_phases(c, tmp_path, [phase])
    phases.run_phases(c, tmp_path, [phase])
    assert calls == ["a"]


def test_a_done_phase_whose_result_is_corrupt_runs_again_and_ends_where_it_did(tmp_path):
    """The finished result of phase `a` damaged in both ways (a truncated array file, a deleted _METADATA): the
    rerun moves it aside, reruns `a` alone and ends with the same params as the uninterrupted run."""
    from test_checkpoint_fallback import _delete_metadata, _truncate_largest

    like = lambda run, results: {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}  # noqa: E731

    def two_phases(calls):
        def a(run, results):
            calls.append("a")
            return {"w": jax.random.normal(run.phase_key("a"), (64, 64))}, {}

        def b(run, results):
            calls.append("b")
            return {"w": results["a"]["w"] * 2.0}, {}

        return phases.Phase("a", a, like=like), phases.Phase("b", b, like=like)

    c = config.from_configdict(load_config(TINY))
    _, first = phases.run_phases(c, tmp_path, two_phases([]))
    for damage in (_truncate_largest, _delete_metadata):
        step_dir = next(p for p in (tmp_path / "a" / "final").iterdir() if p.name.isdigit())
        damage(step_dir)
        calls = []
        _, again = phases.run_phases(c, tmp_path, two_phases(calls))
        assert calls == ["a"]  # b loads its own intact result
        for name in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(again[name]["w"]), np.asarray(first[name]["w"]))
    assert len([p for p in (tmp_path / "a" / "final").iterdir() if ".corrupt-" in p.name]) == 2  # kept, not deleted


def test_each_finished_phase_prints_one_line_with_its_figures(tmp_path, capsys):
    c = dataclasses.replace(config.from_configdict(load_config(TINY)), pretrain=config.PretrainConfig(steps=0))
    phases.run_phases(c, tmp_path, _phases([]))
    lines = [line for line in capsys.readouterr().out.splitlines() if ": done in " in line]
    assert len(lines) == 2 and re.fullmatch(r"\[rlm_jax\] a: done in \d+s \(n 3\)", lines[0])
    assert re.fullmatch(r"\[rlm_jax\] b: done in \d+s", lines[1])  # b recorded no figures
    phases.run_phases(c, tmp_path, _phases([]))
    assert ": done in " not in capsys.readouterr().out  # loaded, not run: nothing to announce
