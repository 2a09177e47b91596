"""One trainer for every phase: `train(name, tc, objective, params, batches, ...)`.

    params, last = trainer.train("sft", c.sft, Objective(steps.next_token_loss, (cfg,)), params,
                                 example_batches(arrays, c.sft.batch_size, seed), ckpt_dir, writer, mesh)

The jitted, sharded step is cached on (model, head, mesh, objective, optimizer settings): phases and RL
iterations that train the same way reuse one compiled program instead of jitting a fresh closure per call.
Params and optimizer state keep their shardings (`parallel.model_param_shardings` / `opt_state_shardings`)
and are donated; batches are global host arrays, the same on every process.

Gradient accumulation (`grad_accum` > 1) happens inside the step (`steps.make_train_step`): one update's
batch holds grad_accum micro-batches, averaged with the objective's denominators as weights.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from rlm_jax import parallel
from rlm_jax.config import TrainerConfig
from rlm_jax.models import heads, lora
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import loop, steps


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss as hashable data: `fn(*args, params, batch, **kwargs) -> (loss, metrics)`, with `fn` a module-level
    function and `args` / `kwargs` hashable (configs, floats), so that equal objectives share a compiled step."""

    fn: Callable
    args: tuple = ()
    kwargs: tuple = ()  # (name, value) pairs

    def __call__(self, params, batch):
        return self.fn(*self.args, params, batch, **dict(self.kwargs))


def make_optimizer(tc: TrainerConfig, steps: int | None = None, b2: float = 0.95,
                   end_lr_fraction: float = 0.1) -> optax.GradientTransformation:
    """AdamW with `tc.warmup_steps` of linear warmup then cosine decay to end_lr_fraction * lr over `steps`
    updates (default tc.steps), after global-norm clipping at tc.clip_norm (0: none)."""
    steps = tc.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"optimizer steps must be >= 1, got {steps}")
    warmup = min(tc.warmup_steps, steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(init_value=0.0 if warmup else tc.lr, peak_value=tc.lr,
                                                  warmup_steps=warmup, decay_steps=steps,
                                                  end_value=tc.lr * end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm) if tc.clip_norm else optax.identity(),
                       optax.adamw(schedule, b2=b2, weight_decay=tc.weight_decay))


def _path_strs(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def opt_state_shardings(optimizer, cfg: ModelConfig, mesh, rules: parallel.Rules = parallel.DEFAULT_RULES,
                        head_cfg: heads.HeadConfig | None = None):
    """Shardings of `optimizer.init(params)`, computed from shapes only (value-model params with `head_cfg`).

    Optax states hold per-param copies of the params tree (adam's mu and nu, ...): a state leaf whose
    path ends with a param's path and has that param's shape gets that param's sharding; anything else
    (step counts, factored statistics of other shapes) is replicated.
    """
    abstract = parallel.abstract_model_params(cfg, head_cfg)
    p_sh = parallel.model_param_shardings(cfg, mesh, rules, head_cfg)
    by_path = {_path_strs(p): (a.shape, s) for (p, a), s in
               zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(p_sh))}
    state = jax.eval_shape(optimizer.init, abstract)
    rep = parallel.replicated(mesh)

    def pick(path, leaf):
        path = _path_strs(path)
        for start in range(len(path)):  # longest suffix first
            hit = by_path.get(path[start:])
            if hit is not None:
                return hit[1] if hit[0] == leaf.shape else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, state)


def init_opt_state(optimizer, params, shardings):
    """`optimizer.init(params)` created directly in `shardings` (from `opt_state_shardings`). Sharding the
    state before the first step also avoids compiling the step twice."""
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


def jit_train_step(cfg: ModelConfig, mesh, optimizer, rules: parallel.Rules = parallel.DEFAULT_RULES,
                   loss_fn: Callable | None = None, donate: bool = True, head_cfg: heads.HeadConfig | None = None,
                   grad_accum: int = 1) -> Callable:
    """`make_train_step` jitted with shardings: params / opt_state keep theirs in and out and are donated;
    every batch leaf is [B, ...] with `parallel.data_sharding`; metrics are replicated scalars. `loss_fn`
    default: the next-token loss (`steps.next_token_loss`)."""
    p_sh = parallel.model_param_shardings(cfg, mesh, rules, head_cfg)
    o_sh = opt_state_shardings(optimizer, cfg, mesh, rules, head_cfg)
    return jax.jit(steps.make_train_step(cfg, optimizer, loss_fn, jit=False, grad_accum=grad_accum),
                   in_shardings=(p_sh, o_sh, parallel.data_sharding(mesh, rules)),
                   out_shardings=(p_sh, o_sh, parallel.replicated(mesh)), donate_argnums=(0, 1) if donate else ())


def _optimizer_settings(tc: TrainerConfig, updates: int) -> TrainerConfig:
    """The fields of `tc` the optimizer and step depend on, as a plain TrainerConfig (a hashable cache key)."""
    keep = {f.name: getattr(tc, f.name) for f in dataclasses.fields(TrainerConfig)}
    return TrainerConfig(**{**keep, "steps": updates, "save_every": 1, "log_every": 1})


@functools.lru_cache(maxsize=64)
def _compiled(cfg: ModelConfig, head: heads.HeadConfig | None, mesh, objective: Objective, settings: TrainerConfig):
    optimizer = make_optimizer(settings)
    if cfg.lora_rank:  # only the adapters (and a value model's head) train
        optimizer = lora.freeze_base(optimizer)
    step = jit_train_step(cfg, mesh, optimizer, loss_fn=objective, head_cfg=head, grad_accum=settings.grad_accum)
    return optimizer, step


def example_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int) -> Callable[[int], dict]:
    """batch_at(step) over padded example arrays [N, ...]: shuffled anew every epoch (`loop.epoch_batch_indices`),
    host arrays, the same global batch on every process."""
    n = next(iter(arrays.values())).shape[0]

    def batch_at(step: int):
        idx = loop.epoch_batch_indices(n, batch_size, step, seed)
        return {k: v[idx] for k, v in arrays.items()}

    return batch_at


def trim_padding(batch, multiple: int = 8):
    """The batch without the leading time columns no row uses: training batches are left-padded to seq_len,
    and positions count real tokens only, so the model computes the same on the narrower batch, for fewer
    positions (countdown's SFT rows hold at most 39 of 64). The width is rounded up to a multiple of
    `multiple`, so a phase compiles its step for a few widths only. [B, T] arrays and [B, T - 1] ones
    (next-token log-probs) lose the same leading columns; a dict without a [B, T] "mask" has its sub-dicts
    trimmed each on its own (SFT rehearsal beside RL rows) and its other leaves kept."""
    if not isinstance(batch, dict):
        return batch
    mask = batch.get("mask")
    if not (isinstance(mask, np.ndarray) and mask.ndim == 2):
        return {k: trim_padding(v, multiple) if isinstance(v, dict) else v for k, v in batch.items()}
    b, t = mask.shape
    used = np.flatnonzero(mask.any(axis=0))
    width = min(t, -(-(t - used[0] if used.size else 1) // multiple) * multiple)
    cut = t - width
    if not cut:
        return batch
    narrow = lambda x: x[:, cut:] if (isinstance(x, np.ndarray) and x.ndim >= 2 and x.shape[0] == b  # noqa: E731
                                      and x.shape[1] in (t, t - 1)) else x
    return {k: narrow(v) for k, v in batch.items()}


def _grouped(batch_at: Callable[[int], Any], k: int) -> Callable[[int], Any]:
    """Update u's batch: micro-batches u*k .. u*k + k - 1 of `batch_at`, concatenated along the batch."""
    if k == 1:
        return batch_at
    return lambda u: jax.tree.map(lambda *xs: np.concatenate(xs), *[batch_at(u * k + i) for i in range(k)])


def train(name: str, tc: TrainerConfig, objective: Objective, cfg: ModelConfig, params, batches: Callable[[int], Any],
          ckpt_dir, writer, mesh, head: heads.HeadConfig | None = None, updates: int | None = None):
    """Trains `params` (a policy's, or a value model's {"trunk", "head"} with `head`) for `updates` optimizer
    updates (default tc.steps) on `batches(micro_step)`, resuming from `ckpt_dir` (`loop.train`).
    Returns (params, last metrics)."""
    updates = tc.steps if updates is None else updates
    optimizer, step = _compiled(cfg, head, mesh, objective, _optimizer_settings(tc, updates))
    p_sh = parallel.model_param_shardings(cfg, mesh, head_cfg=head)
    # a copy on the params' shardings: the step donates its inputs, the caller's arrays stay valid
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p), out_shardings=p_sh)(
        jax.tree.map(parallel.put_global, params, p_sh))
    opt_state = init_opt_state(optimizer, params,
                                        opt_state_shardings(optimizer, cfg, mesh, head_cfg=head))
    sharded = lambda p, o, batch: step(p, o, parallel.shard_global_batch(batch, mesh))  # noqa: E731
    grouped = _grouped(batches, tc.grad_accum)
    params, _, last = loop.train(name, sharded, params, opt_state, lambda u: trim_padding(grouped(u)), updates,
                                 ckpt_dir, writer, save_every=tc.save_every, log_every=tc.log_every)
    return params, last
