"""Phase 1, policy SFT: next-token loss on reasoning traces, on the solution tokens only."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlm_jax import formatting, parallel
from rlm_jax.models.config import ModelConfig
from rlm_jax.tasks.base import Problem, Task
from rlm_jax.tokenizer import Tokenizer
from rlm_jax.training import loop, optim


def trace_examples(tok: Tokenizer, task: Task, problems: Sequence[Problem],
                   traces: Sequence[Sequence[str]] | None = None) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss_mask) per problem: the given traces, or the task's reference solver's."""
    if traces is None:
        traces = [task.solve(p) for p in problems]
    return [formatting.sft_example(tok, task, p, t) for p, t in zip(problems, traces)]


def reference_traces(task: Task, problems: Sequence[Problem], per_problem: int = 1):
    """(problems, traces), one row per trace: up to `per_problem` distinct reference solutions of each
    problem (the task's `solutions`, in its order), else the one of `solve`. Several solutions of one
    problem teach the policy its alternatives, so its samples differ where the problem allows."""
    if per_problem <= 1:
        return list(problems), [task.solve(p) for p in problems]
    if not hasattr(task, "solutions"):
        raise ValueError(f"task {task.name} cannot enumerate solutions; set task.traces_per_problem=1")
    rows = [(p, t) for p in problems for t in task.solutions(p)[:per_problem]]
    return [p for p, _ in rows], [t for _, t in rows]


def batch_fn(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    """batch_at(step) over padded example arrays [N, ...] (see loop.epoch_batch_indices): host arrays,
    the same global batch on every process."""
    n = next(iter(arrays.values())).shape[0]

    def batch_at(step: int):
        idx = loop.epoch_batch_indices(n, batch_size, step, seed)
        return {k: v[idx] for k, v in arrays.items()}

    return batch_at


def run_sft(cfg: ModelConfig, params, arrays: dict[str, np.ndarray], tc, ckpt_dir, writer, seed: int,
            mesh, name: str = "sft"):
    """Trains `params` on the padded examples [N, T] with the sharded train step on `mesh` (batch over
    data x fsdp); tc: a config with steps, batch_size, lr, warmup_steps, weight_decay, clip_norm,
    grad_accum, save_every, log_every. Returns (params, last metrics)."""
    tx = optim.make_optimizer(tc.lr, tc.steps, tc.warmup_steps, tc.weight_decay, tc.clip_norm, tc.grad_accum)
    step_fn, params, opt_state = parallel.sharded_trainer(cfg, mesh, tx, params)
    params, _, last = loop.train(name, step_fn, params, opt_state,
                                 batch_fn(arrays, tc.batch_size, seed), tc.steps * tc.grad_accum, ckpt_dir,
                                 writer, save_every=tc.save_every, log_every=tc.log_every)
    return params, last
