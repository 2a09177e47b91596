"""Sampling without replacement (stochastic beam search) against the exact sequence probabilities."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import distinct_sampling
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig

# 5 tokens, 2 new tokens at most, token 4 stops: 21 possible outputs, enumerable.
CFG = ModelConfig(vocab_size=5, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  init_std=0.3, max_seq_len=16)
STOP, T, K = 4, 0.8, 3


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(3))


def _outputs():
    return [(STOP,)] + [(a, b) for a, b in itertools.product(range(4), range(5))]


def _exact(params, prompt, temperature):
    """{output: probability at `temperature`} and {output: log-prob at temperature 1}, by teacher forcing."""
    probs, logps = {}, {}
    for out in _outputs():
        seq = jnp.asarray([list(prompt) + list(out)])
        logits, _, _ = transformer.forward(CFG, params, seq)
        logits = np.asarray(logits[0, len(prompt) - 1:len(prompt) - 1 + len(out)], np.float64)
        lp_t = logits / temperature - np.logaddexp.reduce(logits / temperature, axis=-1, keepdims=True)
        lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        probs[out] = float(np.exp(sum(lp_t[i, t] for i, t in enumerate(out))))
        logps[out] = float(sum(lp[i, t] for i, t in enumerate(out)))
    return probs, logps


def _draws(params, prompt, n, key):
    tokens = jnp.asarray([prompt] * n)
    out = jax.jit(lambda key: distinct_sampling.generate_distinct(
        CFG, params, tokens, jnp.ones(tokens.shape, bool), key, k=K, max_new_tokens=2, temperature=T,
        stop_tokens=(STOP,), pad_id=0))(key)
    out = jax.device_get(out)
    seqs = [tuple(int(x) for x in row[:n_]) for row, n_ in zip(out.tokens, out.lengths)]
    return [seqs[i * K:(i + 1) * K] for i in range(n)], out


def test_draws_are_distinct_and_distributed_as_sampling_without_replacement(params):
    prompt = [1, 2, 3]
    probs, logps = _exact(params, prompt, T)
    assert abs(sum(probs.values()) - 1) < 1e-5
    n = 12000
    groups, out = _draws(params, prompt, n, jax.random.key(0))
    assert all(len(set(g)) == K for g in groups), "the k draws of a prompt repeat each other"
    # Slot 0 is one ordinary sample; (slot 0, slot 1) has p(x) p(y) / (1 - p(x)).
    first = {o: 0 for o in probs}
    pairs = {}
    for g in groups:
        first[g[0]] += 1
        pairs[tuple(g[:2])] = pairs.get(tuple(g[:2]), 0) + 1
    tv_first = 0.5 * sum(abs(first[o] / n - p) for o, p in probs.items())
    exact_pairs = {(x, y): probs[x] * probs[y] / (1 - probs[x]) for x in probs for y in probs if x != y}
    tv_pairs = 0.5 * sum(abs(pairs.get(xy, 0) / n - p) for xy, p in exact_pairs.items())
    assert tv_first < 0.02, tv_first
    assert tv_pairs < 0.05, tv_pairs
    # The test tells drawing with replacement apart: its pairs are p(x) p(y), repeats included.
    with_replacement = {(x, y): probs[x] * probs[y] for x in probs for y in probs}
    assert 0.5 * sum(abs(with_replacement[xy] - exact_pairs.get(xy, 0)) for xy in with_replacement) > 0.2
    # Log-probs are the model's at temperature 1, per token.
    for row, n_, lp in zip(out.tokens[:30], out.lengths[:30], out.logprobs[:30]):
        seq = tuple(int(x) for x in row[:n_])
        np.testing.assert_allclose(lp[:n_].sum(), logps[seq], atol=1e-4)
        assert np.all(lp[n_:] == 0)


def test_inactive_prompts_generate_nothing_and_stop_tokens_are_reported(params):
    tokens = jnp.asarray([[1, 2, 3], [3, 2, 1]])
    out = distinct_sampling.generate_distinct(CFG, params, tokens, jnp.ones(tokens.shape, bool),
                                              jax.random.key(1), k=K, max_new_tokens=2, temperature=T,
                                              stop_tokens=(STOP,), pad_id=0, active=jnp.asarray([False, True]))
    assert np.all(np.asarray(out.lengths[:K]) == 0) and np.all(np.asarray(out.stop_token[:K]) == -1)
    lengths, stops, toks = (np.asarray(x[K:]) for x in (out.lengths, out.stop_token, out.tokens))
    assert np.all(lengths >= 1)
    for length, stop, row in zip(lengths, stops, toks):
        assert (stop == STOP) == (row[length - 1] == STOP)
        assert stop == STOP or length == 2


def test_temperature_zero_is_rejected(params):
    tokens = jnp.asarray([[1, 2, 3]])
    with pytest.raises(ValueError, match="temperature > 0"):
        distinct_sampling.generate_distinct(CFG, params, tokens, jnp.ones(tokens.shape, bool), jax.random.key(0),
                                            k=2, max_new_tokens=2, temperature=0.0)
