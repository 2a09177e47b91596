"""Paired differences of per-problem accuracies (the report's SFT / control / RL comparison)."""
import math

import numpy as np
import pytest

from rlm_jax import evaluation, report, statistics


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
        mean, se = statistics.paired_difference(a, b)
        assert mean == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
        assert se == pytest.approx(_mcnemar_se(a, b), rel=1e-9)


def test_pairing_is_tighter_than_independent_errors_on_correlated_outcomes():
    rng = np.random.default_rng()
    n = 768
    easy = rng.random(n) < 0.3
    a = list(easy | (rng.random(n) < 0.05))
    b = list(easy & (rng.random(n) < 0.9))
    _, se = statistics.paired_difference(a, b)
    unpaired = math.sqrt(np.var(a, ddof=1) / n + np.var(b, ddof=1) / n)
    assert se < 0.7 * unpaired


def test_paired_difference_rejects_unmatched_lists():
    with pytest.raises(ValueError, match="equal-length"):
        statistics.paired_difference([True, False, True], [True, False])


def test_selection_ceiling_counts_distinct_finished_answers_and_the_value_pick():
    samples = [
        [("a", 0.1, True), ("a", 0.9, True), ("b", 0.5, True)],   # "a" counts once, with its first score 0.1
        [("c", 0.9, False), ("d", -0.2, True), ("e", -0.1, True)],  # unfinished "c" is no answer
        [("f", 0.3, False), ("f", 0.3, False), ("f", 0.3, False)],  # nothing finished
    ]
    solved = {(0, "a"), (1, "d")}
    c = evaluation.ceiling_from_samples(samples, lambda i, text: (i, text) in solved)
    assert c.samples == 3
    assert c.distinct_finished == pytest.approx((2 + 2 + 0) / 3)
    assert c.pass_at_n == pytest.approx(2 / 3)  # problems 0 and 1 have a solved sample
    assert c.value_pick == 0.0  # the value picks "b" (0.5 > 0.1) and "e" (-0.1 > -0.2): both wrong
    # finished (score, solved): a 0.1 +, b 0.5 -, d -0.2 +, e -0.1 -; pairs (+ above -): a>e only -> 1/4
    assert c.value_auc == pytest.approx(0.25)


def test_selection_ceiling_picks_the_highest_value_answer():
    rng = np.random.default_rng()
    samples, truth = [], []
    for _ in range(50):
        rows = [(str(rng.integers(6)), float(rng.normal()), bool(rng.random() < 0.8)) for _ in range(8)]
        samples.append(rows)
        truth.append({str(t) for t in range(6) if rng.random() < 0.3})
    c = evaluation.ceiling_from_samples(samples, lambda i, text: text in truth[i])
    firsts = [{} for _ in samples]
    for i, rows in enumerate(samples):
        for text, score, finished in rows:
            if finished and text not in firsts[i]:
                firsts[i][text] = score
    best = [max(f.items(), key=lambda kv: kv[1])[0] if f else None for f in firsts]
    assert c.value_pick == pytest.approx(np.mean([b is not None and b in t for b, t in zip(best, truth)]))
    assert c.pass_at_n == pytest.approx(np.mean([any(x in t for x in f) for f, t in zip(firsts, truth)]))


def _result(strategy, budget, tokens, solved):
    return evaluation.Result(strategy, budget, float(np.mean(solved)), tokens, 1.0, {}, list(solved))


def test_equal_token_comparison_gives_best_of_n_at_least_the_same_tokens():
    rng = np.random.default_rng()
    n = 200
    solved = lambda p: list(rng.random(n) < p)
    bon = [_result("best_of_n", b, 16.0 * b + rng.uniform(-1, 1), solved(0.3)) for b in (2, 4, 8, 16)]
    tokens = sorted(rng.uniform(10, 400, size=4)) + [300.0]  # above best-of-16's ~256 at least once
    mcts = [_result("mcts", 4 * (k + 1), t, solved(0.35)) for k, t in enumerate(tokens)]
    others = [_result("greedy", 1, 15.0, solved(0.2))]
    comparisons = report.equal_token_comparisons(others + bon + mcts)
    assert [c.result for c in comparisons] == mcts
    for c in comparisons:
        enough = [x for x in bon if x.tokens_per_problem >= c.result.tokens_per_problem]
        # brute force: the cheapest best-of-N with at least MCTS's tokens; none: no pair, never a cheaper one
        if enough:
            assert c.baseline is min(enough, key=lambda x: x.tokens_per_problem)
            assert (c.mean, c.se) == statistics.paired_difference(c.result.solved, c.baseline.solved)
            assert c.covering_budget is None
        else:
            assert c.baseline is None and c.mean is None and c.se is None
            # best-of-16 samples ~16 tokens each: the budget that covers MCTS's tokens
            assert c.covering_budget == math.ceil(c.result.tokens_per_problem / (bon[-1].tokens_per_problem / 16))
    assert any(c.baseline is None for c in comparisons)
    assert "mcts:4" in report.comparison_table(comparisons)
    assert report.equal_token_comparisons(others + bon) == []


def test_other_searches_are_paired_with_best_of_n_and_with_mcts_at_no_fewer_tokens():
    rng = np.random.default_rng()
    n = 150
    solved = lambda p: list(rng.random(n) < p)
    bon = [_result("best_of_n", b, 16.0 * b + rng.uniform(-1, 1), solved(0.3)) for b in (4, 8)]
    mcts = [_result("mcts", s, t, solved(0.35)) for s, t in ((8, 90.0), (16, 170.0))]
    searches = [_result("beam", 2, 48.0, solved(0.3)), _result("tot_dfs", 8, rng.uniform(60, 100), solved(0.33)),
                _result("dvts", 4, 200.0, solved(0.3))]
    pairs = report.search_comparisons(bon + mcts + searches)
    assert [a.result for a, _ in pairs] == searches
    for a, b in pairs:
        for c, base in ((a, bon), (b, mcts)):
            enough = [x for x in base if x.tokens_per_problem >= c.result.tokens_per_problem]
            assert c.baseline is (min(enough, key=lambda x: x.tokens_per_problem) if enough else None)
            if enough:
                assert (c.mean, c.se) == statistics.paired_difference(c.result.solved, c.baseline.solved)
    assert pairs[2][0].baseline is None and pairs[2][1].baseline is None  # dvts:4 out-tokens both
    table = report.search_comparison_table(pairs)
    assert "| tot_dfs:8 (" in table and "no budget with >= 200.0 tokens" in table
    assert [e["strategy"] for e in report.search_comparisons_json(bon + mcts + searches)] == ["beam", "tot_dfs", "dvts"]
