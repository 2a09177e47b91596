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
from rlm_jax.search import paged
from rlm_jax.search.lm import value_params as lm_value_params
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
    cost: chex.Array  # [B] float32 token positions the models computed so far
    pool: dict  # with the cache: each beam's pages (paged.py), {} without


def keep_best(kept: Kept, cand: chex.Array, cand_mask: chex.Array, score: chex.Array) -> tuple[Kept, chex.Array]:
    """kept updated with the best of the candidates cand, cand_mask [B, C, D, L] by score [B, C] (-inf:
    not eligible) where it beats kept.score; and where it did ([B] bool)."""
    rows = jnp.arange(score.shape[0])
    i = jnp.argmax(score, axis=1)
    better = score[rows, i] > kept.score
    return Kept(jnp.where(better[:, None, None], cand[rows, i], kept.steps),
                jnp.where(better[:, None, None], cand_mask[rows, i], kept.mask),
                jnp.where(better, score[rows, i], kept.score)), better


def answer(finished: Kept, found: chex.Array, fallback: Kept, generated_tokens: chex.Array,
           cost: chex.Array) -> StrategyOutput:
    """The answer of a search that keeps candidates (beam, GoT): the best finished one where one was found
    ([B] bool), else the best unfinished one."""
    pick = lambda x, y: jnp.where(found.reshape(found.shape + (1,) * (x.ndim - 1)), x, y)
    return StrategyOutput(steps=pick(finished.steps, fallback.steps), mask=pick(finished.mask, fallback.mask),
                          score=pick(finished.score, fallback.score), finished=found,
                          generated_tokens=generated_tokens, cost=cost)


def _pages(spec: LMSpec, b: int, w: int, cfg, name: str) -> dict:
    """Empty per-beam pages [B, W, D, layers, L, kv_heads, head_dim] (k and v) of one model."""
    shape = (b, w, spec.max_depth, cfg.num_layers, spec.step_len, cfg.num_kv_heads, cfg.head_dim)
    return {f"{name}_k": jnp.zeros(shape, cfg.jnp_dtype), f"{name}_v": jnp.zeros(shape, cfg.jnp_dtype)}


def _propose_recompute(spec, inputs, key, s: BeamState, depth, e, temperature, grow):
    """The re-prefill baseline (`spec.kv_cache=False`): each beam's and candidate's whole context is re-read.
    grow(new [B*W, E, L], old [B, W, D, L]) -> the candidates [B*W, E, D, L].
    -> (Proposals [B*W, E], value of the candidates [B, W*E] or None, positions [B], pool {})."""
    b, w, d, l = s.steps.shape
    prompt = jnp.repeat(inputs["prompt"], w, axis=0)
    prompt_mask = jnp.repeat(inputs["prompt_mask"], w, axis=0)
    ctx, ctx_mask = ops.context(prompt, prompt_mask, s.steps.reshape(b * w, d, l), s.mask.reshape(b * w, d, l))
    props = ops.generate_steps(spec, inputs["policy"], ctx, ctx_mask, key, e, temperature)
    cost = jnp.sum(props.cost.reshape(b, w), axis=1)
    value = None
    if spec.value is not None:
        cand, cand_mask = grow(props.tokens, s.steps), grow(props.mask, s.mask)
        c_ctx, c_mask = ops.context(jnp.repeat(prompt, e, axis=0), jnp.repeat(prompt_mask, e, axis=0),
                                    cand.reshape(-1, d, l), cand_mask.reshape(-1, d, l))
        value = ops.evaluate_value(spec, lm_value_params(spec, inputs), c_ctx, c_mask).reshape(b, w * e)
        cost = cost + w * e * c_ctx.shape[1]
    return props, value, cost, {}


def _propose_cached(spec, inputs, key, s: BeamState, depth, e, temperature, grow):
    """Proposals from each beam's pages (no prefix recomputed), and the candidates' pages [B, W*E, ...]."""
    b, w, d, l = s.steps.shape
    n = b * w
    flat = lambda x: x.reshape((n,) + x.shape[2:])
    rows = jnp.repeat(jnp.arange(b), w)
    pool = s.pool
    ctx = paged.extend(inputs["prompt_pages"], rows, flat(pool["policy_k"]), flat(pool["policy_v"]),
                       flat(s.mask), flat(pool["hidden"]))
    props, (pk, pv), hidden = paged.generate_steps(spec, inputs["policy"], ctx, key, e, temperature,
                                                   active=flat(s.alive))
    cost = jnp.sum(props.cost.reshape(b, w), axis=1)
    at = (jnp.arange(d) == depth)[:, None, None, None, None]  # [D, 1, 1, 1, 1]: the new page's slot

    def with_page(pages, new):  # pages [B, W, D, ...], new [B*W, E, ...] -> [B, W*E, D, ...]
        grown = jnp.where(at, new[:, :, None], jnp.repeat(flat(pages)[:, None], e, 1))
        return grown.reshape((b, w * e) + grown.shape[2:])

    cand_pool = {"policy_k": with_page(pool["policy_k"], pk), "policy_v": with_page(pool["policy_v"], pv),
                 "hidden": hidden.reshape(b, w * e, -1)}
    value = None
    if spec.value is not None and spec.shared_trunk:
        value = paged.head_value(spec, inputs["value"]["head"], cand_pool["hidden"])
    elif spec.value is not None:
        vctx = paged.extend(inputs["value_pages"], rows, flat(pool["value_k"]), flat(pool["value_v"]),
                            flat(s.mask), flat(pool["hidden"]))
        value, (vk, vv), vcost = paged.value_of_steps(spec, inputs["value"], vctx, props.tokens.reshape(n * e, l),
                                                      props.mask.reshape(n * e, l))
        value = value.reshape(b, w * e)
        cost = cost + jnp.sum(vcost.reshape(b, -1), axis=1)
        cand_pool.update(value_k=with_page(pool["value_k"], vk.reshape((n, e) + vk.shape[1:])),
                         value_v=with_page(pool["value_v"], vv.reshape((n, e) + vv.shape[1:])))
    return props, value, cost, cand_pool


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
    cost = jnp.zeros((b,), jnp.float32)
    pool = {}
    if spec.kv_cache:  # the prompt's KV once per problem (and the value model's), then one page per step
        ctx = paged.prompt_context(spec.policy, inputs["policy"], inputs["prompt"], inputs["prompt_mask"])
        inputs = dict(inputs, prompt_pages=ctx)
        pool = dict(_pages(spec, b, w, spec.policy, "policy"), hidden=jnp.repeat(ctx.hidden[:, None], w, 1))
        cost = cost + inputs["prompt"].shape[1]
        if spec.value is not None and not spec.shared_trunk:
            inputs = dict(inputs, value_pages=paged.prompt_context(spec.value, inputs["value"]["trunk"],
                                                                   inputs["prompt"], inputs["prompt_mask"]))
            pool.update(_pages(spec, b, w, spec.value, "value"))
            cost = cost + inputs["prompt"].shape[1]
    state = BeamState(key=key, steps=steps, mask=mask,
                      alive=jnp.zeros((b, w), bool).at[:, 0].set(True),  # one beam at first: no duplicate starts
                      logp=jnp.zeros((b, w)), finished=nothing, found=jnp.zeros((b,), bool), fallback=nothing,
                      generated_tokens=jnp.zeros((b,), jnp.int32), cost=cost, pool=pool)
    propose = _propose_cached if spec.kv_cache else _propose_recompute

    def body(depth, s: BeamState) -> BeamState:
        key, k_gen = jax.random.split(s.key)
        at = (jnp.arange(d) == depth)[:, None]  # [D, 1]
        grow = lambda new, old: jnp.where(at, new[:, :, None], jnp.repeat(old.reshape(b * w, 1, d, l), e, 1))
        props, value, cost, cand_pool = propose(spec, inputs, k_gen, s, depth, e, temperature, grow)
        ntok = s.generated_tokens + jnp.sum(
            jnp.where(s.alive.reshape(b * w, 1), props.sampled_tokens, 0).reshape(b, -1), axis=1)
        cand = grow(props.tokens, s.steps).reshape(b, w * e, d, l)
        cand_mask = grow(props.mask, s.mask).reshape(b, w * e, d, l)
        # Prune: truncated steps and repeats of a sibling are dropped (their prior logit is -inf).
        valid = jnp.repeat(s.alive, e, axis=1) & jnp.isfinite(ops.proposal_logits(spec, props)).reshape(b, w * e)
        terminal = props.terminal.reshape(b, w * e)
        cand_logp = jnp.repeat(s.logp, e, axis=1) + props.logprob.reshape(b, w * e)
        score = cand_logp if value is None else value
        if spec.verifier is not None:
            verified = ops.verify(spec, jnp.repeat(inputs["problem_index"], w * e), cand.reshape(-1, d, l),
                                  cand_mask.reshape(-1, d, l)).reshape(b, w * e)
            score = jnp.where(terminal, verified, score)
        # Finished candidates: keep the best one seen.
        finished, better = keep_best(s.finished, cand, cand_mask, jnp.where(valid & terminal, score, neg))
        # Unfinished: the top W continue (Select / Prune), the best is the fallback answer.
        open_score = jnp.where(valid & ~terminal, score, neg)
        idx, top = ops.select_top_k(open_score, w)
        fallback, _ = keep_best(s.fallback, cand, cand_mask, open_score)
        rows = jnp.arange(b)[:, None]
        return BeamState(key=key, steps=cand[rows, idx], mask=cand_mask[rows, idx], alive=top > neg,
                         logp=cand_logp[rows, idx], finished=finished, found=s.found | better,
                         fallback=fallback, generated_tokens=ntok, cost=s.cost + cost,
                         pool=jax.tree.map(lambda x: x[rows, idx], cand_pool))

    s = jax.lax.fori_loop(0, d, body, state)
    return answer(s.finished, s.found, s.fallback, s.generated_tokens, s.cost)


@functools.partial(jax.jit, static_argnames=("spec", "trees", "expansions", "temperature"))
def dvts_jit(spec: LMSpec, inputs, key, trees: int, expansions: int = 2,
             temperature: float | None = None) -> StrategyOutput:
    """Diverse verifier tree search (DVTS, search-and-learn): `trees` independent subtrees per problem, each a
    beam of width 1 that keeps the best-scored of its E = expansions proposals at every step; the answer is
    the best subtree's (finished ones first, then the score: the value model's, else the log-probability).

    Independence is the point: beam search's W beams compete for one top-W and collapse onto a few prefixes,
    while each subtree here keeps its own line (they differ by their samples). At equal cost to beam:W
    (T = W subtrees x E proposals per step). Tokens and positions are summed over the subtrees; each reads
    the prompt once."""
    b = inputs["prompt"].shape[0]
    rep = lambda x: jnp.repeat(x, trees, axis=0)
    rows = dict(inputs, prompt=rep(inputs["prompt"]), prompt_mask=rep(inputs["prompt_mask"]),
                problem_index=rep(inputs["problem_index"]))
    out = beam_search_jit(spec, rows, key, width=1, expansions=expansions, temperature=temperature)
    per = lambda x: x.reshape((b, trees) + x.shape[1:])
    score, finished = per(out.score), per(out.finished)
    best_finished = jnp.argmax(jnp.where(finished, score, -jnp.inf), axis=1)
    i = jnp.where(jnp.any(finished, axis=1), best_finished, jnp.argmax(score, axis=1))
    pick = lambda x: per(x)[jnp.arange(b), i]
    return StrategyOutput(steps=pick(out.steps), mask=pick(out.mask), score=pick(out.score),
                          finished=pick(out.finished), generated_tokens=jnp.sum(per(out.generated_tokens), axis=1),
                          cost=jnp.sum(per(out.cost), axis=1))
