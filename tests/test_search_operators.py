"""The model-free operators of rlm_jax.search.operators against plain numpy / Python references:
Select / Prune (select_top_k), Aggregate (majority_vote, weighted_vote). (Generate and Evaluate need a
model: tests/test_search_strategies.py.)
"""
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import operators as ops


def _scores(seed, shape):
    """Random scores with many ties (values on a coarse grid), so tie-breaking is exercised."""
    return np.random.default_rng(seed).integers(-3, 4, size=shape).astype(np.float32) / 2


def _top_k_ref(row, k):
    """Indices of the k largest entries, larger first, ties to the lower index (stable sort)."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_select_top_k(k):
    scores = _scores(0, (5, 4, 7))
    idx, top = jax.jit(ops.select_top_k, static_argnums=1)(jnp.asarray(scores), k)
    assert idx.shape == top.shape == (5, 4, k)
    for i in range(5):
        for j in range(4):
            want = _top_k_ref(scores[i, j].tolist(), k)
            assert np.asarray(idx[i, j]).tolist() == want
            np.testing.assert_array_equal(top[i, j], scores[i, j, want])


def _vote_ref(ids, weights, valid):
    """Python: total weight per answer over valid samples; the first sample of a best answer (0 if none)."""
    totals = defaultdict(float)
    for a, w, ok in zip(ids, weights, valid):
        if ok:
            totals[a] += w
    if not totals:
        return 0
    best = max(totals.values())
    return next(j for j, (a, ok) in enumerate(zip(ids, valid)) if ok and totals[a] == best)


def test_majority_and_weighted_votes_match_python():
    rng = np.random.default_rng(2)
    b, n = 200, 9
    ids = rng.integers(0, 4, size=(b, n)).astype(np.int32)
    valid = rng.random((b, n)) < 0.7
    valid[0] = False  # a problem without a single parseable answer
    weights = rng.integers(0, 5, size=(b, n)).astype(np.float32) / 4  # ties between answers happen
    majority = np.asarray(jax.jit(ops.majority_vote)(ids, valid))
    weighted = np.asarray(jax.jit(ops.weighted_vote)(ids, weights, valid))
    everyone = np.asarray(ops.majority_vote(jnp.asarray(ids)))
    ties = 0
    for r in range(b):
        assert majority[r] == _vote_ref(ids[r], np.ones(n), valid[r]), r
        assert weighted[r] == _vote_ref(ids[r], weights[r], valid[r]), r
        assert everyone[r] == _vote_ref(ids[r], np.ones(n), np.ones(n, bool)), r
        counts = np.bincount(ids[r][valid[r]], minlength=4)
        ties += (counts == counts.max()).sum() > 1
    assert ties >= 10 and (majority != weighted).sum() >= 10, "the references must discriminate"
