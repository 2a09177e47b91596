"""A corrupt checkpoint step is moved aside (renamed, never deleted) and the previous intact step restored;
with none left, restore returns None and `loop.train` restarts the phase. An intact checkpoint restored into
an abstract_state of another shape still raises and keeps every step.

Values are fresh random numbers each run, so restoring the corrupt step (or zeros) fails the tests.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import checkpoint as ck
from rlm_jax.training import loop

# When one array read fails, orbax leaves its other pending reads to be garbage-collected ("Exception ignored in
# coroutine _read_array_index_and_device_put"): orbax's noise, not a failure of the fallback.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(rng):
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32),
                       "ids": jnp.asarray(rng.integers(0, 1000, size=(8,)), jnp.int32)},
            "count": int(rng.integers(1, 10**6))}


def _save_10_20(directory):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    states = {10: _state(rng), 20: _state(rng)}
    with ck.Checkpointer(directory, max_to_keep=None) as c:
        for step, st in states.items():
            c.save(step, st, {"step": step}, force=True)
    return states


def _assert_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _truncate_largest(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    assert os.path.getsize(big) > 1000, big  # an array's data, not a small metadata file
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)


def _delete_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"  # where orbax's StandardSave writes the tree metadata
    assert path.is_file()
    path.unlink()


def _aside(directory, step):
    return sorted(n for n in os.listdir(directory) if n.startswith(f"{step}.corrupt-"))


@pytest.mark.parametrize("corrupt", [_truncate_largest, _delete_metadata], ids=["truncated", "no_metadata"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
    states = _save_10_20(tmp_path)
    corrupt(tmp_path / "20")
    c = ck.Checkpointer(tmp_path, max_to_keep=None)
    assert c.all_steps() == [10, 20]
    with caplog.at_level(logging.WARNING, logger="rlm_jax.checkpoint"):
        state, meta = c.restore(abstract_state=ck.abstract_of(states[10]))
    assert meta == {"step": 10}
    _assert_equal(state, states[10])
    assert c.all_steps() == [10] and c.latest_step() == 10
    assert _aside(tmp_path, 20) == ["20.corrupt-1"] and not (tmp_path / "20").exists()
    assert (tmp_path / "20.corrupt-1" / "state").is_dir()  # moved, not deleted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{tmp_path / '20'} (" in warnings[0] and "20.corrupt-1" in warnings[0]
    assert "trying step 10" in warnings[0]
    c.close()

    # A fresh Checkpointer (the next rerun) neither lists nor cleans up the moved step; saving 20 again works.
    c = ck.Checkpointer(tmp_path, max_to_keep=1)
    assert c.all_steps() == [10]
    assert c.save(20, states[20], {"step": 20}, force=True)
    c.wait()
    assert c.all_steps() == [20] and _aside(tmp_path, 20) == ["20.corrupt-1"]  # max_to_keep leaves it alone
    _assert_equal(c.restore(abstract_state=ck.abstract_of(states[20]))[0], states[20])
    c.close()


def test_truncated_without_abstract_state_falls_back(tmp_path):
    states = _save_10_20(tmp_path)
    _truncate_largest(tmp_path / "20")
    with ck.Checkpointer(tmp_path) as c:
        state, meta = c.restore()
        assert meta == {"step": 10}
        _assert_equal(state["params"], states[10]["params"])


def test_every_step_corrupt_returns_none(tmp_path, caplog):
    states = _save_10_20(tmp_path)
    _truncate_largest(tmp_path / "20")
    _delete_metadata(tmp_path / "10")
    c = ck.Checkpointer(tmp_path, max_to_keep=None)
    with caplog.at_level(logging.WARNING, logger="rlm_jax.checkpoint"):
        assert c.restore(abstract_state=ck.abstract_of(states[10])) is None
    assert c.latest_step() is None and c.all_steps() == []
    assert _aside(tmp_path, 10) == ["10.corrupt-1"] and _aside(tmp_path, 20) == ["20.corrupt-1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "missing state/_METADATA" in warnings[1] and str(tmp_path / "10") in warnings[1]
    assert warnings[1].endswith(f"no intact checkpoint left in {tmp_path}: the phase restarts")
    c.close()
    assert ck.Checkpointer(tmp_path).latest_step() is None


def test_explicit_corrupt_step_raises_and_is_moved(tmp_path):
    _save_10_20(tmp_path)
    _truncate_largest(tmp_path / "20")
    with ck.Checkpointer(tmp_path, max_to_keep=None) as c:
        with pytest.raises(FileNotFoundError, match=r"corrupt checkpoint .*20 \(.*available steps: \[10\]"):
            c.restore(20)
        assert c.all_steps() == [10] and _aside(tmp_path, 20) == ["20.corrupt-1"]


@pytest.mark.parametrize("change", ["shape", "structure"])
def test_intact_checkpoint_wrong_target_raises_and_keeps_steps(tmp_path, change):
    states = _save_10_20(tmp_path)
    wrong = ck.abstract_of(states[20])
    if change == "shape":
        wrong["params"]["w"] = jax.ShapeDtypeStruct((32, 32), jnp.float32)  # e.g. the model config changed
    else:
        wrong["params"]["extra"] = jax.ShapeDtypeStruct((4,), jnp.float32)
    with ck.Checkpointer(tmp_path, max_to_keep=None) as c:
        with pytest.raises(ValueError, match="(?s)cannot restore step 20 .*same tree structure, shapes"):
            c.restore(abstract_state=wrong)
        assert c.all_steps() == [10, 20]
    assert sorted(os.listdir(tmp_path)) == ["10", "20"]


def test_load_result_of_corrupt_result_says_rerun(tmp_path):
    tree = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)}
    ck.save_result(tmp_path / "final", tree)
    _truncate_largest(tmp_path / "final" / "0")
    with pytest.raises(FileNotFoundError, match="corrupt.*rerun the phase"):
        ck.load_result(tmp_path / "final", tree)
    assert _aside(tmp_path / "final", 0) == ["0.corrupt-1"]


def _step_fn(params, opt_state, batch):
    """Deterministic, optimizer-free: the result depends on every step's batch, in order."""
    params = jax.tree.map(lambda p: p * 0.9 + batch["x"], params)
    return params, {"n": opt_state["n"] + 1}, {"loss": jnp.sum(params["w"])}


def _batch_at(step):
    return {"x": jnp.float32(np.sin(step + 1.0))}


def _init():
    rng = np.random.default_rng(7)
    return ({"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "b": jnp.zeros(16, jnp.float32)},
            {"n": jnp.int32(0)})


def test_train_resumes_from_previous_step_after_corruption(tmp_path, caplog):
    want_params, want_opt, _ = loop.train("t", _step_fn, *_init(), _batch_at, 20, tmp_path / "clean", save_every=10)

    d = tmp_path / "ckpt"
    loop.train("t", _step_fn, *_init(), _batch_at, 20, d, save_every=10)
    assert sorted(os.listdir(d)) == ["10", "20"]
    _truncate_largest(d / "20")
    calls = []
    counted = lambda p, o, b: (calls.append(1), _step_fn(p, o, b))[1]
    with caplog.at_level(logging.WARNING, logger="rlm_jax.checkpoint"):
        params, opt, _ = loop.train("t", counted, *_init(), _batch_at, 20, d, save_every=10)
    assert len(calls) == 10  # resumed from step 10, not from scratch, not from the corrupt 20
    assert any("trying step 10" in r.getMessage() for r in caplog.records)
    _assert_equal(params, want_params)
    assert int(opt["n"]) == int(want_opt["n"]) == 20
    assert sorted(os.listdir(d)) == ["10", "20", "20.corrupt-1"]

    # Both steps corrupt: the phase restarts from scratch and still ends where an uninterrupted run does.
    _truncate_largest(d / "20")
    _delete_metadata(d / "10")
    calls.clear()
    params, _, _ = loop.train("t", counted, *_init(), _batch_at, 20, d, save_every=10)
    assert len(calls) == 20
    _assert_equal(params, want_params)
    assert sorted(os.listdir(d)) == ["10", "10.corrupt-1", "20", "20.corrupt-1", "20.corrupt-2"]
