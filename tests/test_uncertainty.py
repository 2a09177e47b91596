"""Token-level uncertainty (rlm_jax/uncertainty.py) against float64 numpy, and as decoding returns it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import decoding, uncertainty
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig


def numpy_stats(logits: np.ndarray) -> np.ndarray:
    """The definitions, in float64: entropy, varentropy (variance of -log p), Gini (1 - sum p^2)."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        surprisal = np.where(p > 0, -np.log(p), 0.0)
    h = (p * surprisal).sum(-1)
    var = (p * (surprisal - h[..., None]) ** 2).sum(-1)
    return np.stack([h, var, 1 - (p * p).sum(-1)], -1)


def test_token_stats_match_float64_on_random_distributions():
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.1, 8.0, size=(6, 5, 1))  # flat to peaked
    logits = rng.normal(size=(6, 5, 301)) * scales
    logits[0, 0, rng.choice(301, 250, replace=False)] = -np.inf  # a filtered distribution
    got = np.asarray(uncertainty.token_stats(jnp.asarray(logits, jnp.float32)))
    np.testing.assert_allclose(got, numpy_stats(logits), rtol=2e-4, atol=2e-5)
    assert np.all(np.isfinite(got))


def test_known_distributions():
    v = 64
    uniform = np.asarray(uncertainty.token_stats(jnp.zeros((1, v))))[0]
    np.testing.assert_allclose(uniform, [np.log(v), 0.0, 1 - 1 / v], atol=1e-5)
    certain = np.asarray(uncertainty.token_stats(jnp.full((1, v), -jnp.inf).at[0, 3].set(0.0)))[0]
    np.testing.assert_allclose(certain, [0.0, 0.0, 0.0], atol=1e-6)
    # two equal candidates and a negligible tail: H = log 2, and the surprisals barely vary
    two = np.asarray(uncertainty.token_stats(jnp.full((1, v), -30.0).at[0, :2].set(0.0)))[0]
    np.testing.assert_allclose(two, [np.log(2), 0.0, 0.5], atol=1e-4)


def test_step_summary_is_the_masked_mean_and_max():
    rng = np.random.default_rng(3)
    stats = rng.uniform(0, 3, size=(4, 2, 6, 3)).astype(np.float32)
    mask = rng.uniform(size=(4, 2, 6)) < 0.6
    mask[0, 0] = False  # an empty step
    out = uncertainty.step_summary(jnp.asarray(stats), jnp.asarray(mask))
    for j, name in enumerate(uncertainty.FIELDS):
        for idx in np.ndindex(4, 2):
            vals = stats[idx][mask[idx], j]
            want_mean, want_max = (vals.mean(), vals.max()) if len(vals) else (0.0, 0.0)
            assert float(out[f"{name}_mean"][idx]) == pytest.approx(want_mean, rel=1e-5, abs=1e-6)
            assert float(out[f"{name}_max"][idx]) == pytest.approx(want_max, rel=1e-6, abs=1e-6)


CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64)


@pytest.mark.parametrize("compact", [False, True])
def test_decode_returns_the_stats_of_the_distribution_each_token_was_drawn_from(compact):
    """Reference: one full forward pass over prompt + generated tokens; the stats of its logits at the
    position before each generated token. Zero after a row stopped; the tokens are those drawn without it."""
    params = transformer.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(3, 97, size=n)) for n in (5, 9, 3, 7)]
    tokens, mask = decoding.pad_prompts(prompts, 0, bucket=False)
    key, m = jax.random.key(5), 12
    kw = dict(max_new_tokens=m, temperature=1.0, stop_tokens=tuple(range(1, 13)), pad_id=0)  # ~1 in 8 tokens stops a row
    cache, logits = decoding.prefill(CFG, params, tokens, mask, m)
    decode = lambda **more: jax.jit(functools.partial(decoding.decode, CFG, compact=compact, smallest=2, **kw, **more))(
        params, cache, logits, key).out  # one program, not op by op
    with_stats, plain = decode(uncertainty=True), decode()
    np.testing.assert_array_equal(np.asarray(with_stats.tokens), np.asarray(plain.tokens))
    assert plain.uncertainty is None and with_stats.uncertainty.shape == (4, m, 3)
    lengths = np.asarray(with_stats.lengths)
    assert lengths.min() < m  # some row stopped early: the zeros after it are checked too
    for r in range(4):
        n = int(lengths[r])
        seq = np.concatenate([np.asarray(prompts[r]), np.asarray(with_stats.tokens[r, :n])])[None].astype(np.int32)
        full_logits, _, _ = transformer.forward(CFG, params, jnp.asarray(seq))
        want = numpy_stats(np.asarray(full_logits[0, len(prompts[r]) - 1:len(seq[0]) - 1]))
        got = np.asarray(with_stats.uncertainty[r])
        np.testing.assert_allclose(got[:n], want, rtol=1e-3, atol=1e-4)
        assert np.all(got[n:] == 0)


# ------------------------------------------------------------------ uncertainty-triggered branching

PEAKED = CFG.replace(init_std=1.0)  # entropies that differ from context to context


def _branch_spec(threshold, k=4, **kw):
    from rlm_jax.search.base import LMSpec
    return LMSpec(policy=PEAKED, step_id=1, eos_id=2, pad_id=0, num_slots=k, step_len=6, max_depth=3,
                  temperature=1.0, branch_entropy=threshold, **kw)


def test_a_context_branches_into_k_proposals_only_where_its_first_token_entropy_exceeds_the_threshold():
    """Reference: the float64 entropy of a full forward pass's next-token distribution at each prompt. Branched
    contexts get the K proposals the search draws without branching (same key, same noise); the others one
    greedy step (the argmax continuation of decoding.generate at temperature 0), their other slots empty."""
    from rlm_jax.search import paged
    params = transformer.init_params(PEAKED, jax.random.key(1))
    rng = np.random.default_rng(21)
    prompts = [list(rng.integers(3, 97, size=n)) for n in rng.integers(2, 10, size=12)]
    tokens, mask = decoding.pad_prompts(prompts, 0, length=10)
    entropy = []
    for p in prompts:
        logits, _, _ = transformer.forward(PEAKED, params, jnp.asarray([p], jnp.int32))
        entropy.append(numpy_stats(np.asarray(logits[0, -1]))[0])
    entropy = np.asarray(entropy)
    threshold = float(np.mean(np.sort(entropy)[8:10]))  # between the 9th and 10th: 3 of the 12 contexts branch
    branch = entropy > threshold
    assert 0 < branch.sum() < len(prompts)
    ctx = paged.prompt_context(PEAKED, params, jnp.asarray(tokens), jnp.asarray(mask))
    key, k = jax.random.key(3), 4
    generate = jax.jit(paged.generate_steps, static_argnums=(0, 4))  # one program, not op by op
    got, _, _ = generate(_branch_spec(threshold, k), params, ctx, key, k)
    everywhere, _, _ = generate(_branch_spec(0.0, k), params, ctx, key, k)
    greedy = decoding.generate_jit(PEAKED, params, tokens, mask, key, max_new_tokens=6, temperature=0.0,
                                   stop_tokens=(1, 2), pad_id=0)
    ok, length, toks = (np.asarray(x) for x in (got.ok, got.length, got.tokens))
    for r in range(len(prompts)):
        if branch[r]:
            np.testing.assert_array_equal(toks[r], np.asarray(everywhere.tokens[r]))
            np.testing.assert_array_equal(length[r], np.asarray(everywhere.length[r]))
        else:
            n = int(greedy.lengths[r])
            assert length[r, 0] == n and toks[r, 0, :n].tolist() == np.asarray(greedy.tokens[r, :n]).tolist()
            assert not ok[r, 1:].any() and (length[r, 1:] == 0).all()
    # The slots never decoded cost nothing: 21 of 48 rows live, so the compacting decode runs at 24 rows.
    assert float(got.cost.sum()) < float(everywhere.cost.sum())


@pytest.mark.slow
def test_mcts_with_branching_expands_one_child_under_a_confident_root():
    """A threshold above every entropy: each root has one valid proposal, so every simulation descends the
    single chain; below every entropy the search is the plain one (the same trees on the same key)."""
    from rlm_jax.search import lm, mcts
    params = transformer.init_params(PEAKED, jax.random.key(2))
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(3, 97, size=n)) for n in (4, 7, 5, 6)]
    tokens, mask = decoding.pad_prompts(prompts, 0, length=8)
    inputs = lm.search_inputs(params, None, tokens, mask)
    preset = mcts.preset("puct")
    ends = tuple(range(3, 30))  # ~1 token in 4 ends a step: most steps fit the 6 slots
    chain = lm.lm_mcts_jit(_branch_spec(1e6, step_ends=ends), inputs, jax.random.key(0), 4, preset)
    visits = np.asarray(chain.root_visits)
    assert (visits[:, 1:] == 0).all() and (visits[:, 0] == 4).sum() >= 3, visits
    plain = lm.lm_mcts_jit(_branch_spec(0.0, step_ends=ends), inputs, jax.random.key(0), 4, preset)
    tiny = lm.lm_mcts_jit(_branch_spec(1e-9, step_ends=ends), inputs, jax.random.key(0), 4, preset)
    assert (np.asarray(plain.root_visits)[:, 1:] > 0).any()
    np.testing.assert_array_equal(np.asarray(plain.root_visits), np.asarray(tiny.root_visits))
    np.testing.assert_array_equal(np.asarray(plain.visits), np.asarray(tiny.visits))
