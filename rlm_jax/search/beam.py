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
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec, StrategyOutput


class Kept(NamedTuple):
    """The best candidate of each problem seen so far. steps, mask: [B, D, L]; score: [B] (-inf: none)."""

    steps: chex.Array
    mask: chex.Array
    score: chex.Array


class BeamState(NamedTuple):
    """The loop state of `beam_search_jit`: B problems, W beams, D step slots of L tokens."""

    key: chex.PRNGKey
    steps: chex.Array  # [B, W, D, L] the beams' steps (slots beyond the current depth empty)
    mask: chex.Array  # [B, W, D, L]
    alive: chex.Array  # [B, W] bool: the beam exists (fewer than W candidates leave holes)
    logp: chex.Array  # [B, W] cumulative log-probability of the beam's steps
    finished: Kept  # the best finished candidate (step ended with EOS)
    found: chex.Array  # [B] bool: a finished candidate exists
    fallback: Kept  # the best unfinished candidate: the answer when nothing finishes
    generated_tokens: chex.Array  # [B] int32 tokens sampled so far


def _keep_best(kept: Kept, cand: chex.Array, cand_mask: chex.Array, score: chex.Array) -> tuple[Kept, chex.Array]:
    """kept updated with the best of the candidates cand, cand_mask [B, C, D, L] by score [B, C] (-inf:
    not eligible) where it beats kept.score; and where it did ([B] bool)."""
    rows = jnp.arange(score.shape[0])
    i = jnp.argmax(score, axis=1)
    better = score[rows, i] > kept.score
    return Kept(jnp.where(better[:, None, None], cand[rows, i], kept.steps),
                jnp.where(better[:, None, None], cand_mask[rows, i], kept.mask),
                jnp.where(better, score[rows, i], kept.score)), better


@functools.partial(jax.jit, static_argnames=("spec", "width", "expansions", "temperature"))
def beam_search_jit(spec: LMSpec, inputs, key, width: int, expansions: int,
                    temperature: float | None = None) -> StrategyOutput:
    """W = width beams, E = expansions proposals per beam and step; inputs: `lm.search_inputs`."""
    b = inputs["prompt"].shape[0]
    w, e, d, l = width, expansions, spec.max_depth, spec.step_len
    neg = -jnp.inf
    steps = jnp.full((b, w, d, l), spec.pad_id, jnp.int32)
    mask = jnp.zeros((b, w, d, l), bool)
    nothing = Kept(steps[:, 0], mask[:, 0], jnp.full((b,), neg))
    state = BeamState(key=key, steps=steps, mask=mask,
                      alive=jnp.zeros((b, w), bool).at[:, 0].set(True),  # one beam at first: no duplicate starts
                      logp=jnp.zeros((b, w)), finished=nothing, found=jnp.zeros((b,), bool), fallback=nothing,
                      generated_tokens=jnp.zeros((b,), jnp.int32))
    prompt = jnp.repeat(inputs["prompt"], w, axis=0)
    prompt_mask = jnp.repeat(inputs["prompt_mask"], w, axis=0)

    def body(depth, s: BeamState) -> BeamState:
        key, k_gen = jax.random.split(s.key)
        ctx, ctx_mask = ops.context(prompt, prompt_mask, s.steps.reshape(b * w, d, l), s.mask.reshape(b * w, d, l))
        props = ops.generate_steps(spec, inputs["policy"], ctx, ctx_mask, k_gen, e, temperature)
        ntok = s.generated_tokens + jnp.sum(
            jnp.where(s.alive.reshape(b * w, 1), props.length, 0).reshape(b, -1), axis=1)
        at = (jnp.arange(d) == depth)[:, None]  # [D, 1]
        cand = jnp.where(at, props.tokens[:, :, None], jnp.repeat(s.steps.reshape(b * w, 1, d, l), e, 1))
        cand_mask = jnp.where(at, props.mask[:, :, None], jnp.repeat(s.mask.reshape(b * w, 1, d, l), e, 1))
        cand, cand_mask = cand.reshape(b, w * e, d, l), cand_mask.reshape(b, w * e, d, l)
        # Prune: truncated steps and repeats of a sibling are dropped (their prior logit is -inf).
        valid = jnp.repeat(s.alive, e, axis=1) & jnp.isfinite(ops.proposal_logits(spec, props)).reshape(b, w * e)
        terminal = props.terminal.reshape(b, w * e)
        cand_logp = jnp.repeat(s.logp, e, axis=1) + props.logprob.reshape(b, w * e)
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
        # Finished candidates: keep the best one seen.
        finished, better = _keep_best(s.finished, cand, cand_mask, jnp.where(valid & terminal, score, neg))
        # Unfinished: the top W continue (Select / Prune), the best is the fallback answer.
        open_score = jnp.where(valid & ~terminal, score, neg)
        idx, top = ops.select_top_k(open_score, w)
        fallback, _ = _keep_best(s.fallback, cand, cand_mask, open_score)
        rows = jnp.arange(b)[:, None]
        return BeamState(key=key, steps=cand[rows, idx], mask=cand_mask[rows, idx], alive=top > neg,
                         logp=cand_logp[rows, idx], finished=finished, found=s.found | better,
                         fallback=fallback, generated_tokens=ntok)

    s = jax.lax.fori_loop(0, d, body, state)
    pick = lambda x, y: jnp.where(s.found.reshape((b,) + (1,) * (x.ndim - 1)), x, y)
    return StrategyOutput(steps=pick(s.finished.steps, s.fallback.steps), mask=pick(s.finished.mask, s.fallback.mask),
                          score=pick(s.finished.score, s.fallback.score), finished=s.found,
                          generated_tokens=s.generated_tokens)
