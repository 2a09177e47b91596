"""Reasoning graphs: nodes with up to G parents, in fixed-capacity arrays batched over problems.

The tree (tree.py) gives every node one parent. A graph node may have several: Graph of Thoughts'
Aggregate writes one step from two partial solutions (two parents), and a refinement can keep the step it
rewrote as a second parent. Layout: B problems, N node capacity, G parent slots. Node 0 is the root;
nodes are allocated in order and a node's parents already exist when it is created, so every parent of
node n is < n (the arrays are a topological order) and `[0, num_nodes)` are the nodes in use.
`parents[b, n]` lists n's parents, NONE where absent (the root and padding have none; a parent listed
twice is one parent). `depth[n]` is the longest path from the root: 1 + the deepest parent, so a parent
is always shallower than its child.

Statistics as in the tree: `visits[n]` counts the node's creation plus every backed-up simulation that
started at n or below it; `value_sum[n] / visits[n]` is V(n), starting at the evaluator's value. In a
DAG a simulation reaches an ancestor along several paths; `backup` adds it there once (no double
counting), which a per-path walk such as backup.py's would not. Values are not discounted along the way:
paths of different lengths reach the same ancestor.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import tree
from rlm_jax.search.tree import NONE, ROOT


@chex.dataclass(frozen=True)
class Graph:
    """A batch of reasoning graphs. Shapes: B problems, N node capacity, G parent slots.

    parents: [B, N, G] int32 node indices, NONE where absent (the root and unused nodes have none).
    depth: [B, N] int32 longest path from the root (0 for the root and unused nodes).
    visits: [B, N] int32 (module docstring); 0 for unused nodes.
    value_sum: [B, N] sum of backed-up values; V = value_sum / visits.
    raw_value: [B, N] the evaluator's value when the node was created.
    terminal: [B, N] bool.
    num_nodes: [B] int32 nodes in use.
    """

    parents: chex.Array
    depth: chex.Array
    visits: chex.Array
    value_sum: chex.Array
    raw_value: chex.Array
    terminal: chex.Array
    num_nodes: chex.Array

    @property
    def capacity(self) -> int:
        return self.parents.shape[1]

    @property
    def max_parents(self) -> int:
        return self.parents.shape[2]


def init_graph(root_value: chex.Array, capacity: int, max_parents: int) -> Graph:
    """A graph per problem holding only its root (visits 1, V = root_value [B])."""
    batch = root_value.shape[0]
    bn = (batch, capacity)
    at_root = lambda fill, dt, value: jnp.full(bn, fill, dt).at[:, ROOT].set(value)
    return Graph(parents=jnp.full(bn + (max_parents,), NONE, jnp.int32), depth=jnp.zeros(bn, jnp.int32),
                 visits=at_root(0, jnp.int32, 1), value_sum=at_root(0, root_value.dtype, root_value),
                 raw_value=at_root(0, root_value.dtype, root_value), terminal=jnp.zeros(bn, bool),
                 num_nodes=jnp.ones((batch,), jnp.int32))


node_value = tree.node_value  # V(n) = value_sum / visits, [B, N]: the same fields as the tree's


def add_nodes(graph: Graph, parents: chex.Array, value: chex.Array, terminal: chex.Array,
              live: chex.Array) -> tuple[Graph, chex.Array]:
    """Creates up to M nodes per problem, in order: parents [B, M, G] (NONE where absent), value [B, M],
    terminal [B, M], live [B, M] bool -> (graph, index [B, M] of each new node, NONE where none was made).

    An entry is made when it is live, names at least one parent that exists (a parent >= num_nodes, even
    one made by this call, is ignored) and fits in the capacity. A new node is visited once and valued
    `value`; its depth is 1 + its deepest parent's."""
    batch, m, g = parents.shape
    chex.assert_shape([value, terminal, live], (batch, m))
    n = graph.capacity
    rows = jnp.arange(batch)[:, None]
    known = (parents >= 0) & (parents < graph.num_nodes[:, None, None])
    parents = jnp.where(known, parents, NONE)
    make = live & jnp.any(known, axis=-1)
    index = graph.num_nodes[:, None] + jnp.cumsum(make, axis=1) - 1
    make = make & (index < n)
    index = jnp.where(make, index, NONE)
    at = jnp.where(make, index, n)  # out of range: dropped by the scatters
    parent_depth = graph.depth[rows[..., None], jnp.maximum(parents, 0)]
    depth = 1 + jnp.max(jnp.where(known, parent_depth, -1), axis=-1)
    put = lambda field, x: field.at[rows, at].set(x.astype(field.dtype), mode="drop")
    graph = graph.replace(parents=put(graph.parents, parents), depth=put(graph.depth, depth),
                          visits=put(graph.visits, jnp.ones_like(index)), value_sum=put(graph.value_sum, value),
                          raw_value=put(graph.raw_value, value), terminal=put(graph.terminal, terminal),
                          num_nodes=graph.num_nodes + jnp.sum(make, axis=1, dtype=jnp.int32))
    return graph, index


def ancestors(graph: Graph, start: chex.Array) -> chex.Array:
    """start [B, W] nodes (NONE: none) -> [B, W, N] bool: each start node and every node above it, once.

    One sweep from the deepest level up: parents are strictly shallower than their children, so when a
    level passes its marks to its parents every path into that level has already arrived."""
    batch, w = start.shape
    n = graph.capacity
    live = (start >= 0) & (start < graph.num_nodes[:, None])
    mark = jax.nn.one_hot(jnp.where(live, start, n), n, dtype=bool)  # NONE: an all-False row
    level0 = jnp.max(jnp.where(live, jnp.take_along_axis(graph.depth, jnp.maximum(start, 0), 1), 0))
    b_idx = jnp.arange(batch)[:, None, None, None]
    w_idx = jnp.arange(w)[None, :, None, None]
    up = jnp.where(graph.parents >= 0, graph.parents, n)[:, None]  # [B, 1, N, G], NONE -> dropped

    def body(state):
        level, mark = state
        here = mark & (graph.depth == level)[:, None, :]  # [B, W, N]
        to = jnp.where(here[..., None], up, n)  # [B, W, N, G]; unmarked nodes send nothing
        return level - 1, mark.at[b_idx, w_idx, to].set(True, mode="drop")

    _, mark = jax.lax.while_loop(lambda s: s[0] > 0, body, (level0, mark))
    return mark


def backup(graph: Graph, start: chex.Array, value: chex.Array) -> Graph:
    """Backs up W simulations per problem: start [B, W] the node each ended at (NONE: skip), value [B, W]
    its value. Every node in a simulation's `ancestors` (start included) gets visits += 1 and
    value_sum += value, once per simulation however many paths lead there."""
    mark = ancestors(graph, start)
    hits = jnp.sum(mark, axis=1, dtype=jnp.int32)
    added = jnp.einsum("bwn,bw->bn", mark.astype(graph.value_sum.dtype), value.astype(graph.value_sum.dtype))
    return graph.replace(visits=graph.visits + hits, value_sum=graph.value_sum + added)
