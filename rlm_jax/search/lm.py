"""MCTS over reasoning steps: the policy LM and value model as the search's environment.

    out = lm_mcts(spec, inputs, key, num_simulations, config)

A node is a reasoning step. Its embedding holds its own step (`step [L]`, `step_mask [L]`), the K
proposals for its children (`props [K, L]`, `props_mask`, `props_terminal`, `props_ok`) and
`rollout_value []`, `rollout_tokens []` (its rollouts' mean reward, x1's simulation_value, and the
tokens they sampled; 0 without rollouts). The proposals are sampled from the policy when the node is
created: their log-probs are the node's K prior logits (PUCT's prior). Creating the child in slot a
therefore needs no generation for the child's own text (it is `props[a]` of the parent), only for the
child's proposals (none for a child that ends the solution: it is never expanded). `spec.proposals`
= "distinct" draws a node's K proposals without replacement (a confident policy's independent samples
repeat each other, and the repeats are merged into one slot). A node's text is the prompt plus the
steps on its root path, gathered along `parent` into D fixed-width slots (operators.context).

Values: a new non-terminal node gets V from the value model; with `spec.num_rollouts` = R > 0 (x1's
simulations), R rollouts to the end are sampled from it inside the same program (from its cached pages,
`paged.rollouts`; `ops.simulate` re-reads the context without the cache) and
V = (1 - alpha) V_model + alpha * mean rollout reward (alpha = spec.rollout_alpha; the root is
evaluated the same way). A terminal node (its step ended with EOS) gets the verifier's score in
training mode (`spec.verifier`, a batched host callback) or the value model's score (inference mode:
everything on device, no host callback in the compiled program). A truncated step (no STEP/EOS within L tokens)
has a -inf prior and, if created anyway (x1's expand-all), is a dead terminal of value -1.

`inputs` (a dict, the `params` of `mcts`): policy, value (params or None), prompt [B, P], prompt_mask
[B, P], problem_index [B] (passed to the verifier).
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search import operators as ops
from rlm_jax.search import paged
from rlm_jax.search.base import ExpandOutput, LMSpec, RootInput, SearchOutput
from rlm_jax.search.tree import NONE, Tree, path_to_root


def path_steps(spec: LMSpec, tree: Tree, node: chex.Array):
    """Steps on the root path of node [B, M] -> (steps [B, M, D, L], mask [B, M, D, L])."""
    path = path_to_root(tree, node, spec.max_depth + 1)[..., 1:]  # depth 1..D (the root has no step)
    rows = jnp.arange(tree.batch_size)[:, None, None]
    safe = jnp.maximum(path, 0)
    steps = tree.embedding["step"][rows, safe]
    mask = tree.embedding["step_mask"][rows, safe] & (path >= 0)[..., None]
    return steps, mask


def _evaluate_new(spec: LMSpec, inputs, key, steps, steps_mask, terminal, ok, problem_index):
    """Values and K proposals of n new nodes, re-reading their whole contexts (`spec.kv_cache=False`).
    steps [n, D, L] (their full path); -> (value [n], prior logits [n, K], Proposals, rollouts:
    {"rollout_value": mean reward [n] (0 without rollouts or for terminal nodes), "rollout_tokens":
    tokens sampled [n]}, positions computed [n])."""
    tokens, mask = ops.context(inputs["prompt_rows"], inputs["prompt_mask_rows"], steps, steps_mask)
    # A finished (or dead) node is never expanded: it gets no proposals, and costs no tokens.
    props = ops.generate_steps(spec, inputs["policy"], tokens, mask, key, spec.num_slots, active=~terminal & ok)
    value = ops.evaluate_value(spec, value_params(spec, inputs), tokens, mask)
    cost = props.cost + (tokens.shape[1] if spec.value is not None else 0)
    value, rollouts, rollout_cost = _rollouts_and_verifier(spec, inputs, key, value, steps, steps_mask, terminal,
                                                           ok, problem_index)
    return _finish(spec, value, props, terminal, ok) + (rollouts, cost + rollout_cost)


def _rollouts_and_verifier(spec, inputs, key, value, steps, steps_mask, terminal, ok, problem_index, cached=None):
    """x1's rollouts blended into the model's value, and the verifier's score of finished nodes ->
    (value [n], {"rollout_value", "rollout_tokens"} [n], positions the rollouts computed [n]).
    cached: (the nodes' policy Context, value_read) to roll out from the KV cache (`_cached_rollouts`);
    None: the rollouts re-read their contexts (`operators.simulate`)."""
    sim, rollout_tokens = jnp.zeros(value.shape, jnp.float32), jnp.zeros(value.shape, jnp.int32)
    cost = jnp.zeros(value.shape, jnp.float32)
    if spec.num_rollouts:  # x1: Q = (1 - alpha) Q_model + alpha * mean rollout reward (own key: the
        # proposals and everything else are drawn exactly as without rollouts).
        live = ~terminal & ok
        sub = jax.random.fold_in(key, 1)
        if cached is None:
            sim, rollout_tokens, cost = ops.simulate(spec, inputs["policy"], value_params(spec, inputs),
                                                     inputs["prompt_rows"], inputs["prompt_mask_rows"], steps,
                                                     steps_mask, problem_index, live, sub)
        else:
            sim, rollout_tokens, cost = _cached_rollouts(spec, inputs, *cached, steps, steps_mask, problem_index,
                                                         live, sub)
        a = spec.rollout_alpha
        sim = jnp.where(live, sim, 0.0)
        value = jnp.where(live, (1.0 - a) * value + a * sim, value)
    if spec.verifier is not None:
        score = ops.verify(spec, problem_index, steps, steps_mask)
        value = jnp.where(terminal, score, value)
    return value, {"rollout_value": sim, "rollout_tokens": rollout_tokens}, cost


def _cached_rollouts(spec: LMSpec, inputs, ctx: paged.Context, value_read, steps, steps_mask, problem_index,
                     live, key):
    """`operators.simulate` from the KV cache (`paged.rollouts`): the same draws, no context re-read.
    ctx: the n nodes' policy contexts; value_read (a separate value model only, else None): (its Context
    [c rows, n a multiple of c], tokens [n, X] and mask of the node's text it has not read yet) after
    which a finished rollout's steps are read to score it (inference mode). -> as `operators.simulate`."""
    depth = jnp.sum(jnp.any(steps_mask, -1), -1)
    temperature = spec.temperature if spec.rollout_temperature is None else spec.rollout_temperature
    roll = paged.rollouts(spec, inputs["policy"], ctx, depth, live, key, temperature)
    r = spec.num_rollouts
    rep = lambda x: jnp.repeat(x, r, axis=0)
    cost = roll.cost
    if spec.verifier is not None:
        score = ops.verify(spec, rep(problem_index), *ops.append_steps(rep(steps), rep(steps_mask), rep(depth),
                                                                       roll.steps, roll.mask))
    elif spec.shared_trunk:  # free: the hidden state after the rollout's last token
        score = paged.head_value(spec, inputs["value"]["head"], roll.hidden)
    else:
        vctx, unread, unread_mask = value_read
        flat = lambda x: x.reshape(x.shape[0], -1)
        tokens = jnp.concatenate([rep(unread), flat(roll.steps)], 1)
        mask = jnp.concatenate([rep(unread_mask), flat(roll.mask)], 1)
        score, _, read = paged.value_of_steps(spec, inputs["value"], vctx, tokens, mask,
                                              live=roll.finished if spec.compact else None)
        cost = cost + read
    return ops.rollout_return(spec, score, roll.finished, roll.added, roll.tokens, cost)


def value_params(spec: LMSpec, inputs):
    """The value model's params as `operators.evaluate_value` reads them (a shared-trunk head gets the
    policy's trunk)."""
    if spec.shared_trunk:
        return {"trunk": inputs["policy"], "head": inputs["value"]["head"]}
    return inputs["value"]


def _finish(spec, value, props, terminal, ok):
    """(value [n], prior logits [n, K], props): dead nodes are worth -1, ended ones get no slots."""
    logits = ops.proposal_logits(spec, props)
    value = jnp.where(ok, value, -1.0)
    return value, jnp.where((terminal | ~ok)[:, None], -jnp.inf, logits), props


def _evaluate_cached(spec: LMSpec, inputs, key, ctx: paged.Context, value, steps, steps_mask, terminal, ok,
                     problem_index, active, value_read=None):
    """`_evaluate_new` from cached contexts: the K proposals (and rollouts) decode from each node's pages
    (ctx), and return the pool entries of the new nodes (their proposals' pages and hidden states) and
    the positions the rollouts computed [n]. value [n]: the model's value, computed by the caller from
    the cache; value_read: see `_cached_rollouts`."""
    props, (k, v), hidden = paged.generate_steps(spec, inputs["policy"], ctx, key, spec.num_slots,
                                                 active=active & ~terminal & ok)
    value, rollouts, rollout_cost = _rollouts_and_verifier(spec, inputs, key, value, steps, steps_mask, terminal,
                                                           ok & active, problem_index, (ctx, value_read))
    value, logits, props = _finish(spec, value, props, terminal, ok)
    pool = dict(rollouts, props_k=k, props_v=v, props_hidden=hidden, entropy=props.entropy)
    return value, logits, props, pool, rollout_cost


@dataclasses.dataclass(frozen=True)
class LMExpand:
    """`expand_fn` for `mcts`: creates the children (parent [B, M], slot [B, M])."""

    spec: LMSpec

    def __call__(self, inputs, key, tree: Tree, parent: chex.Array, slot: chex.Array) -> ExpandOutput:
        spec = self.spec
        b, m = parent.shape
        rows = jnp.arange(b)[:, None]
        emb = tree.embedding
        step = emb["props"][rows, parent, slot]  # [B, M, L]
        step_mask = emb["props_mask"][rows, parent, slot]
        terminal = emb["props_terminal"][rows, parent, slot]
        ok = jnp.any(step_mask, -1) & (emb["props_ok"][rows, parent, slot])
        steps, steps_mask = path_steps(spec, tree, parent)  # the parent's path ...
        depth = tree.depth[rows, parent]  # ... plus the new step in slot `depth`
        at = (jnp.arange(spec.max_depth) == depth[..., None])[..., None]  # [B, M, D, 1]
        steps = jnp.where(at, step[:, :, None, :], steps)
        steps_mask = jnp.where(at, step_mask[:, :, None, :], steps_mask)

        flat = lambda x: x.reshape((b * m,) + x.shape[2:])
        rows_in = dict(inputs, prompt_rows=jnp.repeat(inputs["prompt"], m, axis=0),
                       prompt_mask_rows=jnp.repeat(inputs["prompt_mask"], m, axis=0))
        args = (flat(steps), flat(steps_mask), flat(terminal), flat(ok), jnp.repeat(inputs["problem_index"], m))
        if spec.kv_cache:
            value, logits, props, extra, cost = self._cached(rows_in, key, tree, parent, slot, step, step_mask, *args)
        else:
            value, logits, props, extra, cost = _evaluate_new(spec, rows_in, key, *args)
        unflat = lambda x: x.reshape((b, m) + x.shape[1:])
        embedding = {"step": step, "step_mask": step_mask, "props": unflat(props.tokens),
                     "props_mask": unflat(props.mask), "props_terminal": unflat(props.terminal),
                     "props_ok": unflat(props.ok), **jax.tree.map(unflat, dict(extra, **_sampled(spec, props)))}
        return ExpandOutput(embedding=embedding, reward=jnp.zeros((b, m)), discount=jnp.ones((b, m)),
                            prior_logits=unflat(logits), value=unflat(value),
                            terminal=terminal | ~ok, cost=jnp.sum(unflat(cost), axis=1))

    def _cached(self, inputs, key, tree, parent, slot, step, step_mask, steps, steps_mask, terminal, ok,
                problem_index):
        """The children's contexts from the pool: no prefix is recomputed. Entries that create no node
        (void simulations) decode nothing, and a call where all are void skips the models."""
        spec = self.spec
        b, m = parent.shape
        n = b * m
        rows, rows3 = jnp.arange(b)[:, None], jnp.arange(b)[:, None, None]
        emb = tree.embedding
        flat = lambda x: x.reshape((n,) + x.shape[2:])
        prompt_row = jnp.repeat(jnp.arange(b), m)
        child = tree.children[rows, parent, slot]
        live = flat((child != NONE) & (tree.visits[rows, jnp.maximum(child, 0)] == 0))  # reserved this iteration
        owner, page_slot, valid, value_nodes = paged.child_pages(tree, parent, slot, spec.max_depth)
        page = lambda name: flat(emb[name][rows3, owner, page_slot])  # [n, D, layers, L, ...]
        hidden = flat(emb["props_hidden"][rows, parent, slot])  # after the child's own step
        ctx = paged.extend(inputs["prompt_pages"], prompt_row, page("props_k"), page("props_v"),
                           flat(emb["props_mask"][rows3, owner, page_slot] & valid[..., None]), hidden)

        def compute():
            cost = jnp.zeros((n,), jnp.float32)
            value_pages, value_read = {}, None
            if spec.value is None:
                value = jnp.zeros((n,), jnp.float32)
            elif spec.shared_trunk:  # free: the hidden state after the step is in the pool
                value = paged.head_value(spec, inputs["value"]["head"], hidden)
            else:  # the value model reads only the new step, after its own pages of the parent's path
                safe, has = jnp.maximum(value_nodes, 0), value_nodes != NONE
                vpage = lambda name: flat(emb[name][rows3, safe])
                vctx = paged.extend(inputs["value_pages"], prompt_row, vpage("value_k"), vpage("value_v"),
                                    flat(emb["step_mask"][rows3, safe] & has[..., None]), hidden)
                value, (vk, vv), cost = paged.value_of_steps(spec, inputs["value"], vctx, flat(step), flat(step_mask),
                                                             live=live & flat(ok) if spec.compact else None)
                value_pages = {"value_k": vk, "value_v": vv}
                value_read = (vctx, flat(step), flat(step_mask))  # the rollouts' steps are read after the node's
            value, logits, props, extra, rollout_cost = _evaluate_cached(spec, inputs, key, ctx, value, steps,
                                                                         steps_mask, terminal, ok, problem_index,
                                                                         live, value_read)
            return value, logits, props, dict(extra, **value_pages), cost + props.cost + rollout_cost

        def skip():
            shapes = jax.eval_shape(compute)
            return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        return jax.lax.cond(jnp.any(live), compute, skip)


def _sampled(spec: LMSpec, props) -> dict:
    """With tools, the tokens the model sampled per proposal (`props_sampled`): a tool's result is not
    generated (`generated_tokens`)."""
    return {"props_sampled": props.sampled_tokens} if spec.tool is not None else {}


def make_root(spec: LMSpec, inputs, key) -> tuple[RootInput, dict]:
    """The root of each problem: V(prompt) and K proposals for the first step; and the inputs extended by
    the prompts' KV (`prompt_pages`, and `value_pages` for a separate value model) with the cache."""
    b, p = inputs["prompt"].shape
    d, l = spec.max_depth, spec.step_len
    steps = jnp.full((b, d, l), spec.pad_id, jnp.int32)
    steps_mask = jnp.zeros((b, d, l), bool)
    no = jnp.zeros((b,), bool)
    rows_in = dict(inputs, prompt_rows=inputs["prompt"], prompt_mask_rows=inputs["prompt_mask"])
    args = (steps, steps_mask, no, ~no, inputs["problem_index"])
    if spec.kv_cache:
        ctx = paged.prompt_context(spec.policy, inputs["policy"], inputs["prompt"], inputs["prompt_mask"])
        inputs = dict(inputs, prompt_pages=ctx)
        cost = jnp.full((b,), p, jnp.float32)
        extra, value_read = {}, None
        if spec.value is None:
            value = jnp.zeros((b,), jnp.float32)
        elif spec.shared_trunk:
            value = paged.head_value(spec, inputs["value"]["head"], ctx.hidden)
        else:
            vctx = paged.prompt_context(spec.value, inputs["value"]["trunk"], inputs["prompt"], inputs["prompt_mask"])
            inputs = dict(inputs, value_pages=vctx)
            value = paged.head_value(spec, inputs["value"]["head"], vctx.hidden)
            cost = cost + p
            shape = (b, spec.value.num_layers, l, spec.value.num_kv_heads, spec.value.head_dim)
            extra = {"value_k": jnp.zeros(shape, vctx.prefix.k.dtype), "value_v": jnp.zeros(shape, vctx.prefix.v.dtype)}
            value_read = (vctx, steps[:, 0, :0], steps_mask[:, 0, :0])  # nothing unread after the prompt
        value, logits, props, pool, rollout_cost = _evaluate_cached(spec, rows_in, key, ctx, value, *args,
                                                                    active=~no, value_read=value_read)
        extra.update(pool)
        cost = cost + props.cost + rollout_cost
    else:
        value, logits, props, extra, cost = _evaluate_new(spec, rows_in, key, *args)
    embedding = {"step": steps[:, 0], "step_mask": steps_mask[:, 0], "props": props.tokens,
                 "props_mask": props.mask, "props_terminal": props.terminal, "props_ok": props.ok, **extra,
                 **_sampled(spec, props)}
    return RootInput(prior_logits=logits, value=value, embedding=embedding, cost=cost), inputs


def search_inputs(policy_params, value_params, prompt, prompt_mask, problem_index=None) -> dict:
    """The `inputs` dict of `lm_mcts` (prompt [B, P] left-padded)."""
    b = prompt.shape[0]
    if problem_index is None:
        problem_index = jnp.arange(b, dtype=jnp.int32)
    return {"policy": policy_params, "value": value_params, "prompt": jnp.asarray(prompt, jnp.int32),
            "prompt_mask": jnp.asarray(prompt_mask, bool),
            "problem_index": jnp.asarray(problem_index, jnp.int32)}


def lm_mcts(spec: LMSpec, inputs, key, num_simulations: int,
            config: mcts_lib.SearchConfig) -> SearchOutput:
    """MCTS over steps for a batch of prompts, one jitted program (see `lm_mcts_jit`).

    `config.max_depth` is set to `spec.max_depth` (a node with D steps is not expanded)."""
    config = dataclasses.replace(config, max_depth=spec.max_depth)
    root_key, search_key = jax.random.split(key)
    root, inputs = make_root(spec, inputs, root_key)
    out = mcts_lib.mcts(inputs, search_key, root, LMExpand(spec), num_simulations, config)
    # The KV pool has served its purpose: the tree handed back holds tokens and statistics only.
    emb = {name: x for name, x in out.tree.embedding.items() if name not in paged.POOL_KEYS}
    return out.replace(tree=out.tree.replace(embedding=emb))


lm_mcts_jit = jax.jit(lm_mcts, static_argnames=("spec", "num_simulations", "config"))


def generated_tokens(tree: Tree) -> chex.Array:
    """Tokens an LM tree search generated per problem [B]: every created node's K proposals (the root's
    included; finished nodes sample none) and its rollouts' tokens (LMSpec.num_rollouts). Void entries
    (revisits) create no node and cost nothing. With tools the model's own tokens (`props_sampled`)."""
    in_use = jnp.arange(tree.parent.shape[1])[None, :] < tree.num_nodes[:, None]
    if "props_sampled" in tree.embedding:
        per_node = jnp.sum(tree.embedding["props_sampled"], axis=-1)
    else:
        per_node = jnp.sum(tree.embedding["props_mask"], axis=(-1, -2))
    if "rollout_tokens" in tree.embedding:
        per_node = per_node + tree.embedding["rollout_tokens"]
    return jnp.sum(jnp.where(in_use, per_node, 0), axis=1)


def solution_steps(spec: LMSpec, out: SearchOutput):
    """The steps of each problem's best node: ([B, D, L] tokens, mask)."""
    steps, mask = path_steps(spec, out.tree, out.best_node[:, None])
    return steps[:, 0], mask[:, 0]
