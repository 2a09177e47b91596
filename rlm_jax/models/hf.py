"""Local Hugging Face checkpoints <-> our params: config mapping, safetensors I/O, name-mapping table.

    cfg = config_from_hf(folder)                  # config.json -> ModelConfig
    cfg, params = load_hf(folder, dtype="bfloat16")
    export_hf(cfg, params, out_folder, tokenizer=tok)   # transformers.AutoModelForCausalLM loads it

Supported (`hf_config.SUPPORTED_MODEL_TYPES`): `llama` (LlamaForCausalLM: Llama 2/3.x, SmolLM, ...), `qwen2`
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
from rlm_jax.models.hf_config import CONFIG_FILE, HFCheckpointError, config_from_hf, config_to_hf

# model_type -> architecture, for every family we load and export.
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold no weights we need (old transformers saved RoPE buffers).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


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
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg, **ids), indent=2, sort_keys=True) + "\n")
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
