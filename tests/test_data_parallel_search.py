"""Data-parallel search: the problem batch split over ("data", "fsdp") on the 8 simulated CPU devices of
conftest.py gives exactly the single-device result with the same key, for MCTS, beam search and
best-of-N, in inference mode and (MCTS) in training mode with the host-callback verifier.

The reference is the same jitted strategy called on plain host arrays (one device, no mesh). Every leaf
of the output is compared: integer and boolean leaves (sampled tokens, tree structure, visit counts,
chosen actions) exactly, float leaves (values, priors, scores) to 1e-5.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlm_jax import decoding
from rlm_jax import parallel as ds
from rlm_jax import parallel as par
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import beam, lm, mcts, sampling
from rlm_jax.search.base import LMSpec

PAD, STEP, EOS = 0, 1, 2
# A random policy over 10 tokens: STEP / EOS are sampled often, so solutions end at varied depths.
CFG = ModelConfig(vocab_size=10, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32,
                  max_seq_len=64, init_std=0.5)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
B, PLEN = 8, 8
# compact=False: a batch split over devices decodes without compaction (RunConfig.lm_spec decides so from
# the mesh), so each device keeps its rows.
SPEC = LMSpec(policy=CFG, value=CFG, head=HEAD, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=3,
              step_len=6, max_depth=3, compact=False)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def host_inputs():
    policy = transformer.init_params(CFG, jax.random.key(1))
    value = heads.init_value_params(CFG, HEAD, jax.random.key(2))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, CFG.vocab_size, size=rng.integers(1, PLEN))) for _ in range(B)]
    t, m = decoding.pad_prompts(prompts, PAD, length=PLEN)
    return lm.search_inputs(jax.device_get(policy), jax.device_get(value), t, m)


def assert_same(ref, out, what):
    """Every leaf equal: ints / bools exactly, floats to 1e-5 (infinities must match)."""
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    out_leaves = jax.tree.leaves(out)
    assert len(ref_leaves) == len(out_leaves), what
    for (path, a), b in zip(ref_leaves, out_leaves):
        a, b = np.asarray(a), np.asarray(b)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def assert_batch_sharded(x, mesh):
    """x is split over the batch axes: each device holds B / (data*fsdp) rows, not the whole batch."""
    ways = ds.batch_ways(mesh)
    assert ways > 1
    assert {s.data.shape[0] for s in x.addressable_shards} == {x.shape[0] // ways}, x.sharding


@pytest.mark.slow  # the training-mode test below keeps sharded MCTS in the default run
def test_mcts_inference_mode_sharded_equals_single_device(host_inputs):
    """MuZero preset: root Dirichlet noise, temperature-1 acting and 2 parallel descents with virtual
    loss, so the sampled proposals, the noise and the acting draw all depend on the key."""
    config = mcts.muzero(num_parallel=2)
    ref = lm.lm_mcts_jit(SPEC, host_inputs, KEY, 4, config)
    mesh = par.make_mesh(data=2, fsdp=4, tensor=1)
    with ds.search_mesh(mesh):  # as evaluation / RL run it: pin_batch keeps the rows split
        out = lm.lm_mcts_jit(SPEC, ds.shard_search_inputs(host_inputs, mesh), KEY, 4, config)
    assert_batch_sharded(out.visits, mesh)
    assert_batch_sharded(out.tree.embedding["props"], mesh)
    assert_same(ref, out, "mcts")
    # Not vacuous: the trees grew and the problems' searches differ.
    nodes = np.asarray(out.tree.num_nodes)
    assert nodes.min() >= 2 and nodes.max() > 4 and len(set(nodes.tolist())) > 1
    assert len({np.asarray(out.tree.embedding["props"])[b].tobytes() for b in range(B)}) == B
    # ... and a different key gives a different search (the comparison would notice a wrong stream).
    other = lm.lm_mcts_jit(SPEC, host_inputs, jax.random.key(8), 4, config)
    assert not np.array_equal(np.asarray(other.tree.embedding["props"]), np.asarray(ref.tree.embedding["props"]))


def test_mcts_training_mode_verifier_callback_sharded(host_inputs):
    """The verifier is a jax.pure_callback: it works sharded, called once per evaluation with the whole
    global batch (XLA runs it on the mesh's first device), so the result equals the unsharded one."""
    calls = []

    def verifier(problem_index, steps, mask):
        calls.append(problem_index.copy())
        # Deterministic, depends on the problem and the solution tokens.
        return np.where((problem_index + np.sum(np.where(mask, steps, 0), axis=(1, 2))) % 3 == 0, 1.0, -1.0)

    spec = dataclasses.replace(SPEC, verifier=verifier)
    config = mcts.x1()
    ref = lm.lm_mcts_jit(spec, host_inputs, KEY, 3, config)
    ref_calls, calls[:] = list(calls), []
    mesh = par.make_mesh(data=2, fsdp=4, tensor=1)
    with ds.search_mesh(mesh):  # as evaluation / RL run it: pin_batch keeps the rows split
        out = lm.lm_mcts_jit(spec, ds.shard_search_inputs(host_inputs, mesh), KEY, 3, config)
    assert_same(ref, out, "mcts_x1_verifier")
    assert len(calls) == len(ref_calls) >= 2  # the root evaluation + one per simulation
    for got, want in zip(calls, ref_calls):
        np.testing.assert_array_equal(got, want)  # same global problem indices, in one call
    assert set(np.concatenate(calls).tolist()) == set(range(B))
    assert np.any(np.asarray(out.tree.terminal)), "no terminal node: the verifier scored nothing"


def test_beam_search_sharded_equals_single_device(host_inputs):
    ref = beam.beam_search_jit(SPEC, host_inputs, KEY, width=2, expansions=2)
    mesh = par.make_mesh(data=2, fsdp=4, tensor=1)
    with ds.search_mesh(mesh):  # as evaluation / RL run it: pin_batch keeps the rows split
        out = beam.beam_search_jit(SPEC, ds.shard_search_inputs(host_inputs, mesh), KEY, width=2, expansions=2)
    assert_batch_sharded(out.steps, mesh)
    assert_same(ref, out, "beam")
    assert np.asarray(out.generated_tokens).min() > 0


def test_best_of_n_sharded_params_equals_single_device(host_inputs):
    """Best-of-N with the models FSDP- and tensor-sharded (parallel.param_shardings) on a 2x2x2 mesh:
    the batch is split 4 ways, weights over fsdp and tensor; same answers and scores."""
    ref = sampling.best_of_n_jit(SPEC, host_inputs, KEY, n=3, scorer="value")
    mesh = par.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = par.param_shardings(CFG, mesh)
    inputs = ds.shard_search_inputs(host_inputs, mesh, policy_shardings=p_sh,
                                    value_shardings={"trunk": p_sh, "head": par.replicated(mesh)})
    q = inputs["policy"]["blocks"]["attn"]["q_proj"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)  # really sharded
    with ds.search_mesh(mesh):  # as evaluation / RL run it: pin_batch keeps the rows split
        out = sampling.best_of_n_jit(SPEC, inputs, KEY, n=3, scorer="value")
    assert_batch_sharded(out.steps, mesh)
    assert_same(ref, out, "best_of_n")


@pytest.mark.parametrize("partitionable", [True, False])
def test_threefry_draws_do_not_depend_on_sharding(partitionable):
    """Why the sharded searches match: in either threefry mode, the same key gives the same draws for
    a sharded and an unsharded batch; the two modes give different draws (so runs compared must use
    the same setting)."""
    mesh = par.make_mesh(data=2, fsdp=4, tensor=1)
    logits = jnp.zeros((16, 5))
    draw = jax.jit(lambda k, x: (jax.random.categorical(k, x), x + jax.random.normal(k, x.shape)))
    with jax.threefry_partitionable(partitionable):
        ref = jax.device_get(draw(KEY, logits))
        got = draw(KEY, jax.device_put(logits, par.data_sharding(mesh)))
        assert_batch_sharded(got[1], mesh)
        assert_same(ref, got, "draws")
    with jax.threefry_partitionable(not partitionable):
        other = jax.device_get(draw(KEY, logits))
    assert not np.array_equal(other[1], ref[1])


def test_batch_helpers_and_errors(host_inputs):
    mesh = par.make_mesh(data=2, fsdp=2, tensor=2)
    assert ds.batch_ways(mesh) == 4
    assert ds.process_batch_slice(8, mesh) == slice(0, 8)  # one process: every row
    with pytest.raises(ValueError, match="multiple of 4"):
        ds.process_batch_slice(6, mesh)
    few = {k: (np.asarray(v)[:5] if k in ds.BATCH_KEYS else v) for k, v in host_inputs.items()}
    with pytest.raises(ValueError, match="multiple of 4"):
        ds.shard_search_inputs(few, mesh)
    padded, real = ds.pad_batch(few, 4)
    assert real == 5 and padded["prompt"].shape == (8, PLEN)
    np.testing.assert_array_equal(padded["prompt"][5:], np.repeat(few["prompt"][4:5], 3, axis=0))
    np.testing.assert_array_equal(padded["problem_index"], [0, 1, 2, 3, 4, 4, 4, 4])
    with pytest.raises(KeyError, match="search_inputs"):
        ds.shard_search_inputs({"prompt": few["prompt"]}, mesh)
    # replicate: a typed key and arrays land on every device of the mesh.
    rep = ds.replicate({"key": KEY, "x": np.arange(3)}, mesh)
    assert rep["key"].sharding == NamedSharding(mesh, P()) and len(rep["x"].addressable_shards) == 8
    np.testing.assert_array_equal(jax.random.key_data(rep["key"]), jax.random.key_data(KEY))
