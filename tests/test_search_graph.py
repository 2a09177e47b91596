"""Reasoning graphs (rlm_jax/search/graph.py): DAG nodes with several parents and a backup that counts a
simulation once at every ancestor, checked against a plain-Python graph under hypothesis fuzzing.

The jitted functions see fixed shapes (B, N, G, M, W below), so hypothesis varies only traced values and
everything compiles once."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rlm_jax.search import graph as graph_lib
from rlm_jax.search.tree import NONE

B, N, G, M, W = 2, 12, 3, 3, 2
_add = jax.jit(graph_lib.add_nodes)
_backup = jax.jit(graph_lib.backup)


def test_a_diamond_is_backed_up_once_at_its_top():
    """root -> a, root -> b, (a, b) -> c: a simulation ending at c adds its value once to the root, though
    two paths lead there (a per-path walk would add it twice)."""
    g = graph_lib.init_graph(jnp.array([0.25]), capacity=6, max_parents=2)
    g, ab = graph_lib.add_nodes(g, jnp.array([[[0, NONE], [0, NONE]]]), jnp.array([[0.5, -0.5]]),
                                jnp.zeros((1, 2), bool), jnp.ones((1, 2), bool))
    g, c = graph_lib.add_nodes(g, jnp.array([[[1, 2]]]), jnp.array([[1.0]]), jnp.ones((1, 1), bool),
                               jnp.ones((1, 1), bool))
    assert ab.tolist() == [[1, 2]] and c.tolist() == [[3]]
    assert g.depth[0, :4].tolist() == [0, 1, 1, 2] and bool(g.terminal[0, 3])
    g = graph_lib.backup(g, jnp.array([[3]]), jnp.array([[1.0]]))
    assert g.visits[0, :4].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(g.value_sum[0, :4], [1.25, 1.5, 0.5, 2.0])
    np.testing.assert_allclose(graph_lib.node_value(g)[0, :4], [0.625, 0.75, 0.25, 1.0])


class _Reference:
    """The same graph as Python dicts: parents as sets, ancestors by breadth-first search."""

    def __init__(self, root_value):
        self.parents, self.depth = [set()], [0]
        self.visits, self.value_sum, self.raw, self.terminal = [1], [root_value], [root_value], [False]

    def add(self, parents, value, terminal, live):
        made, existing = [], len(self.parents)  # nodes made by this call are not parents yet
        for ps, v, t, on in zip(parents, value, terminal, live):
            known = {p for p in ps if 0 <= p < existing} if on else set()
            if not known or len(self.parents) == N:
                made.append(NONE)
                continue
            made.append(len(self.parents))
            self.parents.append(known)
            self.depth.append(1 + max(self.depth[p] for p in known))
            self.visits.append(1), self.value_sum.append(v), self.raw.append(v), self.terminal.append(t)
        return made

    def ancestors(self, node):
        seen, todo = {node}, [node]
        while todo:
            for p in self.parents[todo.pop()]:
                if p not in seen:
                    seen.add(p), todo.append(p)
        return seen

    def backup(self, starts, values):
        for s, v in zip(starts, values):
            if 0 <= s < len(self.parents):
                for a in self.ancestors(s):
                    self.visits[a] += 1
                    self.value_sum[a] += v


_values = st.floats(-1, 1, width=32)
_parent = st.integers(-1, N - 1)  # may name a node that does not exist (yet): ignored
_add_op = st.tuples(st.lists(st.lists(st.lists(_parent, min_size=G, max_size=G), min_size=M, max_size=M),
                             min_size=B, max_size=B),
                    st.lists(st.lists(_values, min_size=M, max_size=M), min_size=B, max_size=B),
                    st.lists(st.lists(st.booleans(), min_size=M, max_size=M), min_size=B, max_size=B),
                    st.lists(st.lists(st.booleans(), min_size=M, max_size=M), min_size=B, max_size=B))
_backup_op = st.tuples(st.lists(st.lists(st.integers(-1, N - 1), min_size=W, max_size=W), min_size=B, max_size=B),
                       st.lists(st.lists(_values, min_size=W, max_size=W), min_size=B, max_size=B))


@settings(max_examples=40, deadline=None)
@given(roots=st.lists(_values, min_size=B, max_size=B), ops=st.lists(st.one_of(_add_op, _backup_op), max_size=8))
def test_random_graphs_match_a_python_graph_and_keep_their_invariants(roots, ops):
    g = graph_lib.init_graph(jnp.asarray(roots, jnp.float32), capacity=N, max_parents=G)
    refs = [_Reference(r) for r in roots]
    simulations = np.zeros(B, int)
    for op in ops:
        if len(op) == 4:
            parents, value, terminal, live = op
            g, index = _add(g, jnp.asarray(parents, jnp.int32), jnp.asarray(value, jnp.float32),
                            jnp.asarray(terminal), jnp.asarray(live))
            for b, ref in enumerate(refs):
                assert np.asarray(index[b]).tolist() == ref.add(parents[b], value[b], terminal[b], live[b])
        else:
            start, value = op
            g = _backup(g, jnp.asarray(start, jnp.int32), jnp.asarray(value, jnp.float32))
            for b, ref in enumerate(refs):
                simulations[b] += sum(0 <= s < len(ref.parents) for s in start[b])
                ref.backup(start[b], value[b])
    g = jax.tree.map(np.asarray, g)
    for b, ref in enumerate(refs):
        used = len(ref.parents)
        assert g.num_nodes[b] == used
        assert [set(row[row != NONE].tolist()) for row in g.parents[b, :used]] == ref.parents
        assert g.depth[b, :used].tolist() == ref.depth
        assert g.visits[b, :used].tolist() == ref.visits
        np.testing.assert_allclose(g.value_sum[b, :used], ref.value_sum, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.raw_value[b, :used], ref.raw, rtol=1e-6)
        assert g.terminal[b, :used].tolist() == ref.terminal
        # Untouched padding; a topological order; every backup through a node also goes through its parents.
        assert (g.parents[b, used:] == NONE).all() and (g.visits[b, used:] == 0).all()
        for node in range(1, used):
            ps = g.parents[b, node][g.parents[b, node] != NONE]
            assert len(ps) and (ps < node).all() and (g.depth[b, ps] < g.depth[b, node]).all()
            assert (g.visits[b, ps] >= g.visits[b, node]).all()
        # Every node descends from the root, so the root sees every simulation once.
        assert g.visits[b, 0] == 1 + simulations[b]
