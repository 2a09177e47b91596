"""Tree-of-Thoughts DFS against a recursive Python DFS over the same tree's values, with a tiny random policy.

The jitted search picks "the deepest frontier node, best value first" instead of keeping a stack; the
reference is ToT's recursion (expand a node, stop at a finished child valued >= threshold, else visit the
unpruned children in value order), replayed on the values the search recorded. The expansion orders must
agree node for node, whatever the thresholds prune.
"""
import jax
import numpy as np
import pytest

from rlm_jax import decoding
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import dfs, lm
from rlm_jax.search.base import LMSpec
from rlm_jax.search.tree import NONE, ROOT

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=64, init_std=1.0)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
D, L, P, K = 4, 5, 8, 3


@pytest.fixture(scope="module")
def models():
    policy = jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(5))
    value = heads.init_value_params(CFG, HEAD, jax.random.key(6), trunk=policy)
    return policy, value


def _inputs(policy, value, seed, batch):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, CFG.vocab_size, size=rng.integers(1, P))) for _ in range(batch)]
    t, m = decoding.pad_prompts(prompts, PAD, length=P)
    return lm.search_inputs(policy, value, t, m)


def _reference_order(tree, b, threshold, expansions):
    """ToT-DFS as a recursion over problem b's recorded tree -> the nodes in the order it expands them."""
    children, value = tree.children[b], tree.raw_value[b]
    finished = {int(c): bool(tree.embedding["props_terminal"][b, tree.parent[b, c], tree.action_from_parent[b, c]])
                for c in range(1, int(tree.num_nodes[b]))}
    order = []

    def visit(node):
        if len(order) == expansions:
            return "spent"
        order.append(node)
        kids = [int(c) for c in children[node] if c != NONE]
        if any(finished[c] and value[c] >= threshold for c in kids):
            return "found"
        open_ = [c for c in kids if not finished[c] and value[c] >= threshold and tree.depth[b, c] < D]
        for c in sorted(open_, key=lambda c: (-value[c], c)):
            if visit(c) is not None:  # the budget is spent or a solution found: the whole search ends
                return "stop"
        return None

    visit(ROOT)
    return order


@pytest.mark.parametrize("threshold,nodes", [pytest.param(-1.0, 30, marks=pytest.mark.slow), (-0.3, 40),
                                             pytest.param(-0.1, 40, marks=pytest.mark.slow)])
def test_dfs_expands_in_tot_order_and_counts_what_it_created(models, threshold, nodes):
    policy, value = models
    spec = LMSpec(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=K, step_len=L, max_depth=D,
                  value=CFG, head=HEAD, temperature=1.5)
    out = jax.device_get(dfs.tot_dfs_jit(spec, _inputs(policy, value, 3, 8), jax.random.key(7), nodes=nodes,
                                         threshold=threshold))
    tree, answer = out.tree, out.answer
    backtracked = 0
    for b in range(8):
        got = [int(x) for x in np.argsort(np.where(out.expanded_at[b] >= 0, out.expanded_at[b], 1 << 30))
               [:int((out.expanded_at[b] >= 0).sum())]]
        want = _reference_order(tree, b, threshold, nodes // K)
        assert got == want, (b, got, want)
        assert int(tree.num_nodes[b]) <= 1 + nodes  # the budget bounds the nodes created
        # a backtrack: an expanded node that is not a child of the node expanded just before it
        backtracked += sum(tree.parent[b, y] != x for x, y in zip(got, got[1:]))
        in_use = np.arange(tree.parent.shape[1]) < tree.num_nodes[b]
        assert answer.generated_tokens[b] == (tree.embedding["props_mask"][b].sum(axis=(-1, -2)) * in_use).sum()
    assert backtracked > 0 or threshold == -1.0  # the pruning thresholds make the search go back up
    assert answer.cost is not None and np.all(answer.cost > 0)


def test_a_threshold_above_every_value_expands_only_the_root(models):
    policy, value = models
    spec = LMSpec(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=K, step_len=L, max_depth=D,
                  value=CFG, head=HEAD)
    out = jax.device_get(dfs.tot_dfs_jit(spec, _inputs(policy, value, 4, 4), jax.random.key(8), nodes=30,
                                         threshold=1.5))
    assert np.all((out.expanded_at >= 0).sum(axis=1) == 1) and np.all(out.expanded_at[:, ROOT] == 0)
    assert not out.answer.finished.any()
