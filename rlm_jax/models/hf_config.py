"""A Hugging Face `config.json` <-> `ModelConfig`: the supported families and what each key maps to.

Supported (`SUPPORTED_MODEL_TYPES`): llama (Llama 2/3.x incl. the llama3 RoPE scaling, SmolLM), qwen2 (Qwen2,
Qwen2.5) and qwen3 (q/k norm). Anything else raises HFCheckpointError naming its model_type and the list.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from rlm_jax.models.config import ModelConfig

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(SUPPORTED_MODEL_TYPES.values())
_SUPPORTED = ", ".join(f"{t!r} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())
CONFIG_FILE = "config.json"


class HFCheckpointError(ValueError):
    """A local HF checkpoint that cannot be read into (or written from) our model; the message says
    what is wrong and how to fix it."""



def _read_config(folder_or_dict) -> tuple[dict, str]:
    """-> (config dict, a description of where it came from, for error messages)."""
    if isinstance(folder_or_dict, Mapping):
        return dict(folder_or_dict), "the given config dict"
    path = Path(folder_or_dict)
    file = path if path.is_file() else path / CONFIG_FILE
    if not file.is_file():
        raise HFCheckpointError(
            f"missing config.json: {file} does not exist; point at a local HF model folder holding "
            "config.json and *.safetensors (e.g. one written by save_pretrained or export_hf)")
    try:
        return json.loads(file.read_text()), str(file)
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"config.json at {file} is not valid JSON: {e}") from None


def _architecture(d: Mapping, where: str) -> str:
    """-> the architecture (a SUPPORTED_ARCHITECTURES entry); one error naming the model_type otherwise."""
    model_type = d.get("model_type")
    archs = list(d.get("architectures") or [])
    if not archs and model_type in SUPPORTED_MODEL_TYPES:
        archs = [SUPPORTED_MODEL_TYPES[model_type]]
    arch = archs[0] if len(archs) == 1 else archs
    hint = f"supported model types: {_SUPPORTED}; another family needs its layers and weight map in rlm_jax.models"
    if model_type is None and not archs:
        raise HFCheckpointError(f"{where} names neither a 'model_type' nor 'architectures'; {hint}")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"unsupported model_type {model_type!r} (architectures {archs}) in {where}; {hint}")
    if len(archs) != 1 or arch not in SUPPORTED_ARCHITECTURES or (
            model_type is not None and SUPPORTED_MODEL_TYPES[model_type] != arch):
        raise HFCheckpointError(f"unsupported architecture {arch!r} (model_type {model_type!r}) in {where}; {hint}")
    return arch


_LLAMA3_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_len"}


def _rope(d: Mapping, where: str) -> dict[str, Any]:
    """-> the ModelConfig RoPE fields (rope_theta, rope_type, and the llama3 scaling fields); rejects
    every RoPE variant other than plain ("default") and Llama 3 ("llama3").

    transformers v5 keeps RoPE settings in `rope_parameters` (`rope_type`, `rope_theta`); older
    configs use top-level `rope_theta` and `rope_scaling` (`type` or `rope_type`).
    """
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, Mapping) for v in params.values()):  # per layer type (v5)
        variants = list(params.values())
        if any(v != variants[0] for v in variants):
            raise HFCheckpointError(f"{where}: per-layer-type rope_parameters differ ({params}); "
                                    "only one RoPE setting for all layers is supported")
        params = variants[0]
    scaling = {**(d.get("rope_scaling") or {}), **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise HFCheckpointError(
            f"unsupported rope scaling type {rope_type!r} in {where}: only plain RoPE ('default') and "
            "Llama 3 scaling ('llama3') are implemented; use a checkpoint without rope_scaling or add the "
            "scaling to transformer.rope_inv_freq")
    if float(scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFCheckpointError(f"{where}: partial_rotary_factor != 1 is not supported (RoPE rotates "
                                "the whole head_dim here)")
    out: dict[str, Any] = {"rope_theta": float(scaling.get("rope_theta", d.get("rope_theta", 10000.0))),
                           "rope_type": rope_type}
    if rope_type == "llama3":
        missing = sorted(k for k in _LLAMA3_KEYS if scaling.get(k) is None)
        if missing:
            raise HFCheckpointError(f"{where}: llama3 rope scaling lacks {missing}; it needs "
                                    f"{sorted(_LLAMA3_KEYS)}")
        out.update({ours: float(scaling[k]) for k, ours in _LLAMA3_KEYS.items()})
        out["rope_original_max_len"] = int(scaling["original_max_position_embeddings"])
    return out


def config_from_hf(folder_or_dict, *, dtype: str = "float32", compute_dtype: str | None = None) -> ModelConfig:
    """Maps an HF config (a model folder, a config.json path, or its dict) to a ModelConfig.

    Raises HFCheckpointError for an unsupported family (naming its model_type) or feature (RoPE
    scaling other than llama3, sliding window, non-SiLU activation, MLP or o_proj bias), naming it.
    """
    d, where = _read_config(folder_or_dict)
    arch = _architecture(d, where)
    rope = _rope(d, where)
    if d.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act={d['hidden_act']!r} unsupported; only 'silu' (SwiGLU)")
    if d.get("mlp_bias", False):
        raise HFCheckpointError(f"{where}: mlp_bias=true is unsupported (our MLP has no bias)")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        if d.get("attention_bias", False):
            raise HFCheckpointError(
                f"{where}: attention_bias=true is unsupported for {arch} (it adds an o_proj bias, which our "
                "attention lacks); Qwen2-style q/k/v-only bias is supported via Qwen2ForCausalLM")
        qkv_bias = False
    else:  # Qwen2 always has q/k/v biases and never an o_proj bias
        qkv_bias = True
    qk_norm = arch == "Qwen3ForCausalLM"
    if arch != "LlamaForCausalLM":
        if d.get("use_sliding_window", False) and "sliding_attention" in (d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(d["num_hidden_layers"])]):
            raise HFCheckpointError(f"{where}: sliding-window attention (use_sliding_window=true) is "
                                    "unsupported; set use_sliding_window=false if the model tolerates it")
    try:
        heads = int(d["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            mlp_dim=int(d["intermediate_size"]),
            head_dim=d.get("head_dim") or None,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            **rope,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            param_dtype=dtype,
            dtype=compute_dtype or dtype,
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise HFCheckpointError(f"{where} lacks required key {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
    """ModelConfig -> an HF config.json dict: Qwen3ForCausalLM if the model has q/k norms, Qwen2ForCausalLM
    if it has q/k/v biases, else LlamaForCausalLM. Written for transformers v5 (`rope_parameters`), with
    the v4 keys (`rope_theta`, `rope_scaling`) too."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise HFCheckpointError("cannot export qk_norm together with qkv_bias: no supported HF family has "
                                "both (Qwen3's attention_bias also adds an o_proj bias)")
    model_type = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update({k: getattr(cfg, ours) for k, ours in _LLAMA3_KEYS.items()})
    d = {
        "architectures": [SUPPORTED_MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_type != "default":
        d["rope_scaling"] = dict(rope)
    if model_type != "llama":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if model_type != "qwen2":
        d.update(attention_bias=False)
    if model_type == "llama":
        d.update(mlp_bias=False)
    return d
