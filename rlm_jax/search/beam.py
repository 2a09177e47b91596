"""Step-level beam search: keep the W best partial solutions, extend each by E sampled steps.

    out = beam_search_jit(spec, inputs, key, width=W, expansions=E)

One jitted program: a `lax.fori_loop` over the D step slots. Candidates are scored by the value model
(V of the extended context); without a value model by their cumulative log-probability. Finished
candidates (step ended with EOS) leave the beam; in training mode (`spec.verifier`) they are scored by
the verifier. The answer is the best finished candidate, else the best surviving beam.
With W = 1, E = 1 and greedy sampling this is greedy decoding, step by step.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import operators as ops


@chex.dataclass(frozen=True)
class StrategyOutput:
    """A strategy's answer per problem. steps, mask: [B, D, L]; score: [B] (value, verifier score or
    log-prob); finished: [B] the answer ended with EOS; generated_tokens: [B] tokens sampled in total."""

    steps: chex.Array
    mask: chex.Array
    score: chex.Array
    finished: chex.Array
    generated_tokens: chex.Array


@functools.partial(jax.jit, static_argnames=("spec", "width", "expansions", "temperature"))
def beam_search_jit(spec: ops.LMSpec, inputs, key, width: int, expansions: int,
                    temperature: float | None = None) -> StrategyOutput:
    b = inputs["prompt"].shape[0]
    w, e, d, l = width, expansions, spec.max_depth, spec.step_len
    neg = -jnp.inf
    steps = jnp.full((b, w, d, l), spec.pad_id, jnp.int32)
    mask = jnp.zeros((b, w, d, l), bool)
    alive = jnp.zeros((b, w), bool).at[:, 0].set(True)  # one beam at first: no duplicate starts
    logp = jnp.zeros((b, w))
    best = (steps[:, 0], mask[:, 0], jnp.full((b,), neg), jnp.zeros((b,), bool))
    # The best unfinished candidate seen so far: the answer when nothing finishes.
    fallback = (steps[:, 0], mask[:, 0], jnp.full((b,), neg))
    prompt = jnp.repeat(inputs["prompt"], w, axis=0)
    prompt_mask = jnp.repeat(inputs["prompt_mask"], w, axis=0)

    def body(depth, state):
        key, steps, mask, alive, logp, best, fallback, ntok = state
        key, k_gen = jax.random.split(key)
        ctx, ctx_mask = ops.context(prompt, prompt_mask, steps.reshape(b * w, d, l), mask.reshape(b * w, d, l))
        props = ops.generate_steps(spec, inputs["policy"], ctx, ctx_mask, k_gen, e, temperature)
        ntok = ntok + jnp.sum(jnp.where(alive.reshape(b * w, 1), props.length, 0).reshape(b, -1), axis=1)
        at = (jnp.arange(d) == depth)[:, None]  # [D, 1]
        cand = jnp.where(at, props.tokens[:, :, None], jnp.repeat(steps.reshape(b * w, 1, d, l), e, 1))
        cand_mask = jnp.where(at, props.mask[:, :, None], jnp.repeat(mask.reshape(b * w, 1, d, l), e, 1))
        cand, cand_mask = cand.reshape(b, w * e, d, l), cand_mask.reshape(b, w * e, d, l)
        # Truncated steps and repeats of a sibling are dropped (their prior logit is -inf).
        valid = jnp.repeat(alive, e, axis=1) & jnp.isfinite(ops.proposal_logits(spec, props)).reshape(b, w * e)
        terminal = props.terminal.reshape(b, w * e)
        cand_logp = jnp.repeat(logp, e, axis=1) + props.logprob.reshape(b, w * e)
        c_ctx, c_mask = ops.context(jnp.repeat(prompt, e, axis=0), jnp.repeat(prompt_mask, e, axis=0),
                                    cand.reshape(-1, d, l), cand_mask.reshape(-1, d, l))
        if spec.value is not None:
            score = ops.evaluate_value(spec, inputs["value"], c_ctx, c_mask).reshape(b, w * e)
        else:
            score = cand_logp
        if spec.verifier is not None:
            verified = ops.verify(spec, jnp.repeat(inputs["problem_index"], w * e), cand.reshape(-1, d, l),
                                  cand_mask.reshape(-1, d, l)).reshape(b, w * e)
            score = jnp.where(terminal, verified, score)
        rows = jnp.arange(b)
        # Finished candidates: keep the best one seen.
        fin_score = jnp.where(valid & terminal, score, neg)
        i = jnp.argmax(fin_score, axis=1)
        better = fin_score[rows, i] > best[2]
        best = (jnp.where(better[:, None, None], cand[rows, i], best[0]),
                jnp.where(better[:, None, None], cand_mask[rows, i], best[1]),
                jnp.where(better, fin_score[rows, i], best[2]), best[3] | better)
        # Unfinished: the top W continue.
        open_score = jnp.where(valid & ~terminal, score, neg)
        top, idx = jax.lax.top_k(open_score, w)
        j = jnp.argmax(open_score, axis=1)
        improve = open_score[rows, j] > fallback[2]
        fallback = (jnp.where(improve[:, None, None], cand[rows, j], fallback[0]),
                    jnp.where(improve[:, None, None], cand_mask[rows, j], fallback[1]),
                    jnp.where(improve, open_score[rows, j], fallback[2]))
        steps = cand[rows[:, None], idx]
        mask = cand_mask[rows[:, None], idx]
        logp = cand_logp[rows[:, None], idx]
        alive = top > neg
        return key, steps, mask, alive, logp, best, fallback, ntok

    state = (key, steps, mask, alive, logp, best, fallback, jnp.zeros((b,), jnp.int32))
    _, _, _, _, _, best, fallback, ntok = jax.lax.fori_loop(0, d, body, state)
    found = best[3]
    pick = lambda x, y: jnp.where(found.reshape((b,) + (1,) * (x.ndim - 1)), x, y)
    return StrategyOutput(steps=pick(best[0], fallback[0]), mask=pick(best[1], fallback[1]),
                          score=pick(best[2], fallback[2]), finished=found, generated_tokens=ntok)
