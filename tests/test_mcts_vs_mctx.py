"""Our batched search visits exactly the nodes mctx visits, on a deterministic random tree environment.

Same environment (tests/fixtures/toy_env.py: priors, values and rewards are fixed hashes of the state),
same key, same settings: the whole tree must agree (structure, visit counts; values up to float32
rounding, since we keep value sums where mctx keeps running means), and so must the root visit counts,
root Q-values, action weights and the chosen action. Several batch sizes, branching factors, simulation
counts and seeds (a seed changes both the roots and the key, not the compiled program).
"""
import functools

import jax
import mctx
import numpy as np
import pytest

from fixtures.toy_env import ToyEnv
from rlm_jax.search import mcts as search
from rlm_jax.search import selection


def _recurrent_fn(env):
    def recurrent_fn(params, key, action, state):
        del params, key
        nxt, reward, discount, logits, value, _ = env.step(state, action)
        return mctx.RecurrentFnOutput(reward=reward, discount=discount, prior_logits=logits, value=value), nxt
    return recurrent_fn


@functools.lru_cache(maxsize=None)
def _mctx_search(env, policy, num_simulations, **kwargs):
    recurrent_fn = _recurrent_fn(env)

    @jax.jit
    def run(key, root):
        root = mctx.RootFnOutput(prior_logits=root.prior_logits, value=root.value, embedding=root.embedding)
        return getattr(mctx, policy)(None, key, root, recurrent_fn, num_simulations, **kwargs)
    return run


def _assert_same_search(ours, ref):
    t, r = ours.tree, ref.search_tree
    np.testing.assert_array_equal(ours.root_visits, r.children_visits[:, 0])
    np.testing.assert_array_equal(t.visits, r.node_visits)
    np.testing.assert_array_equal(t.parent, r.parents)
    np.testing.assert_array_equal(t.action_from_parent, r.action_from_parent)
    np.testing.assert_array_equal(t.children, r.children_index)
    np.testing.assert_allclose(ours.values, r.node_values, atol=2e-5)
    np.testing.assert_allclose(t.raw_value, r.raw_values, atol=1e-6)
    np.testing.assert_allclose(ours.root_qvalues, r.summary().qvalues, atol=2e-5)
    np.testing.assert_allclose(ours.action_weights, ref.action_weights, atol=1e-5)
    np.testing.assert_array_equal(ours.action, ref.action)


MUZERO_CASES = [
    # (batch, branching K, simulations, our config overrides, mctx kwargs)
    (16, 8, 48, {}, {}),  # mctx's defaults: Dirichlet root noise, acting at temperature 1
    (5, 3, 12, dict(qtransform=selection.QByMinMax(-2.0, 2.0), dirichlet_fraction=0.0),
     dict(qtransform=functools.partial(mctx.qtransform_by_min_max, min_value=-2.0, max_value=2.0),
          dirichlet_fraction=0.0)),
]


@pytest.mark.parametrize("batch,k,sims,ours_kw,mctx_kw", MUZERO_CASES)
def test_muzero_matches_mctx(batch, k, sims, ours_kw, mctx_kw):
    env = ToyEnv(num_actions=k)
    ref_fn = _mctx_search(env, "muzero_policy", sims, **mctx_kw)
    config = search.muzero(**ours_kw)
    for seed in range(3):
        root, key = env.root(batch, seed), jax.random.PRNGKey(seed)
        ours = search.mcts(None, key, root, env, sims, config)
        _assert_same_search(ours, ref_fn(key, root))


GUMBEL_CASES = [
    (12, 8, 40, 16, 1.0),  # more considered actions than slots
    (6, 5, 20, 4, 0.0),  # no Gumbel noise
]


@pytest.mark.parametrize("batch,k,sims,considered,scale", GUMBEL_CASES)
def test_gumbel_matches_mctx(batch, k, sims, considered, scale):
    env = ToyEnv(num_actions=k)
    ref_fn = _mctx_search(env, "gumbel_muzero_policy", sims, max_num_considered_actions=considered,
                          gumbel_scale=scale)
    config = search.gumbel_muzero(max_num_considered_actions=considered, gumbel_scale=scale)
    for seed in range(3):
        root, key = env.root(batch, seed), jax.random.PRNGKey(seed)
        ours = search.mcts(None, key, root, env, sims, config)
        _assert_same_search(ours, ref_fn(key, root))


def test_sequential_halving_schedule_matches_mctx():
    from mctx._src import seq_halving  # the schedule is private in mctx; pin ours to it
    from rlm_jax.search.gumbel import considered_visits
    for m in (1, 2, 3, 4, 7, 16):
        for n in (1, 5, 16, 33, 100):
            assert considered_visits(m, n) == seq_halving.get_sequence_of_considered_visits(m, n)
