"""Paired differences of per-problem accuracies (the report's SFT / control / RL comparison)."""
import math

import numpy as np
import pytest

from rlm_jax import evaluation


def _mcnemar_se(a, b):
    """Standard error of mean(a - b) from the discordant counts alone (a closed form for 0/1 pairs)."""
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return math.sqrt((only_a + only_b - (only_a - only_b) ** 2 / n) / (n * (n - 1)))


def test_paired_difference_matches_the_discordant_pair_formula():
    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(10, 500))
        skill = rng.random(n)  # shared per-problem difficulty: a and b are correlated, as two checkpoints are
        a = list(rng.random(n) < skill)
        b = list(rng.random(n) < skill * rng.uniform(0.5, 1.0))
        mean, se = evaluation.paired_difference(a, b)
        assert mean == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
        assert se == pytest.approx(_mcnemar_se(a, b), rel=1e-9)


def test_pairing_is_tighter_than_independent_errors_on_correlated_outcomes():
    rng = np.random.default_rng()
    n = 768
    easy = rng.random(n) < 0.3
    a = list(easy | (rng.random(n) < 0.05))
    b = list(easy & (rng.random(n) < 0.9))
    _, se = evaluation.paired_difference(a, b)
    unpaired = math.sqrt(np.var(a, ddof=1) / n + np.var(b, ddof=1) / n)
    assert se < 0.7 * unpaired


def test_paired_difference_rejects_unmatched_lists():
    with pytest.raises(ValueError, match="equal-length"):
        evaluation.paired_difference([True, False, True], [True, False])
