"""Self-refine MCTS (SR-MCTS, after LLaMA-Berry, Zhang et al. 2024): MCTS whose nodes are whole solutions and
whose expansion is Refine.

    out = sr_mcts_jit(spec, inputs, key, solutions=S)        # out.answer: StrategyOutput

One jitted program, a `lax.fori_loop` of S rounds; each round writes one solution:
- Select: the node with the highest UCT score Q(n) + c sqrt(ln N(root) / N(n)) among the nodes written so
  far and the root (the empty solution: refining it writes a fresh draft, so the search can always go
  back to the start).
- Refine, guided by the critic's feedback: the value model reads every prefix of the selected solution
  (`operators.evaluate_steps`, one forward pass) and flags the step after which its value fell most
  (`operators.weakest_step`). The steps before it are kept; the policy proposes K = `rewrites` new
  steps in its place, the best-valued one that differs from the flagged step is kept (the same step only
  where all K repeat it), and the policy writes the rest of the solution (`operators.complete_paths`).
  Our policies were never taught to write critiques, so the feedback is the value model's, and the
  rewrite is a new sample from the flagged step on, ranked by the same model.
- Evaluate: the new solution's value (its last prefix value, read in the same pass that gives the next
  round's feedback); a solution that did not end with EOS within D steps scores -1. In training mode
  (`spec.verifier`) finished solutions are scored by the verifier.
- Backup: the score is added along the node's ancestors (`graph.backup`); each node's parent is the
  solution it refined, so the output graph holds the refinement tree with every solution written.

The answer is the best-scored finished solution, else the best-valued unfinished one. Tokens: every token
the policy sampled (the K proposals, those not kept included, and the completions). Needs a value model.
No KV cache: each context is re-read whole (`spec.kv_cache` unused), as in Graph of Thoughts.
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
from rlm_jax.search.tree import NONE, ROOT


@chex.dataclass(frozen=True)
class SRMCTSOutput:
    """answer: the StrategyOutput [B, ...]; graph: node 0 the root (the empty solution), node i > 0 the i-th
    solution written, whose parent is the solution it refined (capacity 1 + S); steps, mask: [B, 1 + S, D, L]
    each node's solution; values: [B, 1 + S, D + 1] its prefix values (`operators.evaluate_steps`);
    rewritten: [B, 1 + S] int32 the slot its refinement rewrote (every slot from there on was regenerated;
    NONE for the root)."""

    answer: StrategyOutput
    graph: graph_lib.Graph
    steps: chex.Array
    mask: chex.Array
    values: chex.Array
    rewritten: chex.Array


class _State(NamedTuple):
    key: chex.PRNGKey
    graph: graph_lib.Graph
    steps: chex.Array  # [B, N, D, L]
    mask: chex.Array  # [B, N, D, L]
    values: chex.Array  # [B, N, D + 1]
    rewritten: chex.Array  # [B, N] int32
    finished: Kept
    found: chex.Array  # [B] bool
    fallback: Kept
    generated_tokens: chex.Array  # [B] int32
    cost: chex.Array  # [B] float32


def uct_scores(graph: graph_lib.Graph, exploration: float) -> chex.Array:
    """[B, N] UCT score of every node in use, Q(n) + c sqrt(ln N(root) / N(n)); -inf beyond num_nodes."""
    visits = jnp.maximum(graph.visits, 1).astype(jnp.float32)
    total = graph.visits[:, ROOT:ROOT + 1].astype(jnp.float32)
    score = graph_lib.node_value(graph) + exploration * jnp.sqrt(jnp.log(total) / visits)
    used = jnp.arange(graph.capacity)[None, :] < graph.num_nodes[:, None]
    return jnp.where(used, score, -jnp.inf)


def choose_rewrite(spec: LMSpec, props, value: chex.Array, old_step: chex.Array, has_old: chex.Array) -> chex.Array:
    """Which of K proposals [B, K] replaces the flagged step: the best-valued (value [B, K]) usable one (not
    truncated, not a repeat) that differs from the old step (old_step [B, L], -1 where masked; has_old [B]
    False where there is none, at the root); one equal to it only where no usable proposal differs. -> [B]."""
    same = jnp.all(jnp.where(props.mask, props.tokens, -1) == old_step[:, None], -1) & has_old[:, None]
    usable = jnp.isfinite(ops.proposal_logits(spec, props))
    rank = jnp.where(usable, value + jnp.where(same, -4.0, 0.0), -jnp.inf)  # values lie in [-1, 1]
    return jnp.argmax(rank, axis=1)


@functools.partial(jax.jit, static_argnames=("spec", "solutions", "exploration", "rewrites", "temperature"))
def sr_mcts_jit(spec: LMSpec, inputs, key, solutions: int, exploration: float = 1.0, rewrites: int | None = None,
                temperature: float | None = None) -> SRMCTSOutput:
    """S = solutions written (the first is a draft: a refinement of the empty root); exploration: UCT's c;
    rewrites: K, the new steps proposed at the flagged slot (default spec.num_slots); inputs: `lm.search_inputs`.
    Needs a value model (the critic that says which step to rewrite)."""
    if spec.value is None:
        raise ValueError("sr_mcts_jit's feedback is the value model's; give LMSpec.value/head")
    if solutions < 1 or (rewrites is not None and rewrites < 1):
        raise ValueError(f"sr_mcts needs at least one solution and one rewrite per refinement, got solutions="
                         f"{solutions}, rewrites={rewrites}")
    prompt, prompt_mask = inputs["prompt"], inputs["prompt_mask"]
    b, p = prompt.shape
    k, d, l = spec.num_slots if rewrites is None else rewrites, spec.max_depth, spec.step_len
    n = 1 + solutions
    vparams = lm_value_params(spec, inputs)
    temperature = spec.temperature if temperature is None else temperature
    rows = jnp.arange(b)
    empty = jnp.full((b, d, l), spec.pad_id, jnp.int32), jnp.zeros((b, d, l), bool)
    root_values = ops.evaluate_steps(spec, vparams, prompt, prompt_mask, *empty)  # [B, D + 1], all V(prompt)
    nothing = Kept(*empty, jnp.full((b,), -jnp.inf))
    state = _State(key=key, graph=graph_lib.init_graph(root_values[:, 0], n, 1),
                   steps=jnp.full((b, n, d, l), spec.pad_id, jnp.int32), mask=jnp.zeros((b, n, d, l), bool),
                   values=jnp.zeros((b, n, d + 1), jnp.float32).at[:, ROOT].set(root_values),
                   rewritten=jnp.full((b, n), NONE, jnp.int32), finished=nothing, found=jnp.zeros((b,), bool),
                   fallback=nothing, generated_tokens=jnp.zeros((b,), jnp.int32),
                   cost=jnp.full((b,), p, jnp.float32))
    prompt_k, prompt_mask_k = jnp.repeat(prompt, k, axis=0), jnp.repeat(prompt_mask, k, axis=0)
    slots = jnp.arange(d)[None, :]

    def body(_, s: _State) -> _State:
        key, k_gen, k_rest = jax.random.split(s.key, 3)
        # Select.
        node = jnp.argmax(uct_scores(s.graph, exploration), axis=1)  # [B]
        old, old_mask = s.steps[rows, node], s.mask[rows, node]
        old_depth = jnp.sum(jnp.any(old_mask, -1), -1)  # [B] steps of the selected solution
        # Refine: the feedback, then K proposals in the flagged slot after the steps before it.
        j = jnp.where(node == ROOT, 0, ops.weakest_step(s.values[rows, node], old_depth))  # [B]
        keep = (slots < j[:, None])[..., None]
        prefix, prefix_mask = jnp.where(keep, old, spec.pad_id), old_mask & keep
        ctx, ctx_mask = ops.context(prompt, prompt_mask, prefix, prefix_mask)
        props = ops.generate_steps(spec, inputs["policy"], ctx, ctx_mask, k_gen, k, temperature)
        at_j = (slots == j[:, None])[:, None, :, None]  # [B, 1, D, 1]
        cand = jnp.where(at_j, props.tokens[:, :, None], prefix[:, None])  # [B, K, D, L]
        cand_mask = jnp.where(at_j, props.mask[:, :, None], prefix_mask[:, None])
        c_ctx, c_mask = ops.context(prompt_k, prompt_mask_k, cand.reshape(-1, d, l), cand_mask.reshape(-1, d, l))
        c_value = ops.evaluate_value(spec, vparams, c_ctx, c_mask).reshape(b, k)
        pick = choose_rewrite(spec, props, c_value, jnp.where(old_mask, old, -1)[rows, j], j < old_depth)
        steps, mask = cand[rows, pick], cand_mask[rows, pick]
        step_ok, step_end = props.ok[rows, pick], props.terminal[rows, pick]
        steps, mask, _, done, rest_tokens, rest_cost = ops.complete_paths(
            spec, inputs["policy"], prompt, prompt_mask, steps, mask, step_ok & ~step_end, k_rest, temperature)
        finished = (step_ok & step_end) | done
        # Evaluate: every prefix value in one read (the next refinement's feedback); the last is the score.
        values = ops.evaluate_steps(spec, vparams, prompt, prompt_mask, steps, mask)
        value = values[:, -1]
        score = value
        if spec.verifier is not None:
            score = ops.verify(spec, inputs["problem_index"], steps, mask)
        score = jnp.where(finished, score, -1.0)
        ntok = s.generated_tokens + jnp.sum(props.sampled_tokens, 1) + rest_tokens
        cost = s.cost + props.cost + k * c_ctx.shape[1] + rest_cost + ctx.shape[1]
        # The graph: the new solution under the one it refined; its score backed up through the ancestors.
        graph, index = graph_lib.add_nodes(s.graph, node[:, None, None], score[:, None], finished[:, None],
                                           jnp.ones((b, 1), bool))
        graph = graph_lib.backup(graph, index, score[:, None])
        at = jnp.where(index[:, 0] >= 0, index[:, 0], n)
        put = lambda field, x: field.at[rows, at].set(x.astype(field.dtype), mode="drop")
        cand1, mask1 = steps[:, None], mask[:, None]
        kept, better = keep_best(s.finished, cand1, mask1, jnp.where(finished, score, -jnp.inf)[:, None])
        fallback, _ = keep_best(s.fallback, cand1, mask1, jnp.where(finished, -jnp.inf, value)[:, None])
        return _State(key=key, graph=graph, steps=put(s.steps, steps), mask=put(s.mask, mask),
                      values=put(s.values, values), rewritten=put(s.rewritten, j),
                      finished=kept, found=s.found | better, fallback=fallback, generated_tokens=ntok, cost=cost)

    s = jax.lax.fori_loop(0, solutions, body, state)
    return SRMCTSOutput(answer=answer(s.finished, s.found, s.fallback, s.generated_tokens, s.cost), graph=s.graph,
                        steps=s.steps, mask=s.mask, values=s.values, rewritten=s.rewritten)
