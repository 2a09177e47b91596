"""(weighted sum, denominator) bookkeeping of the training objectives (tunix's LossOutput(WeightedMetric) idea).

An objective returns `Sums`: {name: (weighted sum, denominator)}, with the objective under "loss"; `finalize`
divides each pair once. Denominators never depend on params, so d(sum / denom) = d(sum) / denom, and the
trainer's gradient accumulation weights micro-batches by the denominator (`metrics["weight"]`): the mean over
micro-batches equals the full-batch mean exactly.
"""
from __future__ import annotations

import jax.numpy as jnp

Pair = tuple  # (weighted sum, denominator): scalar float32 arrays
Sums = dict  # name -> Pair; "loss" is the objective


def safe_div(s, d):
    """s / d, and 0 (not NaN) where nothing was counted."""
    return jnp.where(d > 0, s / jnp.where(d > 0, d, 1.0), 0.0)


def finalize(sums: Sums):
    """Sums -> (loss, metrics): every pair divided once. metrics also holds `weight`, the loss's
    denominator (counted tokens for PPO/GRPO, pairs for DPO, samples for the value loss)."""
    metrics = {k: safe_div(s, d) for k, (s, d) in sums.items()}
    metrics["weight"] = sums["loss"][1]
    return metrics["loss"], metrics


def require(batch, keys, who: str, hint: str = ""):
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{who} needs batch keys {missing} (got {sorted(batch)}){'; ' + hint if hint else ''}")


def check_shape(batch, key, shape, who: str, what: str):
    got = tuple(batch[key].shape)
    if got != tuple(shape):
        raise ValueError(f"{who}: batch[{key!r}] has shape {got}, expected {tuple(shape)} ({what})")


def sample_weight(batch, b: int):
    """[B] float32: batch['sample_weight'] or ones."""
    if "sample_weight" in batch:
        return jnp.asarray(batch["sample_weight"], jnp.float32).reshape(b)
    return jnp.ones((b,), jnp.float32)
