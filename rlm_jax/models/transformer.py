"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 family, as Flax NNX modules with a functional core.

RMSNorm, rotary position embeddings (rotate-half convention, as in transformers; plain or Llama 3
frequency scaling), SwiGLU MLP, grouped-query attention with optional q/k/v bias (Qwen2) and optional
per-head q/k RMSNorm (Qwen3), tied or untied embeddings.

Layers are stacked (every block weight has a leading `layers` axis) and run with `lax.scan`: compile
time does not grow with depth. The functional core is:

    params = init_params(cfg, key)                        # a plain nested dict of arrays
    logits, hidden, cache = forward(cfg, params, tokens, mask=mask, cache=cache)

`params` never holds modules; `forward` rebuilds the NNX module inside the trace (`nnx.merge`), so it
is an ordinary pure function to `jax.jit`, `jax.grad` and `vmap`. `logical_axes(cfg)` gives each weight's
logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`), which
`rlm_jax.parallel` maps to mesh axes.

Padding: batches are left-padded. `mask[b, t]` is True for real tokens; positions count real tokens only,
so a padded prompt gets exactly the logits it gets alone.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.models.config import ModelConfig

Params = dict  # nested dict of arrays
_NEG_INF = -1e30  # finite, so a fully masked row (left padding) gives no NaNs


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init="normal"):
    if init == "ones":
        value = jnp.ones(shape, cfg.jnp_param_dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, cfg.jnp_param_dtype)
    else:
        value = (cfg.init_std * jax.random.normal(rngs.params(), shape)).astype(cfg.jnp_param_dtype)
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


def _add_adapters(module: nnx.Module, name: str, in_shape, in_axes, out_shape, out_axes, cfg: ModelConfig,
                  rngs: nnx.Rngs) -> None:
    """LoRA's two weights beside projection `name` when cfg adapts it: `<name>_lora_a [*in, rank]` (random,
    std 1 / sqrt(fan-in)) and `<name>_lora_b [rank, *out]` (zeros: the adapted model starts as its base)."""
    if name not in cfg.lora_target_names:
        return
    r, fan_in = cfg.lora_rank, math.prod(in_shape)
    a = (jax.random.normal(rngs.params(), (*in_shape, r)) / jnp.sqrt(fan_in)).astype(cfg.jnp_param_dtype)
    setattr(module, f"{name}_lora_a", nnx.Param(a, sharding_names=(*in_axes, "lora"), eager_sharding=False))
    setattr(module, f"{name}_lora_b", _param(rngs, (r, *out_shape), ("lora", *out_axes), cfg, init="zeros"))


def _project(module: nnx.Module, name: str, spec: str, x):
    """`x` through projection `name` (einsum `spec`, e.g. "bte,ehd->bthd"), plus its LoRA update
    (lora_scale * (x A) B) where the module has adapters for it. Compute dtype cfg.dtype."""
    cfg, dt = module.cfg, module.cfg.jnp_dtype
    y = jnp.einsum(spec, x, getattr(module, name)[...].astype(dt))
    if hasattr(module, f"{name}_lora_a"):
        a, b = getattr(module, f"{name}_lora_a")[...].astype(dt), getattr(module, f"{name}_lora_b")[...].astype(dt)
        n_in = a.ndim - 1  # contract x's trailing input axes with A's, then the rank axis with B's
        xa = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
        y = y + (cfg.lora_scale * jnp.tensordot(xa, b, axes=1)).astype(y.dtype)
    return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis: `d_model` wide (axis `embed`) unless `dim` / `axis` say otherwise
    (Qwen3's q/k norms are `head_dim` wide)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None, axis: str = "embed"):
        self.eps = cfg.norm_eps
        self.scale = _param(rngs, (dim or cfg.d_model,), (axis,), cfg, init="ones")

    def __call__(self, x):
        """x: [..., embed] -> same shape and dtype; statistics in float32 (as transformers does)."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(jnp.float32) * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies [head_dim / 2] float32 for cfg.rope_type ("default" or "llama3").

    "llama3" follows transformers' `_compute_llama3_parameters` op for op (float32): low frequencies
    (wavelength > original_max_len / low_freq_factor) are divided by `rope_factor`, high ones
    (wavelength < original_max_len / high_freq_factor) kept, the band between interpolated smoothly.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_type == "default":
        return inv_freq
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return jnp.where(medium, smoothed, scaled)


def rope(x, positions, theta: float, inv_freq: jax.Array | None = None):
    """Rotary embedding, rotate-half convention. x: [B, T, H, D]; positions: [B, T] int.

    inv_freq: [D/2] (`rope_inv_freq(cfg)`); default: plain RoPE with base `theta`.
    """
    d = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        e, h, k, d = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), cfg)
        for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
            _add_adapters(self, name, (e,), ("embed",), (heads, d), ("heads" if name == "q_proj" else "kv_heads",
                                                                     "head_dim"), cfg, rngs)
        _add_adapters(self, "o_proj", (h, d), ("heads", "head_dim"), (e,), ("embed",), cfg, rngs)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), cfg, init="zeros")
            self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.qk_norm:  # Qwen3: one head_dim-wide scale shared by all heads
            self.q_norm = RMSNorm(cfg, rngs, dim=d, axis="head_dim")
            self.k_norm = RMSNorm(cfg, rngs, dim=d, axis="head_dim")

    def project_qkv(self, x, positions):
        """x: [B, T, embed] -> q [B, T, heads, D], k and v [B, T, kv_heads, D] (q/k norm, then RoPE)."""
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        x = x.astype(dt)
        q = _project(self, "q_proj", "bte,ehd->bthd", x)
        k = _project(self, "k_proj", "bte,ehd->bthd", x)
        v = _project(self, "v_proj", "bte,ehd->bthd", x)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q).astype(dt), self.k_norm(k).astype(dt)
        inv_freq = None if cfg.rope_type == "default" else rope_inv_freq(cfg)
        return rope(q, positions, cfg.rope_theta, inv_freq), rope(k, positions, cfg.rope_theta, inv_freq), v

    def attend(self, q, k, v, allowed, prefix=None):
        """q: [B, T, H, D]; k, v: [B, S, Hkv, D]; allowed: [B, T, S] bool -> [B, T, embed].

        Query heads are grouped onto their kv head by reshaping, so k and v are never repeated.
        prefix: None or (k, v [Bp, Sp, Hkv, D], mask [Bp, Sp]) read-only keys every query may attend to
        (before its own S slots), shared by B / Bp consecutive query rows: K samples of one context
        read one copy of it.
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, h, d = q.shape
        g = h // cfg.num_kv_heads
        q = q.reshape(b, t, cfg.num_kv_heads, g, d)
        scale = jnp.sqrt(d).astype(jnp.float32)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / scale
        scores = jnp.where(allowed[:, None, None, :, :], scores, _NEG_INF)
        if prefix is not None:
            pk, pv, pmask = prefix
            bp, sp = pmask.shape
            qp = q.reshape(bp, b // bp, t, cfg.num_kv_heads, g, d)
            pscores = jnp.einsum("brtkgd,bskd->brkgts", qp, pk).astype(jnp.float32) / scale
            pscores = jnp.where(pmask[:, None, None, None, None, :], pscores, _NEG_INF).reshape(b, -1, g, t, sp)
            probs = jax.nn.softmax(jnp.concatenate([pscores, scores], -1), axis=-1).astype(dt)
            pprobs = probs[..., :sp].reshape(bp, b // bp, cfg.num_kv_heads, g, t, sp)
            out = (jnp.einsum("bkgts,bskd->btkgd", probs[..., sp:], v)
                   + jnp.einsum("brkgts,bskd->brtkgd", pprobs, pv).reshape(b, t, cfg.num_kv_heads, g, d))
        else:
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        return _project(self, "o_proj", "bthd,hde->bte", out.reshape(b, t, h, d))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        e, m = cfg.d_model, cfg.mlp_dim
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), cfg)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), cfg)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), cfg)
        _add_adapters(self, "gate_proj", (e,), ("embed",), (m,), ("mlp",), cfg, rngs)
        _add_adapters(self, "up_proj", (e,), ("embed",), (m,), ("mlp",), cfg, rngs)
        _add_adapters(self, "down_proj", (m,), ("mlp",), (e,), ("embed",), cfg, rngs)

    def __call__(self, x):
        """SwiGLU. x: [B, T, embed] -> [B, T, embed]."""
        x = x.astype(self.cfg.jnp_dtype)
        gate = jax.nn.silu(_project(self, "gate_proj", "...e,em->...m", x))
        return _project(self, "down_proj", "...m,me->...e", gate * _project(self, "up_proj", "...e,em->...m", x))


class Block(nnx.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)


class Transformer(nnx.Module):
    """The policy LM. Weights: `embed [vocab, embed]`, `blocks` (stacked, leading `layers` axis),
    `final_norm`, and `lm_head [embed, vocab]` unless embeddings are tied."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        self.blocks = nnx.vmap(lambda k: Block(cfg, nnx.Rngs(params=k)))(keys)
        self.final_norm = RMSNorm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)


@chex.dataclass
class KVCache:
    """Explicit key/value cache, shared slot layout across the batch (prompts are left-padded).

    k, v: [layers, B, S, kv_heads, head_dim]; mask: [B, S] bool, True where a slot holds a real
    token; index: [] int32, the next slot to write; next_pos: [B] int32, the position of each
    sequence's next token (real tokens seen so far).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array
    next_pos: jax.Array


@chex.dataclass
class PrefixKV:
    """Read-only keys/values a chunk attends to before its cache (e.g. a search node's prompt and path
    pages), shared by consecutive query rows: B query rows read Bp prefix rows, B / Bp rows each.

    k, v: [layers, Bp, Sp, kv_heads, head_dim] (RoPE already applied at their true positions);
    mask: [Bp, Sp] bool, True where a slot holds a real token. The cache's `next_pos` must continue
    from the prefix's real length (the caller sets it: positions count real tokens only).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
    """An empty cache of `size` slots per sequence (1 <= size <= cfg.max_seq_len)."""
    if not 1 <= size <= cfg.max_seq_len:
        raise ValueError(f"init_cache: size={size} slots must be in [1, max_seq_len={cfg.max_seq_len}]; the "
                         "cache holds prompt padding + generated tokens: pad less, generate fewer tokens, "
                         "or raise ModelConfig.max_seq_len")
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))


@functools.lru_cache(maxsize=None)
def _abstract(cfg: ModelConfig):
    """(graphdef, abstract Param state) of a model with this config; built once per config.

    Built outside any mesh context: under `jax.set_mesh` (a search's `parallel.search_mesh`) nnx.eval_shape
    would turn the params' logical axis names into shardings on that mesh, whose axes they are not."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state


def bind(cfg: ModelConfig, params: Params) -> Transformer:
    """The NNX module carrying `params` (use inside a trace; cheap)."""
    graphdef, abstract_state = _abstract(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random initial params (a plain nested dict)."""
    model = Transformer(cfg, nnx.Rngs(params=key))
    return nnx.state(model, nnx.Param).to_pure_dict()


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating (for sharded init and restore)."""
    return _abstract(cfg)[1].to_pure_dict()


def logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every weight: a dict shaped like the params, leaves are tuples.

    Stacked block weights get a leading "layers" axis.
    """
    _, state = _abstract(cfg)
    specs = nnx.get_partition_spec(state).to_pure_dict()
    specs = jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    specs["blocks"] = jax.tree.map(lambda axes: ("layers",) + axes, specs["blocks"],
                                   is_leaf=lambda x: isinstance(x, tuple))
    return specs


def default_positions(mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """Positions that count real tokens only: mask [B, T] -> [B, T] int32 (pads get a clamped value)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


def _run_blocks(model: Transformer, x, positions, allowed, cache: KVCache | None, prefix: PrefixKV | None = None):
    """Scans the stacked blocks. x: [B, T, embed]; allowed: [B, T, S] -> (x, cache k, cache v)."""
    graphdef, block_state = nnx.split(model.blocks)

    def layer(carry, xs):
        h, ck, cv = carry
        state, layer_idx, pre = xs
        blk = nnx.merge(graphdef, state)
        q, k, v = blk.attn.project_qkv(blk.attn_norm(h), positions)
        if cache is not None:  # write this chunk into the cache, attend over every slot
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer_idx, 0, cache.index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer_idx, 0, cache.index, 0, 0))
            k, v = ck[layer_idx], cv[layer_idx]
        if pre is not None:
            pre = (pre[0].astype(q.dtype), pre[1].astype(q.dtype), prefix.mask)
        h = h + blk.attn.attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed, pre).astype(h.dtype)
        h = h + blk.mlp(blk.mlp_norm(h)).astype(h.dtype)
        return (h, ck, cv), None

    ck = cache.k if cache is not None else jnp.zeros((), x.dtype)
    cv = cache.v if cache is not None else jnp.zeros((), x.dtype)
    layer_ids = jnp.arange(model.cfg.num_layers)
    pre = None if prefix is None else (prefix.k, prefix.v)  # scanned over its layers axis
    (x, ck, cv), _ = jax.lax.scan(layer, (x, ck, cv), (block_state, layer_ids, pre))
    return x, ck, cv


def _check_cache_room(cache: KVCache, t: int) -> None:
    """Raises when a chunk of t tokens cannot fit the cache (statically, or with a concrete index)."""
    s = cache.mask.shape[1]
    if t > s:
        raise ValueError(f"forward: a chunk of {t} tokens does not fit a cache of {s} slots; "
                         "init_cache a larger cache or feed shorter chunks")
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > s:
        raise ValueError(f"forward: a chunk of {t} tokens does not fit the cache's free room ({s - int(cache.index)} "
                         f"of {s} slots left at index {int(cache.index)}); init_cache a larger cache")


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, *, mask: jax.Array | None = None,
            positions: jax.Array | None = None, cache: KVCache | None = None,
            prefix: PrefixKV | None = None, compute_logits: bool = True):
    """Runs the LM on a chunk of tokens.

    Args:
      tokens: [B, T] int token ids (left-padded).
      mask: [B, T] bool, True for real tokens (default: all True).
      positions: [B, T] int (default: counts real tokens, continuing from `cache.next_pos`).
      cache: if given, the chunk is written at slot `cache.index` and attends to every valid slot
        before it; the cache must have room (`index + T <= S`: `rlm_jax.decoding` sizes it).
        T > S raises; with a concrete index (eager calls) `index + T > S` raises; under jit, where the
        index is only known at run time, an overflowing chunk gives NaN logits and hidden states
        (dynamic_update_slice would otherwise clamp and silently overwrite earlier slots).
      prefix: read-only KV every token attends to before the cache (`PrefixKV`; needs a cache).
    Raises:
      ValueError: T > cfg.max_seq_len, or the chunk does not fit the cache (see above).
    Returns:
      logits [B, T, vocab] float32 (None if not `compute_logits`: use `lm_logits` on the positions you
      need), hidden [B, T, embed] (after the final norm), and the updated cache (None without a cache).
    """
    b, t = tokens.shape
    if t > cfg.max_seq_len:
        raise ValueError(f"forward: a chunk of {t} tokens exceeds the model's context (max_seq_len="
                         f"{cfg.max_seq_len}); shorten the sequences or raise ModelConfig.max_seq_len")
    if cache is not None:
        _check_cache_room(cache, t)
    if prefix is not None and (cache is None or b % prefix.mask.shape[0]):
        raise ValueError(f"forward: a prefix needs a cache and a batch ({b}) that is a multiple of the prefix's "
                         f"rows ({prefix.mask.shape[0]})")
    if mask is None:
        mask = jnp.ones((b, t), bool)
    mask = mask.astype(bool)
    if positions is None:
        positions = default_positions(mask, None if cache is None else cache.next_pos)
    model = bind(cfg, params)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(cfg.jnp_dtype)

    if cache is None:
        causal = jnp.tril(jnp.ones((t, t), bool))
        allowed = causal[None] & mask[:, None, :]
        new_cache = None
    else:
        s = cache.mask.shape[1]
        slot_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
        query_slot = cache.index + jnp.arange(t)
        allowed = (jnp.arange(s)[None, :] <= query_slot[:, None])[None] & slot_mask[:, None, :]
    x, ck, cv = _run_blocks(model, x, positions, allowed, cache, prefix)
    hidden = model.final_norm(x)
    if cache is not None and isinstance(cache.index, jax.core.Tracer):  # overflow known only at run time
        hidden = jnp.where(cache.index + t > s, jnp.nan, hidden)
    if cache is not None:
        new_cache = KVCache(k=ck, v=cv, mask=slot_mask, index=cache.index + t,
                            next_pos=cache.next_pos + mask.sum(axis=1, dtype=jnp.int32))
    logits = lm_logits(cfg, params, hidden) if compute_logits else None
    return logits, hidden, new_cache


def lm_logits(cfg: ModelConfig, params: Params, hidden):
    """hidden [..., embed] (after the final norm) -> logits [..., vocab], float32."""
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...e,ev->...v", hidden.astype(cfg.jnp_dtype), w.astype(cfg.jnp_dtype),
                      preferred_element_type=jnp.float32)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def param_summary(params: Params) -> dict[str, Any]:
    """{path: shape} for printing."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}
