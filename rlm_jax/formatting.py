"""The token layout of a reasoning trace, shared by training, search and evaluation.

    [BOS] prompt [STEP] step_1 [STEP] step_2 [STEP] ... step_n [EOS]

Every intermediate step ends with the step-delimiter token; the final step ends with EOS, so a node
whose step ended with EOS is terminal (x1 does the same with <|eois_id|> and <|eot_id|>).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlm_jax.tasks.base import Problem, Task
from rlm_jax.tokenizer import Tokenizer, step_stops


def prompt_ids(tok: Tokenizer, task: Task, problem: Problem) -> list[int]:
    """[BOS] + prompt + [STEP]: the policy's context before its first step. A chat run's tokenizer
    (`HFTokenizer.chat`) renders the prompt through its chat template instead (BOS as the template writes it):
    template(system, user: prompt, assistant's generation prompt) + [STEP]."""
    if getattr(tok, "chat", False):
        return tok.chat_prompt_ids(task.prompt(problem)) + [tok.step_id]
    text = task.prompt(problem).rstrip(tok.step_delimiter)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return bos + tok.encode(text) + [tok.step_id]


def step_ids(tok: Tokenizer, step: str, final: bool) -> list[int]:
    """One step's ids, ended by EOS if it is the final step, else by the step delimiter."""
    if tok.step_delimiter in step:
        raise ValueError(f"step {step!r} contains the step delimiter; split it into separate steps")
    return tok.encode(step) + [tok.eos_id if final else tok.step_id]


def solution_ids(tok: Tokenizer, steps: Sequence[str]) -> list[int]:
    return [i for k, s in enumerate(steps) for i in step_ids(tok, s, final=k == len(steps) - 1)]


def sft_example(tok: Tokenizer, task: Task, problem: Problem, steps: Sequence[str]) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask): the loss covers the solution tokens only, not the prompt."""
    p, s = prompt_ids(tok, task, problem), solution_ids(tok, steps)
    return p + s, [False] * len(p) + [True] * len(s)


def step_text(tok: Tokenizer, ids: Sequence[int]) -> str:
    """A step's text without its terminator (step delimiter, EOS or padding)."""
    special = {tok.step_id, tok.eos_id, tok.pad_id}
    text = tok.decode([int(i) for i in ids if int(i) not in special])
    # A merged step end (".\n\n") brings the delimiter along; byte-fallback pieces can spell it without
    # being the step token: it cannot be part of a step's text.
    return text.removesuffix(tok.step_delimiter).replace(tok.step_delimiter, " ")


def solution_text(tok: Tokenizer, steps_ids: Sequence[Sequence[int]]) -> str:
    """Steps (each a list of ids) -> the solution text, one step per line (what verifiers read)."""
    return "\n".join(step_text(tok, s) for s in steps_ids)


def split_generated(tok: Tokenizer, ids: Sequence[int]) -> list[list[int]]:
    """A generated continuation -> its steps (split after STEP/EOS; stops at the first EOS)."""
    steps, cur, ends = [], [], step_stops(tok) | {tok.eos_id}
    for i in ids:
        i = int(i)
        cur.append(i)
        if i in ends:
            steps.append(cur)
            cur = []
            if i == tok.eos_id:
                return steps
    return steps + [cur] if cur else steps


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int,
                 length: int, truncate: bool = False) -> dict[str, np.ndarray]:
    """Left-pads (ids, loss_mask) pairs -> {"tokens", "mask", "loss_mask"}: [B, length] arrays.

    Too-long examples are an error (training data must fit), unless `truncate`, which keeps their last
    `length` tokens (for model-generated states, whose length the model decides).
    """
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    loss = np.zeros((b, length), bool)
    for r, (ids, lm) in enumerate(examples):
        if truncate:
            ids, lm = list(ids)[-length:], list(lm)[-length:]
        n = len(ids)
        if n > length:
            raise ValueError(f"example {r} has {n} tokens, more than the sequence length {length}; "
                             "raise the sequence length in the config")
        tokens[r, length - n:] = ids
        mask[r, length - n:] = True
        loss[r, length - n:] = lm
    return {"tokens": tokens, "mask": mask, "loss_mask": loss}
