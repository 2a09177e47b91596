"""Tree-of-Thoughts DFS (Yao et al. 2023): value-pruned depth-first search with backtracking, one jitted program.

    out = tot_dfs_jit(spec, inputs, key, nodes=8, threshold=-0.5)     # out.answer: StrategyOutput

The environment is MCTS's: `lm.LMExpand` over the same array tree and paged KV pool, so no prefix is ever
recomputed. Expanding the current node creates one child per usable proposal of it (not truncated, not a
repeat), all at once; each child is valued when created (the value model; the verifier for a finished
child in training mode) and samples its own K proposals, ready for when it is expanded.

Prune: a child is kept on the frontier only if its value is at least `threshold` (and it is unfinished,
below max_depth). The default, -0.5, prunes what the value model puts below a 1-in-4 chance (V = 2P - 1):
ToT's "impossible". At 0 a weak value model prunes most right steps too (README). Select: the next node to expand is the deepest frontier node, the highest-valued first.
In a depth-first search the frontier nodes of one depth are always siblings (children of the current
path's node one level up), so this rule *is* ToT's DFS with children visited in value order, and
Backtrack needs no stack: when a subtree is exhausted (all pruned or spent) the deepest frontier left is
the next-best sibling of an ancestor. The search of a problem ends at the first finished child valued at
least `threshold` (ToT's "solution found"), when its frontier is empty, or when the node budget is spent.
Answer: the best-valued finished node, else the root path of the last node expanded.

Budget: `nodes` bounds the nodes created (as MCTS's simulations create one node each): floor(nodes / K)
expansions (at least one) of up to K children, so tot_dfs:S creates no more nodes than mcts:S.
"""
from __future__ import annotations


import chex
import jax
import jax.numpy as jnp

from rlm_jax.search import lm, paged
from rlm_jax.search.base import LMSpec, StrategyOutput
from rlm_jax.search.mcts import write_nodes
from rlm_jax.search.tree import NONE, ROOT, Tree, init_tree


@chex.dataclass(frozen=True)
class DFSOutput:
    """answer: the StrategyOutput [B, ...]; tree: the searched tree (tokens and statistics; raw_value is each
    node's value at creation); expanded_at: [B, N] int32 the expansion (0, 1, ...) that expanded the node,
    NONE for nodes never expanded."""

    answer: StrategyOutput
    tree: Tree
    expanded_at: chex.Array


def _reserve(tree: Tree, current: chex.Array, valid: chex.Array) -> tuple[Tree, chex.Array]:
    """Links a new child under `current` [B] for each valid slot [B, K] (structure only, as MCTS reserves
    before it expands); -> (tree, new node indices [B, K], capacity where not created)."""
    b, k = valid.shape
    rows = jnp.arange(b)[:, None]
    new = jnp.where(valid, tree.num_nodes[:, None] + jnp.cumsum(valid, axis=1) - 1, tree.capacity)
    at = jnp.where(valid, current[:, None], tree.capacity)
    slots = jnp.broadcast_to(jnp.arange(k), (b, k))
    tree = tree.replace(children=tree.children.at[rows, at, slots].set(new, mode="drop"),
                        parent=tree.parent.at[rows, new].set(current[:, None], mode="drop"),
                        action_from_parent=tree.action_from_parent.at[rows, new].set(slots, mode="drop"),
                        depth=tree.depth.at[rows, new].set(tree.depth[rows, current[:, None]] + 1, mode="drop"),
                        num_nodes=tree.num_nodes + jnp.sum(valid, axis=1, dtype=jnp.int32))
    return tree, new


def tot_dfs(spec: LMSpec, inputs, key, nodes: int, threshold: float = -0.5) -> DFSOutput:
    """ToT-DFS over steps for a batch of prompts (see the module doc); inputs: `lm.search_inputs`."""
    k = spec.num_slots
    expansions = max(1, nodes // k)
    root_key, key = jax.random.split(key)
    root, inputs = lm.make_root(spec, inputs, root_key)
    tree = init_tree(root, 1 + expansions * k)
    b, n = tree.parent.shape
    rows = jnp.arange(b)[:, None]
    expand = lm.LMExpand(spec)
    no_node = jnp.full((b,), NONE, jnp.int32)
    state = dict(i=jnp.zeros((), jnp.int32), key=key, tree=tree, current=jnp.full((b,), ROOT, jnp.int32),
                 frontier=jnp.zeros((b, n), bool), done=jnp.zeros((b,), bool),
                 expanded_at=jnp.full((b, n), NONE, jnp.int32),
                 best=no_node, best_value=jnp.full((b,), -jnp.inf), cost=jnp.asarray(root.cost, jnp.float32))

    def body(s):
        key, sub = jax.random.split(s["key"])
        tree, current, done = s["tree"], s["current"], s["done"]
        slots = jnp.arange(k)[None, :]
        valid = jnp.isfinite(tree.child_prior_logits[rows, current[:, None], slots]) & ~done[:, None]
        expanded_at = s["expanded_at"].at[rows[:, 0], jnp.where(done, n, current)].set(s["i"], mode="drop")
        tree, new = _reserve(tree, current, valid)
        # void entries ask for an empty slot of the current node: nothing is decoded for them
        out = expand(inputs, sub, tree, jnp.broadcast_to(current[:, None], valid.shape), jnp.broadcast_to(slots, valid.shape))
        tree = write_nodes(tree, new, out, 1.0)
        finished = valid & tree.embedding["props_terminal"][rows, current[:, None], slots]
        value = out.value
        child_depth = tree.depth[rows[:, 0], current] + 1
        keep = valid & ~finished & (value >= threshold) & (child_depth < spec.max_depth)[:, None]
        frontier = s["frontier"].at[rows, new].set(keep, mode="drop")
        end_value = jnp.where(finished, value, -jnp.inf)
        j = jnp.argmax(end_value, axis=1)
        better = end_value[rows[:, 0], j] > s["best_value"]
        best = jnp.where(better, new[rows[:, 0], j], s["best"])
        best_value = jnp.where(better, end_value[rows[:, 0], j], s["best_value"])
        # Select the deepest frontier node, best value first (values lie in [-1, 1]: depth dominates).
        rank = jnp.where(frontier, 4.0 * tree.depth + jnp.clip(tree.raw_value, -1.0, 1.0), -jnp.inf)
        nxt = jnp.argmax(rank, axis=1).astype(jnp.int32)
        done = done | jnp.any(finished & (value >= threshold), axis=1) | ~jnp.any(frontier, axis=1)
        current = jnp.where(done, current, nxt)
        i = s["i"] + 1
        frontier = frontier.at[rows[:, 0], jnp.where(done, n, nxt)].set(False, mode="drop")
        return dict(i=i, key=key, tree=tree, current=current, frontier=frontier, done=done, expanded_at=expanded_at,
                    best=best, best_value=best_value, cost=s["cost"] + out.cost)

    s = jax.lax.while_loop(lambda s: (s["i"] < expansions) & ~jnp.all(s["done"]), body, state)
    tree = s["tree"]
    found = s["best"] != NONE
    answer_node = jnp.where(found, s["best"], s["current"])
    steps, mask = lm.path_steps(spec, tree, answer_node[:, None])
    answer = StrategyOutput(steps=steps[:, 0], mask=mask[:, 0], score=tree.raw_value[rows[:, 0], answer_node],
                            finished=found, generated_tokens=lm.generated_tokens(tree), cost=s["cost"])
    emb = {name: x for name, x in tree.embedding.items() if name not in paged.POOL_KEYS}
    return DFSOutput(answer=answer, tree=tree.replace(embedding=emb), expanded_at=s["expanded_at"])


tot_dfs_jit = jax.jit(tot_dfs, static_argnames=("spec", "nodes"))
