"""Invariants of the search tree, fuzzed with hypothesis over random toy environments.

Each configuration is compiled once; hypothesis varies what is traced (roots, key, and the env's
terminal / dead-end / reward knobs passed through `params`), so the fuzzing costs little compile time.
Environments have rewards only on terminal edges (in [-1, 1]) and values in [-1, 1], so every backed-up
value must stay in [-1, 1].
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.toy_env import ToyEnv
from rlm_jax.search import mcts as search
from rlm_jax.search.backup import MeanBackup, sum_backup
from rlm_jax.search.base import RootInput
from rlm_jax.search.tree import NONE, init_tree, path_to_root

# name -> (batch, K, simulations, config). Small capacities / depths make full trees and cut-offs common.
CONFIGS = {
    "puct": (4, 3, 24, search.muzero(dirichlet_fraction=0.0)),
    "puct_small": (3, 4, 30, search.muzero(capacity=12)),
    "uct_parallel": (3, 4, 10, search.uct(num_parallel=3, capacity=20, max_depth=2)),
    "x1": (4, 2, 16, search.x1()),
    "x1_td": (4, 2, 16, search.x1(td_rate=0.5)),
    "x1_stop_created": (4, 2, 16, search.x1(stop_on_terminal="created")),
    "x1_stop_selected": (4, 2, 16, search.x1(stop_on_terminal="selected")),
    "x1_parallel_stop": (3, 3, 8, search.x1(num_parallel=2, stop_on_terminal=True, max_depth=4)),
    "gumbel_parallel": (3, 5, 12, search.gumbel_muzero(num_parallel=2, max_num_considered_actions=4,
                                                       capacity=16)),
}


def _run(name, seed, knobs, root_terminal=0.0):
    batch, k, sims, config = CONFIGS[name]
    env = ToyEnv(num_actions=k, reward_scale=0.0, discount=0.9)
    params = {key: jnp.float32(v) for key, v in knobs.items()}
    root = env.root(batch, seed, params)
    root = root.replace(terminal=jax.random.uniform(jax.random.PRNGKey(seed), (batch,)) < root_terminal)
    out = search.mcts(params, jax.random.PRNGKey(seed), root, env, sims, config)
    return jax.tree.map(np.asarray, out), config, sims


def _check_invariants(out, config, sims):
    t = out.tree
    batch, n, k = t.children.shape
    w, e = config.num_parallel, (k if config.expand_all else 1)
    max_depth = n - 1 if config.max_depth is None else config.max_depth
    mean = isinstance(config.backup, MeanBackup)  # x1's rule; else MuZero's running sum
    values = out.values
    for b in range(batch):
        used = int(t.num_nodes[b])
        assert 1 <= used <= n
        # Untouched padding beyond num_nodes: nothing was written beyond capacity or allocation.
        assert (t.parent[b, used:] == NONE).all() and (t.visits[b, used:] == 0).all()
        assert (t.children[b, used:] == NONE).all()
        assert (t.visits[b, :used] >= 1).all()
        assert np.all(np.abs(values[b, :used]) <= 1 + 1e-5)
        kids = t.children[b, :used]
        assert ((kids == NONE) | ((kids > 0) & (kids < used))).all()
        for node in range(used):
            mine = kids[node][kids[node] != NONE]
            if node > 0:
                p, a = t.parent[b, node], t.action_from_parent[b, node]
                assert 0 <= p < node and t.children[b, p, a] == node
                assert t.depth[b, node] == t.depth[b, p] + 1 <= max_depth
            assert (t.parent[b, mine] == node).all()
            assert len(set(mine.tolist())) == len(mine)
            if t.terminal[b, node] or t.depth[b, node] >= max_depth:
                assert len(mine) == 0, "terminal and depth-limited nodes are never expanded"
            elif config.expand_all:
                assert len(mine) in (0, k), "expand_all creates all K children at once"
            # Visits: 1 at creation, +1 per simulation through the node.
            if len(mine):
                passes = np.sum(t.visits[b, mine] - 1) + (1 if config.expand_all else len(mine))
                assert t.visits[b, node] == 1 + passes
                q = t.reward[b, mine] + t.discount[b, mine] * values[b, mine]
                if mean and node > 0 and config.backup.td_rate == 1:
                    # x1: V = visit-weighted mean of children's Q (td_rate < 1: the reference test)
                    n_c = t.visits[b, mine]
                    np.testing.assert_allclose(values[b, node], np.sum(n_c * q) / np.sum(n_c), atol=1e-5)
                if not mean and not config.expand_all:  # value sums add up along edges
                    expect = t.raw_value[b, node] + np.sum(
                        t.reward[b, mine] * t.visits[b, mine] + t.discount[b, mine] * t.value_sum[b, mine])
                    np.testing.assert_allclose(t.value_sum[b, node], expect, atol=1e-4)
            else:  # leaves are visited again only if nothing can be added below them
                dead = not np.isfinite(t.child_prior_logits[b, node]).any()
                if not (t.terminal[b, node] or t.depth[b, node] >= max_depth or dead):
                    assert t.visits[b, node] == 1
        assert t.visits[b, 0] - 1 <= sims * w
        if w == 1 and config.capacity is None and not config.stop_on_terminal:
            assert t.visits[b, 0] == 1 + sims, "every simulation passes the root (none is void)"
        # The root's children: one visit each at creation plus every simulation that went through the
        # root (a root with children is never revisited); one expansion made all K at once (expand_all).
        root_kids = t.children[b, 0]
        np.testing.assert_array_equal(out.root_visits[b], np.where(root_kids != NONE, t.visits[b, root_kids], 0))
        if (root_kids != NONE).any():
            assert out.root_visits[b].sum() == t.visits[b, 0] - 1 + (k - 1 if config.expand_all else 0)
        else:
            assert out.root_visits[b].sum() == 0
        if mean and not config.backup.update_root:
            assert values[b, 0] == pytest.approx(t.raw_value[b, 0])
        if config.stop_on_terminal in (True, "created") and t.terminal[b, :used].any():
            first = np.argmax(t.terminal[b, :used])
            assert used - first <= w * e, "no iteration starts after a terminal node is found"
        if config.stop_on_terminal == "selected":  # selecting a terminal stops before its backup
            assert (t.visits[b, :used][t.terminal[b, :used]] == 1).all()
        # Best path: linked from the root to best_node; the best terminal if there is one.
        best, path = out.best_node[b], out.best_path[b]
        depth = t.depth[b, best]
        assert path[0] == 0 and path[depth] == best and (path[depth + 1:] == NONE).all()
        assert all(t.parent[b, path[d]] == path[d - 1] for d in range(1, depth + 1))
        terminals = np.flatnonzero(t.terminal[b, :used])
        assert out.found_terminal[b] == (len(terminals) > 0)
        if len(terminals):
            q = t.reward[b] + t.discount[b] * values[b]
            q[0] = values[b, 0]
            assert t.terminal[b, best] and q[best] == pytest.approx(q[terminals].max())
    np.testing.assert_allclose(out.action_weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), terminal_prob=st.sampled_from([0.0, 0.1, 0.4]),
       invalid_prob=st.sampled_from([0.0, 0.3, 0.8]), root_terminal=st.sampled_from([0.0, 0.0, 0.5]))
def test_tree_invariants(name, seed, terminal_prob, invalid_prob, root_terminal):
    """Each config compiles once; its examples only change traced inputs."""
    out, config, sims = _run(name, seed, dict(terminal_prob=terminal_prob, invalid_prob=invalid_prob),
                             root_terminal)
    _check_invariants(out, config, sims)


def test_full_tree_stops_gracefully():
    # capacity 12 < 1 + 30 simulations: the tree fills, the remaining simulations are void.
    out, config, sims = _run("puct_small", 3, dict(terminal_prob=0.0, invalid_prob=0.0))
    assert (out.tree.num_nodes == 12).all()
    assert (out.tree.visits[:, 0] == 12).all()  # 11 expansions, then 19 void simulations


def test_terminal_root_is_revisited_never_expanded():
    out, config, sims = _run("puct", 0, dict(terminal_prob=0.0, invalid_prob=0.0), root_terminal=1.0)
    assert (out.tree.num_nodes == 1).all() and (out.tree.visits[:, 0] == 1 + sims).all()
    assert out.found_terminal.all() and (out.best_path[:, 0] == 0).all() and (out.best_path[:, 1:] == NONE).all()


def test_parallel_leaves_are_batched_and_spread():
    calls = []

    def recording(env):
        def expand_fn(params, key, tree, parent, action):
            calls.append(parent.shape)
            return env(params, key, tree, parent, action)
        return expand_fn

    # Tracing is enough to see how expand_fn is called: once per iteration, for all W leaves.
    env = ToyEnv(num_actions=4)
    search.mcts.lower(None, jax.random.PRNGKey(1), env.root(3), recording(env), 5,
                      search.muzero(num_parallel=4))
    assert calls == [(3, 4)]
    calls.clear()
    env = ToyEnv(num_actions=3)
    search.mcts.lower(None, jax.random.PRNGKey(1), env.root(2), recording(env), 3, search.x1(num_parallel=2))
    assert calls == [(2, 6)]  # W = 2 leaves x K = 3 children each
    # Virtual loss spreads the W = 3 descents of an iteration: 10 iterations fill capacity 20.
    out, config, sims = _run("uct_parallel", 0, dict(terminal_prob=0.0, invalid_prob=0.0))
    assert (out.tree.num_nodes == 20).all()


def test_path_to_root_and_sum_backup_by_hand():
    # Chain root -> 1 -> 2 and root -> 3, built by hand.
    root = RootInput(prior_logits=jnp.zeros((1, 2)), value=jnp.array([0.5]), embedding=jnp.zeros((1,)))
    t = init_tree(root, 5)
    t = t.replace(
        parent=jnp.array([[-1, 0, 1, 0, -1]]), depth=jnp.array([[0, 1, 2, 1, 0]]),
        children=jnp.array([[[1, 3], [2, -1], [-1, -1], [-1, -1], [-1, -1]]]),
        action_from_parent=jnp.array([[-1, 0, 0, 1, -1]]), num_nodes=jnp.array([4]),
        visits=jnp.array([[1, 1, 1, 1, 0]]), value_sum=jnp.array([[0.5, 0.2, -1.0, 0.3, 0]]),
        reward=jnp.array([[0, 0.1, 0.2, 0, 0]]), discount=jnp.array([[0, 0.5, 0.5, 1.0, 0]]))
    np.testing.assert_array_equal(path_to_root(t, jnp.array([2]), 4), [[0, 1, 2, -1]])
    np.testing.assert_array_equal(path_to_root(t, jnp.array([[3, -1]]), 3), [[[0, 3, -1], [-1, -1, -1]]])
    # Two paths in one backup: from node 2 (g = -1) and from node 3 (g = 0.3).
    t2 = sum_backup(t, jnp.array([[2, 3]]), jnp.array([[-1.0, 0.3]]))
    g1 = 0.2 + 0.5 * -1.0  # return at node 1
    g0 = 0.1 + 0.5 * g1 + 0.0 + 1.0 * 0.3  # node 0 gets both paths
    np.testing.assert_allclose(t2.value_sum[0, :4], [0.5 + g0, 0.2 + g1, -2.0, 0.6], atol=1e-6)
    np.testing.assert_array_equal(t2.visits[0], [3, 2, 2, 2, 0])


def _x1_reference(env, root, sims, c1=1.25, c2=19652.0, gamma=0.96, td_rate=1.0, stop=False):
    """x1's MCTS (blueprint Algorithm 1, paper variant) for one problem, in plain Python/float64.
    stop: False, "created" (after an iteration that created a terminal node) or "selected" (x1's
    code: the loop breaks when selection ends on a terminal node). -> (N, V, parent, iterations run)."""
    step = jax.jit(env.step)
    state = [np.uint32(root.embedding)]
    n, v, r, term, kids, parent = [1], [float(root.value)], [0.0], [False], [[]], [-1]
    for it in range(sims):
        s = 0
        while kids[s] and not term[s]:  # descend by norm(V(c)) + sqrt(N(s)-1)/(1+N(c)) (c1 + log((N(s)+c2)/c2))
            score = [(v[c] + 1) / 2 + np.sqrt(n[s] - 1) / (1 + n[c]) * (c1 + np.log((n[s] + c2) / c2))
                     for c in kids[s]]
            s = kids[s][int(np.argmax(score))]
        if term[s] and stop == "selected":
            return np.array(n), np.array(v), np.array(parent), it
        created_terminal = False
        if not term[s]:  # expand all K children at once, each evaluated
            for a in range(env.num_actions):
                nxt, rew, _, _, val, t = (np.asarray(x) for x in step(jnp.uint32(state[s]), a))
                kids[s].append(len(n))
                state.append(nxt); n.append(1); v.append(float(val)); r.append(float(rew))
                term.append(bool(t)); kids.append([]); parent.append(s)
                created_terminal |= bool(t)
        while s != -1:  # backup: N += 1; V(s) <- (1-a) V(s) + a * mean over children of N(c) (r + gamma V(c)),
            n[s] += 1   # the root excluded
            if s != 0 and kids[s]:
                mean = sum(n[c] * (r[c] + gamma * v[c]) for c in kids[s]) / sum(n[c] for c in kids[s])
                v[s] = (1 - td_rate) * v[s] + td_rate * mean
            s = parent[s]
        if created_terminal and stop == "created":
            return np.array(n), np.array(v), np.array(parent), it + 1
    return np.array(n), np.array(v), np.array(parent), sims


@pytest.mark.parametrize("name", ["x1", "x1_td", "x1_stop_created", "x1_stop_selected"])
def test_x1_preset_matches_a_plain_python_x1(name):
    out, config, sims = _run(name, 5, dict(terminal_prob=0.15, invalid_prob=0.0))
    batch, k, _, _ = CONFIGS[name]
    env = ToyEnv(num_actions=k, reward_scale=0.0, discount=0.9)
    root = env.root(batch, 5, dict(terminal_prob=jnp.float32(0.15), invalid_prob=jnp.float32(0.0)))
    env = ToyEnv(num_actions=k, reward_scale=0.0, terminal_prob=0.15)
    stopped_early = 0
    for b in range(batch):
        one = jax.tree.map(lambda x: x[b], root)
        n, v, parent, iterations = _x1_reference(env, one, sims, td_rate=config.backup.td_rate,
                                                 stop=config.stop_on_terminal)
        stopped_early += iterations < sims
        used = int(out.tree.num_nodes[b])
        assert used == len(n)
        np.testing.assert_array_equal(out.tree.parent[b, :used], parent)
        np.testing.assert_array_equal(out.visits[b, :used], n)
        np.testing.assert_allclose(out.values[b, :used], v, atol=1e-5)
    if config.stop_on_terminal:
        assert stopped_early >= 2, "the stop rule must matter for this check to mean anything"


def test_search_loop_exits_once_every_problem_has_stopped():
    """Terminal roots and x1's "selected" stop: both problems stop in the first iteration and the loop
    ends there (expand_fn runs once, void) instead of running all 10 iterations."""
    env = ToyEnv(num_actions=3)
    calls = []

    def counting(params, key, tree, parent, action):
        jax.debug.callback(lambda: calls.append(1))
        return env(params, key, tree, parent, action)

    root = env.root(2).replace(terminal=jnp.ones((2,), bool))
    out = search.mcts(None, jax.random.PRNGKey(0), root, counting, 10, search.x1(stop_on_terminal="selected"))
    jax.block_until_ready(out)
    assert len(calls) == 1
    np.testing.assert_array_equal(out.tree.visits[:, 0], 1)  # the terminal root was not backed up
