"""Local Hugging Face checkpoints <-> our params: config mapping, safetensors I/O, name-mapping table.

    cfg = config_from_hf(folder)                  # config.json -> ModelConfig
    cfg, params = load_hf(folder, dtype="bfloat16")
    export_hf(cfg, params, out_folder, tokenizer=tok)   # transformers.AutoModelForCausalLM loads it

Supported (`SUPPORTED_MODEL_TYPES`): `llama` (LlamaForCausalLM: Llama 2/3.x, SmolLM, ...), `qwen2`
(Qwen2ForCausalLM: q/k/v bias) and `qwen3` (Qwen3ForCausalLM: per-head q/k RMSNorm, head_dim apart from
hidden/heads), with plain or Llama 3 ("llama3") RoPE scaling, SiLU MLP, no MLP or o_proj bias, no
sliding window. Any other family raises HFCheckpointError naming its model_type. Loading reads
safetensors with its numpy API (no torch, no transformers), from a single file or a sharded checkpoint
(`model.safetensors.index.json`). Nothing is downloaded.

The mapping is one declarative table (`WEIGHT_MAP`): HF name <-> our param path + a layout. HF stores a
linear layer as `[out, in]` (flattened); we store `[in axes..., out axes...]` with heads split out
(q_proj `[embed, heads, head_dim]`, o_proj `[heads, head_dim, embed]`), and per-layer tensors stacked
on a leading `layers` axis. Our shapes come from `transformer.abstract_params(cfg)`, the single source of
truth, so the expected HF shape of every tensor is derived, never written twice.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig

# model_type -> architecture, for every family we load and export.
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(SUPPORTED_MODEL_TYPES.values())
_SUPPORTED = ", ".join(f"{t!r} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())
_CONFIG = "config.json"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold no weights we need (old transformers saved RoPE buffers).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A local HF checkpoint that cannot be read into (or written from) our model; the message says
    what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One row of the name-mapping table.

    hf: the HF tensor name; `{i}` stands for the layer index (then `path` is a stacked block weight).
    path: our param path in the nested params dict.
    layout: how the HF tensor relates to ours (per layer):
      "same"      identical shape (embeddings, norm scales);
      "flat"      HF is ours flattened (biases: HF [heads*head_dim] <-> ours [heads, head_dim]);
      "linear:N"  HF nn.Linear weight [out, in]; ours is [in axes (N of them)..., out axes...].
    """

    hf: str
    path: tuple[str, ...]
    layout: str

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_L = "model.layers.{i}."
WEIGHT_MAP: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", ("embed",), "same"),
    WeightRule("model.norm.weight", ("final_norm", "scale"), "same"),
    WeightRule("lm_head.weight", ("lm_head",), "linear:1"),  # absent from our params when tied
    WeightRule(_L + "input_layernorm.weight", ("blocks", "attn_norm", "scale"), "same"),
    WeightRule(_L + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale"), "same"),
    WeightRule(_L + "self_attn.q_proj.weight", ("blocks", "attn", "q_proj"), "linear:1"),
    WeightRule(_L + "self_attn.k_proj.weight", ("blocks", "attn", "k_proj"), "linear:1"),
    WeightRule(_L + "self_attn.v_proj.weight", ("blocks", "attn", "v_proj"), "linear:1"),
    WeightRule(_L + "self_attn.o_proj.weight", ("blocks", "attn", "o_proj"), "linear:2"),
    WeightRule(_L + "self_attn.q_proj.bias", ("blocks", "attn", "q_bias"), "flat"),  # Qwen2 only
    WeightRule(_L + "self_attn.k_proj.bias", ("blocks", "attn", "k_bias"), "flat"),
    WeightRule(_L + "self_attn.v_proj.bias", ("blocks", "attn", "v_bias"), "flat"),
    WeightRule(_L + "self_attn.q_norm.weight", ("blocks", "attn", "q_norm", "scale"), "same"),  # Qwen3 only
    WeightRule(_L + "self_attn.k_norm.weight", ("blocks", "attn", "k_norm", "scale"), "same"),
    WeightRule(_L + "mlp.gate_proj.weight", ("blocks", "mlp", "gate_proj"), "linear:1"),
    WeightRule(_L + "mlp.up_proj.weight", ("blocks", "mlp", "up_proj"), "linear:1"),
    WeightRule(_L + "mlp.down_proj.weight", ("blocks", "mlp", "down_proj"), "linear:1"),
)


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _active_rules(cfg: ModelConfig) -> list[tuple[WeightRule, tuple[int, ...]]]:
    """The rules whose param exists for this config, each with our per-layer shape."""
    abstract = transformer.abstract_params(cfg)
    out = []
    for rule in WEIGHT_MAP:
        leaf = _get(abstract, rule.path)
        if leaf is None:  # e.g. lm_head when tied, biases without qkv_bias, q/k norms without qk_norm
            continue
        shape = tuple(leaf.shape[1:] if rule.per_layer else leaf.shape)
        out.append((rule, shape))
    return out


def _hf_shape(layout: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "same":
        return ours
    if layout == "flat":
        return (math.prod(ours),)
    n_in = int(layout.split(":")[1])
    return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))


def _to_ours(layout: str, w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if layout.startswith("linear:"):
        return np.ascontiguousarray(w.T).reshape(ours)
    return w.reshape(ours)


def _to_hf(layout: str, x: np.ndarray) -> np.ndarray:
    if layout.startswith("linear:"):
        n_in = int(layout.split(":")[1])
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)
    return np.ascontiguousarray(x.reshape(_hf_shape(layout, x.shape)))


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name a checkpoint of this config holds (sorted)."""
    names = []
    for rule, _ in _active_rules(cfg):
        names += [rule.hf.format(i=i) for i in range(cfg.num_layers)] if rule.per_layer else [rule.hf]
    return sorted(names)


# ------------------------------------------------------------------------------------------ config


def _read_config(folder_or_dict) -> tuple[dict, str]:
    """-> (config dict, a description of where it came from, for error messages)."""
    if isinstance(folder_or_dict, Mapping):
        return dict(folder_or_dict), "the given config dict"
    path = Path(folder_or_dict)
    file = path if path.is_file() else path / _CONFIG
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


# ----------------------------------------------------------------------------------------- loading


def _tensor_index(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFCheckpointError(f"{index} has no 'weight_map'; it should map tensor names to shard files")
        files = {f: folder / f for f in set(weight_map.values())}
        missing = sorted(f for f, p in files.items() if not p.is_file())
        if missing:
            raise HFCheckpointError(f"missing weight file(s) {missing} listed in {index}; copy every shard "
                                    "into the folder")
        return {name: files[f] for name, f in weight_map.items()}
    files = [folder / _SINGLE_FILE] if (folder / _SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = " (PyTorch .bin weights are not supported: re-save with safe_serialization)" if any(
            n.endswith(".bin") for n in found) else ""
        raise HFCheckpointError(f"missing weight file: no model.safetensors, {_INDEX_FILE} or *.safetensors "
                                f"in {folder}{hint}; found {found}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="np") as h:
            out.update({name: f for name in h.keys()})
    return out


def load_hf(folder, dtype: str = "float32", *, compute_dtype: str | None = None):
    """Loads a local HF Llama/Qwen2/Qwen3 checkpoint -> (ModelConfig, params).

    Args:
      folder: a folder with config.json and model.safetensors (or shards + model.safetensors.index.json).
      dtype: storage dtype of the params ("float32", "bfloat16", "float16"); compute_dtype defaults to it.
    Returns:
      cfg and params, a nested dict of jax arrays shaped like `transformer.init_params(cfg, key)`.
    Raises:
      HFCheckpointError naming the missing config/file/tensor, the mismatched shape, or the unexpected
      tensor (weights our model would silently drop, e.g. an o_proj bias).
    """
    from safetensors import safe_open

    folder = Path(folder)
    cfg = config_from_hf(folder, dtype=dtype, compute_dtype=compute_dtype)
    where = _tensor_index(folder)
    np_dtype = np.dtype(cfg.jnp_param_dtype)
    handles: dict[Path, Any] = {}

    def read(name: str, expected: tuple[int, ...]) -> np.ndarray:
        if name not in where:
            raise HFCheckpointError(f"missing tensor {name!r} in {folder}; the checkpoint does not match "
                                    f"its config.json ({len(where)} tensors found)")
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="np").__enter__()
        found = tuple(handles[f].get_slice(name).get_shape())
        if found != expected:
            raise HFCheckpointError(f"tensor {name!r} has shape {found}, expected {expected} from config.json "
                                    f"({f.name}); the weights and config.json disagree")
        return handles[f].get_tensor(name)

    params: dict = {}
    used = set()
    try:
        for rule, ours in _active_rules(cfg):
            hf_shape = _hf_shape(rule.layout, ours)
            names = [rule.hf.format(i=i) for i in range(cfg.num_layers)] if rule.per_layer else [rule.hf]
            arrays = [_to_ours(rule.layout, read(n, hf_shape), ours).astype(np_dtype) for n in names]
            used.update(names)
            _set(params, rule.path, jnp.asarray(np.stack(arrays) if rule.per_layer else arrays[0]))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    extra = sorted(n for n in where if n not in used and not n.endswith(_IGNORABLE_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.tie_embeddings))  # tied: a saved copy of embed
    if extra:
        raise HFCheckpointError(f"unexpected tensor(s) in {folder} that the model would ignore: {extra[:8]}"
                                f"{' ...' if len(extra) > 8 else ''}; the architecture has weights we do not "
                                "implement")
    return cfg, params


# ----------------------------------------------------------------------------------------- export


def to_hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our params -> {HF name: numpy array} in HF layout and our param dtype."""
    out = {}
    for rule, ours in _active_rules(cfg):
        x = _get(params, rule.path)
        if x is None:
            raise HFCheckpointError(f"params lack {'/'.join(rule.path)}, which config {cfg} requires")
        x = np.asarray(jax.device_get(x))
        expected = ((cfg.num_layers,) + ours) if rule.per_layer else ours
        if x.shape != expected:
            raise HFCheckpointError(f"param {'/'.join(rule.path)} has shape {x.shape}, expected {expected} "
                                    "from the ModelConfig")
        x = x.astype(np.dtype(cfg.jnp_param_dtype))
        if rule.per_layer:
            out.update({rule.hf.format(i=i): _to_hf(rule.layout, x[i]) for i in range(cfg.num_layers)})
        else:
            out[rule.hf] = _to_hf(rule.layout, x)
    return out


def export_hf(cfg: ModelConfig, params, folder, tokenizer=None, *, max_shard_bytes: int | None = None) -> Path:
    """Writes config.json + safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      tokenizer: optional `rlm_jax.tokenizer.Tokenizer`; saved into the folder (`tokenizer.save`) and its
        bos/eos/pad ids written to config.json and generation_config.json.
      max_shard_bytes: split the weights into shards of at most this size + model.safetensors.index.json
        (default: one model.safetensors).
    Returns the folder. Output is deterministic: the same params give byte-identical files.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = {}
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise HFCheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                                    f"{cfg.vocab_size}; resize the embeddings or use a smaller tokenizer")
        ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        tokenizer.save(folder)
    (folder / _CONFIG).write_text(json.dumps(config_to_hf(cfg, **ids), indent=2, sort_keys=True) + "\n")
    if ids:
        gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    tensors = to_hf_tensors(cfg, params)
    for stale in [folder / _SINGLE_FILE, folder / _INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # never leave an old index pointing at old shards
    meta = {"format": "pt"}  # transformers refuses safetensors without it
    if max_shard_bytes is None:
        save_file(tensors, str(folder / _SINGLE_FILE), metadata=meta)
        return folder
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / _INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
