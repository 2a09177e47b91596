"""Sampling without replacement (stochastic beam search) against the exact sequence probabilities."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import decoding, distinct_sampling
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig

# 5 tokens, 3 new tokens at most, token 4 stops: 85 possible outputs, enumerable. Three tokens make the
# KV cache, reordered after every token, feed the later tokens' logits.
CFG = ModelConfig(vocab_size=5, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  init_std=0.3, max_seq_len=16)
STOP, T, K, NEW = 4, 0.8, 3, 3
PROMPTS = ([1, 2, 3], [3, 0, 2])  # interleaved row by row: a reorder that mixes prompts shows


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(3))


def _outputs():
    go = range(4)  # the tokens that do not stop
    return ([(STOP,)] + [(a, STOP) for a in go] + [(a, b, c) for a, b in itertools.product(go, go)
                                                   for c in range(5)])


def _exact(params, prompt, temperature):
    """{output: probability at `temperature`} and {output: log-prob at temperature 1}, by teacher forcing
    (one causal forward of every output, right-padded: padding after a token cannot change its logits)."""
    outs = _outputs()
    seqs = jnp.asarray([list(prompt) + list(o) + [0] * (NEW - len(o)) for o in outs])
    logits = np.asarray(transformer.forward(CFG, params, seqs)[0], np.float64)[:, len(prompt) - 1:-1]
    lp_t = logits / temperature - np.logaddexp.reduce(logits / temperature, axis=-1, keepdims=True)
    lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    probs = {o: float(np.exp(sum(lp_t[j, i, t] for i, t in enumerate(o)))) for j, o in enumerate(outs)}
    logps = {o: float(sum(lp[j, i, t] for i, t in enumerate(o))) for j, o in enumerate(outs)}
    return probs, logps


def _draws(params, n, key):
    """n rows, alternating PROMPTS -> (per row: its K outputs, in slot order), DecodeOutput [n*K]."""
    tokens = jnp.asarray([PROMPTS[i % 2] for i in range(n)])
    out = jax.jit(lambda key: distinct_sampling.generate_distinct(
        CFG, params, tokens, jnp.ones(tokens.shape, bool), key, k=K, max_new_tokens=NEW, temperature=T,
        stop_tokens=(STOP,), pad_id=0))(key)
    out = jax.device_get(out)
    seqs = [tuple(int(x) for x in row[:n_]) for row, n_ in zip(out.tokens, out.lengths)]
    return [seqs[i * K:(i + 1) * K] for i in range(n)], out


def _distances(params, groups):
    """Per prompt: (TV of slot 0 against p(x), TV of slot 1 against sum_x p(x) p(y) / (1 - p(x)), the second
    draw without replacement)."""
    result = []
    for j, prompt in enumerate(PROMPTS):
        probs, _ = _exact(params, prompt, T)
        mine = groups[j::2]
        first, second = {}, {}
        for g in mine:
            first[g[0]] = first.get(g[0], 0) + 1
            second[g[1]] = second.get(g[1], 0) + 1
        n = len(mine)
        exact_second = {y: sum(px * probs[y] / (1 - px) for x, px in probs.items() if x != y) for y in probs}
        result.append((0.5 * sum(abs(first.get(o, 0) / n - p) for o, p in probs.items()),
                       0.5 * sum(abs(second.get(y, 0) / n - p) for y, p in exact_second.items())))
    return result


def test_draws_are_distinct_and_distributed_as_sampling_without_replacement(params):
    for prompt in PROMPTS:
        probs, _ = _exact(params, prompt, T)
        assert abs(sum(probs.values()) - 1) < 1e-5
        # The test tells drawing with replacement apart: its second draw is distributed as p(y).
        exact_second = {y: sum(px * probs[y] / (1 - px) for x, px in probs.items() if x != y) for y in probs}
        assert 0.5 * sum(abs(exact_second[y] - probs[y]) for y in probs) > 0.04
    n = 16000
    groups, out = _draws(params, n, jax.random.key(0))
    assert all(len(set(g)) == K for g in groups), "the k draws of a prompt repeat each other"
    for tv_first, tv_second in _distances(params, groups):
        assert tv_first < 0.035, tv_first
        assert tv_second < 0.04, tv_second
    # Log-probs are the model's at temperature 1, per token, for the row's own prompt.
    logps = [_exact(params, p, T)[1] for p in PROMPTS]
    for r in range(0, 600, 7):  # rows of both prompts and every slot
        seq = tuple(int(x) for x in out.tokens[r][:out.lengths[r]])
        np.testing.assert_allclose(out.logprobs[r].sum(), logps[(r // K) % 2][seq], atol=1e-4)
        assert np.all(out.logprobs[r][out.lengths[r]:] == 0)


def test_without_the_truncation_the_draws_fail_the_same_check(params, monkeypatch):
    """The control: top-k of unconditioned perturbed log-probs is not sampling without replacement, and
    the thresholds above catch it."""
    monkeypatch.setattr(distinct_sampling, "truncated_gumbel", lambda parent_max, children: children)
    groups, _ = _draws(params, 16000, jax.random.key(0))
    assert any(tv_first >= 0.035 or tv_second >= 0.04 for tv_first, tv_second in _distances(params, groups))


def test_inactive_prompts_generate_nothing_and_leave_the_others_unchanged(params):
    tokens = jnp.asarray([PROMPTS[0], PROMPTS[1]])
    kw = dict(k=K, max_new_tokens=NEW, temperature=T, stop_tokens=(STOP,), pad_id=0)
    mask = jnp.ones(tokens.shape, bool)
    full = distinct_sampling.generate_distinct(CFG, params, tokens, mask, jax.random.key(1), **kw)
    part = distinct_sampling.generate_distinct(CFG, params, tokens, mask, jax.random.key(1),
                                               active=jnp.asarray([False, True]), **kw)
    assert np.all(np.asarray(part.lengths[:K]) == 0) and np.all(np.asarray(part.stop_token[:K]) == -1)
    assert np.all(np.asarray(part.tokens[:K]) == 0) and np.all(np.asarray(part.logprobs[:K]) == 0)
    for field in ("tokens", "lengths", "stop_token"):
        np.testing.assert_array_equal(getattr(part, field)[K:], getattr(full, field)[K:])
    np.testing.assert_allclose(part.logprobs[K:], full.logprobs[K:], atol=1e-6)
    lengths, stops, toks = (np.asarray(x[K:]) for x in (part.lengths, part.stop_token, part.tokens))
    assert np.all(lengths >= 1)
    for length, stop, row in zip(lengths, stops, toks):
        assert (stop == STOP) == (row[length - 1] == STOP)
        assert stop == STOP or length == NEW
    np.testing.assert_array_equal(part.lengths, decoding.output_lengths(
        part.tokens, part.stop_token, jnp.asarray([STOP]), jnp.repeat(jnp.asarray([False, True]), K)))


def test_bad_settings_are_rejected(params):
    tokens = jnp.asarray([PROMPTS[0]])
    mask = jnp.ones(tokens.shape, bool)
    with pytest.raises(ValueError, match="temperature > 0"):
        distinct_sampling.generate_distinct(CFG, params, tokens, mask, jax.random.key(0), k=2, max_new_tokens=2,
                                            temperature=0.0)
    with pytest.raises(ValueError, match="k <= vocabulary size"):
        distinct_sampling.generate_distinct(CFG, params, tokens, mask, jax.random.key(0), k=6, max_new_tokens=2,
                                            temperature=1.0)
