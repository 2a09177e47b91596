"""Optimizers from config: AdamW, warmup + cosine schedule, global-norm clipping, accumulation."""
from __future__ import annotations

import optax


def make_optimizer(lr: float, steps: int, warmup_steps: int = 0, weight_decay: float = 0.0,
                   clip_norm: float = 1.0, grad_accum: int = 1, b2: float = 0.95,
                   end_lr_fraction: float = 0.1) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to `end_lr_fraction * lr` over `steps` updates.

    `steps` counts optimizer updates; with `grad_accum > 1` every update averages that many micro-batch
    gradients (optax.MultiSteps), so the caller runs `steps * grad_accum` micro-steps.
    """
    if steps < 1:
        raise ValueError(f"optimizer steps must be >= 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    warmup_steps = min(warmup_steps, steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else lr, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=steps, end_value=lr * end_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
                     optax.adamw(schedule, b2=b2, weight_decay=weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx
