"""Meshes, sharding rules, and sharded == single-device for the forward pass and an adamw train step.

Runs on the 8 simulated CPU devices of conftest.py.
"""
import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from rlm_jax import multihost
from rlm_jax import parallel as par
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import steps, trainer
from limits import hang_limit

CFG = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
B, T = 8, 16
KEY = jax.random.PRNGKey(0)
TOL = dict(atol=1e-5, rtol=1e-5)
SEEDS = (0, 1)  # fixed batch seeds: a failure reproduces


def _optimizer():
    # Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 it is ill-conditioned for
    # the many |g| ~ 1e-8 entries, where a different (sharded) reduction order legitimately moves g by
    # ~1e-8 and the update by ~lr. eps=1e-3 bounds that sensitivity (lr/eps = 10) without hiding bugs.
    return optax.adamw(learning_rate=1e-2, eps=1e-3, weight_decay=0.1)


def _make_batch(seed):
    """Random tokens [B, T], left-padded: every row a different number of real tokens (1 to T)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([T, 1, 2, 5, 9, 12, 15, 7])
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
    loss_mask = mask & (rng.random((B, T)) < 0.7)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


@pytest.fixture(scope="module", params=SEEDS, ids=lambda s: f"seed{s}")
def batch(request):
    return _make_batch(request.param)


@pytest.fixture(scope="module")
def ref_step():
    return steps.make_train_step(CFG, _optimizer())


@pytest.fixture(scope="module")
def reference(batch, ref_step):
    """Single-device results (device 0, no shardings)."""
    params = transformer.init_params(CFG, KEY)
    logits, hidden, _ = jax.jit(lambda p, t, m: transformer.forward(CFG, p, t, mask=m))(
        params, batch["tokens"], batch["mask"])
    copy = jax.tree.map(jnp.copy, params)  # the step donates its inputs
    new_params, new_opt, metrics = ref_step(copy, _optimizer().init(copy), batch)
    return dict(params=params, logits=logits, hidden=hidden, new_params=new_params, new_opt=new_opt,
                metrics=metrics)


# ----------------------------------------------------------------------------------------------- meshes

def test_conftest_appends_device_count_to_existing_xla_flags():
    """An XLA_FLAGS already set in the environment keeps its flags and still gets the 8 devices."""
    code = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import conftest  # noqa: F401  (sets XLA_FLAGS before jax is imported)
        import jax
        print(jax.device_count(), os.environ["XLA_FLAGS"])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_fast_math=false", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=hang_limit())
    assert out.returncode == 0, out.stderr[-2000:]
    count, flags = out.stdout.split(maxsplit=1)
    assert int(count) == 8, out.stdout
    assert "--xla_cpu_enable_fast_math=false" in flags, flags


def test_make_mesh_resolves_minus_one_and_uses_auto_axes():
    mesh = par.make_mesh(2, -1, 1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(par.MeshConfig(data=-1, fsdp=2, tensor=2).make().shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    sub = par.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    assert sub.devices.size == 4


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 1), "needs 3 devices but 8 are available"),
    ((2, 2, 4), "needs 16 devices but 8 are available"),
    ((3, -1, 1), "does not divide the 8 available devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((0, 8, 1), "must be >= 1"),
    ((2, -2, 2), "must be >= 1"),
])
def test_bad_mesh_raises_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        par.make_mesh(*shape)


# ------------------------------------------------------------------------------------------------ rules

def test_logical_to_spec_rules():
    mesh = par.make_mesh(1, 2, 4)
    rules = par.DEFAULT_RULES
    # kv_heads=2 cannot be split 4 ways: replicated over tensor, while heads=4 is split
    assert par.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), rules, mesh, (2, 64, 2, 16)) \
        == P(None, "fsdp", None, None)
    assert par.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules, mesh, (2, 64, 4, 16)) \
        == P(None, "fsdp", "tensor", None)
    # a mesh axis already used by an earlier dimension is dropped (batch took fsdp)
    assert par.logical_to_spec(("batch", "length", "embed"), rules, mesh) == P(("data", "fsdp"), None, None)
    # several mesh axes for one name: each kept only if the product still divides
    mesh2 = par.make_mesh(2, 4, 1)
    assert par.logical_to_spec(("batch",), rules, mesh2, (8,)) == P(("data", "fsdp"))
    assert par.logical_to_spec(("batch",), rules, mesh2, (6,)) == P("data")
    assert par.logical_to_spec(("batch",), rules, mesh2, (4,)) == P("data")
    assert par.logical_to_spec(("batch",), rules, par.make_mesh(4, 2, 1), (2,)) == P("fsdp")
    # overrides
    assert par.logical_to_spec(("vocab", "embed"), par.with_rules(rules, embed=None), mesh, (256, 64)) \
        == P("tensor", None)
    with pytest.raises(KeyError, match="'experts' has no sharding rule"):
        par.logical_to_spec(("experts",), rules, mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'model'"):
        par.logical_to_spec(("embed",), par.with_rules(rules, embed="model"), mesh)
    with pytest.raises(ValueError, match="one name per dimension"):
        par.logical_to_spec(("embed",), rules, mesh, (2, 64))


def test_opt_state_shardings_follow_params_and_replicate_the_rest():
    mesh = par.make_mesh(1, 2, 4)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    sh = trainer.opt_state_shardings(opt, CFG, mesh)
    p_sh = par.param_shardings(CFG, mesh)
    adam = sh[1][0]
    assert jax.tree.map(lambda s: s.spec, adam.mu) == jax.tree.map(lambda s: s.spec, p_sh)
    assert jax.tree.map(lambda s: s.spec, adam.nu) == jax.tree.map(lambda s: s.spec, p_sh)
    assert adam.count.spec == P()


def test_shard_batch_rejects_indivisible_batch():
    mesh = par.make_mesh(2, 4, 1)
    bad = {"tokens": np.zeros((6, T), np.int32)}
    with pytest.raises(ValueError, match=r"\['tokens'\].*must be a multiple of 8"):
        par.shard_batch(bad, mesh)


# --------------------------------------------------------------------------------- sharded == unsharded

# Expected specs, written out by hand from the rules (so a change in logical_to_spec shows up here):
# embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; layers, head_dim -> None; kv_heads=2 is
# replicated when tensor=4 does not divide it.
def _expected_specs(mesh_shape):
    kv = "tensor" if 2 % mesh_shape[2] == 0 else None
    return {
        ("embed",): P("tensor", "fsdp"),
        ("lm_head",): P("fsdp", "tensor"),
        ("final_norm", "scale"): P("fsdp"),
        ("blocks", "attn_norm", "scale"): P(None, "fsdp"),
        ("blocks", "attn", "q_proj"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "k_proj"): P(None, "fsdp", kv, None),
        ("blocks", "attn", "v_proj"): P(None, "fsdp", kv, None),
        ("blocks", "attn", "o_proj"): P(None, "tensor", None, "fsdp"),
        ("blocks", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "up_proj"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
        ("blocks", "mlp_norm", "scale"): P(None, "fsdp"),
    }


# Per-device shard shapes of a few weights, by hand: q_proj [2, 64, 4, 16], k_proj [2, 64, 2, 16],
# embed [256, 64].
EXPECTED_SHARD_SHAPES = {
    (8, 1, 1): {"q": (2, 64, 4, 16), "k": (2, 64, 2, 16), "embed": (256, 64)},
    (2, 4, 1): {"q": (2, 16, 4, 16), "k": (2, 16, 2, 16), "embed": (256, 16)},
    (2, 2, 2): {"q": (2, 32, 2, 16), "k": (2, 32, 1, 16), "embed": (128, 32)},
    (1, 2, 4): {"q": (2, 32, 1, 16), "k": (2, 32, 2, 16), "embed": (64, 32)},
}


def _flat(tree):
    return {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_sharded_as_rules_say(params, mesh, mesh_shape):
    flat = _flat(params)
    expected = _expected_specs(mesh_shape)
    assert set(flat) == set(expected)
    for path, x in flat.items():
        spec = expected[path]
        assert x.sharding.mesh.shape == mesh.shape, path
        got = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        assert got == tuple(spec), (path, x.sharding.spec)
        # every device holds exactly its slice: dim / product of the mesh axes sharding it
        want = tuple(d // math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ()))
                     for d, s in zip(x.shape, tuple(spec)))
        shards = x.addressable_shards
        assert len(shards) == 8, path
        assert {s.data.shape for s in shards} == {want}, (path, want)
    hand = EXPECTED_SHARD_SHAPES[mesh_shape]
    assert flat[("blocks", "attn", "q_proj")].addressable_shards[0].data.shape == hand["q"]
    assert flat[("blocks", "attn", "k_proj")].addressable_shards[0].data.shape == hand["k"]
    assert flat[("embed",)].addressable_shards[0].data.shape == hand["embed"]


def _assert_trees_close(got, want, **tol):
    got, want = _flat(got), _flat(want)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k), **tol)


@functools.lru_cache(maxsize=None)
def _sharded_fns(mesh_shape):
    """(mesh, jitted forward, jitted train step), built once per mesh: every seed reuses one compilation."""
    mesh = par.make_mesh(*mesh_shape)
    return mesh, par.jit_forward(CFG, mesh), trainer.jit_train_step(CFG, mesh, _optimizer())


@pytest.mark.parametrize("mesh_shape", list(EXPECTED_SHARD_SHAPES), ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_and_train_step_match_single_device(mesh_shape, batch, reference):
    mesh, forward, step = _sharded_fns(mesh_shape)
    opt = _optimizer()

    # sharded init: same values as the unsharded init, laid out as the rules say
    params = par.init_sharded_params(CFG, KEY, mesh)
    _check_sharded_as_rules_say(params, mesh, mesh_shape)
    _assert_trees_close(params, reference["params"], atol=1e-7, rtol=0)

    sbatch = par.shard_batch(batch, mesh)
    assert sbatch["tokens"].sharding.spec == P(("data", "fsdp"))

    logits, hidden = forward(params, sbatch["tokens"], sbatch["mask"])
    assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference["logits"]), **TOL)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(reference["hidden"]), **TOL)

    opt_state = trainer.init_opt_state(opt, params, trainer.opt_state_shardings(opt, CFG, mesh))
    new_params, new_opt, metrics = step(params, opt_state, sbatch)

    assert params["embed"].is_deleted() and opt_state[0].mu["embed"].is_deleted()  # donated
    for k in ("loss", "accuracy", "num_tokens", "grad_norm"):
        np.testing.assert_allclose(float(metrics[k]), float(reference["metrics"][k]), err_msg=k, **TOL)
    _assert_trees_close(new_params, reference["new_params"], **TOL)
    _assert_trees_close(new_opt[0].mu, reference["new_opt"][0].mu, **TOL)  # = 0.1 * grads
    _assert_trees_close(new_opt[0].nu, reference["new_opt"][0].nu, **TOL)
    # the step really moved the params (so the comparison above is not vacuous)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(reference["new_params"]), jax.tree.leaves(reference["params"])))
    assert moved > 1e-3

    # out shardings are preserved: params and adam moments stay where the rules put them
    _check_sharded_as_rules_say(new_params, mesh, mesh_shape)
    _check_sharded_as_rules_say(new_opt[0].mu, mesh, mesh_shape)
    _check_sharded_as_rules_say(new_opt[0].nu, mesh, mesh_shape)
    assert new_opt[0].count.sharding.spec == P()


# ---------------------------------------------------------------------------------------- train step

def test_next_token_loss_matches_hand_computation(batch):
    params = transformer.init_params(CFG, KEY)
    loss, metrics = jax.jit(lambda p, b: steps.next_token_loss(CFG, p, b))(params, batch)
    logits = np.asarray(transformer.forward(CFG, params, batch["tokens"], mask=batch["mask"])[0], np.float64)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            # target t counts when selected and real, and predicted from a real token
            if batch["loss_mask"][b, t] and batch["mask"][b, t] and batch["mask"][b, t - 1]:
                row = logits[b, t - 1]
                total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[batch["tokens"][b, t]]
                count += 1
    assert count > 0 and float(metrics["num_tokens"]) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    # the length-1 row has no target; no counted token at all gives 0, not NaN
    empty = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    assert float(steps.next_token_loss(CFG, params, empty)[0]) == 0.0


def test_train_step_reduces_loss(batch, ref_step):
    opt = _optimizer()
    params = transformer.init_params(CFG, KEY)
    opt_state = opt.init(params)
    losses = []
    for _ in range(5):
        params, opt_state, metrics = ref_step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------------------------------- multi-host

def test_initialize_distributed_is_a_no_op_for_a_single_process():
    assert multihost.initialize_distributed(num_processes=1) is False  # decided before touching jax
    # The rest needs a fresh process: jax.distributed.initialize must come before any backend use.
    code = textwrap.dedent("""
        import jax
        from rlm_jax import multihost
        assert multihost.initialize_distributed() is False  # no cluster detected on this machine
        assert not jax.distributed.is_initialized()
        try:
            multihost.initialize_distributed(num_processes=2)  # no coordinator, no process id
        except ValueError as e:
            assert "pass all three" in str(e), e
        else:
            raise AssertionError("expected a ValueError")
        assert jax.device_count() >= 1
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=hang_limit())
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
