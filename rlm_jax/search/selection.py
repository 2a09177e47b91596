"""Selection: per-node scoring rules and the batched descent from the root to a leaf.

A rule maps one node's `ChildStats` (tree.py) to scores [K]; the descent takes the argmax over the
slots it may choose (first index on ties, no random tie-break: the search is deterministic given its
inputs). Rules are written for one node of one tree and lifted with `jax.vmap`.

Rules:
- `puct_scores`: MuZero / mctx `muzero_action_selection`:
  `qtransform(Q) + sqrt(N(s)) * (c1 + log((N(s) + c2 + 1) / c2)) * softmax(prior) / (1 + N(c))`.
- `uct_scores`: `qtransform(Q) + c * sqrt(log N(s) / N(c))`, unvisited children first; ignores priors.
- `x1_scores`: x1 / the blueprint (Algorithm 1), node-based PUCT without prior:
  `norm(V(c)) + sqrt(N(s) - 1) / (1 + N(c)) * (c1 + log((N(s) + c2) / c2))` with V(c) the child's own
  value (x1's q(c), not reward + discount * V) min-max normalised from [q_min, q_max].
- Gumbel MuZero's root and interior rules live in `gumbel.py`.

Q transforms (as mctx's): `q_by_parent_and_siblings` (min-max over V(s) and visited siblings' Q, the
MuZero default) and `q_by_min_max` (fixed bounds). Unvisited children get 0 (the minimum).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search.tree import NONE, ROOT, ChildStats, Tree, child_stats_one

# A rule: (stats, depth [], extra) -> scores [K]. `extra` is per-problem data (e.g. root Gumbel noise).
ScoreFn = Callable[[ChildStats, chex.Array, Any], chex.Array]


# ---------------------------------------------------------------- Q transforms ([K] -> [K] in [0, 1])
def q_by_min_max(stats: ChildStats, *, q_min: float, q_max: float) -> chex.Array:
    q = jnp.where(stats.visits > 0, stats.qvalues, q_min)
    return (q - q_min) / (q_max - q_min)


def q_by_parent_and_siblings(stats: ChildStats, *, epsilon: float = 1e-8) -> chex.Array:
    visited = stats.visits > 0
    safe = jnp.where(visited, stats.qvalues, stats.node_value)
    lo = jnp.minimum(stats.node_value, jnp.min(safe))
    hi = jnp.maximum(stats.node_value, jnp.max(safe))
    q = jnp.where(visited, stats.qvalues, lo)
    return (q - lo) / jnp.maximum(hi - lo, epsilon)


def make_qtransform(name: str, q_min: float, q_max: float) -> Callable[[ChildStats], chex.Array]:
    if name == "parent_and_siblings":
        return q_by_parent_and_siblings
    if name == "min_max":
        return functools.partial(q_by_min_max, q_min=q_min, q_max=q_max)
    raise ValueError(f"unknown qtransform {name!r}")


# ---------------------------------------------------------------- rules (one node -> scores [K])
def puct_scores(stats, depth, extra, *, pb_c_init, pb_c_base, qtransform):
    del depth, extra
    n = stats.node_visits
    pb_c = pb_c_init + jnp.log((n + pb_c_base + 1.0) / pb_c_base)
    prior = jax.nn.softmax(stats.prior_logits)
    return qtransform(stats) + jnp.sqrt(n) * pb_c * prior / (stats.visits + 1)


def uct_scores(stats, depth, extra, *, c, qtransform):
    del depth, extra
    n = jnp.maximum(stats.node_visits, 1).astype(jnp.float32)
    bonus = c * jnp.sqrt(jnp.log(n) / jnp.maximum(stats.visits, 1))
    return jnp.where(stats.visits > 0, qtransform(stats) + bonus, jnp.inf)


def x1_scores(stats, depth, extra, *, c1, c2, q_min, q_max):
    del depth, extra
    n = stats.node_visits.astype(jnp.float32)
    norm_v = (stats.values - q_min) / (q_max - q_min)
    explore = jnp.sqrt(jnp.maximum(n - 1.0, 0.0)) / (1.0 + stats.visits) * (c1 + jnp.log((n + c2) / c2))
    return norm_v + explore


# ---------------------------------------------------------------- descent
CONTINUE, EXPAND, REVISIT, DROP = 0, 1, 2, 3
"""How a simulation's descent ended:
EXPAND: at `node`, create the child in `slot` (or all K children when expanding all);
REVISIT: at `node`, a terminal node, a dead end (no valid slot) or a node at max_depth: no new node,
    the node's value is backed up again;
DROP: the simulation is void (collision with a node reserved by a parallel simulation this iteration,
    full tree, or the problem has stopped): nothing is expanded or backed up."""


class Leaf(NamedTuple):
    node: chex.Array  # [B] node where the descent ended
    slot: chex.Array  # [B] slot to expand (EXPAND with one child per expansion)
    status: chex.Array  # [B] EXPAND / REVISIT / DROP


def _descend_one(tree, extra, fresh_from, stopped, *, root_fn, interior_fn, max_depth, expand_all):
    """One tree: from the root, follow the best slot until an empty slot, a terminal, or a cut-off."""

    def ends_at(node):  # a node where nothing can be added below: revisit it
        return tree.terminal[node] | (tree.depth[node] >= max_depth)

    def body(state):
        node, _, _ = state
        stats = child_stats_one(tree, node)
        depth = tree.depth[node]
        if root_fn is interior_fn:
            scores = interior_fn(stats, depth, extra)
        else:  # both are cheap [K] vectors; a select is cheaper than a cond under vmap
            scores = jnp.where(depth == 0, root_fn(stats, depth, extra), interior_fn(stats, depth, extra))
        # Expanding all children at once: a node is a leaf until it has children, then we choose among
        # them. One child per expansion: choose among valid slots, filled or not.
        choosable = stats.filled if expand_all else stats.valid
        slot = jnp.argmax(jnp.where(choosable, scores, -jnp.inf)).astype(jnp.int32)
        child = stats.index[slot]
        if expand_all:
            leaf = ~jnp.any(stats.filled)
            status = jnp.where(leaf, EXPAND, CONTINUE)
        else:
            dead_end = ~jnp.any(stats.valid)
            status = jnp.where(dead_end, REVISIT, jnp.where(child == NONE, EXPAND, CONTINUE))
        moving = status == CONTINUE
        # A child created earlier in this iteration (index >= fresh_from) has no evaluation yet.
        pending = child >= fresh_from
        status = jnp.where(moving & pending, DROP, jnp.where(moving & ends_at(child), REVISIT, status))
        node = jnp.where(moving & ~pending, child, node)
        return node, slot, status

    root = jnp.int32(ROOT)
    status0 = jnp.where(stopped, DROP, jnp.where(ends_at(root), REVISIT, CONTINUE))
    state = (root, jnp.int32(0), status0.astype(jnp.int32))
    node, slot, status = jax.lax.while_loop(lambda s: s[2] == CONTINUE, body, state)
    return Leaf(node, slot, status)


def descend(tree: Tree, extra: Any, fresh_from: chex.Array, stopped: chex.Array, *,
            root_fn: ScoreFn, interior_fn: ScoreFn, max_depth: int, expand_all: bool) -> Leaf:
    """Selects one leaf per problem. The tree is read, never carried: the loop state is 3 ints.

    tree: batched Tree; extra: pytree [B, ...] handed to the rules; fresh_from: [B] first node index
    created in the current iteration (pending evaluation); stopped: [B] bool, problems to skip.
    """
    fn = functools.partial(_descend_one, root_fn=root_fn, interior_fn=interior_fn,
                           max_depth=max_depth, expand_all=expand_all)
    return jax.vmap(fn)(tree, extra, fresh_from, stopped)
