"""Phase 1, policy SFT: next-token loss on reasoning traces, on the solution tokens only."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlm_jax import formatting, parallel
from rlm_jax.models import hf, lora, transformer
from rlm_jax.tasks.base import Problem, Task
from rlm_jax.tokenizer import Tokenizer
from rlm_jax.training import steps, trainer
from rlm_jax.training.phases import Phase


def trace_examples(tok: Tokenizer, task: Task, problems: Sequence[Problem],
                   traces: Sequence[Sequence[str]] | None = None) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss_mask) per problem: the given traces, or the task's reference solver's."""
    if traces is None:
        traces = [task.solve(p) for p in problems]
    return [formatting.sft_example(tok, task, p, t) for p, t in zip(problems, traces)]


def reference_traces(task: Task, problems: Sequence[Problem], per_problem: int = 1, kind: str = "solution",
                     max_steps: int = 0):
    """(problems, traces), one row per trace: up to `per_problem` distinct reference solutions of each
    problem (the task's `solutions`, in its order), else the one of `solve`. Several solutions of one
    problem teach the policy its alternatives, so its samples differ where the problem allows.
    kind "search": each problem's linearised search trace of at most `max_steps` steps (`search_trace`,
    Stream of Search), the problems without one left out."""
    if kind == "search":
        rows = [(p, task.search_trace(p, max_steps)) for p in problems]
        rows = [(p, t) for p, t in rows if t is not None]
        return [p for p, _ in rows], [t for _, t in rows]
    if per_problem <= 1:
        return list(problems), [task.solve(p) for p in problems]
    if not task.capabilities.solutions:
        raise ValueError(f"task {task.name} cannot enumerate solutions; set task.traces_per_problem=1")
    rows = [(p, t) for p in problems for t in task.solutions(p)[:per_problem]]
    return [p for p, _ in rows], [t for _, t in rows]


def trace_arrays(run, tok: Tokenizer, problems: Sequence[Problem]) -> dict[str, np.ndarray]:
    """The padded SFT examples of `problems`' reference traces, task.traces_per_problem of each where the task
    has that many (SFT's data, RL's rehearsal)."""
    rows, traces = reference_traces(run.task, problems, run.c.task.traces_per_problem, run.c.task.trace,
                                    run.c.search.max_depth)
    return formatting.pad_examples(trace_examples(tok, run.task, rows, traces), tok.pad_id, run.c.seq_len)


def initial_policy(run, results):
    """Where SFT starts, on the run's mesh: phase 0's pretrained params, else model.init's Hugging Face
    weights (with fresh LoRA adapters under model.lora_rank), else random ones."""
    cfg = run.model_config(results)
    if results.get("pretrain") is not None:
        return results["pretrain"]
    folder = run.c.init_folder()
    if folder is None:
        return parallel.init_sharded_params(cfg, run.phase_key("sft"), run.mesh)
    _, params = hf.load_hf(folder, cfg.param_dtype, compute_dtype=cfg.dtype)
    params = lora.add_adapters(cfg, params, run.phase_key("sft"))  # model.lora_rank: fresh, zero-effect adapters
    return parallel.place_params(params, parallel.param_shardings(cfg, run.mesh))


def _sft(run, results):
    tok, cfg, train = results["tokenizer"], run.model_config(results), results["data"]["train"]
    params = initial_policy(run, results)
    arrays = trace_arrays(run, tok, train)
    run.log(f"sft: {transformer.count_params(params) / 1e6:.2f}M params, {len(arrays['tokens'])} traces of "
            f"{len(train)} problems")
    return trainer.train("sft", run.c.sft, trainer.Objective(steps.next_token_loss, (cfg,)), cfg, params,
                         trainer.example_batches(arrays, run.c.sft.batch_size, run.c.seed),
                         run.workdir / "sft" / "ckpt", run.writer, run.mesh)


PHASE = Phase("sft", _sft, like=lambda run, results: run.like(run.model_config(results)))
