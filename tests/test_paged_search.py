"""The tree as the paged KV cache (search/paged.py) against fresh full forward passes and the re-prefill search.

Exactness: every node of a real search's tree (all depths, variable step lengths, left-padded prompts of
random lengths) has, in its pool entry, the hidden state a fresh forward pass over its whole text
(prompt + root path) gives: its first-token logits and a separate value model's value match within
1e-5 in float32, for the Llama and Qwen2 (q/k/v bias) families. Equivalence: with the same key the
cached and the re-prefill searches build the same trees and pick the same answers (MCTS presets, beam,
best-of-N), while the cache computes fewer positions.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import decoding, distinct_sampling, evaluation
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import beam, dfs, lm, mcts, paged, sampling
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec
from rlm_jax.search.tree import NONE

PAD, STEP, EOS = 0, 1, 2
D, L, P, K = 3, 6, 10, 3
FAMILIES = {
    "llama": ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                         max_seq_len=64, init_std=0.5, dtype="float32"),
    "qwen2": ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=48,
                         max_seq_len=64, init_std=0.5, qkv_bias=True, dtype="float32"),
}
HEAD = heads.HeadConfig(kind="value", hidden=(8,))


def _models(cfg, seed):
    policy = transformer.init_params(cfg, jax.random.key(seed))
    if cfg.qkv_bias:  # random biases: zero ones would hide a bias that is applied at the wrong place
        keys = iter(jax.random.split(jax.random.key(seed + 100), 3))
        attn = policy["blocks"]["attn"]
        for name in ("q_bias", "k_bias", "v_bias"):
            attn[name] = 0.5 * jax.random.normal(next(keys), attn[name].shape)
    return policy, heads.init_value_params(cfg, HEAD, jax.random.key(seed + 1))


def _spec(cfg, **kw):
    base = dict(policy=cfg, value=cfg, head=HEAD, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=K, step_len=L,
                max_depth=D)
    return LMSpec(**{**base, **kw})


def _inputs(policy, value, seed, batch=4):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 16, size=rng.integers(1, P + 1))) for _ in range(batch)]
    return lm.search_inputs(policy, value, *decoding.pad_prompts(prompts, PAD, length=P))


def _search_with_pool(spec, inputs, key, sims, config):
    """lm_mcts without stripping the pool from the tree."""
    config = dataclasses.replace(config, max_depth=spec.max_depth)
    root_key, search_key = jax.random.split(key)
    root, inputs = lm.make_root(spec, inputs, root_key)
    return mcts.mcts(inputs, search_key, root, lm.LMExpand(spec), sims, config)


def _tool(tokens, mask):
    """A stand-in for a task's tool on token ids (tools.runner's contract): a finished step of 3 or more
    tokens before its terminator is rewritten, its body reversed without its first token (so a tool changes
    both the text and the length of a step); other rows are left alone."""
    tokens, mask = np.array(tokens), np.array(mask)
    for r in range(tokens.shape[0]):
        ids = tokens[r][mask[r]]
        if len(ids) >= 4 and ids[-1] in (STEP, EOS):
            new = np.concatenate([ids[1:-1][::-1], ids[-1:]])
            tokens[r], mask[r] = PAD, False
            tokens[r, :len(new)], mask[r, :len(new)] = new, True
    return tokens, mask


# Llama with a tool checks every node as Llama without one does (steps the tool leaves alone included):
# Llama without a tool runs in the slow suite.
@pytest.mark.parametrize("family,tool", [("llama", True), pytest.param("qwen2", False, marks=pytest.mark.slow),
                                         pytest.param("llama", False, marks=pytest.mark.slow)])
def test_every_node_of_a_cached_search_matches_a_fresh_forward_pass(family, tool):
    """tool: every step goes through a tool that rewrites it (`LMSpec.tool`): the pages and hidden states
    of rewritten steps are those of the rewritten text, and the generated tokens are the model's."""
    cfg = FAMILIES[family]
    policy, value = _models(cfg, seed=3)
    spec = _spec(cfg, tool=_tool if tool else None)
    inputs = _inputs(policy, value, seed=4)
    out = jax.jit(_search_with_pool, static_argnums=(0, 3, 4))(spec, inputs, jax.random.key(5), 12, mcts.preset("x1"))
    tree = jax.device_get(out.tree)
    emb = tree.embedding
    steps, steps_mask = jax.device_get(lm.path_steps(spec, out.tree, jnp.arange(tree.parent.shape[1])[None].repeat(4, 0)))
    @jax.jit
    def fresh_pass(tokens, mask):
        """Logits of the node's next token and its value, from its whole text read from scratch."""
        _, hidden, _ = transformer.forward(cfg, policy, tokens, mask=mask, compute_logits=False)
        last = mask.shape[1] - 1 - jnp.argmax(mask[0, ::-1])  # the node's last token
        return (transformer.lm_logits(cfg, policy, hidden[0, last]),
                ops.evaluate_value(spec, value, tokens, mask)[0])

    checked, depths, lengths = 0, set(), set()
    for b in range(4):
        for node in range(1, int(tree.num_nodes[b])):
            parent, slot = int(tree.parent[b, node]), int(tree.action_from_parent[b, node])
            if not emb["props_ok"][b, parent, slot]:
                continue  # a truncated step: a dead node, never evaluated
            tokens, mask = ops.context(inputs["prompt"][b:b + 1], inputs["prompt_mask"][b:b + 1],
                                       steps[b, node][None], steps_mask[b, node][None])
            fresh, fresh_value = fresh_pass(tokens, mask)
            cached = transformer.lm_logits(cfg, policy, emb["props_hidden"][b, parent, slot])
            np.testing.assert_allclose(cached, fresh, atol=1e-5, rtol=1e-5)
            if not emb["props_terminal"][b, parent, slot]:  # inference mode: the value model's value
                np.testing.assert_allclose(tree.raw_value[b, node], fresh_value, atol=1e-5)
            checked += 1
            depths.add(int(tree.depth[b, node]))
            lengths.add(int(emb["step_mask"][b, node].sum()))
    assert checked >= 20 and depths == {1, 2, 3} and len(lengths) >= 3, (checked, depths, lengths)
    if tool:  # the tool ran: rewritten steps are one token shorter than what the model sampled
        in_use = np.arange(emb["props_mask"].shape[1])[None] < tree.num_nodes[:, None]
        written = emb["props_mask"].sum(-1)[in_use]
        assert (emb["props_sampled"][in_use] == written + 1).sum() >= 10
        assert (emb["props_sampled"][in_use] >= written).all()
        np.testing.assert_array_equal(evaluation.mcts_tokens(out), (emb["props_sampled"] * in_use[..., None]).sum((1, 2)))


def _both_ways(family, seed, proposals, shared, search, eos_scale=1.0, **spec_kw):
    """search(spec, inputs) run with the re-prefill baseline and with the cache, same models and keys.
    eos_scale multiplies the policy's EOS logits (more of its random solutions end within D steps)."""
    cfg = FAMILIES[family]
    policy, value = _models(cfg, seed=seed)
    policy = dict(policy, lm_head=policy["lm_head"].at[:, EOS].multiply(eos_scale))
    if shared:
        value = {"head": value["head"]}
    inputs = _inputs(policy, value, seed=seed + 1)
    return [jax.device_get(search(_spec(cfg, kv_cache=kv, proposals=proposals, temperature=0.8, shared_trunk=shared,
                                        **spec_kw), inputs)) for kv in (False, True)]


# x1 with distinct proposals: in the slow suite (47 s); the default run keeps three presets and both proposal kinds.
@pytest.mark.parametrize("preset,proposals,shared,tool", [
    ("puct", "sample", False, False), pytest.param("x1", "distinct", False, False, marks=pytest.mark.slow),
    ("gumbel", "sample", True, False), pytest.param("muzero", "distinct", True, False, marks=pytest.mark.slow),
    pytest.param("puct", "sample", False, True, marks=pytest.mark.slow)])
def test_cached_mcts_builds_the_re_prefill_tree(preset, proposals, shared, tool):
    base, cached = _both_ways("qwen2", 7, proposals, shared, lambda spec, inputs: lm.lm_mcts_jit(
        spec, inputs, jax.random.key(9), 10, mcts.preset(preset, num_parallel=2)), tool=_tool if tool else None)
    np.testing.assert_array_equal(cached.tree.num_nodes, base.tree.num_nodes)
    np.testing.assert_array_equal(cached.visits, base.visits)
    np.testing.assert_array_equal(cached.tree.embedding["props"], base.tree.embedding["props"])
    np.testing.assert_array_equal(cached.best_node, base.best_node)
    np.testing.assert_array_equal(cached.action, base.action)
    np.testing.assert_allclose(cached.values, base.values, atol=1e-5)
    assert np.all(cached.cost < base.cost) and "props_k" not in cached.tree.embedding


# Slow suite (a minute per case): the default suite checks the cached rollouts against an independent
# reference in tests/test_search_strategies.py.
@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_cached_rollouts_sample_what_the_re_prefill_ones_sample(shared):
    """x1's rollouts (sampled, R = 2 per node, alpha 0.5, inference mode: scored by a separate value model
    reading the rollout's steps after its own pages, or by a shared-trunk head for free) decode from the
    node's pages: the same rollouts, values and trees as re-reading every context, fewer positions."""
    base, cached = _both_ways("qwen2", 21, "sample", shared, lambda spec, inputs: lm.lm_mcts_jit(
        spec, inputs, jax.random.key(23), 8, mcts.preset("x1")), eos_scale=2.0, num_rollouts=2)
    emb, want = cached.tree.embedding, base.tree.embedding
    np.testing.assert_array_equal(cached.tree.num_nodes, base.tree.num_nodes)
    np.testing.assert_array_equal(emb["rollout_tokens"], want["rollout_tokens"])
    np.testing.assert_allclose(emb["rollout_value"], want["rollout_value"], atol=1e-5)
    np.testing.assert_array_equal(cached.visits, base.visits)
    np.testing.assert_allclose(cached.values, base.values, atol=1e-5)
    np.testing.assert_array_equal(cached.best_node, base.best_node)
    in_use = np.arange(emb["rollout_value"].shape[1])[None] < cached.tree.num_nodes[:, None]
    rolled = emb["rollout_value"][in_use & ~cached.tree.terminal]
    assert len(rolled) >= 4 and (rolled > -1).sum() >= 3, rolled
    assert np.all(cached.cost < base.cost)


@pytest.mark.parametrize("proposals,shared", [("sample", False), pytest.param("distinct", True, marks=pytest.mark.slow),
                                              pytest.param("diverse", False, marks=pytest.mark.slow)])
def test_cached_beam_and_best_of_n_equal_the_re_prefill_ones(proposals, shared):
    base_out, cached_out = _both_ways("llama", 11, proposals, shared, lambda spec, inputs: (
        beam.beam_search_jit(spec, inputs, jax.random.key(13), width=3, expansions=2),
        sampling.best_of_n_jit(spec, inputs, jax.random.key(14), n=4)))
    for base, cached in zip(base_out, cached_out):
        np.testing.assert_array_equal(cached.steps, base.steps)
        np.testing.assert_array_equal(cached.generated_tokens, base.generated_tokens)
        np.testing.assert_allclose(cached.score, base.score, atol=1e-5)
        assert np.all(cached.cost < base.cost)


@pytest.mark.slow  # tests/test_tot_dfs.py runs the cached DFS against its own reference in the default run
def test_cached_tot_dfs_builds_the_re_prefill_tree():
    base, cached = _both_ways("llama", 3, "sample", False, lambda spec, inputs: dfs.tot_dfs_jit(
        spec, inputs, jax.random.key(19), nodes=16, threshold=-1.0))
    np.testing.assert_array_equal(cached.tree.num_nodes, base.tree.num_nodes)
    np.testing.assert_array_equal(cached.expanded_at, base.expanded_at)
    np.testing.assert_array_equal(cached.answer.steps, base.answer.steps)
    np.testing.assert_array_equal(cached.answer.generated_tokens, base.answer.generated_tokens)
    np.testing.assert_allclose(cached.tree.raw_value, base.tree.raw_value, atol=1e-5)
    assert np.all(cached.answer.cost < base.answer.cost) and (base.expanded_at >= 0).sum() > base.expanded_at.shape[0]


def test_void_simulations_cost_nothing_and_capacity_exhaustion_stays_a_state():
    """A search whose capacity is spent keeps running void simulations: with the cache they skip the
    models, so 40 simulations cost what the first few did."""
    cfg = FAMILIES["llama"]
    policy, value = _models(cfg, seed=15)
    inputs = _inputs(policy, value, seed=16)
    spec = _spec(cfg)
    costs = [jax.device_get(lm.lm_mcts_jit(spec, inputs, jax.random.key(17), s, mcts.preset("puct", capacity=4)).cost)
             for s in (3, 40)]
    np.testing.assert_array_equal(costs[0], costs[1])


def test_kv_bytes_counts_the_pool():
    cfg = FAMILIES["llama"]
    spec = _spec(cfg)
    per_token = 2 * 4 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    assert paged.kv_bytes(spec, capacity=9, prompt_len=P) == per_token * (P + 9 * K * L) + per_token * (P + 9 * L)
    assert paged.kv_bytes(_spec(cfg, shared_trunk=True), 9, P) == per_token * (P + 9 * K * L)
    with pytest.raises(ValueError, match="shared-trunk"):
        _spec(cfg, value=FAMILIES["qwen2"], shared_trunk=True)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (0.0, 0)])
def test_compacting_decode_samples_what_decode_samples_and_computes_less(temperature, top_k):
    """Finished rows leave the batch (halving it) without changing a single draw: tokens, log-probs, the
    cache pages and the last hidden states equal `decode`'s; the positions computed drop, and
    `operators.solutions_cost` replays them from the lengths alone."""
    cfg = FAMILIES["qwen2"]
    policy, _ = _models(cfg, seed=21)
    rng = np.random.default_rng(22)
    prompts = [list(rng.integers(3, 16, size=rng.integers(1, P + 1))) for _ in range(4)]
    ctx = paged.prompt_context(cfg, policy, *map(jnp.asarray, decoding.pad_prompts(prompts, PAD, length=P)))
    n, m = 8, 20  # 8 samples per prompt: 32 rows, stopping at EOS at varied lengths
    cache = transformer.init_cache(cfg, 4 * n, m).replace(next_pos=jnp.repeat(ctx.length, n))
    logits = jnp.repeat(transformer.lm_logits(cfg, policy, ctx.hidden), n, axis=0)
    args = dict(max_new_tokens=m, temperature=temperature, top_k=top_k, stop_tokens=(EOS,), pad_id=PAD,
                prefix=ctx.prefix, active=jnp.asarray(rng.random(4 * n) < 0.9))
    run = jax.jit(lambda f, c, lg, key: f(cfg, policy, c, lg, key, **args), static_argnums=0)
    full = run(decoding.decode, cache, logits, jax.random.key(23))
    compact = run(decoding.decode_compacting, cache, logits, jax.random.key(23))
    for a, b in [(full.out.tokens, compact.out.tokens), (full.out.lengths, compact.out.lengths),
                 (full.out.stop_token, compact.out.stop_token), (full.cache.mask, compact.cache.mask)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(compact.out.logprobs, full.out.logprobs, atol=1e-5)
    written = np.asarray(full.cache.mask)[None, :, :, None, None]
    np.testing.assert_allclose(np.where(written, compact.cache.k, 0), np.where(written, full.cache.k, 0), atol=1e-5)
    np.testing.assert_allclose(compact.last_hidden, full.last_hidden, atol=1e-5)
    lengths = np.asarray(full.out.lengths)
    assert len(set(lengths.tolist())) > 3 and int(compact.positions) < int(full.positions)
    spec = _spec(cfg, max_depth=4, step_len=5)  # context_len D*L = m
    replay = ops.solutions_cost(spec, prompt_len=0, n=n, out=compact.out)
    np.testing.assert_allclose(np.sum(replay), int(compact.positions))


def test_compacting_distinct_sampling_draws_the_same_steps():
    cfg = FAMILIES["llama"]
    policy, _ = _models(cfg, seed=24)
    rng = np.random.default_rng(25)
    prompts = [list(rng.integers(3, 16, size=rng.integers(1, P + 1))) for _ in range(8)]
    ctx = paged.prompt_context(cfg, policy, *map(jnp.asarray, decoding.pad_prompts(prompts, PAD, length=P)))
    k = 3
    cache = transformer.init_cache(cfg, 8 * k, L).replace(next_pos=jnp.repeat(ctx.length, k))
    logits = jnp.repeat(transformer.lm_logits(cfg, policy, ctx.hidden), k, axis=0)
    run = jax.jit(lambda compact, key: distinct_sampling.decode_distinct(
        cfg, policy, cache, logits, key, k=k, max_new_tokens=L, temperature=0.8, stop_tokens=(STEP, EOS),
        prefix=ctx.prefix, compact=compact), static_argnums=0)
    full, compact = run(False, jax.random.key(26)), run(True, jax.random.key(26))
    np.testing.assert_array_equal(compact.out.tokens, full.out.tokens)
    np.testing.assert_array_equal(compact.out.lengths, full.out.lengths)
    np.testing.assert_allclose(compact.last_hidden, full.last_hidden, atol=1e-5)
    assert int(compact.positions) <= int(full.positions)
