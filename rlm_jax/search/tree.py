"""The search tree: fixed-capacity arrays batched over problems (its I/O types: base.py).

Layout (as mctx, but with statistics stored per *node* rather than per edge):
`B` problems, `N` node capacity, `K` child slots per node. Node 0 is the root; nodes are allocated in
order, so `[0, num_nodes)` are the nodes in use and the rest is untouched padding (`parent == -1`).
A node's K slots are its possible children (for an LM: K sampled steps, never the vocabulary); a slot
is *valid* while its prior logit is finite (`-inf` marks a slot that may never be chosen) and *filled*
once its child node exists (`children != -1`).

Statistics: `visits[n]` counts the node's creation plus every simulation whose path went through it
(so it is >= 1 for every node in use); `value_sum[n] / visits[n]` is the backed-up value V(n), which
starts at the evaluator's `raw_value[n]`. The edge into `n` carries `reward[n]` and `discount[n]`,
and the Q-value of a child is `Q(parent, n) = reward[n] + discount[n] * V(n)` (MuZero's convention).

Capacity exhaustion, terminal nodes and dead ends (no valid slot) are states of this structure that the
search handles (see `rlm_jax.search.mcts`), never exceptions.

Functions named `*_one` work on one unbatched tree (every field without its `B` axis) and are lifted
with `jax.vmap`; the others take the batched tree.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search.base import ChildStats, RootInput

ROOT = 0  # index of the root node
NONE = -1  # no parent / empty child slot / no node


@chex.dataclass(frozen=True)
class Tree:
    """A batch of search trees. Shapes: B problems, N node capacity, K child slots.

    parent: [B, N] int32, NONE for the root and unused nodes.
    action_from_parent: [B, N] int32 slot of the parent this node fills, NONE for the root/unused.
    children: [B, N, K] int32 node index of each slot's child, NONE where the slot is empty.
    child_prior_logits: [B, N, K] prior logits of each node's K slots (LM: log-probs of the K steps).
    visits: [B, N] int32 visit counts (see module docstring).
    value_sum: [B, N] sum of backed-up values; V = value_sum / visits.
    raw_value: [B, N] the evaluator's value when the node was created.
    reward: [B, N] reward on the edge into the node (0 for the root).
    discount: [B, N] discount on the edge into the node.
    terminal: [B, N] bool.
    depth: [B, N] int32 edges from the root.
    num_nodes: [B] int32 nodes in use.
    embedding: pytree with leaves [B, N, ...].
    """

    parent: chex.Array
    action_from_parent: chex.Array
    children: chex.Array
    child_prior_logits: chex.Array
    visits: chex.Array
    value_sum: chex.Array
    raw_value: chex.Array
    reward: chex.Array
    discount: chex.Array
    terminal: chex.Array
    depth: chex.Array
    num_nodes: chex.Array
    embedding: Any

    @property
    def capacity(self) -> int:
        return self.parent.shape[-1]

    @property
    def num_slots(self) -> int:
        return self.children.shape[-1]

    @property
    def batch_size(self) -> int:
        return self.parent.shape[0]


def init_tree(root: RootInput, capacity: int) -> Tree:
    """A tree per problem holding only its root (visits 1, value = root.value)."""
    batch, k = root.prior_logits.shape
    chex.assert_shape(root.value, (batch,))
    bn, bnk = (batch, capacity), (batch, capacity, k)
    dtype = root.value.dtype
    terminal = jnp.zeros((batch,), bool) if root.terminal is None else root.terminal.astype(bool)

    def with_root(shape, fill, dt, root_value):
        return jnp.full(shape, fill, dt).at[:, ROOT].set(root_value)

    return Tree(
        parent=jnp.full(bn, NONE, jnp.int32),
        action_from_parent=jnp.full(bn, NONE, jnp.int32),
        children=jnp.full(bnk, NONE, jnp.int32),
        child_prior_logits=with_root(bnk, 0, root.prior_logits.dtype, root.prior_logits),
        visits=with_root(bn, 0, jnp.int32, 1),
        value_sum=with_root(bn, 0, dtype, root.value),
        raw_value=with_root(bn, 0, dtype, root.value),
        reward=jnp.zeros(bn, dtype),
        discount=jnp.zeros(bn, dtype),
        terminal=with_root(bn, False, bool, terminal),
        depth=jnp.zeros(bn, jnp.int32),
        num_nodes=jnp.ones((batch,), jnp.int32),
        embedding=jax.tree.map(
            lambda x: jnp.zeros(bn + x.shape[1:], x.dtype).at[:, ROOT].set(x), root.embedding),
    )


def node_value(tree: Tree) -> chex.Array:
    """V(n) = value_sum / visits, [B, N] (0 for unused nodes)."""
    return tree.value_sum / jnp.maximum(tree.visits, 1)


def child_stats_one(tree: Tree, node: chex.Array) -> ChildStats:
    """Gathers the statistics of `node`'s K slots in one unbatched tree (`node` a scalar)."""
    index = tree.children[node]
    filled = index != NONE
    safe = jnp.where(filled, index, 0)  # a -1 gather would wrap to the last node

    visits = jnp.where(filled, tree.visits[safe], 0)
    values = jnp.where(filled, tree.value_sum[safe] / jnp.maximum(tree.visits[safe], 1), 0)
    qvalues = jnp.where(filled, tree.reward[safe] + tree.discount[safe] * values, 0)
    logits = tree.child_prior_logits[node]
    node_visits = tree.visits[node]
    return ChildStats(
        index=index,
        filled=filled,
        valid=logits > -jnp.inf,
        visits=visits,
        qvalues=qvalues,
        values=values,
        prior_logits=logits,
        node_visits=node_visits,
        node_value=tree.value_sum[node] / jnp.maximum(node_visits, 1),
        raw_value=tree.raw_value[node],
    )


def child_stats(tree: Tree, node: chex.Array) -> ChildStats:
    """`child_stats_one` for node [B] of a batched tree: fields [B, K] (scalars [B])."""
    return jax.vmap(child_stats_one)(tree, node)


def qvalues(tree: Tree, node: chex.Array) -> chex.Array:
    """Q(node, slot) = reward + discount * V(child) of node [B]'s K slots: [B, K], 0 where empty."""
    return child_stats(tree, node).qvalues


def child_visits(tree: Tree, node: chex.Array) -> chex.Array:
    """Visit counts of node [B]'s K slots: [B, K] int32, 0 where empty."""
    return child_stats(tree, node).visits


def path_to_root(tree: Tree, node: chex.Array, length: int) -> chex.Array:
    """Node indices from the root down to `node`: node [B] or [B, M] -> [B, length] or [B, M, length].

    `path[..., d]` is the ancestor at depth d (so `path[..., depth[node]] == node`), NONE-padded; a NONE
    node gives an all-NONE path. Used to gather a node's text (the steps along its root path).
    Ancestors deeper than `length - 1` are cut off. The loop carries only the [B, M, length] paths.
    """
    rows = jnp.arange(tree.batch_size).reshape((-1,) + (1,) * (node.ndim - 1))
    positions = jnp.arange(length)

    def body(state):
        cur, path = state
        live = cur != NONE
        safe = jnp.maximum(cur, 0)
        at = live[..., None] & (positions == tree.depth[rows, safe][..., None])
        path = jnp.where(at, cur[..., None], path)
        return jnp.where(live, tree.parent[rows, safe], NONE), path

    node = jnp.asarray(node, jnp.int32)
    path = jnp.full(node.shape + (length,), NONE, jnp.int32)
    _, path = jax.lax.while_loop(lambda s: jnp.any(s[0] != NONE), body, (node, path))
    return path
