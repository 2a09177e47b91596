"""Selection: per-node scoring rules, the root rule of PUCT / UCT / x1, and the batched descent.

A rule (`base.ScoreFn`) maps one node's `ChildStats` to scores [K]; the descent takes the argmax over
the slots it may choose (first index on ties, no random tie-break: the search is deterministic given its
inputs). Rules are written for one node of one tree and lifted with `jax.vmap`; they are frozen
dataclasses, so a `SearchConfig` holding them stays hashable and equal presets share a compilation.

Rules:
- `Puct`: MuZero / mctx `muzero_action_selection`:
  `qtransform(Q) + sqrt(N(s)) * (c1 + log((N(s) + c2 + 1) / c2)) * softmax(prior) / (1 + N(c))`.
- `Uct`: `qtransform(Q) + c * sqrt(log N(s) / N(c))`, unvisited children first; ignores priors.
- `X1`: x1 / the blueprint (Algorithm 1), node-based PUCT without prior:
  `norm(V(c)) + sqrt(N(s) - 1) / (1 + N(c)) * (c1 + log((N(s) + c2) / c2))` with V(c) the child's own
  value (x1's q(c), not reward + discount * V) min-max normalised from [q_min, q_max].
- Gumbel MuZero's root and interior rules live in `gumbel.py`.
`MuZeroRoot` (a `base.RootRule`): mctx.muzero_policy's root: Dirichlet noise on the prior, the interior
rule at the root, acting by visit counts at a temperature.

Q transforms (`base.QTransform`, as mctx's): `q_by_parent_and_siblings` (min-max over V(s) and visited
siblings' Q, the MuZero default) and `QByMinMax` (fixed bounds). Unvisited children get 0 (the minimum).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search.base import ChildStats, QTransform, RootInput, ScoreFn
from rlm_jax.search.tree import NONE, ROOT, Tree, child_stats_one


# ---------------------------------------------------------------- Q transforms ([K] -> [K] in [0, 1])
def q_by_parent_and_siblings(stats: ChildStats, *, epsilon: float = 1e-8) -> chex.Array:
    visited = stats.visits > 0
    safe = jnp.where(visited, stats.qvalues, stats.node_value)
    lo = jnp.minimum(stats.node_value, jnp.min(safe))
    hi = jnp.maximum(stats.node_value, jnp.max(safe))
    q = jnp.where(visited, stats.qvalues, lo)
    return (q - lo) / jnp.maximum(hi - lo, epsilon)


@dataclasses.dataclass(frozen=True)
class QByMinMax:
    """Q min-max normalised from fixed bounds [q_min, q_max]."""

    q_min: float = -1.0
    q_max: float = 1.0

    def __call__(self, stats: ChildStats) -> chex.Array:
        q = jnp.where(stats.visits > 0, stats.qvalues, self.q_min)
        return (q - self.q_min) / (self.q_max - self.q_min)


# ---------------------------------------------------------------- rules (one node -> scores [K])
@dataclasses.dataclass(frozen=True)
class Puct:
    pb_c_init: float = 1.25
    pb_c_base: float = 19652.0
    qtransform: QTransform = q_by_parent_and_siblings

    def __call__(self, stats, depth, extra):
        del depth, extra
        n = stats.node_visits
        pb_c = self.pb_c_init + jnp.log((n + self.pb_c_base + 1.0) / self.pb_c_base)
        prior = jax.nn.softmax(stats.prior_logits)
        return self.qtransform(stats) + jnp.sqrt(n) * pb_c * prior / (stats.visits + 1)


@dataclasses.dataclass(frozen=True)
class Uct:
    c: float = 2.0 ** 0.5
    qtransform: QTransform = QByMinMax()

    def __call__(self, stats, depth, extra):
        del depth, extra
        n = jnp.maximum(stats.node_visits, 1).astype(jnp.float32)
        bonus = self.c * jnp.sqrt(jnp.log(n) / jnp.maximum(stats.visits, 1))
        return jnp.where(stats.visits > 0, self.qtransform(stats) + bonus, jnp.inf)


@dataclasses.dataclass(frozen=True)
class X1:
    c1: float = 1.25
    c2: float = 19652.0
    q_min: float = -1.0
    q_max: float = 1.0

    def __call__(self, stats, depth, extra):
        del depth, extra
        n = stats.node_visits.astype(jnp.float32)
        norm_v = (stats.values - self.q_min) / (self.q_max - self.q_min)
        explore = jnp.sqrt(jnp.maximum(n - 1.0, 0.0)) / (1.0 + stats.visits) * (
            self.c1 + jnp.log((n + self.c2) / self.c2))
        return norm_v + explore


# ---------------------------------------------------------------- the root of PUCT / UCT / x1
@dataclasses.dataclass(frozen=True)
class MuZeroRoot:
    """mctx.muzero_policy's root (a `base.RootRule`): the prior becomes
    log(max((1 - f) softmax(l) + f Dirichlet(alpha), tiny)) (invalid -inf slots stay -inf), the root is
    scored by the interior rule, and the action is sampled ~ visits^(1/T) (T = 0: most visited). The
    policy target is the visit distribution."""

    dirichlet_fraction: float = 0.0
    dirichlet_alpha: float = 0.3
    temperature: float = 0.0

    def prepare(self, key, root: RootInput):
        key, noise_key, search_key = jax.random.split(key, 3)  # as mctx.muzero_policy
        logits = root.prior_logits
        probs = jax.nn.softmax(logits)
        if self.dirichlet_fraction > 0:
            noise = jax.random.dirichlet(noise_key, jnp.full(logits.shape[-1:], self.dirichlet_alpha),
                                         shape=logits.shape[:1])
            probs = (1 - self.dirichlet_fraction) * probs + self.dirichlet_fraction * noise
        noisy = jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))
        root = root.replace(prior_logits=jnp.where(logits > -jnp.inf, noisy, -jnp.inf))
        return key, search_key, root, jnp.zeros(logits.shape[:1])

    def scores(self, interior: ScoreFn, num_simulations: int) -> ScoreFn:
        del num_simulations
        return interior

    def act(self, key, stats: ChildStats, extra):
        del extra
        counts = stats.visits.astype(jnp.float32)
        total = jnp.sum(counts, axis=1, keepdims=True)
        weights = jnp.where(total > 0, counts / jnp.maximum(total, 1), 1.0 / counts.shape[1])
        if self.temperature > 0:
            logits = jnp.log(jnp.maximum(weights, jnp.finfo(weights.dtype).tiny))
            logits = (logits - jnp.max(logits, axis=1, keepdims=True)) / self.temperature
            action = jax.random.categorical(key, logits).astype(jnp.int32)
        else:
            action = jnp.argmax(stats.visits, axis=1).astype(jnp.int32)
        return action, weights


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
