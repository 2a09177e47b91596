"""Statistics of per-problem results: paired differences and ranking AUC (numpy, host side)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_difference(solved_a: Sequence[bool], solved_b: Sequence[bool]) -> tuple[float, float]:
    """(mean, standard error) of accuracy(a) - accuracy(b) on the same problems. Pairing removes the
    problems' own difficulty from the noise: far tighter than two independent accuracies' errors."""
    if len(solved_a) != len(solved_b) or len(solved_a) < 2:
        raise ValueError(f"paired_difference needs two equal-length per-problem lists of >= 2, got "
                         f"{len(solved_a)} and {len(solved_b)}")
    d = np.asarray(solved_a, np.float64) - np.asarray(solved_b, np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def ranking_auc(scores: np.ndarray, solved: np.ndarray) -> float:
    """The probability that a random solved item scores above a random failed one (ties count half);
    NaN without both kinds."""
    scores, solved = np.asarray(scores), np.asarray(solved, bool)
    pos, neg = scores[solved], scores[~solved]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))
