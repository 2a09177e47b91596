"""Graph of Thoughts over steps: a step-level beam search whose candidates include merges of two beams.

    out = got_jit(spec, inputs, key, width=W, expansions=E, merges=A)

One jitted program, a `lax.fori_loop` of D rounds. Each round:
- Generate: E proposals for each of the W open beams (a beam's next step goes into its own next slot).
- Aggregate: the A best-scored pairs of beams each become one candidate: beam a's steps followed by beam
  b's steps after the prefix the two share. In countdown two partial computations on disjoint numbers
  become one state that holds both results (`3+5=8` and `7*2=14` from 3 5 7 2 give a state with 8 and
  14). A pair merges only where neither beam is a prefix of the other (the merge would be the longer one)
  and the result fits in the D step slots. A merge samples no token.
- Evaluate every candidate with the value model. A merged context is no root path, so no cached page
  holds its text: candidates are read whole (the re-prefill path of beam search; `spec.kv_cache` unused).
- Select the W best open candidates; finished ones (the step ended with EOS) compete for the answer, as in
  beam search (`spec.verifier` scores them in training mode).

Every candidate is a node of a `graph.Graph`: an extension has its beam as parent, a merge both beams.
Each round's finished candidates are backed up through the DAG (`graph.backup`: a merge's ancestors count
each simulation once), so the output graph's V(n) is the mean score of the answers found below n (and its
own value): the statistics a value model can be trained on, and what shows where the merges led.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import graph as graph_lib
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec, StrategyOutput
from rlm_jax.search.beam import Kept, answer, keep_best
from rlm_jax.search.lm import value_params as lm_value_params
from rlm_jax.search.tree import NONE


@chex.dataclass(frozen=True)
class GoTOutput:
    """answer: the strategy's answer per problem; graph: every candidate as a node (capacity
    1 + D * (W * E + A)), finished candidates backed up through it."""

    answer: StrategyOutput
    graph: graph_lib.Graph


class _State(NamedTuple):
    key: chex.PRNGKey
    steps: chex.Array  # [B, W, D, L] the open beams
    mask: chex.Array  # [B, W, D, L]
    depth: chex.Array  # [B, W] int32 steps of each beam
    alive: chex.Array  # [B, W] bool
    score: chex.Array  # [B, W] the beam's value
    node: chex.Array  # [B, W] int32 the beam's graph node
    finished: Kept
    found: chex.Array  # [B] bool
    fallback: Kept
    generated_tokens: chex.Array  # [B] int32
    cost: chex.Array  # [B] float32
    graph: graph_lib.Graph


def pairs(width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """All pairs (a, b), a < b, of W beams: (first members, second members), W (W - 1) / 2 each."""
    firsts = tuple(a for a in range(width) for _ in range(a + 1, width))
    seconds = tuple(b for a in range(width) for b in range(a + 1, width))
    return firsts, seconds


def merge(a: chex.Array, a_mask: chex.Array, a_depth: chex.Array, b: chex.Array, b_mask: chex.Array,
          b_depth: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array, chex.Array]:
    """Aggregate two partial solutions: a, b [n, D, L] of a_depth, b_depth [n] steps -> (steps, mask
    [n, D, L], depth [n], ok [n]): a's steps, then b's after the prefix the two share; ok where neither
    is a prefix of the other and the merge fits in D slots."""
    d = a.shape[1]
    slots = jnp.arange(d)[None, :]
    both = (slots < a_depth[:, None]) & (slots < b_depth[:, None])
    same = both & jnp.all((a == b) | ~(a_mask | b_mask), -1) & jnp.all(a_mask == b_mask, -1)  # [n, D]
    shared = jnp.sum(jnp.cumprod(same, axis=1), axis=1)  # length of the common prefix
    src = slots + shared[:, None]
    tail_ok = (src < b_depth[:, None])[..., None]
    take = lambda x: jnp.take_along_axis(x, jnp.clip(src, 0, d - 1)[..., None], 1)
    tail, tail_mask = jnp.where(tail_ok, take(b), 0), take(b_mask) & tail_ok
    steps, mask = ops.append_steps(a, a_mask, a_depth, tail, tail_mask)
    depth = a_depth + b_depth - shared
    ok = (shared < a_depth) & (shared < b_depth) & (depth <= d)
    return steps, mask, depth, ok


@functools.partial(jax.jit, static_argnames=("spec", "width", "expansions", "merges", "temperature"))
def got_jit(spec: LMSpec, inputs, key, width: int, expansions: int = 2, merges: int | None = None,
            temperature: float | None = None) -> GoTOutput:
    """W = width beams, E = expansions proposals per beam and round, A = merges pairs aggregated per round
    (default min(W, W (W - 1) / 2): none at W = 1, where this is beam search); inputs: `lm.search_inputs`.
    Needs a value model (the merged states are scored by it)."""
    if spec.value is None:
        raise ValueError("got_jit scores merged partial solutions with the value model; give LMSpec.value/head")
    b = inputs["prompt"].shape[0]
    w, e, d, l = width, expansions, spec.max_depth, spec.step_len
    firsts, seconds = pairs(w)
    a = min(w, len(firsts)) if merges is None else min(merges, len(firsts))
    c = w * e + a  # candidates per round
    neg = -jnp.inf
    rows = jnp.arange(b)[:, None]
    steps = jnp.full((b, w, d, l), spec.pad_id, jnp.int32)
    mask = jnp.zeros((b, w, d, l), bool)
    nothing = Kept(steps[:, 0], mask[:, 0], jnp.full((b,), neg))
    graph = graph_lib.init_graph(jnp.zeros((b,), jnp.float32), 1 + d * c, 2)
    prompt_w = jnp.repeat(inputs["prompt"], w, axis=0)
    prompt_mask_w = jnp.repeat(inputs["prompt_mask"], w, axis=0)
    state = _State(key=key, steps=steps, mask=mask, depth=jnp.zeros((b, w), jnp.int32),
                   alive=jnp.zeros((b, w), bool).at[:, 0].set(True), score=jnp.zeros((b, w)),
                   node=jnp.zeros((b, w), jnp.int32), finished=nothing, found=jnp.zeros((b,), bool),
                   fallback=nothing, generated_tokens=jnp.zeros((b,), jnp.int32), cost=jnp.zeros((b,), jnp.float32),
                   graph=graph)

    def body(_, s: _State) -> _State:
        key, k_gen = jax.random.split(s.key)
        flat = lambda x: x.reshape((b * w,) + x.shape[2:])
        # Generate: E next steps per open beam, each in its beam's next slot.
        ctx, ctx_mask = ops.context(prompt_w, prompt_mask_w, flat(s.steps), flat(s.mask))
        can_grow = s.alive & (s.depth < d)
        props = ops.generate_steps(spec, inputs["policy"], ctx, ctx_mask, k_gen, e, temperature,
                                   active=flat(can_grow))
        rep = lambda x: jnp.repeat(flat(x), e, axis=0)
        new = lambda x: x.reshape((b * w * e,) + x.shape[2:])
        first = (jnp.arange(d) == 0)[None, :, None]  # the new step as slot 0 of the steps to append
        step_mask = new(props.mask)[:, None] & first
        ext, ext_mask = ops.append_steps(rep(s.steps), rep(s.mask), rep(s.depth),
                                         jnp.where(step_mask, new(props.tokens)[:, None], spec.pad_id), step_mask)
        ext_valid = (jnp.repeat(can_grow, e, axis=1)
                     & jnp.isfinite(ops.proposal_logits(spec, props)).reshape(b, w * e))
        # Aggregate: the A best-scored pairs of open beams, merged.
        pa, pb = jnp.asarray(firsts, jnp.int32), jnp.asarray(seconds, jnp.int32)
        pairwise = lambda x: x.reshape((-1,) + x.shape[2:])  # [B, pairs, ...] -> [B * pairs, ...]
        m_steps, m_mask, m_depth, m_ok = merge(*(pairwise(x[:, pa]) for x in (s.steps, s.mask, s.depth)),
                                               *(pairwise(x[:, pb]) for x in (s.steps, s.mask, s.depth)))
        m_ok = m_ok.reshape(b, -1) & s.alive[:, pa] & s.alive[:, pb]
        pick, _ = ops.select_top_k(jnp.where(m_ok, s.score[:, pa] + s.score[:, pb], neg), a)  # [B, A]
        take = lambda x: x.reshape((b, len(firsts)) + x.shape[1:])[rows, pick]
        m_steps, m_mask, m_depth, m_ok = take(m_steps), take(m_mask), take(m_depth), m_ok[rows, pick]
        # Evaluate every candidate (extensions and merges) by reading its whole context.
        cand = jnp.concatenate([ext.reshape(b, w * e, d, l), m_steps], 1)  # [B, C, D, L]
        cand_mask = jnp.concatenate([ext_mask.reshape(b, w * e, d, l), m_mask], 1)
        cand_depth = jnp.concatenate([jnp.repeat(s.depth + 1, e, axis=1), m_depth], 1)
        valid = jnp.concatenate([ext_valid, m_ok], 1)
        terminal = jnp.concatenate([props.terminal.reshape(b, w * e), jnp.zeros((b, a), bool)], 1)
        c_ctx, c_mask = ops.context(jnp.repeat(inputs["prompt"], c, axis=0), jnp.repeat(inputs["prompt_mask"], c, axis=0),
                                    cand.reshape(-1, d, l), cand_mask.reshape(-1, d, l))
        score = ops.evaluate_value(spec, lm_value_params(spec, inputs), c_ctx, c_mask).reshape(b, c)
        if spec.verifier is not None:
            verified = ops.verify(spec, jnp.repeat(inputs["problem_index"], c), cand.reshape(-1, d, l),
                                  cand_mask.reshape(-1, d, l)).reshape(b, c)
            score = jnp.where(terminal, verified, score)
        ntok = s.generated_tokens + jnp.sum(jnp.where(flat(can_grow)[:, None], props.sampled_tokens, 0).reshape(b, -1), 1)
        cost = s.cost + jnp.sum(props.cost.reshape(b, w), 1) + c * c_ctx.shape[1]
        # The graph: an extension's parent is its beam, a merge's parents are both beams.
        parents = jnp.concatenate([
            jnp.stack([jnp.repeat(s.node, e, axis=1), jnp.full((b, w * e), NONE)], -1),
            jnp.stack([s.node[rows, pa[pick]], s.node[rows, pb[pick]]], -1)], 1)
        graph, index = graph_lib.add_nodes(s.graph, parents, jnp.where(valid, score, 0.0), terminal, valid)
        done = valid & terminal
        graph = graph_lib.backup(graph, jnp.where(done, index, NONE), jnp.where(done, score, 0.0))
        # Select: the best finished candidate so far; the W best open ones go on.
        finished, better = keep_best(s.finished, cand, cand_mask, jnp.where(done, score, neg))
        open_score = jnp.where(valid & ~terminal, score, neg)
        fallback, _ = keep_best(s.fallback, cand, cand_mask, open_score)
        idx, top = ops.select_top_k(open_score, w)
        return _State(key=key, steps=cand[rows, idx], mask=cand_mask[rows, idx], depth=cand_depth[rows, idx],
                      alive=top > neg, score=jnp.where(top > neg, top, 0.0), node=index[rows, idx],
                      finished=finished, found=s.found | better, fallback=fallback, generated_tokens=ntok,
                      cost=cost, graph=graph)

    s = jax.lax.fori_loop(0, d, body, state)
    return GoTOutput(answer=answer(s.finished, s.found, s.fallback, s.generated_tokens, s.cost), graph=s.graph)
