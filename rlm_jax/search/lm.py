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
simulations), R rollouts to the end are sampled from it inside the same program (`ops.simulate`) and
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
from rlm_jax.search.base import ExpandOutput, LMSpec, RootInput, SearchOutput
from rlm_jax.search.tree import Tree, path_to_root


def path_steps(spec: LMSpec, tree: Tree, node: chex.Array):
    """Steps on the root path of node [B, M] -> (steps [B, M, D, L], mask [B, M, D, L])."""
    path = path_to_root(tree, node, spec.max_depth + 1)[..., 1:]  # depth 1..D (the root has no step)
    rows = jnp.arange(tree.batch_size)[:, None, None]
    safe = jnp.maximum(path, 0)
    steps = tree.embedding["step"][rows, safe]
    mask = tree.embedding["step_mask"][rows, safe] & (path >= 0)[..., None]
    return steps, mask


def _evaluate_new(spec: LMSpec, inputs, key, steps, steps_mask, terminal, ok, problem_index):
    """Values and K proposals of n new nodes. steps [n, D, L] (their full path); -> (value [n],
    prior logits [n, K], Proposals, rollouts: {"rollout_value": mean reward [n] (0 without rollouts or
    for terminal nodes), "rollout_tokens": tokens sampled [n]})."""
    tokens, mask = ops.context(inputs["prompt_rows"], inputs["prompt_mask_rows"], steps, steps_mask)
    # A finished (or dead) node is never expanded: it gets no proposals, and costs no tokens.
    props = ops.generate_steps(spec, inputs["policy"], tokens, mask, key, spec.num_slots, active=~terminal & ok)
    logits = ops.proposal_logits(spec, props)
    value = ops.evaluate_value(spec, inputs["value"], tokens, mask)
    sim, rollout_tokens = jnp.zeros(value.shape, jnp.float32), jnp.zeros(value.shape, jnp.int32)
    if spec.num_rollouts:  # x1: Q = (1 - alpha) Q_model + alpha * mean rollout reward (own key: the
        # proposals and everything else are drawn exactly as without rollouts)
        live = ~terminal & ok
        sim, rollout_tokens = ops.simulate(spec, inputs["policy"], inputs["value"], inputs["prompt_rows"],
                           inputs["prompt_mask_rows"], steps, steps_mask, problem_index, live,
                           jax.random.fold_in(key, 1))
        a = spec.rollout_alpha
        sim = jnp.where(live, sim, 0.0)
        value = jnp.where(live, (1.0 - a) * value + a * sim, value)
    if spec.verifier is not None:
        score = ops.verify(spec, problem_index, steps, steps_mask)
        value = jnp.where(terminal, score, value)
    value = jnp.where(ok, value, -1.0)
    logits = jnp.where((terminal | ~ok)[:, None], -jnp.inf, logits)
    return value, logits, props, {"rollout_value": sim, "rollout_tokens": rollout_tokens}


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
        value, logits, props, rollouts = _evaluate_new(
            spec, rows_in, key, flat(steps), flat(steps_mask), flat(terminal), flat(ok),
            jnp.repeat(inputs["problem_index"], m))
        unflat = lambda x: x.reshape((b, m) + x.shape[1:])
        embedding = {"step": step, "step_mask": step_mask, "props": unflat(props.tokens),
                     "props_mask": unflat(props.mask), "props_terminal": unflat(props.terminal),
                     "props_ok": unflat(props.ok), **jax.tree.map(unflat, rollouts)}
        return ExpandOutput(embedding=embedding, reward=jnp.zeros((b, m)), discount=jnp.ones((b, m)),
                            prior_logits=unflat(logits), value=unflat(value),
                            terminal=terminal | ~ok)


def make_root(spec: LMSpec, inputs, key) -> RootInput:
    """The root of each problem: V(prompt) and K proposals for the first step."""
    b = inputs["prompt"].shape[0]
    d, l = spec.max_depth, spec.step_len
    steps = jnp.full((b, d, l), spec.pad_id, jnp.int32)
    steps_mask = jnp.zeros((b, d, l), bool)
    no = jnp.zeros((b,), bool)
    rows_in = dict(inputs, prompt_rows=inputs["prompt"], prompt_mask_rows=inputs["prompt_mask"])
    value, logits, props, rollouts = _evaluate_new(spec, rows_in, key, steps, steps_mask, no, ~no,
                                                   inputs["problem_index"])
    embedding = {"step": steps[:, 0], "step_mask": steps_mask[:, 0], "props": props.tokens,
                 "props_mask": props.mask, "props_terminal": props.terminal, "props_ok": props.ok, **rollouts}
    return RootInput(prior_logits=logits, value=value, embedding=embedding)


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
    root = make_root(spec, inputs, root_key)
    return mcts_lib.mcts(inputs, search_key, root, LMExpand(spec), num_simulations, config)


lm_mcts_jit = jax.jit(lm_mcts, static_argnames=("spec", "num_simulations", "config"))


def solution_steps(spec: LMSpec, out: SearchOutput):
    """The steps of each problem's best node: ([B, D, L] tokens, mask)."""
    steps, mask = path_steps(spec, out.tree, out.best_node[:, None])
    return steps[:, 0], mask[:, 0]
