"""A minimal, reusable LM train step: pure functions on plain pytrees, raw optax.

    step = make_train_step(cfg, optax.adamw(1e-4))
    params, opt_state, metrics = step(params, opt_state, batch)

`batch` is a dict of [B, T] arrays (left-padded):
  tokens:    int token ids;
  mask:      bool, True for real tokens (False for padding);
  loss_mask: bool, True for the tokens that count as prediction targets (e.g. the completion, not the
             prompt). Token t is predicted from position t - 1.
SFT uses the default next-token loss; RL and other objectives pass their own
`loss_fn(params, batch) -> (loss, metrics)` and reuse the rest. `rlm_jax.training.trainer` jits the same
step with shardings.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from rlm_jax.models import lora, transformer
from rlm_jax.models.config import ModelConfig

LossFn = Callable  # (params, batch) -> (scalar loss, dict of scalar metrics)


def target_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of each next token: logits [B, T, V], tokens [B, T] -> [B, T - 1] float32, where
    entry t is log p(tokens[t + 1] | tokens[:t + 1])."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    # logsumexp minus the target logit: no [B, T, V] log-softmax array is materialised
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def target_weights(batch) -> jax.Array:
    """[B, T - 1] float32 weights of the next-token targets: target t + 1 counts when it is in
    `loss_mask` and real, and the token predicting it is real too (under left padding the first real
    token has only padding before it, so it is never a target)."""
    mask = batch["mask"].astype(bool)
    keep = batch["loss_mask"].astype(bool)[:, 1:] & mask[:, 1:] & mask[:, :-1]
    return keep.astype(jnp.float32)


def next_token_loss(cfg: ModelConfig, params, batch):
    """Cross-entropy averaged over the counted target tokens of the whole batch (not per sequence).

    Returns (loss, metrics) with metrics {loss, accuracy (argmax = target), num_tokens}. With no
    counted token the loss is 0 (not NaN).
    """
    logits, _, _ = transformer.forward(cfg, params, batch["tokens"], mask=batch["mask"])
    w = target_weights(batch)
    n = w.sum()
    denom = jnp.maximum(n, 1.0)
    loss = -(target_log_probs(logits, batch["tokens"]) * w).sum() / denom
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": (correct * w).sum() / denom, "num_tokens": n}


_DENOMINATORS = ("weight", "num_tokens")


def _denominator(metrics) -> jax.Array:
    for name in _DENOMINATORS:
        if name in metrics:
            return jnp.asarray(metrics[name], jnp.float32)
    raise ValueError("gradient accumulation needs the objective's denominator in metrics['weight'] (or "
                     f"'num_tokens'); got {sorted(metrics)}; use grad_accum=1 with this objective")


def _step_fn(objective: Callable, optimizer: optax.GradientTransformation, grad_accum: int):

    def grads_of(params, batch):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
        return grads, metrics

    def accumulated(params, batch):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def body(carry, mb):
            grads, metrics = grads_of(params, mb)
            w = _denominator(metrics)
            sums, metric_sums, total = carry
            return (jax.tree.map(lambda c, g: c + w * g, sums, grads),
                    jax.tree.map(lambda c, m: c + w * m, metric_sums, metrics), total + w), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             jax.eval_shape(lambda p, b: (*grads_of(p, b), jnp.float32(0)), params, first))
        (grads, metrics, total), _ = jax.lax.scan(body, zeros, micro)
        scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        metrics = jax.tree.map(lambda m: m * scale, metrics)
        name = next(k for k in _DENOMINATORS if k in metrics)
        metrics[name] = total  # the whole batch's denominator, not a weighted mean of them
        return jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params), metrics

    def step(params, opt_state, batch):
        grads, metrics = grads_of(params, batch) if grad_accum == 1 else accumulated(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.global_norm(grads)}

    return step


def _adapters_only(objective: Callable) -> Callable:
    return lambda params, batch: objective(lora.stop_base_gradient(params), batch)


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    loss_fn: LossFn | None = None, jit: bool = True, grad_accum: int = 1) -> Callable:
    """`step(params, opt_state, batch) -> (params, opt_state, metrics)`: one gradient step.

    Args:
      optimizer: any optax transformation; `opt_state = optimizer.init(params)`.
      loss_fn: `(params, batch) -> (loss, metrics dict)`; default `next_token_loss(cfg, ...)`.
      jit: jit with params and opt_state donated (the inputs are invalid after the call). False gives
        the pure function, e.g. for `rlm_jax.training.trainer.jit_train_step` to jit with shardings.
      grad_accum: > 1: every batch leaf is [grad_accum * b, ...]; the micro-batch gradients are combined
        with the objective's denominators as weights (metrics["weight"], or "num_tokens" for the next-token
        loss; `lax.scan`, one compiled body), so the update equals one batch of all the rows: never an
        average of per-micro-batch means, which over-weights micro-batches with few counted tokens.
    Metrics are the loss_fn's (weighted means under accumulation) plus `grad_norm` (global L2 norm of the
    gradients, before the optimizer).

    Under LoRA (`cfg.lora_rank` > 0) the loss sees the base weights through `stop_gradient` (their gradients
    are zeros, never computed); pair it with `lora.freeze_base(optimizer)` so they get no state or update.
    """
    objective = loss_fn or functools.partial(next_token_loss, cfg)
    if cfg.lora_rank:
        objective = _adapters_only(objective)
    step = _step_fn(objective, optimizer, grad_accum)
    return jax.jit(step, donate_argnums=(0, 1)) if jit else step
