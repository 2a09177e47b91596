"""report.py: the honest equal-token pairing of MCTS with best-of-N (table, eval.json entries, the budget
added when none covers MCTS's tokens) and the scaling plot."""
import json
import math

import numpy as np
import pytest

from rlm_jax import evaluation, report


def _result(strategy, budget, tokens, solved):
    return evaluation.Result(strategy, budget, float(np.mean(solved)), tokens, 1.0, {1: 0.5}, list(solved))


def _runs(seed=0, n=100):
    rng = np.random.default_rng(seed)
    solved = lambda p: list(rng.random(n) < p)  # noqa: E731
    bon = [_result("best_of_n", 4, 62.0, solved(0.4)), _result("best_of_n", 8, 125.0, solved(0.43))]
    mcts = [_result("mcts", 8, 122.0, solved(0.5)), _result("mcts", 16, 134.0, solved(0.55))]
    return [_result("greedy", 1, 16.0, solved(0.3))] + bon + mcts


def test_the_readme_case_pairs_mcts_8_and_leaves_mcts_16_unpaired():
    """README run 3: MCTS:16 used 134 tokens, best-of-8 125: no pair (it used to be paired anyway)."""
    versus = report.equal_token_comparisons(_runs())
    (m8, m16) = versus
    assert (m8.result.budget, m8.baseline.budget) == (8, 8)
    assert m16.baseline is None and m16.covering_budget == 9  # 134 / (125 / 8) = 8.6 -> 9 samples
    table = report.comparison_table(versus)
    assert "Rule:" in table and "fewest generated tokens at or above" in table
    rows = [line for line in table.splitlines() if line.startswith("| mcts")]
    assert rows[0].startswith("| mcts:8 (122.0) | best_of_n:8 (125.0) | ")  # both token counts
    assert rows[1] == ("| mcts:16 (134.0) | no best-of-N budget with >= 134.0 tokens; run best-of-N at budget 9 "
                       "| not paired |")
    entries = report.comparisons_json(versus)
    assert json.loads(json.dumps(entries)) == entries
    assert [(e["mcts"], e["best_of_n"], e["best_of_n_added"]) for e in entries] == [(8, 8, False), (16, None, False)]
    assert entries[1]["mean"] is None and entries[1]["covering_budget"] == 9
    assert entries[0]["mcts_tokens"] <= entries[0]["best_of_n_tokens"]


@pytest.mark.parametrize("shortfalls", [0, 1])
def test_cover_search_tokens_runs_best_of_n_until_every_mcts_budget_has_a_pair(shortfalls):
    """The budget asked for is the one whose expected tokens cover MCTS's; a run that falls short (tokens
    are random) is followed by a larger budget, extrapolated from that run's tokens per sample."""
    calls = []

    def run_best_of_n(budget, i):
        calls.append(budget)
        per_sample = 125.0 / 8 - (3.0 if len(calls) <= shortfalls else 0.0)  # the first run(s) sample short
        return _result("best_of_n", budget, per_sample * budget, [True, False] * 50)

    results, added = report.cover_search_tokens(_runs(), run_best_of_n)
    assert calls == [9, math.ceil(134.0 / (125.0 / 8 - 3.0))][:shortfalls + 1]  # 9, then 11
    assert added == [("best_of_n", b) for b in calls]
    versus = report.equal_token_comparisons(results)
    assert all(c.baseline is not None and c.baseline.tokens_per_problem >= c.result.tokens_per_problem
               for c in versus)
    assert (versus[1].result.budget, versus[1].baseline.budget) == (16, calls[-1])
    assert (versus[0].result.budget, versus[0].baseline.budget) == (8, 8)  # still the cheapest that covers
    table = report.comparison_table(versus, added)
    assert f"best_of_n:{calls[-1]}* (" in table and "run automatically" in table
    assert report.comparisons_json(versus, added)[1]["best_of_n_added"] is True
    section = "\n".join(report.strategies_section(results, versus, added))
    assert f"| best_of_n | {calls[-1]}* |" in section and "## MCTS against best-of-N at equal tokens" in section


def test_cover_search_tokens_adds_nothing_when_every_mcts_budget_is_covered_or_there_is_no_best_of_n():
    runs = [r for r in _runs() if not (r.strategy == "mcts" and r.budget == 16)]
    never = lambda budget, i: pytest.fail("ran best-of-N")  # noqa: E731
    assert report.cover_search_tokens(runs, never) == (runs, [])
    no_bon = [r for r in _runs() if r.strategy != "best_of_n"]
    assert report.cover_search_tokens(no_bon, never) == (no_bon, [])


def test_cover_search_tokens_covers_the_other_tree_searches_too():
    """A ToT-DFS run with more tokens than every best-of-N (and than MCTS) gets a best-of-N that covers it."""
    dfs = _result("tot_dfs", 8, 162.0, [True, False] * 50)
    calls = []

    def run_best_of_n(budget, i):
        calls.append(budget)
        return _result("best_of_n", budget, 125.0 / 8 * budget, [True, False] * 50)

    results, added = report.cover_search_tokens(_runs() + [dfs], run_best_of_n)
    assert calls == [9, 11]  # MCTS:16's 134 tokens get best-of-9, ToT-DFS's 162 best-of-11 (ceil(162 / 15.6))
    (with_bon, _), = [c for c in report.search_comparisons(results) if c[0].result.strategy == "tot_dfs"]
    assert with_bon.baseline.budget == 11 and with_bon.baseline.tokens_per_problem >= 162.0
    assert [c.baseline.budget for c in report.equal_token_comparisons(results)] == [8, 9]


def test_cover_search_tokens_gives_up_after_its_tries():
    # a best-of-N whose samples get shorter as N grows: no budget ever reaches MCTS:16's 134 tokens
    short = lambda budget, i: _result("best_of_n", budget, 130.0, [True, False] * 50)  # noqa: E731
    results, added = report.cover_search_tokens(_runs(), short, tries=2)
    assert len(added) == 2
    assert report.equal_token_comparisons(results)[1].baseline is None  # still said so, never paired


def test_scaling_plot_labels_budgets_clamps_accuracy_and_marks_pairs(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    saved = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: saved.setdefault("fig", fig))
    results = _runs()
    versus = report.equal_token_comparisons(results)
    report.scaling_plot(results, tmp_path / "scaling.png", versus)
    ax = saved["fig"].axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(str(r.budget) for r in results)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["best_of_n"].get_linestyle() == "-" and lines["greedy"].get_linestyle() == "None"
    pair = lines["equal-token pair"]  # MCTS:8 joined to best-of-8; MCTS:16 is unpaired, so no other pair
    assert list(pair.get_xdata()) == [122.0, 125.0]
    assert sum(line.get_linestyle() == ":" for line in ax.get_lines()) == 1


def test_scaling_plot_writes_a_png(tmp_path):
    results = _runs()
    report.scaling_plot(results, tmp_path / "s.png", report.equal_token_comparisons(results))
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
