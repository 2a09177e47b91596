"""The value model's held-out checks: sign accuracy against exact labels, and its ranking of finished states."""
import itertools

import numpy as np

from rlm_jax.training import value


def _auc_by_pairs(pred, labels, finished):
    pos = [p for p, y, f in zip(pred, labels, finished) if f and y > 0]
    neg = [p for p, y, f in zip(pred, labels, finished) if f and y < 0]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
    return sum(wins) / len(wins)


def test_finished_auc_matches_counting_every_pair():
    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(8, 40))
        pred = np.round(rng.normal(size=n), 1)  # rounded: ties happen
        labels = rng.choice([-1.0, 0.0, 1.0], n)
        finished = rng.random(n) < 0.6
        if not (finished & (labels > 0)).any() or not (finished & (labels < 0)).any():
            continue
        assert np.isclose(value.finished_auc(pred, labels, finished), _auc_by_pairs(pred, labels, finished))


def test_finished_auc_ignores_open_states_and_reads_ranking_not_sign():
    labels = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    finished = np.array([True, True, True, True, False])
    # All predictions negative (sign accuracy of a constant), yet solved ranked above failed: AUC 1.
    assert value.finished_auc(np.array([-0.1, -0.9, -0.2, -0.8, -5.0]), labels, finished) == 1.0
    assert value.finished_auc(np.array([-0.9, -0.1, -0.8, -0.2, 9.0]), labels, finished) == 0.0
    assert np.isnan(value.finished_auc(np.zeros(5), np.ones(5), finished))


def test_label_accuracy_counts_only_labelled_states():
    pred = np.array([0.5, -0.5, 0.5, 0.9])
    labels = np.array([1.0, 1.0, -1.0, 0.0])
    out = value.label_accuracy(pred, labels)
    assert out["labelled_states"] == 3
    assert np.isclose(out["value_accuracy"], 1 / 3) and np.isclose(out["constant_accuracy"], 2 / 3)
