"""A fixed-capacity FIFO replay buffer of training samples, as a pytree of arrays (pure functional).

Phase 2 of the blueprint (Algorithm 4) pushes (state, step, q) samples from pruned MCTS trees into a
buffer R and samples training batches from it. Here a sample is one row of the batch layout of
`rlm_jax.training.rl` (tokens/mask/loss_mask [L], old_/ref_logprobs [L-1], per-sample scalars), so a
sampled batch goes straight into `rl.ppo_loss` & co.

    buf = replay.init(capacity=4096, seq_len=256)                 # fields=replay.STEP_FIELDS
    buf = replay.add(buf, samples)                                # new buffer; oldest rows overwritten
    batch, idx = replay.sample(buf, key, 64)                      # uniform
    batch, idx = replay.sample(buf, key, 64, priority="advantage", beta=0.4)  # prioritised + IS weights

Field kinds follow from the name: `*tokens` and `*mask` (incl. `*loss_mask`) are [L] token rows,
`*logprobs` are [L-1] (aligned with `steps.target_log_probs`), anything else is one scalar per sample.
Shorter token rows are left-padded to the buffer's width L (padding: token 0, mask False, log-prob 0),
matching the codebase's left-padding convention; longer ones are an error. Every function works under
`jax.jit` (shapes are static); `add`'s write position is data, so adding never recompiles.
"""
from __future__ import annotations

from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

STEP_FIELDS = {
    "tokens": jnp.int32, "mask": jnp.bool_, "loss_mask": jnp.bool_,
    "old_logprobs": jnp.float32, "ref_logprobs": jnp.float32,
    "q": jnp.float32, "v_next": jnp.float32, "v_current": jnp.float32, "reward": jnp.float32,
    "advantage": jnp.float32, "group": jnp.int32,
}
PAIR_FIELDS = {
    **{f"{side}_{f}": dt for side in ("chosen", "rejected")
       for f, dt in (("tokens", jnp.int32), ("mask", jnp.bool_), ("loss_mask", jnp.bool_),
                     ("ref_logprobs", jnp.float32))},
    "group": jnp.int32,
}


def field_kind(name: str) -> str:
    """'token' ([L]), 'target' ([L-1]) or 'scalar' ([]), from the field's name."""
    if name.endswith("tokens") or name.endswith("mask"):
        return "token"
    if name.endswith("logprobs"):
        return "target"
    return "scalar"


def _tokens_field(name: str) -> str:
    """The token field a log-prob field is aligned with: chosen_ref_logprobs -> chosen_tokens."""
    for side in ("chosen_", "rejected_"):
        if name.startswith(side):
            return side + "tokens"
    return "tokens"


@chex.dataclass(frozen=True)
class ReplayBuffer:
    """data: {name: [C, ...]}; stamp [C] int32: insertion number of the row in each slot (-1: empty);
    ptr []: next slot to write; size []: rows stored (<= C); count []: rows ever added.
    Stored rows are always slots [0, size)."""
    data: dict
    stamp: chex.Array
    ptr: chex.Array
    size: chex.Array
    count: chex.Array

    @property
    def capacity(self) -> int:
        return self.stamp.shape[0]

    @property
    def seq_len(self) -> int | None:
        """Token width L (None if the buffer stores no token field)."""
        for name, x in self.data.items():
            if field_kind(name) == "token":
                return x.shape[1]
        return None


def init(capacity: int, seq_len: int, fields: Mapping[str, object] = STEP_FIELDS) -> ReplayBuffer:
    """An empty buffer of `capacity` rows with token width `seq_len`. fields: {name: dtype}."""
    if capacity < 1 or seq_len < 2:
        raise ValueError(f"replay.init: need capacity >= 1 and seq_len >= 2, got {capacity}, {seq_len}")
    width = {"token": (seq_len,), "target": (seq_len - 1,), "scalar": ()}
    data = {k: jnp.zeros((capacity,) + width[field_kind(k)], dt) for k, dt in fields.items()}
    z = jnp.zeros((), jnp.int32)
    return ReplayBuffer(data=data, stamp=jnp.full((capacity,), -1, jnp.int32), ptr=z, size=z, count=z)


def _prepare(buffer: ReplayBuffer, samples: Mapping) -> tuple[dict, int]:
    """Checks fields and shapes, left-pads token rows to the buffer's width. -> (rows, n)."""
    missing = sorted(set(buffer.data) - set(samples))
    extra = sorted(set(samples) - set(buffer.data))
    if missing:
        raise KeyError(f"replay.add: samples lack fields {missing} that the buffer stores; add them, "
                       "or init the buffer with `fields` that leave them out")
    if extra:
        raise KeyError(f"replay.add: samples have fields {extra} that the buffer does not store; drop "
                       "them, or init the buffer with `fields` that include them")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in samples.items()}
    n = next(iter(sizes.values()))
    if n is None or any(s != n for s in sizes.values()):
        raise ValueError(f"replay.add: every field needs the same leading (sample) axis; got {sizes}")
    rows = {}
    for name, x in samples.items():
        x = jnp.asarray(x)
        store = buffer.data[name]
        kind = field_kind(name)
        if kind == "scalar":
            if x.shape != (n,):
                raise ValueError(f"replay.add: samples[{name!r}] has shape {x.shape}, expected ({n},)")
        else:
            if x.ndim != 2:
                raise ValueError(f"replay.add: samples[{name!r}] has shape {x.shape}, expected [N, length]")
            width, have = store.shape[1], x.shape[1]
            if have > width:
                what = "tokens" if kind == "token" else "log-prob entries (tokens - 1)"
                raise ValueError(
                    f"replay.add: samples[{name!r}] has {have} {what} but the buffer's width is {width} "
                    f"(seq_len {buffer.seq_len}): init the buffer with a larger seq_len, or truncate the "
                    "left-padded samples from the left")
            if kind == "target":
                tok = _tokens_field(name)
                if tok in samples and np.shape(samples[tok])[1] - 1 != have:
                    raise ValueError(
                        f"replay.add: samples[{name!r}] has {have} entries but samples[{tok!r}] has "
                        f"{np.shape(samples[tok])[1]} tokens; log-probs need tokens - 1 entries "
                        "(steps.target_log_probs alignment)")
            x = jnp.pad(x, ((0, 0), (width - have, 0)))  # left padding: 0 / False
        rows[name] = x.astype(store.dtype)
    return rows, n


def add(buffer: ReplayBuffer, samples: Mapping) -> ReplayBuffer:
    """A new buffer with `samples` ({name: [N, ...]}, the buffer's fields) appended, overwriting the
    oldest rows when full (FIFO). N may exceed the capacity: then only the newest `capacity` rows stay."""
    rows, n = _prepare(buffer, samples)
    c = buffer.capacity
    skip = max(n - c, 0)  # rows that would be overwritten within this call: never written, no duplicate
    kept = n - skip       # scatter indices (whose order XLA leaves unspecified)
    offsets = jnp.arange(kept, dtype=jnp.int32)
    idx = (buffer.ptr + offsets) % c
    data = {k: buffer.data[k].at[idx].set(v[skip:]) for k, v in rows.items()}
    stamp = buffer.stamp.at[idx].set(buffer.count + skip + offsets)
    return ReplayBuffer(data=data, stamp=stamp, ptr=(buffer.ptr + kept) % c,
                        size=jnp.minimum(buffer.size + kept, c), count=buffer.count + n)


def priorities(buffer: ReplayBuffer, kind="advantage", *, alpha: float = 1.0, eps: float = 1e-3,
               half_life: float | None = None):
    """Unnormalised sampling weights [C] of the stored rows (0 for empty slots).

    kind: "advantage": (|advantage| + eps) ** alpha (prioritised replay on the TD error, which the
            blueprint's advantage is; eps keeps zero-advantage rows reachable);
          "recency": 0.5 ** (age / half_life), age 0 for the newest row (default half_life: capacity/4);
          or an explicit [C] array of non-negative priorities (raised to alpha).
    """
    valid = jnp.arange(buffer.capacity) < buffer.size
    if isinstance(kind, str):
        if kind == "advantage":
            if "advantage" not in buffer.data:
                raise KeyError("replay: priority='advantage' needs an 'advantage' field in the buffer")
            p = (jnp.abs(buffer.data["advantage"].astype(jnp.float32)) + eps) ** alpha
        elif kind == "recency":
            hl = buffer.capacity / 4 if half_life is None else half_life
            age = (buffer.count - 1 - buffer.stamp).astype(jnp.float32)
            p = 0.5 ** (age / hl)
        else:
            raise ValueError(f"replay: priority {kind!r} unknown; use 'advantage', 'recency' or an array")
    else:
        p = jnp.asarray(kind, jnp.float32)
        if p.shape != (buffer.capacity,):
            raise ValueError(f"replay: a priority array needs shape ({buffer.capacity},), got {p.shape}")
        p = jnp.maximum(p, 0.0) ** alpha
    return jnp.where(valid, p, 0.0)


def sample(buffer: ReplayBuffer, key, batch_size: int, *, priority=None, alpha: float = 1.0,
           eps: float = 1e-3, half_life: float | None = None, beta: float | None = None):
    """Draws `batch_size` stored rows with replacement -> (batch {name: [batch_size, ...]}, indices).

    priority: None (uniform over stored rows) or a `priorities` kind ("advantage", "recency", an array).
    beta: if set, batch['sample_weight'] holds prioritised replay's importance weights
      (size * P(i)) ** -beta, divided by their maximum over the stored rows (so <= 1); the rl losses
      read that key. Uniform sampling gives weights 1.
    Raises on an empty buffer when its size is known; under jit an empty buffer returns slot 0 (zeros).
    """
    if not isinstance(buffer.size, jax.core.Tracer) and int(buffer.size) == 0:
        raise ValueError("replay.sample: the buffer is empty; add samples first")
    if priority is None:
        idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
        probs = None
    else:
        p = priorities(buffer, priority, alpha=alpha, eps=eps, half_life=half_life)
        probs = p / p.sum()
        idx = jax.random.categorical(key, jnp.log(probs), shape=(batch_size,))  # log 0 = -inf: never
    batch = {k: v[idx] for k, v in buffer.data.items()}
    if beta is not None:
        if probs is None:
            batch["sample_weight"] = jnp.ones((batch_size,), jnp.float32)
        else:
            n = buffer.size.astype(jnp.float32)
            valid = probs > 0
            w_all = jnp.where(valid, (n * jnp.where(valid, probs, 1.0)) ** -beta, 0.0)
            batch["sample_weight"] = w_all[idx] / jnp.max(w_all)
    return batch, idx


def contents(buffer: ReplayBuffer) -> dict:
    """The stored rows as numpy arrays, oldest first (host-side; for inspection, epochs over the whole
    buffer, and tests). Includes '_stamp', each row's insertion number."""
    size = int(buffer.size)
    stamp = np.asarray(buffer.stamp)[:size]
    order = np.argsort(stamp, kind="stable")
    out = {k: np.asarray(v)[:size][order] for k, v in buffer.data.items()}
    out["_stamp"] = stamp[order]
    return out


__all__ = ["STEP_FIELDS", "PAIR_FIELDS", "ReplayBuffer", "field_kind", "init", "add", "priorities",
           "sample", "contents"]
