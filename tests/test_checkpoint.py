"""Checkpointer (orbax) round trips, shardings, retention, interrupted saves, errors; the progress file.

Runs on the 8 simulated CPU devices of conftest.py. Values are fresh random numbers each run, so a
restore that returned zeros, init values or another step's values fails.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlm_jax import checkpoint as ck
from rlm_jax import progress
from rlm_jax import parallel as par
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig
from limits import hang_limit

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _train_state(seed):
    """Nested params, adamw state after one update (mu, nu, count all non-trivial), a typed key."""
    rng = np.random.default_rng(seed)
    params = {"embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "blocks": {"w": jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.bfloat16),
                         "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
              "steps": jnp.asarray(rng.integers(0, 1000, size=(3,)), jnp.int32)}
    floats = {"embed": params["embed"], "blocks": params["blocks"]}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), floats)
    opt = optax.adamw(1e-2)
    _, opt_state = opt.update(grads, opt.init(floats), floats)
    key = jax.random.split(jax.random.key(seed), 3)  # typed keys, batch of 3
    return {"params": params, "opt": opt_state, "key": key, "legacy_key": jax.random.PRNGKey(seed)}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if ck._is_key(x) or ck._is_key(y):
            assert ck._is_key(x) and ck._is_key(y), (x, y)
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_params_optax_key_meta(tmp_path):
    seed = _seed()
    state = _train_state(seed)
    meta = {"phase": "sft", "step": 7, "cursor": {"shard": 3, "offset": 1234}, "seed": seed}
    with ck.Checkpointer(tmp_path / "ckpt") as c:
        assert c.latest_step() is None
        assert c.save(7, state, meta)
        c.wait()
        assert c.all_steps() == [7] and c.latest_step() == 7

        # Exact structure (optax namedtuples, tuples) and typed keys back, with abstract_state.
        restored, rmeta = c.restore(abstract_state=jax.eval_shape(lambda: state))
        _assert_tree_equal(restored, state)
        assert rmeta == meta
        # The restored key works as a key: same stream as the original.
        np.testing.assert_array_equal(jax.random.uniform(restored["key"][1], (4,)),
                                      jax.random.uniform(state["key"][1], (4,)))

    # A fresh Checkpointer (a new process after preemption) restores without a target: containers become
    # dicts / lists, but every value and the typed key come back.
    c = ck.Checkpointer(tmp_path / "ckpt")
    plain, rmeta = c.restore(7)
    assert rmeta == meta
    assert ck._is_key(plain["key"]) and not ck._is_key(plain["legacy_key"])
    _assert_tree_equal(plain["params"], state["params"])
    _assert_tree_equal(plain["key"], state["key"])
    adam = state["opt"][0]
    np.testing.assert_array_equal(plain["opt"][0]["mu"]["embed"], adam.mu["embed"])
    np.testing.assert_array_equal(plain["opt"][0]["nu"]["blocks"]["w"], adam.nu["blocks"]["w"])
    assert int(plain["opt"][0]["count"]) == 1
    c.close()


def test_restore_into_mesh_shardings(tmp_path):
    seed = _seed()
    mesh = par.make_mesh(2, 4, 1)
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)  # random values in the model's param shapes (init_params is slow)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), transformer.abstract_params(CFG))
    c = ck.Checkpointer(tmp_path)
    c.save(0, {"params": params, "key": key}, {})
    c.wait()

    shardings = par.param_shardings(CFG, mesh)
    abstract = ck.with_shardings({"params": transformer.abstract_params(CFG),
                                  "key": jax.eval_shape(lambda: key)},
                                 {"params": shardings, "key": par.replicated(mesh)})
    restored, _ = c.restore(abstract_state=abstract)
    c.close()

    flat_expected = jax.tree.leaves(shardings)
    flat_restored = jax.tree.leaves(restored["params"])
    assert len(flat_expected) == len(flat_restored)
    n_split = 0
    for x, want in zip(flat_restored, flat_expected):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
        n_split += x.addressable_shards[0].data.shape != x.shape
    assert n_split > 0, "no parameter is actually split: the test would not catch a replicated restore"
    _assert_tree_equal(restored["params"], params)
    assert ck._is_key(restored["key"])
    assert restored["key"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(key))


def test_max_to_keep_and_interval(tmp_path):
    c = ck.Checkpointer(tmp_path, max_to_keep=2)
    for step in range(1, 6):
        assert c.save(step, {"x": jnp.full((4,), step)}, {"step": step})
    c.wait()
    assert c.all_steps() == [4, 5]
    assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["4", "5"]
    assert int(c.restore(4)[0]["x"][0]) == 4
    assert not c.save(5, {"x": jnp.zeros(4)}, {})  # not newer than the latest: skipped, nothing overwritten
    c.close()

    c = ck.Checkpointer(tmp_path / "every3", max_to_keep=None, save_interval_steps=3)
    saved = [s for s in range(8) if c.save(s, {"x": jnp.full((2,), s)}, {})]
    assert saved == [0, 3, 6]
    assert c.save(7, {"x": jnp.full((2,), 7)}, {}, force=True)
    c.wait()
    assert c.all_steps() == [0, 3, 6, 7]
    c.close()


def test_fake_half_written_save_is_ignored_and_cleaned(tmp_path):
    c = ck.Checkpointer(tmp_path)
    c.save(1, {"x": jnp.arange(3.0)}, {"step": 1})
    c.close()
    # What a preemption during step 2's write leaves: orbax's tmp directory, partly written.
    tmp = tmp_path / f"2{ck.TMP_SUFFIX}"
    (tmp / "state").mkdir(parents=True)
    (tmp / "_CHECKPOINT_METADATA").write_text('{"init_timestamp_nsecs": 1')
    (tmp / "state" / "garbage").write_bytes(os.urandom(64))
    (tmp_path / f"9{ck.TMP_SUFFIX}").mkdir()  # and one of a step the re-run will not reach soon

    c = ck.Checkpointer(tmp_path)
    assert c.latest_step() == 1 and c.all_steps() == [1]
    state, meta = c.restore()
    assert meta == {"step": 1}
    np.testing.assert_array_equal(state["x"], np.arange(3.0))
    # The re-run saves step 2 again; the stale tmp directory does not get in the way.
    assert c.save(2, {"x": jnp.arange(3.0) + 2}, {"step": 2})
    c.wait()
    assert c.latest_step() == 2 and ck.unfinished_saves(tmp_path) == []  # stale tmp dirs cleaned up
    np.testing.assert_array_equal(c.restore()[0]["x"], np.arange(3.0) + 2)
    c.close()


_KILLED_DURING_COMMIT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from rlm_jax.checkpoint import Checkpointer

    c = Checkpointer(sys.argv[1], max_to_keep=1)
    c.save(1, {"w": jnp.full((256, 256), 1.0)}, {"step": 1})
    c.wait()

    async def die(*args, **kwargs):  # preemption: the process dies just before the commit rename
        os._exit(17)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    c.save(2, {"w": jnp.full((256, 256), 2.0)}, {"step": 2})
    c.wait()
    os._exit(0)  # not reached
""")


def test_process_killed_during_save_keeps_last_good(tmp_path):
    """A real interrupted save: the process dies mid-commit. Step 1 (max_to_keep=1!) survives and is latest."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_COMMIT, str(tmp_path)], env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=hang_limit())
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert ck.unfinished_saves(tmp_path) == [f"2{ck.TMP_SUFFIX}"]  # it really was cut mid-save
    assert (tmp_path / "1").is_dir()

    c = ck.Checkpointer(tmp_path, max_to_keep=1)
    assert c.all_steps() == [1]
    state, meta = c.restore()
    assert meta == {"step": 1}
    np.testing.assert_array_equal(state["w"], np.full((256, 256), 1.0))
    c.close()


def test_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    c = ck.Checkpointer(empty)
    with pytest.raises(FileNotFoundError, match=str(empty)):
        c.restore()
    (empty / f"5{ck.TMP_SUFFIX}").mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished save"):
        c.restore()

    c.save(3, {"x": jnp.ones(2)}, {})
    c.wait()
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[3\]"):
        c.restore(4)
    with pytest.raises(ValueError, match="already has a checkpoint"):
        c.save(3, {"x": jnp.ones(2)}, {}, force=True)
    with pytest.raises(ValueError, match=f"cannot restore step 3 from {empty}"):
        c.restore(abstract_state={"y": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(TypeError, match="JSON"):
        c.save(9, {"x": jnp.ones(2)}, {"arr": np.ones(2)})
    c.close()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"{blocker / 'ckpt'} is not writable.*fix its permissions"):
        ck.Checkpointer(blocker / "ckpt")
    with pytest.raises(ValueError, match="max_to_keep=0"):
        ck.Checkpointer(tmp_path / "k", max_to_keep=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_fails_at_construction(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=f"{ro} is not writable"):
        ck.Checkpointer(ro)


def test_progress_file(tmp_path, monkeypatch):
    wd = tmp_path / "run"
    assert progress.read_progress(wd) == {} and not progress.is_done(wd, "sft")
    assert progress.phase_dir(wd, "sft") == wd / "sft"
    for bad in ("", "..", "a/b", "../x"):
        with pytest.raises(ValueError, match="plain name"):
            progress.phase_dir(wd, bad)

    progress.mark_done(wd, "sft", {"step": 100, "loss": 0.25}, is_primary=True)
    assert progress.is_done(wd, "sft") and not progress.is_done(wd, "value")
    progress.mark_done(wd, "value", {"step": 50}, is_primary=True)
    prog = progress.read_progress(wd)
    assert set(prog) == {"sft", "value"}
    assert prog["sft"]["info"] == {"step": 100, "loss": 0.25} and prog["sft"]["done"] is True
    assert os.listdir(wd) == ["progress.json"]  # no temp files left behind

    progress.mark_done(wd, "rl", {}, is_primary=False)  # non-primary processes never write
    assert not progress.is_done(wd, "rl")

    # A crash between writing the temp file and the rename leaves the previous progress intact.
    before = (wd / "progress.json").read_text()
    def crash(*a, **k):
        raise KeyboardInterrupt("preempted")
    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        progress.mark_done(wd, "rl", {}, is_primary=True)
    monkeypatch.undo()
    assert (wd / "progress.json").read_text() == before
    assert json.loads(before)["phases"].keys() == {"sft", "value"}

    with pytest.raises(TypeError, match="JSON"):
        progress.mark_done(wd, "rl", {"x": object()}, is_primary=True)
    (wd / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{wd / 'progress.json'} is corrupt"):
        progress.is_done(wd, "sft")
