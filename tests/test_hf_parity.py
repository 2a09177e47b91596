"""HF checkpoints <-> our model: logits parity with transformers (PyTorch, f32), export round trips,
greedy and KV-cache decoding parity, and clear errors on bad checkpoints.

Families: Llama (plain RoPE, Llama 3.1 / 3.2 "llama3" RoPE scaling, SmolLM's shapes), Qwen2 (q/k/v bias)
and Qwen3 (per-head q/k RMSNorm, head_dim apart from hidden / heads)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (a declared test dependency: a missing install must fail, not skip)
from safetensors.numpy import load_file, save_file

from helpers_hf import left_padded_batch, load_torch_model, make_tiny_hf_checkpoint, torch_logits
from rlm_jax import decoding
from rlm_jax.models import hf, transformer
from rlm_jax.models.config import ModelConfig

# Llama 3.1 and 3.2 style RoPE scaling, shrunk so that a tiny head_dim (16) has wavelengths in all three
# bands (kept, interpolated, divided by factor) and test sequences run past original_max_position_embeddings.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SMOLLM = dict(hidden_size=144, num_attention_heads=9, intermediate_size=96, rope_theta=100000.0)  # 9 heads, 3 kv

CASES = [  # (name, arch, tied embeddings, num_kv_heads, config overrides); 4 query heads unless overridden
    ("llama", "llama", False, 2, {}),  # GQA
    ("llama", "llama", True, 1, {}),  # MQA
    ("qwen2", "qwen2", False, 4, {}),  # MHA
    ("qwen2", "qwen2", True, 2, {}),
    ("llama3.1", "llama", False, 2, dict(rope_scaling=LLAMA31_ROPE, max_position_embeddings=256)),
    ("llama3.2", "llama", True, 1, dict(rope_scaling=LLAMA32_ROPE, max_position_embeddings=256)),
    ("smollm", "llama", True, 3, SMOLLM),
    ("qwen3", "qwen3", False, 2, dict(head_dim=24)),  # head_dim != 64 / 4
    ("qwen3", "qwen3", True, 1, dict(head_dim=32)),
]
CASE_IDS = [f"{n}-{'tied' if t else 'untied'}-kv{k}" for n, _, t, k, _ in CASES]


def _make(folder, case, seed, init_std):
    _, arch, tie, kv, overrides = case
    return make_tiny_hf_checkpoint(folder, arch, tie=tie, num_kv_heads=kv, seed=seed, init_std=init_std,
                                   **overrides)


@pytest.fixture(scope="module", params=range(len(CASES)), ids=CASE_IDS)
def checkpoint(request, tmp_path_factory):
    seed = request.param
    return _make(tmp_path_factory.mktemp(CASES[seed][1]), CASES[seed], seed, init_std=0.05), seed


def test_config_mapping(checkpoint):
    checkpoint, _ = checkpoint
    raw = json.loads((checkpoint / "config.json").read_text())
    cfg = hf.config_from_hf(checkpoint)
    assert cfg.vocab_size == raw["vocab_size"] and cfg.d_model == raw["hidden_size"]
    assert cfg.num_kv_heads == raw["num_key_value_heads"] and cfg.num_heads == raw["num_attention_heads"]
    assert cfg.tie_embeddings == raw["tie_word_embeddings"]
    assert cfg.qkv_bias == (raw["model_type"] == "qwen2")
    assert cfg.qk_norm == (raw["model_type"] == "qwen3")
    assert cfg.head_dim == raw["head_dim"]
    rope = raw["rope_parameters"]
    assert cfg.rope_theta == rope["rope_theta"] and cfg.rope_type == rope["rope_type"]
    if cfg.rope_type == "llama3":
        assert (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len) == (
            rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert cfg == hf.config_from_hf(raw)  # a dict maps like its folder


def test_left_padded_logits_match_transformers(checkpoint, request):
    checkpoint, seed = checkpoint
    cfg, params = hf.load_hf(checkpoint)
    rng = np.random.default_rng(seed + 10)
    # 80 tokens: past the llama3 cases' original_max_position_embeddings (64), where the scaling matters most
    tokens, mask, prompts = left_padded_batch(rng, [80, 11, 4, 1], cfg.vocab_size)
    ref = torch_logits(checkpoint, tokens, mask)
    ours = np.asarray(transformer.forward(cfg, params, jnp.asarray(tokens), mask=jnp.asarray(mask))[0])
    assert np.abs(ref[mask]).max() > 0.1  # the comparison is not between near-zero logits
    print(f"max |logit diff| {request.node.callspec.id}: {np.abs(ours[mask] - ref[mask]).max():.2e}")
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)
    for i, p in enumerate(prompts):  # padding changes nothing: each prompt alone gives the same logits
        alone = np.asarray(transformer.forward(cfg, params, jnp.asarray(p)[None])[0])[0]
        np.testing.assert_allclose(ours[i, -len(p):], alone, atol=1e-5, rtol=0)


def test_load_export_reproduces_hf_tensors(checkpoint, tmp_path):
    """HF file -> load -> export gives the same tensors; export -> load -> export is byte-identical."""
    checkpoint, _ = checkpoint
    cfg, params = hf.load_hf(checkpoint)
    original = load_file(str(checkpoint / "model.safetensors"))
    out1 = hf.export_hf(cfg, params, tmp_path / "a")
    exported = load_file(str(out1 / "model.safetensors"))
    assert sorted(exported) == sorted(k for k in original if not (cfg.tie_embeddings and k == "lm_head.weight"))
    for k, v in exported.items():
        assert v.dtype == original[k].dtype and np.array_equal(v, original[k]), k
    cfg2, params2 = hf.load_hf(out1)
    assert cfg2 == cfg
    out2 = hf.export_hf(cfg2, params2, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def _perturbed_init(cfg, seed):
    """Random params with every leaf perturbed (init has zero biases and unit norms, which would hide
    a swapped bias or norm)."""
    rng = np.random.default_rng(seed)
    params = transformer.init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), params)


_LLAMA3_FIELDS = dict(rope_type="llama3", rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_len=4)  # test prompts run past position 4


@pytest.mark.parametrize("extra,family", [
    (dict(), "LlamaForCausalLM"),
    (dict(qkv_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),
    (dict(qk_norm=True, head_dim=12), "Qwen3ForCausalLM"),
    (dict(qk_norm=True, tie_embeddings=True, **_LLAMA3_FIELDS), "Qwen3ForCausalLM"),
    (dict(tie_embeddings=True, **_LLAMA3_FIELDS), "LlamaForCausalLM"),
], ids=["llama", "qwen2-tied", "qwen3-head_dim12", "qwen3-tied-llama3rope", "llama3-tied"])
def test_random_params_export_load_in_transformers(tmp_path, extra, family):
    cfg = ModelConfig(vocab_size=160, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=80,
                      rope_theta=5000.0, norm_eps=1e-5, max_seq_len=64, **extra)
    params = _perturbed_init(cfg, seed=3)
    folder = hf.export_hf(cfg, params, tmp_path / "m", max_shard_bytes=40_000)  # sharded, with an index
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    model = load_torch_model(folder)
    assert type(model).__name__ == family
    tokens, mask, _ = left_padded_batch(np.random.default_rng(5), [9, 3, 6], cfg.vocab_size)
    ref = torch_logits(model, tokens, mask)
    ours = np.asarray(transformer.forward(cfg, params, jnp.asarray(tokens), mask=jnp.asarray(mask))[0])
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)
    cfg2, params2 = hf.load_hf(folder)  # the sharded checkpoint loads back exactly
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bfloat16_load_and_export(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=48,
                      param_dtype="bfloat16", dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _perturbed_init(cfg, seed=8))
    folder = hf.export_hf(cfg, params, tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    cfg2, params2 = hf.load_hf(folder, dtype="bfloat16")
    assert cfg2 == cfg and params2["embed"].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_cached_decode_equals_full_forward(checkpoint):
    """Prefill (past original_max_position_embeddings for llama3) + one-token decode steps through the KV
    cache give the logits of one full forward over the whole left-padded batch."""
    checkpoint, seed = checkpoint
    cfg, params = hf.load_hf(checkpoint)
    tokens, mask, _ = left_padded_batch(np.random.default_rng(seed + 20), [78, 40], cfg.vocab_size)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    full = np.asarray(transformer.forward(cfg, params, tokens, mask=mask)[0])
    step = jax.jit(lambda p, t, m, c: transformer.forward(cfg, p, t, mask=m, cache=c)[::2])
    prefill = 70
    logits, cache = step(params, tokens[:, :prefill], mask[:, :prefill],
                         transformer.init_cache(cfg, tokens.shape[0], tokens.shape[1]))
    outs = [np.asarray(logits)]
    for i in range(prefill, tokens.shape[1]):
        logits, cache = step(params, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
        outs.append(np.asarray(logits))
    ours = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(ours[np.asarray(mask)], full[np.asarray(mask)], atol=1e-5, rtol=0)
    assert np.asarray(cache.next_pos).tolist() == [78, 40]


def test_llama3_inv_freq_matches_transformers(checkpoint):
    """Our llama3 RoPE frequencies equal transformers' `_compute_llama3_parameters` (all three bands)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    checkpoint, _ = checkpoint
    cfg = hf.config_from_hf(checkpoint)
    ours = np.asarray(transformer.rope_inv_freq(cfg))
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim)
    if cfg.rope_type == "default":
        np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=0)
        return
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(str(checkpoint)))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    old = cfg.rope_original_max_len
    wavelen = 2 * np.pi / plain
    bands = (wavelen < old / cfg.rope_high_freq_factor, wavelen > old / cfg.rope_low_freq_factor)
    assert bands[0].any() and bands[1].any() and (~bands[0] & ~bands[1]).any()  # kept, scaled, interpolated
    np.testing.assert_allclose(ours[bands[0]], plain[bands[0]], rtol=1e-6)
    np.testing.assert_allclose(ours[bands[1]], plain[bands[1]] / cfg.rope_factor, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_decoding_matches_transformers_generate(tmp_path, case):
    """32 greedy tokens from a left-padded batch are token-identical to transformers' `generate`."""
    # A large init std gives peaked logits: greedy argmaxes are separated by clear margins (checked below).
    folder = _make(tmp_path / "m", case, seed=11 + CASES.index(case), init_std=0.25)
    cfg, params = hf.load_hf(folder)
    tokens, mask, _ = left_padded_batch(np.random.default_rng(12), [7, 3], cfg.vocab_size)
    new = 32
    out = decoding.generate(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
                            max_new_tokens=new, temperature=0.0)

    model = load_torch_model(folder)
    model.generation_config.eos_token_id = None  # no stop tokens: exactly 32 new tokens
    with torch.no_grad():
        ref = model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(ref.scores, 1).numpy()  # [B, new, V]
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "argmax near-tie: pick another seed"
    ref_tokens = ref.sequences[:, tokens.shape[1]:].numpy()
    assert ref_tokens.shape == (2, new) and len(np.unique(ref_tokens)) > 4  # not a degenerate repetition
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens)
    assert np.asarray(out.lengths).tolist() == [new, new]


# ----------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("good"), "llama", tie=False, num_kv_heads=2, seed=4)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(folder, **kw):
    d = json.loads((folder / "config.json").read_text())
    d.update(kw)
    (folder / "config.json").write_text(json.dumps(d))


def test_unsupported_architecture(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    _edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(hf.HFCheckpointError, match=r"unsupported model_type 'mistral'.*MistralForCausalLM.*"
                                                   + _SUPPORTED_RE):
        hf.load_hf(bad)
    _edit_config(bad, architectures=["LlamaForSequenceClassification"], model_type="llama")
    with pytest.raises(hf.HFCheckpointError, match=r"unsupported architecture 'LlamaForSequenceClassification' "
                                                   r"\(model_type 'llama'\).*" + _SUPPORTED_RE):
        hf.load_hf(bad)


_SUPPORTED_RE = (r"supported model types: 'llama' \(LlamaForCausalLM\), 'qwen2' \(Qwen2ForCausalLM\), "
                 r"'qwen3' \(Qwen3ForCausalLM\)")


def test_unknown_model_type_is_named(tmp_path):
    """A real transformers GPT-2 folder: one error naming model_type 'gpt2' and the supported list."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(gpt2).save_pretrained(str(tmp_path / "gpt2"))
    for source in (tmp_path / "gpt2", json.loads((tmp_path / "gpt2" / "config.json").read_text())):
        with pytest.raises(hf.HFCheckpointError, match=r"unsupported model_type 'gpt2'.*" + _SUPPORTED_RE):
            hf.load_hf(source) if not isinstance(source, dict) else hf.config_from_hf(source)


def test_llama3_rope_needs_its_parameters(good):
    raw = json.loads((good / "config.json").read_text())
    rope = dict(LLAMA31_ROPE)
    del rope["low_freq_factor"]
    with pytest.raises(hf.HFCheckpointError, match=r"llama3 rope scaling lacks \['low_freq_factor'\]"):
        hf.config_from_hf({**raw, "rope_parameters": rope})
    v4 = hf.config_from_hf({**raw, "rope_parameters": None, "rope_scaling": LLAMA31_ROPE})  # v4 style
    assert (v4.rope_type, v4.rope_factor, v4.rope_original_max_len) == ("llama3", 8.0, 64)


def test_unsupported_rope_scaling(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    _edit_config(bad, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(hf.HFCheckpointError, match="unsupported rope scaling type 'yarn'"):
        hf.config_from_hf(bad)
    with pytest.raises(hf.HFCheckpointError, match="unsupported rope scaling type 'linear'"):  # v4 style
        hf.config_from_hf({**json.loads((good / "config.json").read_text()), "rope_parameters": None,
                           "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_missing_config(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    (bad / "config.json").unlink()
    with pytest.raises(hf.HFCheckpointError, match="missing config.json"):
        hf.load_hf(bad)


def test_missing_weight_file(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    with pytest.raises(hf.HFCheckpointError, match="missing weight file"):
        hf.load_hf(bad)
    cfg, params = hf.load_hf(good)
    sharded = hf.export_hf(cfg, params, tmp_path / "sharded", max_shard_bytes=50_000)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(hf.HFCheckpointError, match=f"missing weight file.*{shard.name}"):
        hf.load_hf(sharded)


def test_missing_tensor(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        hf.load_hf(bad)


def test_mismatched_shape(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    _edit_config(bad, intermediate_size=96)  # the weights have 128
    with pytest.raises(hf.HFCheckpointError,
                       match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\), expected \(96, 64\)"):
        hf.load_hf(bad)


def test_unexpected_tensor(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(64, np.float32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError, match=r"unexpected tensor.*o_proj\.bias"):
        hf.load_hf(bad)
