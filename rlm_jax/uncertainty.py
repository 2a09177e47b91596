"""Token-level uncertainty of the policy: entropy, varentropy and Gini impurity of its next-token distribution.

For p = softmax(logits) over the vocabulary (temperature 1: the model's own distribution, as
`DecodeOutput.logprobs`):
  entropy     H = -sum_v p_v log p_v                    (nats; 0 = certain, log V = uniform)
  varentropy  VH = sum_v p_v (log p_v + H)^2            (the variance of the surprisal -log p: low with one
                                                          clear choice or a flat spread, high when a few
                                                          candidates stand out from a long tail)
  gini        G = 1 - sum_v p_v^2                       (the chance two draws differ)
The blueprint proposes forking a reasoning step where the model is uncertain; x1 ships a token-level
analysis of these quantities. `decoding.decode(..., uncertainty=True)` returns them for every generated
token from the logits it samples from (no extra forward pass); `step_summary` aggregates them per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FIELDS = ("entropy", "varentropy", "gini")  # the last axis of `token_stats`


def token_stats(logits: jax.Array) -> jax.Array:
    """logits [..., V] -> [..., 3]: entropy, varentropy, Gini of softmax(logits), in float32.

    -inf logits (masked tokens) have p = 0 and contribute nothing."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    plogp = jnp.where(p > 0, p * logp, 0.0)  # 0 log 0 = 0, also where logp is -inf
    entropy = -jnp.sum(plogp, axis=-1)
    dev = jnp.where(p > 0, logp + entropy[..., None], 0.0)
    varentropy = jnp.sum(p * dev * dev, axis=-1)
    gini = 1.0 - jnp.sum(p * p, axis=-1)
    return jnp.stack([entropy, varentropy, gini], axis=-1)


def step_summary(stats: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-step aggregates of token stats [..., L, 3] over the step's real tokens (mask [..., L]):
    {"<field>_mean", "<field>_max"} [...] for each field (0 for an empty step)."""
    m = mask[..., None].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    mean = jnp.sum(stats * m, axis=-2) / n
    peak = jnp.max(jnp.where(m > 0, stats, 0.0), axis=-2)
    out = {}
    for j, name in enumerate(FIELDS):
        out[f"{name}_mean"], out[f"{name}_max"] = mean[..., j], peak[..., j]
    return out
