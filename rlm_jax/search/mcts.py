"""Batched MCTS in one jitted program: PUCT (MuZero), UCT, x1's rule and Gumbel MuZero.

    out = mcts(params, key, root, expand_fn, num_simulations, config)

One iteration (a `lax.fori_loop` step, everything batched over B problems):
1. Select W leaves per problem, one after another (`selection.descend`, a vmapped while loop that
   carries 3 ints). Each selected leaf reserves its new node indices at once (structure only), and
   while W > 1 a virtual loss is put on its path, so the next descent of the same iteration goes
   elsewhere; a descent that runs into a node reserved this iteration is dropped (a collision).
2. Expand: ONE call `expand_fn(params, key, tree, parent_index [B, M], action [B, M])` evaluates all
   new nodes, M = W * E (E = K when `expand_all`, else 1). Entries are ordered [B, W, E]: with
   `expand_all`, entries `w*K .. w*K + K-1` are the K slots 0..K-1 of the same parent (so an LM can
   reshape to [B, W, K] and sample the K steps jointly, e.g. diverse beams). Void entries (dropped or
   revisiting simulations) are passed as (root, slot 0) and their outputs ignored. The tree handed to
   expand_fn already links the reserved nodes (`parent`, `depth` of the new nodes are set), but their
   statistics and embeddings are not written yet.
3. Back up the W paths level by level (`backup.py`): one batched scatter per tree level, the loop
   carrying only [B, W] cursors besides the [B, N] statistics; cost O(depth), not O(N).

Node `i` is created in order, so capacity N bounds the work: when a problem's tree is full its
remaining simulations are void. Terminal nodes are never expanded: a descent that ends on one (or on
a dead end, or a node at `max_depth`) backs its value up again ("REVISIT").

`expand_fn` returns `base.ExpandOutput` with leaves [B, M, ...]: embedding, reward, discount,
prior_logits [B, M, K] (the new nodes' own K slots), value, terminal.

A `SearchConfig` carries the rules it runs: `rule` (a `base.ScoreFn` for every node below the
root), `root` (a `base.RootRule`: root noise, the root's ScoreFn, the final action) and `backup` (a
`base.BackupFn`). Presets (functions returning a `SearchConfig`, by name in `PRESETS` /
`preset(name, **overrides)`): `puct()` (PUCT with step priors, AlphaZero/MuZero style), `muzero()`
(= mctx.muzero_policy: puct plus root noise and sampled acting), `uct()`, `x1()` (x1 / the blueprint:
no prior, min-max Q, mean backup), `gumbel_muzero()` (= mctx.gumbel_muzero_policy: Gumbel sampling and
sequential halving at the root). Each takes its rule's knobs and any `SearchConfig` field as keywords,
e.g. `num_parallel=W`. With W = 1 and default capacity and depth, `muzero()` and `gumbel_muzero()`
visit exactly the nodes mctx visits (tests/test_mcts_vs_mctx.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import gumbel as gumbel_lib
from rlm_jax.search import selection
from rlm_jax.search.backup import MeanBackup, sum_backup
from rlm_jax.search.base import (BackupFn, ExpandFn, ExpandOutput, RootInput, RootRule, ScoreFn,
                                 SearchOutput)
from rlm_jax.search.tree import NONE, ROOT, Tree, child_stats, init_tree, node_value, path_to_root


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static search settings (hashable: part of the jit cache key). Prefer the presets below.

    rule: the selection rule below the root (selection.py, gumbel.py); root: the root's rule, noise and
        acting (`selection.MuZeroRoot`, `gumbel.GumbelRoot`); backup: `backup.sum_backup` (MuZero
        running mean of returns) or `backup.MeanBackup` (x1: V = visit-weighted mean of children's Q).
    discount: if set, overrides the discount expand_fn returns on every new edge (x1's gamma).
    expand_all: a leaf gets all K children at once (x1 expands its M = K new children together),
        and selection only chooses among existing children. Otherwise one slot per expansion (mctx).
    num_parallel: W leaves per iteration, with virtual loss (`virtual_loss` visits of value
        `virtual_loss_value` on the path) so the W descents spread out.
    capacity: node capacity N (default 1 + num_simulations * W * E: never full).
    max_depth: nodes at this depth are not expanded (default N - 1: never binds).
    stop_on_terminal: when a problem stops (its remaining simulations are void):
        False: never (a descent that ends on a terminal node backs its value up again, "REVISIT");
        True or "created": once a terminal node is created (x1's optional `stop_if_terminal_found`;
            the paper's "stop when a terminal node is reached");
        "selected": once a descent selects a terminal leaf, which is then not backed up (x1's code
            always does this: its loop `break`s there).
        The loop over iterations exits early once every problem of the batch has stopped.
    """

    rule: ScoreFn = selection.Puct()
    root: RootRule = selection.MuZeroRoot()
    backup: BackupFn = sum_backup
    discount: float | None = None
    expand_all: bool = False
    num_parallel: int = 1
    virtual_loss: int = 1
    virtual_loss_value: float = -1.0
    capacity: int | None = None
    max_depth: int | None = None
    stop_on_terminal: bool | str = False

    def __post_init__(self):
        for name in ("rule", "root", "backup"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"SearchConfig.{name} is a function, not a name; build configs with the presets "
                                f"({', '.join(PRESETS)}), e.g. preset({getattr(self, name)!r})")
        if self.stop_on_terminal not in (False, True, "created", "selected"):
            raise ValueError(f"SearchConfig.stop_on_terminal must be False, True, 'created' or 'selected', "
                             f"got {self.stop_on_terminal!r}")
        if self.num_parallel < 1:
            raise ValueError(f"SearchConfig.num_parallel (W) must be >= 1, got {self.num_parallel}")


def puct(*, pb_c_init: float = 1.25, pb_c_base: float = 19652.0,
         qtransform=selection.q_by_parent_and_siblings, **settings) -> SearchConfig:
    """PUCT with the step priors (AlphaZero / MuZero), no root noise, most-visited action."""
    return SearchConfig(**{"rule": selection.Puct(pb_c_init, pb_c_base, qtransform), **settings})


def muzero(*, dirichlet_fraction: float = 0.25, dirichlet_alpha: float = 0.3, temperature: float = 1.0,
           **overrides) -> SearchConfig:
    """mctx.muzero_policy's defaults: PUCT, min-max Q over parent and siblings, root Dirichlet noise,
    acting ~ visits^(1/T). `overrides`: `puct`'s knobs and SearchConfig fields."""
    root = selection.MuZeroRoot(dirichlet_fraction, dirichlet_alpha, temperature)
    return puct(**{"root": root, **overrides})


def uct(*, c: float = 2.0 ** 0.5, qtransform=selection.QByMinMax(), **settings) -> SearchConfig:
    return SearchConfig(**{"rule": selection.Uct(c, qtransform), **settings})


def x1(*, c1: float = 1.25, c2: float = 19652.0, q_min: float = -1.0, q_max: float = 1.0,
       td_rate: float = 1.0, backup_root: bool = False, **settings) -> SearchConfig:
    """x1 / the blueprint's MCTS: no prior, Q min-max normalised from [-1, 1], c1 = 1.25, c2 = 19652,
    all K children of a leaf expanded and evaluated at once, V(s) = gamma * visit-weighted mean of the
    children's values (gamma 0.96, TD rate 1).

    Expansion width: x1 creates M = 2 children per leaf, once (a node with children is never expanded
    again); here a leaf gets all K of its slots, so K = 2 (LMSpec.num_slots=2, the toy env's
    num_actions=2) is x1's setting. Rollouts (x1's simulations, alpha 0.5) are LMSpec.num_rollouts /
    rollout_alpha. Paper over code: the root's value is not backed up, and `best_path` is the
    highest-valued terminal path (x1's code walks greedy PUCT). Stopping: by default a descent that
    reaches a terminal node backs it up again and the search goes on; x1's code stops the whole
    search there (`stop_on_terminal="selected"`), the paper when a terminal node is reached
    (`stop_on_terminal="created"`, x1's optional `stop_if_terminal_found`)."""
    return SearchConfig(**{"rule": selection.X1(c1, c2, q_min, q_max),
                           "backup": MeanBackup(td_rate, update_root=backup_root),
                           "discount": 0.96, "expand_all": True, **settings})


def gumbel_muzero(*, max_num_considered_actions: int = 16, gumbel_scale: float = 1.0, value_scale: float = 0.1,
                  maxvisit_init: float = 50.0, rescale_values: bool = True, use_mixed_value: bool = True,
                  **settings) -> SearchConfig:
    """mctx.gumbel_muzero_policy's defaults."""
    q = gumbel_lib.CompletedQ(value_scale, maxvisit_init, rescale_values, use_mixed_value)
    return SearchConfig(**{"rule": gumbel_lib.GumbelInterior(q),
                           "root": gumbel_lib.GumbelRoot(max_num_considered_actions, gumbel_scale, q), **settings})


PRESETS = {"puct": puct, "muzero": muzero, "x1": x1, "uct": uct, "gumbel": gumbel_muzero}


def preset(name: str, **overrides) -> SearchConfig:
    """A preset by name with overrides, e.g. `preset("x1", num_parallel=4)` (W leaves per iteration)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MCTS preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


@functools.partial(jax.jit, static_argnames=("expand_fn", "num_simulations", "config"))
def mcts(params: Any, key: chex.PRNGKey, root: RootInput, expand_fn: ExpandFn, num_simulations: int,
         config: SearchConfig = SearchConfig()) -> SearchOutput:
    """Runs `num_simulations` iterations of W = config.num_parallel simulations on B problems.

    params: anything (a pytree of arrays), passed to expand_fn. key: consumed. root: RootInput [B, ...].
    expand_fn(params, key, tree, parent_index [B, M], action [B, M]) -> ExpandOutput (see module doc).
    expand_fn, num_simulations and config are static: pass a hashable callable that compares by value
    (e.g. a frozen dataclass with __call__, like lm.LMExpand) so equal ones share a compilation;
    bound methods compare by identity.
    """
    batch, k = root.prior_logits.shape
    w = config.num_parallel
    e = k if config.expand_all else 1
    capacity = config.capacity or 1 + num_simulations * w * e
    max_depth = capacity - 1 if config.max_depth is None else config.max_depth
    interior_fn = config.rule
    root_fn = config.root.scores(interior_fn, num_simulations * w)
    # The root rule splits the key as mctx's policies do, so the same key gives the same noise.
    act_key, key_search, root, extra = config.root.prepare(key, root)
    tree = init_tree(root, capacity)

    rows = jnp.arange(batch)[:, None]
    slots_all = jnp.arange(e, dtype=jnp.int32)

    def select_one(j, state):
        """Descent j of this iteration: select, reserve the new nodes, add virtual loss."""
        sel, fresh_from, stopped, nodes, slots, news, status = state
        leaf = selection.descend(sel, extra, fresh_from, stopped, root_fn=root_fn,
                                 interior_fn=interior_fn, max_depth=max_depth,
                                 expand_all=config.expand_all)
        fits = sel.num_nodes + e <= capacity
        st = jnp.where((leaf.status == selection.EXPAND) & ~fits, selection.DROP, leaf.status)
        if config.stop_on_terminal == "selected":  # x1: selecting a terminal leaf ends the search
            hit = (st == selection.REVISIT) & sel.terminal[rows[:, 0], leaf.node]
            st, stopped = jnp.where(hit, selection.DROP, st), stopped | hit
        grow = st == selection.EXPAND
        new = jnp.where(grow[:, None], sel.num_nodes[:, None] + slots_all, capacity)  # [B, E]
        slot = slots_all[None, :] if config.expand_all else leaf.slot[:, None]  # [B, E]
        parent = leaf.node[:, None]
        node_at = jnp.where(grow[:, None], parent, capacity)
        sel = sel.replace(
            children=sel.children.at[rows, node_at, slot].set(new, mode="drop"),
            parent=sel.parent.at[rows, new].set(parent, mode="drop"),
            action_from_parent=sel.action_from_parent.at[rows, new].set(slot, mode="drop"),
            depth=sel.depth.at[rows, new].set(sel.depth[rows, parent] + 1, mode="drop"),
            # A reserved node reads as Q = virtual_loss_value until it is evaluated.
            discount=sel.discount.at[rows, new].set(1.0, mode="drop"),
            num_nodes=sel.num_nodes + e * grow,
        )
        if w > 1:
            sel = _add_virtual_loss(sel, leaf.node, new, st != selection.DROP, config)
        nodes, status = nodes.at[:, j].set(leaf.node), status.at[:, j].set(st)
        slots, news = slots.at[:, j].set(slot), news.at[:, j].set(new)
        return sel, fresh_from, stopped, nodes, slots, news, status

    def iteration(state):
        i, key, tree, stopped, cost = state
        key, _, expand_key = jax.random.split(key, 3)  # as mctx's search loop
        fresh_from = tree.num_nodes
        zeros_we = jnp.zeros((batch, w, e), jnp.int32)
        init = (tree, fresh_from, stopped, jnp.zeros((batch, w), jnp.int32), zeros_we, zeros_we,
                jnp.zeros((batch, w), jnp.int32))
        if w == 1:  # no loop: a loop would carry (and may copy) the whole tree
            sel, _, stopped, nodes, slots, new, status = select_one(0, init)
        else:
            sel, _, stopped, nodes, slots, new, status = jax.lax.fori_loop(0, w, select_one, init)
        # Keep the reserved structure, drop the virtual statistics.
        tree = sel.replace(visits=tree.visits, value_sum=tree.value_sum)

        grow = status == selection.EXPAND  # [B, W]
        parent_in = jnp.broadcast_to(jnp.where(grow, nodes, ROOT)[..., None], (batch, w, e))
        slot_in = jnp.where(grow[..., None], slots, 0)
        out = expand_fn(params, expand_key, tree, parent_in.reshape(batch, w * e),
                        slot_in.reshape(batch, w * e))
        m = w * e
        chex.assert_shape([out.reward, out.discount, out.value, out.terminal], (batch, m))
        chex.assert_shape(out.prior_logits, (batch, m, k))
        grow_m = jnp.repeat(grow, e, axis=1)
        tree = write_nodes(tree, new.reshape(batch, m), out, config.discount)

        # Back up: g0 = mean over the new children of r + d * v (expansion) or V(node) (revisit).
        r = jnp.asarray(out.reward).reshape(batch, w, e)
        d = (jnp.full_like(r, config.discount) if config.discount is not None
             else jnp.asarray(out.discount).reshape(batch, w, e))
        g_new = jnp.mean(r + d * out.value.reshape(batch, w, e), axis=-1)
        g0 = jnp.where(grow, g_new, tree.raw_value[rows, nodes])
        start = jnp.where(status == selection.DROP, NONE, nodes)
        tree = config.backup(tree, start, g0)
        if config.stop_on_terminal in (True, "created"):
            stopped = stopped | jnp.any(grow_m & out.terminal.astype(bool), axis=1)
        if out.cost is not None:
            cost = cost + out.cost
        return i + 1, key, tree, stopped, cost

    def going(state):  # early exit once every problem has stopped
        i, _, _, stopped, _ = state
        return (i < num_simulations) & ~jnp.all(stopped)

    stopped = jnp.zeros((batch,), bool)
    cost = jnp.zeros((batch,), jnp.float32) if root.cost is None else jnp.asarray(root.cost, jnp.float32)
    _, _, tree, _, cost = jax.lax.while_loop(going, iteration, (0, key_search, tree, stopped, cost))
    return _outputs(act_key, tree, extra, config.root, max_depth).replace(cost=cost)


def _add_virtual_loss(tree, leaf, new, live, config):
    """Virtual visits (worth `virtual_loss_value` each) on the path root..leaf [B] and the reserved
    nodes new [B, E], so the next descent of the iteration prefers other paths. Walks up level by level:
    O(depth), whatever the capacity."""
    n = tree.capacity
    rows = jnp.arange(tree.batch_size)[:, None]
    vl, loss = config.virtual_loss, config.virtual_loss_value * config.virtual_loss

    def add(state, nodes):
        visits, value_sum = state
        return visits.at[rows, nodes].add(vl, mode="drop"), value_sum.at[rows, nodes].add(loss, mode="drop")

    def body(state):
        cur, stats = state
        stats = add(stats, jnp.where(cur != NONE, cur, n)[:, None])
        return jnp.where(cur != NONE, tree.parent[rows[:, 0], jnp.maximum(cur, 0)], NONE), stats

    stats = add((tree.visits, tree.value_sum), new)
    cur = jnp.where(live, leaf, NONE)
    _, (visits, value_sum) = jax.lax.while_loop(lambda s: jnp.any(s[0] != NONE), body, (cur, stats))
    return tree.replace(visits=visits, value_sum=value_sum)


def write_nodes(tree: Tree, new: chex.Array, out: ExpandOutput, discount: float | None) -> Tree:
    """Writes the evaluations of the new nodes new [B, M] (index N = void, dropped)."""
    rows = jnp.arange(tree.batch_size)[:, None]

    def put(x, v):
        return x.at[rows, new].set(jnp.asarray(v).astype(x.dtype), mode="drop")

    disc = out.discount if discount is None else jnp.full(new.shape, discount)
    return tree.replace(
        child_prior_logits=put(tree.child_prior_logits, out.prior_logits),
        visits=put(tree.visits, jnp.ones(new.shape, jnp.int32)),
        value_sum=put(tree.value_sum, out.value),
        raw_value=put(tree.raw_value, out.value),
        reward=put(tree.reward, out.reward),
        discount=put(tree.discount, disc),
        terminal=put(tree.terminal, out.terminal),
        embedding=jax.tree.map(put, tree.embedding, out.embedding),
    )


def best_node(tree: Tree) -> tuple[chex.Array, chex.Array]:
    """(node [B], found_terminal [B]): the highest-valued terminal node (the paper's best path), else
    the end of the most-visited path from the root."""
    batch, n = tree.parent.shape
    in_use = jnp.arange(n)[None, :] < tree.num_nodes[:, None]
    value = node_value(tree)
    q = jnp.where(jnp.arange(n)[None, :] == ROOT, value, tree.reward + tree.discount * value)
    terminal = tree.terminal & in_use
    found = jnp.any(terminal, axis=1)
    best_terminal = jnp.argmax(jnp.where(terminal, q, -jnp.inf), axis=1).astype(jnp.int32)

    rows = jnp.arange(batch)

    def step(cur):  # to the most visited child, if any
        kids = tree.children[rows, cur]  # [B, K]
        kid_visits = jnp.where(kids != NONE, tree.visits[rows[:, None], jnp.maximum(kids, 0)], 0)
        nxt = kids[rows, jnp.argmax(kid_visits, axis=1)]
        return jnp.where(jnp.max(kid_visits, axis=1) > 0, nxt, cur)

    def cond(state):
        cur, prev = state
        return jnp.any(cur != prev)

    start = jnp.full((batch,), ROOT, jnp.int32)
    most_visited, _ = jax.lax.while_loop(cond, lambda s: (step(s[0]), s[0]), (step(start), start))
    return jnp.where(found, best_terminal, most_visited), found


def _outputs(key, tree: Tree, extra, root_rule: RootRule, max_depth: int) -> SearchOutput:
    stats = child_stats(tree, jnp.full((tree.batch_size,), ROOT, jnp.int32))
    action, weights = root_rule.act(key, stats, extra)
    node, found = best_node(tree)
    return SearchOutput(
        tree=tree,
        action=action,
        action_weights=weights,
        root_visits=stats.visits,
        root_qvalues=stats.qvalues,
        root_value=stats.node_value,
        best_path=path_to_root(tree, node, max_depth + 1),
        best_node=node,
        found_terminal=found,
        visits=tree.visits,
        values=node_value(tree),
        cost=jnp.zeros((tree.batch_size,), jnp.float32),
    )
