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


@pytest.mark.parametrize("top_p, kept", [(0.5, [2, 3]), (0.75, [1, 2, 3])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    """On probabilities [0.1, 0.2, 0.3, 0.4] nucleus sampling keeps the fewest most-likely tokens whose
    mass reaches top_p ({3, 2}: 0.7 >= 0.5; {3, 2, 1}: 0.9 >= 0.75) and renormalises over them."""
    probs = np.asarray([0.1, 0.2, 0.3, 0.4])
    logits = jnp.log(jnp.asarray(probs[None], jnp.float32))
    n = 4000
    draws = jax.vmap(lambda k: decoding.sample_token(k, logits, 1.0, top_p=top_p))(
        jax.random.split(jax.random.key(1), n))[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=4) / n
    want = np.zeros(4)
    want[kept] = probs[kept] / probs[kept].sum()
    assert set(np.flatnonzero(freq)) == set(kept)  # exactly the kept set is ever drawn
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_two_stop_tokens_report_which_token_stopped_each_row(params):
    """Stop on a step delimiter and an EOS: row 0 hits the delimiter, row 1 the EOS, row 2 neither. The
    expectation comes from an unstopped greedy run (stopping does not change the tokens before it)."""
    tokens, mask = decoding.pad_prompts(_random_prompts(np.random.default_rng(9), 3), pad_id=0)
    free = np.asarray(decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=12).tokens)
    step_id, eos_id = int(free[0, 3]), int(free[1, 1])
    expected = []  # (stop token or -1, length) by a plain scan of the unstopped tokens
    for row in free.tolist():
        hits = [i for i, tok in enumerate(row) if tok in (step_id, eos_id)]
        expected.append((row[hits[0]], hits[0] + 1) if hits else (-1, len(row)))
    assert [e[0] for e in expected] == [step_id, eos_id, -1], "pick other probe positions"  # all three outcomes

    out = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=12,
                                stop_tokens=[step_id, eos_id], pad_id=0)  # a list: made a static tuple
    assert np.asarray(out.stop_token).tolist() == [e[0] for e in expected]
    assert np.asarray(out.lengths).tolist() == [e[1] for e in expected]
    for i, (_, n) in enumerate(expected):
        assert np.asarray(out.tokens[i, :n]).tolist() == free[i, :n].tolist()
        assert (np.asarray(out.tokens[i, n:]) == 0).all() and (np.asarray(out.logprobs[i, n:]) == 0).all()
    again = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=12,
                                  stop_tokens=np.asarray([step_id, eos_id]), pad_id=0)  # numpy ids work too
    assert np.asarray(again.tokens).tolist() == np.asarray(out.tokens).tolist()


def test_inactive_rows_generate_nothing_and_leave_the_others_unchanged(params):
    tokens, mask = decoding.pad_prompts(_random_prompts(np.random.default_rng(4), 4), pad_id=0)
    kw = dict(max_new_tokens=6, temperature=1.0, stop_tokens=(5,), pad_id=0)
    full = decoding.generate(CFG, params, tokens, mask, jax.random.key(2), **kw)
    active = jnp.asarray([True, False, True, False])
    part = decoding.generate(CFG, params, tokens, mask, jax.random.key(2), active=active, **kw)
    for i, on in enumerate(np.asarray(active)):
        if on:
            for field in ("tokens", "lengths", "stop_token"):
                np.testing.assert_array_equal(getattr(part, field)[i], getattr(full, field)[i])
            np.testing.assert_allclose(part.logprobs[i], full.logprobs[i], atol=1e-5)
        else:
            assert int(part.lengths[i]) == 0 and int(part.stop_token[i]) == -1
            assert (np.asarray(part.tokens[i]) == 0).all() and (np.asarray(part.logprobs[i]) == 0).all()


def test_generate_jit_lower_compiles_ahead_of_time(params):
    tokens, mask = decoding.pad_prompts([[3, 4, 5]], pad_id=0)
    compiled = decoding.generate_jit.lower(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=4,
                                           stop_tokens=[5]).compile()
    out = compiled(params, tokens, mask, jax.random.key(0))
    ref = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=4, stop_tokens=(5,))
    assert np.asarray(out.tokens).tolist() == np.asarray(ref.tokens).tolist()


def test_traced_sampling_settings_raise_a_clear_type_error(params):
    logits = jnp.zeros((2, 5))
    with pytest.raises(TypeError, match="temperature must be a static Python number"):
        jax.jit(lambda t: decoding.sample_token(jax.random.key(0), logits, t))(0.7)
    with pytest.raises(TypeError, match="top_p must be a static Python number"):
        jax.jit(lambda p: decoding.sample_token(jax.random.key(0), logits, 1.0, top_p=p))(0.5)
    tokens, mask = decoding.pad_prompts([[3, 4, 5]], pad_id=0)
    with pytest.raises(TypeError, match="temperature must be a static Python number"):
        jax.jit(lambda t: decoding.generate(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=2,
                                            temperature=t))(0.7)


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


def test_context_check_counts_padding_and_the_bucket_is_capped(params):
    """40 real tokens + 70 new fit max_seq_len=128; the power-of-two bucket (64) does not, so
    pad_prompts caps the bucket at max_seq_len - max_new_tokens = 58 (never below the real length)."""
    new = 70
    room = CFG.max_seq_len - new
    prompt = list(range(1, 41))
    tokens, mask = decoding.pad_prompts([prompt], pad_id=0)
    assert tokens.shape == (1, 64)
    with pytest.raises(ValueError, match=r"prompts padded to 64 slots \+ 70 new tokens = 134 exceeds the model's "
                                         r"context \(max_seq_len=128\).*max_length=58"):
        decoding.generate(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=new)
    tokens, mask = decoding.pad_prompts([prompt, prompt[:5]], pad_id=0, max_length=room)
    assert tokens.shape == (2, room) and mask.sum(1).tolist() == [40, 5]
    out = decoding.generate_jit(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=new)
    assert out.tokens.shape == (2, new) and np.asarray(out.lengths).tolist() == [new, new]
    # the cap never cuts a prompt: a 60-token prompt pads to 60 and is then rejected by its real width
    assert decoding.bucket_length(60, maximum=room) == 60 and decoding.bucket_length(5, maximum=room) == 8
    tokens, mask = decoding.pad_prompts([list(range(1, 61))], pad_id=0, max_length=room)
    with pytest.raises(ValueError, match="prompts padded to 60 slots"):
        decoding.generate(CFG, params, tokens, mask, jax.random.key(0), max_new_tokens=new)
    with pytest.raises(ValueError, match="max_new_tokens=128 leaves no room for a prompt"):
        decoding.generate(CFG, params, tokens[:, :1], mask[:, :1], jax.random.key(0), max_new_tokens=128)


def test_forward_and_cache_reject_chunks_that_do_not_fit(params):
    with pytest.raises(ValueError, match=r"a chunk of 129 tokens exceeds the model's context \(max_seq_len=128\)"):
        transformer.forward(CFG, params, jnp.ones((1, 129), jnp.int32))
    for size in (0, 129):
        with pytest.raises(ValueError, match=f"init_cache: size={size} slots must be in \\[1, max_seq_len=128\\]"):
            transformer.init_cache(CFG, 1, size)
    chunk = jnp.ones((1, 10), jnp.int32)
    with pytest.raises(ValueError, match="a chunk of 10 tokens does not fit a cache of 8 slots"):
        transformer.forward(CFG, params, chunk, cache=transformer.init_cache(CFG, 1, 8))
    _, _, cache = transformer.forward(CFG, params, chunk, cache=transformer.init_cache(CFG, 1, 16))
    with pytest.raises(ValueError, match=r"does not fit the cache's free room \(6 of 16 slots left at index 10\)"):
        transformer.forward(CFG, params, chunk, cache=cache)
    # Under jit the index is traced: an overflowing chunk gives NaNs instead of clamping its write
    # position and silently overwriting earlier slots; a chunk that fits is unaffected.
    step = jax.jit(lambda c, t: transformer.forward(CFG, params, t, cache=c)[0])
    assert bool(jnp.all(jnp.isnan(step(cache, chunk))))
    assert bool(jnp.all(jnp.isfinite(step(cache, chunk[:, :6]))))


def test_tied_embeddings_have_no_lm_head():
    cfg = CFG.replace(tie_embeddings=True)
    p = transformer.init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p
    assert transformer.count_params(p) == cfg.num_params()
    assert transformer.count_params(transformer.init_params(CFG, jax.random.key(0))) == CFG.num_params()


# Qwen3-style q/k norms + Llama 3 RoPE scaling (head_dim apart from d_model / num_heads); small
# original context so the test sequences run past it.
NEW_FEATURES = dict(qk_norm=True, head_dim=12, rope_theta=100.0, rope_type="llama3", rope_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=2.0, rope_original_max_len=16)


def test_new_features_are_off_by_default_and_add_only_the_qk_norm_scales():
    assert not CFG.qk_norm and CFG.rope_type == "default"
    base = transformer.abstract_params(CFG)
    assert "q_norm" not in base["blocks"]["attn"] and "k_norm" not in base["blocks"]["attn"]
    cfg = CFG.replace(**NEW_FEATURES)
    p = transformer.init_params(cfg, jax.random.key(0))
    attn = p["blocks"]["attn"]
    assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (CFG.num_layers, 12)
    assert transformer.logical_axes(cfg)["blocks"]["attn"]["q_norm"]["scale"] == ("layers", "head_dim")
    assert transformer.count_params(p) == cfg.num_params()
    base_paths = {k for k, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    new_paths = {k for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]}
    assert len(new_paths - base_paths) == 2 and base_paths <= new_paths
    plain = transformer.rope_inv_freq(CFG.replace(head_dim=12, rope_theta=100.0))  # wavelengths 6.3, 13.5, 29, ...
    scaled = transformer.rope_inv_freq(cfg)  # kept below 16 / 2, interpolated up to 16, then divided by 8
    assert scaled[0] == plain[0] and plain[1] / 8 < scaled[1] < plain[1]
    np.testing.assert_allclose(scaled[2:], plain[2:] / 8.0, rtol=1e-6)


def test_qk_norm_and_llama3_rope_cached_decode_equals_full_forward():
    cfg = CFG.replace(**NEW_FEATURES)
    p = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape, x.dtype),
                     transformer.init_params(cfg, jax.random.key(1)))  # norm scales away from 1
    rng = np.random.default_rng(4)
    tokens, mask = decoding.pad_prompts(_random_prompts(rng, 3, lo=12, hi=22), pad_id=0, bucket=False)
    full = jax.jit(lambda c: transformer.forward(c, p, tokens, mask=mask)[0], static_argnums=0)
    full, b16 = full(cfg), full(cfg.replace(dtype="bfloat16"))
    step = jax.jit(lambda c, t, m: transformer.forward(cfg, p, t, mask=m, cache=c)[::2])
    logits, cache = step(transformer.init_cache(cfg, 3, tokens.shape[1]), tokens[:, :12], mask[:, :12])
    outs = [logits]
    for i in range(12, tokens.shape[1]):  # past rope_original_max_len
        logits, cache = step(cache, tokens[:, i:i + 1], mask[:, i:i + 1])
        outs.append(logits)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1))[m], np.asarray(full)[m], atol=1e-5)
    assert b16.dtype == jnp.float32 and float(jnp.max(jnp.abs(b16 - full)[m])) < 0.1 * float(jnp.max(jnp.abs(full)))


def test_rope_config_errors():
    with pytest.raises(ValueError, match=r"rope_type='yarn' unknown; use one of \['default', 'llama3'\]"):
        CFG.replace(rope_type="yarn")
    with pytest.raises(ValueError, match="llama3 RoPE needs"):
        CFG.replace(rope_type="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)


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


_last_hidden = jax.jit(lambda p, t, m: transformer.forward(CFG, p, t, mask=m, compute_logits=False)[1][:, -1])


def _head_by_hand(hc, vp, tokens):
    """Independent reference: the head MLP (ReLU between layers) applied in numpy to the trunk's final
    hidden state at the last token of one sequence (left-padded to a fixed 16 slots, so it compiles
    once; padding changes nothing, see above), squashed to the kind's range -> float."""
    t, m = decoding.pad_prompts([tokens], pad_id=0, length=16)
    h = np.asarray(_last_hidden(vp["trunk"], t, m)[0], np.float64)
    layers = vp["head"]["layers"]
    for i in range(len(layers)):
        h = h @ np.asarray(layers[i]["kernel"], np.float64) + np.asarray(layers[i]["bias"], np.float64)
        h = np.maximum(h, 0) if i < len(layers) - 1 else h
    p = 1 / (1 + np.exp(-h[0]))
    return 2 * p - 1 if hc.signed else p


def _value_model(kind, seed):
    """A head of this kind on the `params` trunk; unsaturated scores (spread ~0.1-0.9) tell positions apart."""
    hc = heads.HeadConfig(kind=kind, hidden=(16,))
    return hc, heads.init_value_params(CFG, hc, jax.random.key(seed), trunk=transformer.init_params(CFG, jax.random.key(7)))


def test_prm_scores_each_step_at_its_delimiter():
    """The PRM score read at each step delimiter equals the score of the prefix ending there, by hand;
    masked slots (even ones holding the delimiter id) are never read."""
    hc, vp = _value_model("prm", 2)
    step_id = 5
    seqs = [[1, 2, step_id, 3, 4, step_id, 6], [7, step_id, 8, 9, 10, 11, step_id]]
    tokens, mask = decoding.pad_prompts(seqs, pad_id=0)  # [2, 8]: one pad slot on row 0
    tokens[0, 0] = step_id  # a masked slot holding the delimiter id
    scores, at = jax.jit(heads.step_scores, static_argnums=(0, 1, 5))(CFG, hc, vp, tokens, mask, step_id)
    assert scores.shape == at.shape == tokens.shape
    width = tokens.shape[1]
    for b, seq in enumerate(seqs):
        ends = [i for i, tok in enumerate(seq) if tok == step_id]
        assert np.flatnonzero(np.asarray(at[b])).tolist() == [width - len(seq) + i for i in ends]
        got = [float(scores[b, width - len(seq) + i]) for i in ends]
        want = [_head_by_hand(hc, vp, seq[:i + 1]) for i in ends]
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(np.asarray(scores)[np.asarray(at)]) > 0.05  # scores differ, so a wrong position shows


@pytest.mark.parametrize("kind", ["q", "orm"])
def test_q_and_orm_read_the_last_real_token(kind):
    """Q(s, a) is read at the last token of step a, the ORM at the solution's last real token (EOS):
    sequence_score on a left-padded batch with masked trailing slots equals the head, by hand, on the
    sequence alone, and differs from the score one token earlier."""
    hc, vp = _value_model(kind, 3)
    eos = 9
    seqs = [[4, 6, 8, 5, 11, 12, eos], [3, 5, 13, eos], [21, 22, 5, 23, 24, 25, 5]]  # state + step / solution
    tokens, mask = decoding.pad_prompts(seqs, pad_id=0, length=8)
    # Two masked trailing slots after the end (search's fixed-width step slots leave these).
    tokens = np.concatenate([tokens, np.full((3, 2), 40, np.int32)], axis=1)
    mask = np.concatenate([mask, np.zeros((3, 2), bool)], axis=1)
    scores = np.asarray(heads.sequence_score(CFG, hc, vp, tokens, mask))
    want = [_head_by_hand(hc, vp, s) for s in seqs]
    np.testing.assert_allclose(scores, want, atol=1e-5)
    earlier = [_head_by_hand(hc, vp, s[:-1]) for s in seqs]
    assert np.min(np.abs(np.asarray(want) - np.asarray(earlier))) > 1e-3
    lo = -1.0 if kind == "q" else 0.0
    assert ((scores >= lo) & (scores <= 1)).all()


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
