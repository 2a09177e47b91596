"""Search-free RL data: G sampled completions per prompt, scored by the task's verifier.

`rl.algorithm = "grpo_sampled"` is the GRPO every RL user starts from (DeepSeekMath/R1, TinyZero): no tree,
each problem's G whole solutions form a group, reward +1 solved / -1 not, advantages normalised within the
group (`rl.grpo_advantages`), then the same clipped-ratio + KL-to-reference update as RL from search. It is
the control that tells whether search pays during training: the iteration logs the tokens it generated
(`generated_tokens`) as MCTS iterations do, so the two compare at equal training tokens.

A completion is one sample of the replay buffer (state = the prompt, action = the whole completion, q = its
reward), so the policy update, the value regression (an outcome reward model on finished solutions) and
SFT rehearsal are RL from search's own.
"""
from __future__ import annotations

import functools
from typing import Sequence

import chex
import jax
import numpy as np

from rlm_jax import formatting
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec
from rlm_jax.tasks.base import Problem, Score, Task
from rlm_jax.tokenizer import Tokenizer


@chex.dataclass
class GroupSamples:
    """G completions per problem, rows b*G + j: tokens [B*G, M] int32, lengths [B*G] int32 (EOS included)."""

    tokens: chex.Array
    lengths: chex.Array


@functools.partial(jax.jit, static_argnames=("spec", "group_size"))
def sample_groups_jit(spec: LMSpec, inputs, key, group_size: int) -> GroupSamples:
    """`group_size` whole solutions per prompt of `inputs` (lm.search_inputs), at the spec's temperature,
    the prompt read once (with spec.kv_cache)."""
    out = ops.generate_solutions(spec, inputs["policy"], inputs["prompt"], inputs["prompt_mask"], key, group_size)
    return GroupSamples(tokens=out.tokens, lengths=out.lengths)


def extract_samples(out: GroupSamples, group_size: int, prompt_ids: Sequence[list[int]],
                    problems: Sequence[Problem], task: Task, tok: Tokenizer, first_row: int = 0):
    """Host: (samples, solutions, generated tokens) from one batch's groups; its first len(prompt_ids) problems
    are real (padding rows after them are ignored).

    samples: dicts as search_rl.extract_samples makes them (state = the prompt, action = the completion,
    q = its reward, v_parent = 0, group = the problem's row across the iteration, `first_row + b`);
    solutions: (prompt ids, completion ids) of the solved ones; generated tokens: of the real rows."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    samples, solutions = [], []
    for b, (prompt, problem) in enumerate(zip(prompt_ids, problems)):
        for row in range(b * group_size, (b + 1) * group_size):
            ids = [int(t) for t in tokens[row, :lengths[row]]]
            text = "\n".join(formatting.step_text(tok, s) for s in formatting.split_generated(tok, ids))
            solved = task.verify(problem, text) == Score.SOLVED
            samples.append({"state": list(prompt), "action": ids, "q": 1.0 if solved else -1.0, "v_parent": 0.0,
                            "group": first_row + b})
            if solved:
                solutions.append((list(prompt), ids))
    return samples, solutions, int(lengths[:len(prompt_ids) * group_size].sum())
