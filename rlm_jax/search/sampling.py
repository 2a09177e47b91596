"""Chain strategies: greedy chain-of-thought, best-of-N and self-consistency.

Each samples whole solutions (stop at EOS, at most D*L tokens) in one jitted call for the batch.
- `best_of_n_jit`: N samples per problem ranked by the value model (ORM-style, read at the final
  token), by the verifier in training mode, or by log-probability without either.
- `self_consistency`: N samples, answers extracted by the task on the host (`answer_key`), majority
  (or value-weighted) vote on device. The vote needs the task's notion of "the same answer", which is
  Python (a parser of the final step's text), so the strategy is two jitted calls with one host step
  between them per batch: sample + score (`sample_slots`), then answer ids on the host, then the vote
  (`ops.majority_vote` / `ops.weighted_vote`). No host round trip happens inside a loop. An on-device
  answer id (e.g. a hash of the final step's tokens) would merge answers only when their tokens are
  identical, which is not the task's notion of equality ("=12" vs "= 12"), so it is not offered.
- `greedy_jit`: one greedy sample (chain of thought). With N = 1 best-of-N is plain sampling.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import parallel
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec, StrategyOutput


def _score_samples(spec: LMSpec, inputs, out, n: int, scorer: str):
    """Scores [B*n] of sampled solutions, their step slots, and the positions the models computed [B]."""
    steps, mask = ops.to_step_slots(spec, out.tokens, out.lengths)
    cost = ops.solutions_cost(spec, inputs["prompt"].shape[1], n, out)
    if scorer == "value" and spec.value is not None:
        score, value_cost = ops.value_of_solutions(spec, inputs, steps, mask, n)
        cost = cost + value_cost
        # A sample that never wrote EOS is a partial solution, not an answer: the value model scores it as
        # a state that may still succeed, which would rank it above finished-but-wrong answers. Finished
        # samples come first (values lie in [-1, 1], so -3 puts every unfinished one below them).
        score = jnp.where(out.stop_token == spec.eos_id, score, score - 3.0)
    elif scorer == "verifier":
        score = ops.verify(spec, jnp.repeat(inputs["problem_index"], n), steps, mask)
    else:  # log-probability of the whole solution
        valid = jnp.arange(out.tokens.shape[1])[None, :] < out.lengths[:, None]
        score = jnp.sum(jnp.where(valid, out.logprobs, 0.0), axis=1)
    return score, steps, mask, cost


def _sample(spec, inputs, key, n, temperature):
    return ops.generate_solutions(spec, inputs["policy"], inputs["prompt"], inputs["prompt_mask"], key, n,
                                  temperature)


@functools.partial(jax.jit, static_argnames=("spec", "n", "scorer", "temperature"))
def best_of_n_jit(spec: LMSpec, inputs, key, n: int, scorer: str = "value",
                  temperature: float | None = None) -> StrategyOutput:
    """N samples per problem, the best by `scorer` ("value" | "verifier" | "logprob")."""
    b = inputs["prompt"].shape[0]
    out = _sample(spec, inputs, key, n, temperature)
    score, steps, mask, cost = _score_samples(spec, inputs, out, n, scorer)
    score = score.reshape(b, n)
    i = jnp.argmax(score, axis=1)
    rows = jnp.arange(b)
    pick = lambda x: x.reshape((b, n) + x.shape[1:])[rows, i]
    return StrategyOutput(steps=pick(steps), mask=pick(mask), score=score[rows, i],
                          finished=pick(out.stop_token) == spec.eos_id,
                          generated_tokens=jnp.sum(out.lengths.reshape(b, n), axis=1), cost=cost)


def greedy_jit(spec: LMSpec, inputs, key) -> StrategyOutput:
    """Chain of thought, greedy."""
    return best_of_n_jit(spec, inputs, key, n=1, scorer="logprob", temperature=0.0)


@functools.partial(jax.jit, static_argnames=("spec", "n", "temperature"))
def sample_slots(spec, inputs, key, n, temperature):
    """N samples per problem: (steps [B*n, D, L], mask, value score [B*n], finished [B*n], lengths [B*n])."""
    out = _sample(spec, inputs, key, n, temperature)
    steps, mask = ops.to_step_slots(spec, out.tokens, out.lengths)
    score = (ops.value_of_solutions(spec, inputs, steps, mask, n)[0] if spec.value is not None
             else jnp.ones(out.lengths.shape))
    return steps, mask, score, out.stop_token == spec.eos_id, out.lengths


_weighted_vote_jit = jax.jit(ops.weighted_vote)
_majority_vote_jit = jax.jit(ops.majority_vote)


def self_consistency(spec: LMSpec, inputs, key, n: int,
                     answer_key: Callable[[int, np.ndarray, np.ndarray], object],
                     weighted: bool = False, temperature: float | None = None) -> StrategyOutput:
    """N samples per problem; the answer most samples agree on (value-weighted if `weighted`).

    answer_key(problem_row, steps [D, L], mask [D, L]) -> a hashable answer, or None if unparseable.
    """
    b = inputs["prompt"].shape[0]
    # Host copies of every sample (on a multi-host mesh: gathered from every process), for the answer
    # parser; each process then votes on the whole batch and returns the same result.
    steps, mask, score, finished, lengths = parallel.to_host(
        sample_slots(spec, inputs, key, n, temperature))
    steps_np, mask_np = steps, mask
    ids = np.zeros((b, n), np.int32)
    valid = np.zeros((b, n), bool)
    for r in range(b):
        table: dict = {}
        for j in range(n):
            a = answer_key(r, steps_np[r * n + j], mask_np[r * n + j])
            if a is not None:
                ids[r, j] = table.setdefault(a, len(table))
                valid[r, j] = True
    if weighted:  # value in [-1, 1] -> weight in [0, 1]
        weights = jnp.asarray((score.reshape(b, n) + 1.0) / 2.0, jnp.float32)
        i = np.asarray(_weighted_vote_jit(jnp.asarray(ids), weights, jnp.asarray(valid)))
    else:
        i = np.asarray(_majority_vote_jit(jnp.asarray(ids), jnp.asarray(valid)))
    rows = np.arange(b)
    pick = lambda x: x.reshape((b, n) + x.shape[1:])[rows, i]
    return StrategyOutput(steps=pick(steps), mask=pick(mask), score=pick(score), finished=pick(finished),
                          generated_tokens=np.sum(lengths.reshape(b, n), axis=1))


def decode_steps(tok, steps: np.ndarray, mask: np.ndarray) -> list[str]:
    """Step slots [D, L] -> the non-empty steps' texts (terminators removed)."""
    from rlm_jax.formatting import step_text
    return [step_text(tok, s[m]) for s, m in zip(np.asarray(steps), np.asarray(mask)) if m.any()]


def solution_texts(tok, out: StrategyOutput) -> Sequence[str]:
    """Each problem's answer as text, one step per line (what verifiers read)."""
    steps, mask = np.asarray(out.steps), np.asarray(out.mask)
    return ["\n".join(decode_steps(tok, steps[i], mask[i])) for i in range(steps.shape[0])]
