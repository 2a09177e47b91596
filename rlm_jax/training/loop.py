"""A resumable training loop shared by every phase (SFT, value, RL updates).

Batches are a pure function of the step (`batch_at(step)`), so a run that is killed and restarted
resumes from its last checkpoint and sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import parallel
from rlm_jax import metrics as metrics_lib


def epoch_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: examples shuffled anew each epoch (seeded), drawn in order."""
    if num_examples < 1:
        raise ValueError("no training examples")
    per_epoch = max(1, num_examples // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    idx = perm[k * batch_size:(k + 1) * batch_size]
    if len(idx) < batch_size:  # fewer examples than one batch: wrap around
        idx = np.resize(perm, batch_size)
    return idx


def map_batches(fn: Callable, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """fn(tokens [b, T], mask [b, T]) -> [b, ...] over all rows, in fixed-size batches (the last one
    padded by repeating a row) so a jitted `fn` compiles once. Returns the concatenated numpy result."""
    out = []
    for s in range(0, tokens.shape[0], batch_size):
        t, m = tokens[s:s + batch_size], mask[s:s + batch_size]
        pad = batch_size - t.shape[0]
        if pad:
            t, m = np.concatenate([t, np.repeat(t[:1], pad, 0)]), np.concatenate([m, np.repeat(m[:1], pad, 0)])
        out.append(parallel.to_host(fn(t, m))[:batch_size - pad])  # every host: all rows
    return np.concatenate(out)


def train(name: str, step_fn: Callable, params: Any, opt_state: Any, batch_at: Callable[[int], Mapping],
          num_steps: int, ckpt_dir, writer: metrics_lib.MetricsWriter | None = None,
          save_every: int = 100, log_every: int = 10, step_offset: int = 0) -> tuple[Any, Any, dict]:
    """Runs `num_steps` of `step_fn(params, opt_state, batch) -> (params, opt_state, metrics)`.

    `step_fn` may donate its inputs: pass params / opt_state the caller no longer needs (e.g. the copies
    `parallel.sharded_trainer` makes). Resumes from the latest checkpoint in `ckpt_dir` (params,
    opt_state, restored in their shardings); saves every `save_every` steps and at the end. Metrics go to `writer` under prefix `name` at global step
    `step_offset + step`. Returns (params, opt_state, last metrics as floats).
    """
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=2)
    start = 0
    if ckpt.latest_step() is not None:
        abstract = ckpt_lib.abstract_of({"params": params, "opt_state": opt_state})
        restored = ckpt.restore(abstract_state=abstract)  # None: every step was corrupt (moved aside)
        if restored is not None:
            state, meta = restored
            params, opt_state, start = state["params"], state["opt_state"], int(meta["step"])
    last: dict = {}
    bar = metrics_lib.progress(num_steps, desc=name, initial=start)
    try:
        for step in range(start, num_steps):
            params, opt_state, m = step_fn(params, opt_state, batch_at(step))
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                last = {k: float(v) for k, v in jax.device_get(m).items()}
                if writer is not None:
                    writer.write(step_offset + done, last, prefix=name)
                bar.set_metrics(last)
            if done % save_every == 0 or done == num_steps:
                ckpt.save(done, {"params": params, "opt_state": opt_state}, {"step": done}, force=True)
            bar.update(1)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
    return params, opt_state, last
