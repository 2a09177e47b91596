"""LoRA adapters over a frozen base: what they are in the params, how training freezes the base, and how
they fold back into the weights.

An adapted model is an ordinary params dict: `ModelConfig.lora_rank` > 0 adds `<proj>_lora_a` and
`<proj>_lora_b` beside each adapted projection (`models/transformer.py`), so shardings, checkpoints and the
search's forward passes need nothing new. Training updates only the adapters (and a value model's head):
`freeze_base` gives the base no optimizer state and no update, and `train_step`'s loss sees the base through
`stop_gradient`, so no weight gradient of the base is computed.

Why our own and not flax.nnx.LoRA or qwix: our projections are einsums over stacked, logically named
weights (`[layers, embed, heads, head_dim]`); nnx.LoRA wraps a 2-D Linear module (it would change the
module graph and the HF name table), and qwix rewrites ops at trace time for quantisation-aware LoRA (a
dependency for two extra weights per projection).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig

_ADAPTER = "_lora_"


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_trainable(path) -> bool:
    """Under LoRA: an adapter weight, or anything of a value model's head."""
    names = _names(path)
    return any(_ADAPTER in n for n in names) or (len(names) > 0 and names[0] == "head")


def trainable_labels(params):
    """"train" / "frozen" per leaf of a LoRA model's params (a policy's, or a value model's {"trunk", "head"})."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "train" if is_trainable(p) else "frozen", params)


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the adapters (and head) only; the base gets no update and no optimizer state."""
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, trainable_labels)


def stop_base_gradient(params):
    """The params with the base behind `stop_gradient`: d loss / d base is never computed."""
    return jax.tree_util.tree_map_with_path(lambda p, x: x if is_trainable(p) else jax.lax.stop_gradient(x), params)


def base_params(params: dict) -> dict:
    """The params without their adapters (e.g. to compare a base before and after training)."""
    return {k: base_params(v) if isinstance(v, dict) else v for k, v in params.items() if _ADAPTER not in k}


def share_base(value_params: dict, policy_params: dict) -> dict:
    """The value model {"trunk", "head"} with its trunk's frozen base being the policy's own arrays where they are
    equal bit for bit (both LoRA over one folder: x1's one base under two adapter sets), so the pair holds one
    copy of the base in memory, not two. Arrays are immutable and training copies before it donates, so sharing
    is safe. A value model over another base (value.init, full fine-tuning) comes back unchanged."""
    trunk = value_params.get("trunk")
    if trunk is None or not jax.tree.leaves(_adapters_of(trunk)) or \
            jax.tree.structure(base_params(trunk)) != jax.tree.structure(base_params(policy_params)):
        return value_params
    pairs = list(zip(jax.tree.leaves(base_params(trunk)), jax.tree.leaves(base_params(policy_params))))
    same = all(a is b or (a.shape == b.shape and a.dtype == b.dtype) for a, b in pairs) and \
        all(bool(jnp.array_equal(a, b)) for a, b in pairs if a is not b)
    if not same:
        return value_params
    return {**value_params, "trunk": _overlay(dict(policy_params), _adapters_of(trunk))}


def _adapters_of(params: dict) -> dict:
    return {k: _adapters_of(v) if isinstance(v, dict) else v for k, v in params.items()
            if isinstance(v, dict) or _ADAPTER in k}


def add_adapters(cfg: ModelConfig, params, key: jax.Array):
    """Fresh adapters (B = 0: the model's outputs are unchanged) added to `params` that have none, e.g. a
    Hugging Face folder's weights loaded with `hf.load_hf`. Only the adapters are drawn (the rest of a full
    init is dead code to XLA)."""
    if not cfg.lora_rank:
        return params

    def adapters_only(k):
        fresh = transformer.init_params(cfg, k)
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if any(_ADAPTER in n for n in _names(p)) else None, fresh)

    adapters = jax.jit(adapters_only)(key)
    return _overlay(params, adapters)


def _overlay(base, extra):
    """Nested dicts: `base` with `extra`'s non-None leaves added."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict):
            sub = _overlay(base.get(k, {}), v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out


def merged(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """(config without LoRA, params with every adapter folded in: W + lora_scale * A B), e.g. for export.
    Block weights are stacked, so A [layers, *in, r] and B [layers, r, *out] are multiplied layer by layer."""
    if not cfg.lora_rank:
        return cfg, params

    def fold(module: dict) -> dict:
        out = {}
        for name, w in module.items():
            if isinstance(w, dict):
                out[name] = fold(w)
            elif _ADAPTER not in name:
                a, b = module.get(f"{name}_lora_a"), module.get(f"{name}_lora_b")
                if a is None:
                    out[name] = w
                else:
                    delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(
                        a.astype(jnp.float32), b.astype(jnp.float32))
                    out[name] = (w.astype(jnp.float32) + cfg.lora_scale * delta).astype(w.dtype)
        return out

    return cfg.replace(lora_rank=0), fold(params)
