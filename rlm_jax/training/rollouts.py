"""Host-side glue between tasks and the jitted sampler: verifiers, states and Monte-Carlo rollouts."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from rlm_jax import decoding, formatting, parallel
from rlm_jax.models.config import ModelConfig
from rlm_jax.search.base import Verifier
from rlm_jax.tasks.base import Problem, Score, Task
from rlm_jax.tokenizer import Tokenizer


def make_verifier(tok: Tokenizer, task: Task, problems: Sequence[Problem]) -> Verifier:
    """A host verifier for search: +1 if the steps solve problems[i], else -1."""

    def verifier(index, steps, mask):
        out = np.empty(len(index), np.float32)
        for r, (i, s, m) in enumerate(zip(np.asarray(index), np.asarray(steps), np.asarray(mask))):
            text = "\n".join(formatting.step_text(tok, st[mt]) for st, mt in zip(s, m) if mt.any())
            out[r] = 1.0 if task.verify(problems[int(i)], text) == Score.SOLVED else -1.0
        return out

    return verifier


def state_ids(tok: Tokenizer, task: Task, problem: Problem, steps: Sequence[str]) -> list[int]:
    """Context ids of a partial solution: prompt + the steps, each ended by the step delimiter."""
    ids = formatting.prompt_ids(tok, task, problem)
    for s in steps:
        ids += formatting.step_ids(tok, s, final=False)
    return ids


def sample_continuations(cfg: ModelConfig, params, tok: Tokenizer, contexts: Sequence[Sequence[int]], key,
                         max_new_tokens: int, temperature: float = 1.0, batch_size: int = 256,
                         seq_len: int | None = None) -> list[list[str]]:
    """Samples one continuation (to EOS) per context; returns each continuation's steps as text.

    Contexts are padded to one length (`seq_len`, default: the longest, bucketed) so the sampler
    compiles once; batches are padded to `batch_size` for the same reason.
    """
    if not contexts:
        return []
    length = seq_len or decoding.bucket_length(max(len(c) for c in contexts),
                                               maximum=cfg.max_seq_len - max_new_tokens)
    results: list[list[str]] = []
    for start in range(0, len(contexts), batch_size):
        chunk = list(contexts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        tokens, mask = decoding.pad_prompts(chunk, tok.pad_id, length=length)
        key, sub = jax.random.split(key)
        out = decoding.generate_jit(cfg, params, tokens, mask, sub, max_new_tokens=max_new_tokens,
                                    temperature=temperature, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
        toks, lens = parallel.to_host((out.tokens, out.lengths))  # every host: all rows
        for r in range(real):
            steps = formatting.split_generated(tok, toks[r, :lens[r]])
            results.append([formatting.step_text(tok, s) for s in steps])
    return results


def rollout_values(cfg: ModelConfig, params, tok: Tokenizer, task: Task, states: Sequence[tuple[Problem, list[str]]],
                   key, num_rollouts: int, max_new_tokens: int, gamma: float = 1.0,
                   temperature: float = 1.0) -> np.ndarray:
    """Monte-Carlo value of each (problem, steps) state: the mean over `num_rollouts` policy completions
    of gamma^(steps added) * r, with r = +1 if the completed solution is solved, else -1."""
    contexts = [state_ids(tok, task, p, s) for p, s in states for _ in range(num_rollouts)]
    conts = sample_continuations(cfg, params, tok, contexts, key, max_new_tokens, temperature)
    values = np.zeros(len(states), np.float32)
    for i, (p, s) in enumerate(states):
        total = 0.0
        for c in conts[i * num_rollouts:(i + 1) * num_rollouts]:
            solved = task.verify(p, "\n".join(list(s) + c)) == Score.SOLVED
            total += (gamma ** len(c)) * (1.0 if solved else -1.0)
        values[i] = total / num_rollouts
    return values
