"""Backup: push the W leaves of one iteration up to the root with batched scatters.

The loop walks *levels* (depth d = deepest leaf, ..., 0), not trees: at level d every path whose current
node sits at depth d updates it (a [B, W] scatter) and steps to its parent. The carry is the [B, N]
statistics plus [B, W] cursors, and the loop is not vmapped, so XLA updates the arrays in place and an
iteration costs O(B * W * K), independent of the tree size N. (mctx vmaps a while loop over the whole
[B, N, A] tree, so every step selects the whole tree and search becomes O(N^2); see DESIGN.md.)
Walking by depth rather than by path position means a node shared by several paths is updated after
all its children on those paths, which the "mean" rule needs.

Rules (a `base.BackupFn` each; the presets in mcts.py carry one):
- `sum_backup` (MuZero / mctx): every node on the path gets `visits += 1` and `value_sum += G`, the
  discounted return from that node: `G(leaf) = g0`, `G(parent) = reward(child) + discount(child) * G(child)`.
  V = value_sum / visits is then the running mean of mctx's `backward`.
- `MeanBackup(td_rate, update_root)` (x1 / the blueprint): `visits += 1`, then
  `V(s) <- (1 - td_rate) * V(s) + td_rate * sum_c N(c) Q(s, c) / sum_c N(c)` over s's children, with
  `Q(s, c) = reward(c) + discount(c) * V(c)` (x1: reward 0, discount gamma, i.e. gamma times the
  visit-weighted mean of the children's values); g0 is not read. Nodes without children keep their
  value. The paper applies this to s != root (x1's code also updates the root): `update_root=False`
  follows the paper, the root's V then stays its evaluator value (selection never reads it). A node on
  several paths of the same iteration is updated once (matters only for td_rate < 1).
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search.tree import NONE, ROOT, Tree


def _walk_up(tree: Tree, start: chex.Array, leaf_value: chex.Array, update) -> Tree:
    """The level-by-level walk shared by the rules. start: [B, W] deepest node of each path (the expanded
    node or the revisited one), NONE to skip; leaf_value: [B, W] g0, the return at `start`.
    update(visits, value_sum, idx, active, g) -> (visits, value_sum) at the nodes idx [B, W] (N: none)."""
    batch, n = tree.parent.shape
    rows = jnp.arange(batch)[:, None]
    live = start != NONE
    cur0 = jnp.where(live, start, 0)
    level0 = jnp.max(jnp.where(live, tree.depth[rows, cur0], -1))

    def body(state):
        level, cur, g, visits, value_sum = state
        active = (cur != NONE) & (tree.depth[rows, jnp.maximum(cur, 0)] == level)
        idx = jnp.where(active, cur, n)  # out of range: dropped by the scatters
        visits, value_sum = update(visits, value_sum, idx, active, g)
        safe = jnp.maximum(cur, 0)
        g = jnp.where(active, tree.reward[rows, safe] + tree.discount[rows, safe] * g, g)
        cur = jnp.where(active, tree.parent[rows, safe], cur)
        return level - 1, cur, g, visits, value_sum

    state = (level0, jnp.where(live, start, NONE), leaf_value, tree.visits, tree.value_sum)
    _, _, _, visits, value_sum = jax.lax.while_loop(lambda s: s[0] >= 0, body, state)
    return tree.replace(visits=visits, value_sum=value_sum)


def sum_backup(tree: Tree, start: chex.Array, leaf_value: chex.Array) -> Tree:
    """MuZero's backup of W paths per problem (module docstring); start, leaf_value: [B, W]."""
    rows = jnp.arange(tree.batch_size)[:, None]

    def update(visits, value_sum, idx, active, g):
        del active
        return visits.at[rows, idx].add(1, mode="drop"), value_sum.at[rows, idx].add(g, mode="drop")

    return _walk_up(tree, start, leaf_value, update)


@dataclasses.dataclass(frozen=True)
class MeanBackup:
    """x1's backup of W paths per problem (module docstring); leaf_value is not read."""

    td_rate: float = 1.0
    update_root: bool = True

    def __call__(self, tree: Tree, start: chex.Array, leaf_value: chex.Array) -> Tree:
        n = tree.capacity
        rows = jnp.arange(tree.batch_size)[:, None]

        def update(visits, value_sum, idx, active, g):
            del g
            safe = jnp.minimum(idx, n - 1)
            old_v = value_sum[rows, safe] / jnp.maximum(visits[rows, safe], 1)
            visits = visits.at[rows, idx].add(1, mode="drop")  # duplicates (shared nodes) add up
            new_v = _mean_value(tree, visits, value_sum, rows, safe, old_v, active, self.td_rate,
                                self.update_root)
            return visits, value_sum.at[rows, idx].set(new_v * visits[rows, safe], mode="drop")

        return _walk_up(tree, start, leaf_value, update)


def _mean_value(tree, visits, value_sum, rows, node, old_v, active, td_rate, update_root):
    """V <- (1 - a) V + a * visit-weighted mean of the children's Q, for node [B, W] (old_v elsewhere).

    The children were updated at the level below, so they already hold this iteration's statistics.
    """
    kids = tree.children[rows, node]  # [B, W, K]
    filled = kids != NONE
    k = jnp.where(filled, kids, 0)
    r3 = rows[:, :, None]
    kid_n = jnp.where(filled, visits[r3, k], 0)
    kid_v = value_sum[r3, k] / jnp.maximum(visits[r3, k], 1)
    kid_q = tree.reward[r3, k] + tree.discount[r3, k] * kid_v
    total = jnp.sum(kid_n, axis=-1)
    mean_q = jnp.sum(jnp.where(filled, kid_n * kid_q, 0.0), axis=-1) / jnp.maximum(total, 1)
    update = active & (total > 0)
    if not update_root:
        update = update & (node != ROOT)
    return jnp.where(update, (1.0 - td_rate) * old_v + td_rate * mean_q, old_v)
