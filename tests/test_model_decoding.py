"""Transformer, KV cache, decoding and value heads: behaviour against independent recomputation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import decoding
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig

CFG = ModelConfig(vocab_size=97, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=96,
                  qkv_bias=True, init_std=0.3, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(7))


def _random_prompts(rng, n, lo=2, hi=12):
    return [list(rng.integers(1, CFG.vocab_size, size=rng.integers(lo, hi))) for _ in range(n)]


def test_padded_batch_equals_each_prompt_alone(params):
    rng = np.random.default_rng(0)
    prompts = _random_prompts(rng, 4)
    tokens, mask = decoding.pad_prompts(prompts, pad_id=0)
    logits, _, _ = transformer.forward(CFG, params, tokens, mask=mask)
    for i, p in enumerate(prompts):
        alone, _, _ = transformer.forward(CFG, params, jnp.asarray([p]))
        np.testing.assert_allclose(logits[i, -len(p):], alone[0], atol=1e-5)


def test_chunked_prefill_through_cache_equals_full_forward(params):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, CFG.vocab_size, size=(3, 13)))
    full, _, _ = transformer.forward(CFG, params, tokens)
    cache = transformer.init_cache(CFG, 3, 16)
    outs = []
    for lo, hi in [(0, 5), (5, 6), (6, 13)]:
        lg, _, cache = transformer.forward(CFG, params, tokens[:, lo:hi], cache=cache)
        outs.append(lg)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    assert int(cache.index) == 13 and list(np.asarray(cache.next_pos)) == [13, 13, 13]


_full_forward = jax.jit(lambda p, t, m: transformer.forward(CFG, p, t, mask=m)[0])


def _recompute_decode(params, prompt, n, stop):
    """Reference: no cache, the whole sequence re-run every step (left-padded to one fixed length
    so it compiles once), greedy."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        tokens, mask = decoding.pad_prompts([seq], pad_id=0, length=32)
        tok = int(jnp.argmax(_full_forward(params, tokens, mask)[0, -1]))
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def test_cached_greedy_decode_equals_recompute(params):
    rng = np.random.default_rng(2)
    prompts = _random_prompts(rng, 3)
    tokens, mask = decoding.pad_prompts(prompts, pad_id=0)
    # Stop on a token the model actually emits so per-sequence stopping is exercised.
    probe = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=16)
    stop = (int(probe.tokens[0, 5]),)
    out = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=16,
                                stop_tokens=stop)
    for i, p in enumerate(prompts):
        ref = _recompute_decode(params, p, 16, stop)
        n = int(out.lengths[i])
        assert list(np.asarray(out.tokens[i, :n])) == ref
        assert (int(out.stop_token[i]) == stop[0]) == (ref[-1] == stop[0])
    assert int(out.lengths[0]) <= 6  # the first sequence stops at (or before) the probed token


def test_logprobs_are_the_models_token_logprobs(params):
    rng = np.random.default_rng(3)
    prompt = list(rng.integers(1, CFG.vocab_size, size=6))
    tokens, mask = decoding.pad_prompts([prompt], pad_id=0, bucket=False)
    out = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(4), max_new_tokens=8,
                                temperature=0.7, top_k=20)
    seq = jnp.asarray([prompt + list(np.asarray(out.tokens[0]))])
    logits, _, _ = transformer.forward(CFG, params, seq)
    ref = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1], axis=-1)
    ref = jnp.take_along_axis(ref, seq[0, len(prompt):, None], axis=-1)[:, 0]
    np.testing.assert_allclose(out.logprobs[0], ref, atol=1e-4)


def test_sampling_filters():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 50)) * 3
    top5 = set(np.asarray(jax.lax.top_k(logits, 5)[1][0]).tolist())
    draws = jax.vmap(lambda k: decoding.sample_token(k, logits, 1.0, top_k=5))(jax.random.split(key, 200))
    assert set(np.asarray(draws[:, 0]).tolist()) <= top5
    # top_p tiny keeps only the argmax.
    draws = jax.vmap(lambda k: decoding.sample_token(k, logits, 1.0, top_p=1e-6))(jax.random.split(key, 50))
    assert (np.asarray(draws) == np.asarray(jnp.argmax(logits, -1))[None]).all()
    # Plain sampling follows the distribution (chi-square-ish check on a 4-way softmax).
    small = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]]))
    draws = jax.vmap(lambda k: decoding.sample_token(k, small, 1.0))(jax.random.split(key, 4000))[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_bf16_compute_close_to_f32(params):
    cfg16 = CFG.replace(dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, CFG.vocab_size, size=(2, 9)))
    a, _, _ = transformer.forward(CFG, params, tokens)
    b, _, _ = transformer.forward(cfg16, params, tokens)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


def test_config_errors():
    with pytest.raises(ValueError, match="does not divide d_model"):
        ModelConfig(vocab_size=10, d_model=30, num_layers=1, num_heads=4, num_kv_heads=4, mlp_dim=8)
    with pytest.raises(ValueError, match="must divide num_heads"):
        ModelConfig(vocab_size=10, d_model=32, num_layers=1, num_heads=4, num_kv_heads=3, mlp_dim=8)
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({**CFG.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="dtype"):
        CFG.replace(dtype="float8")


def test_prompt_longer_than_context_is_rejected(params):
    tokens, mask = decoding.pad_prompts([[1] * 100], pad_id=0, bucket=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        decoding.generate(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=64)


def test_tied_embeddings_have_no_lm_head():
    cfg = CFG.replace(tie_embeddings=True)
    p = transformer.init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p
    assert transformer.count_params(p) == cfg.num_params()
    assert transformer.count_params(transformer.init_params(CFG, jax.random.key(0))) == CFG.num_params()


@pytest.mark.parametrize("kind", heads.KINDS)
def test_heads_ranges_and_padding(params, kind):
    hc = heads.HeadConfig(kind=kind, hidden=(32,))
    vp = heads.init_value_params(CFG, hc, jax.random.key(1), trunk=params)
    # Scale the head up so outputs reach the ends of the range.
    vp["head"] = jax.tree.map(lambda x: x * 30, vp["head"])
    rng = np.random.default_rng(6)
    prompts = _random_prompts(rng, 5)
    tokens, mask = decoding.pad_prompts(prompts, pad_id=0)
    scores = heads.sequence_score(CFG, hc, vp, tokens, mask)
    lo = -1.0 if hc.signed else 0.0
    assert scores.shape == (5,) and bool(jnp.all((scores >= lo) & (scores <= 1.0)))
    for i, p in enumerate(prompts):
        t1, m1 = decoding.pad_prompts([p], pad_id=0, bucket=False)
        np.testing.assert_allclose(heads.sequence_score(CFG, hc, vp, t1, m1)[0], scores[i], atol=1e-5)


def test_prm_reads_at_step_tokens(params):
    hc = heads.HeadConfig(kind="prm", hidden=(16,))
    vp = heads.init_value_params(CFG, hc, jax.random.key(2), trunk=params)
    step_id = 5
    tokens, mask = decoding.pad_prompts([[1, 2, step_id, 3, 4, step_id, 6], [7, step_id, 8]], pad_id=0)
    scores, at = heads.step_scores(CFG, hc, vp, tokens, mask, step_id)
    assert at.sum(axis=1).tolist() == [2, 1]
    assert bool(jnp.all((scores >= 0) & (scores <= 1)))


def test_prompt_with_masked_holes_decodes_like_compact_prompt(params):
    rng = np.random.default_rng(8)
    prompt = list(rng.integers(1, CFG.vocab_size, size=9))
    compact, cmask = decoding.pad_prompts([prompt], pad_id=0, length=16)
    # Same real tokens with masked garbage slots inside and after them.
    holey = np.asarray(rng.integers(1, CFG.vocab_size, size=(1, 16)), np.int32)
    hmask = np.zeros((1, 16), bool)
    slots = [1, 2, 5, 6, 7, 9, 10, 11, 13]
    holey[0, slots] = prompt
    hmask[0, slots] = True
    a = decoding.generate_jit(CFG, params, compact, cmask, jax.random.key(0), max_new_tokens=10)
    b = decoding.generate_jit(CFG, params, holey, hmask, jax.random.key(0), max_new_tokens=10)
    assert np.asarray(a.tokens).tolist() == np.asarray(b.tokens).tolist()
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
