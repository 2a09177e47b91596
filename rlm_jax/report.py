"""What a run or an evaluation writes: report.md (tables), eval.json (the figures, for tools) and scaling.png."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from rlm_jax import evaluation, statistics
from rlm_jax.config import RunConfig


PAIRING_RULE = ("each MCTS budget is paired with the best-of-N budget with the fewest generated tokens at or above "
                "MCTS's own, so best-of-N never gets less compute; an MCTS budget that no best-of-N budget covers is "
                "not paired")


@dataclasses.dataclass
class Pairing:
    """One `strategy` result against its equal-token `baseline` (None: no baseline budget has as many tokens).
    mean, se: the paired accuracy difference on the same problems (None when unpaired); covering_budget: the
    baseline budget whose expected tokens would cover `result`'s (what to run to get a fair pair)."""
    result: evaluation.Result
    baseline: evaluation.Result | None
    mean: float | None
    se: float | None
    covering_budget: int | None


def covering_budget(tokens: float, baselines: Sequence[evaluation.Result]) -> int | None:
    """The smallest baseline budget whose expected tokens reach `tokens`, extrapolated from the baseline's
    tokens per unit of budget (best-of-N: per sample) at its largest budget. None without baselines."""
    if not baselines:
        return None
    top = max(baselines, key=lambda r: r.budget)
    return math.ceil(tokens / max(top.tokens_per_problem / top.budget, 1e-9))


def equal_token_comparisons(results: Sequence[evaluation.Result], strategy: str = "mcts",
                            baseline: str = "best_of_n") -> list[Pairing]:
    """A `Pairing` for each `strategy` result: against the `baseline` result with the fewest tokens at or
    above its own, as a paired difference on the same problems; unpaired (baseline None) when every
    baseline budget used fewer tokens. Empty when either strategy is missing."""
    if not any(r.strategy == baseline for r in results):
        return []
    return [pair(r, results, baseline) for r in results if r.strategy == strategy and len(r.solved) >= 2]


def pair(r: evaluation.Result, results: Sequence[evaluation.Result], baseline: str) -> Pairing:
    """`r` against the `baseline` result with the fewest tokens at or above r's (see equal_token_comparisons)."""
    base = sorted((b for b in results if b.strategy == baseline), key=lambda b: b.tokens_per_problem)
    b = next((b for b in base if b.tokens_per_problem >= r.tokens_per_problem), None)
    if b is None:
        return Pairing(r, None, None, None, covering_budget(r.tokens_per_problem, base))
    return Pairing(r, b, *statistics.paired_difference(r.solved, b.solved), None)


def cover_search_tokens(results, run_best_of_n, tries: int = 4):
    """Makes an equal-token pair with best-of-N exist for every MCTS budget and every other tree search
    (`SEARCHES`): while one of them used more tokens than every best-of-N result, runs best-of-N at the
    smallest budget whose expected tokens cover one of them (`covering_budget`), so each gets the cheapest
    partner that covers it, not one sized for a costlier search; tokens are random, so a run may fall short,
    and then the next budget up is tried (at most `tries` runs in all).
    run_best_of_n(budget, i) -> Result. -> (results with the added ones after the configured ones,
    [(strategy, budget)] added)."""
    results, added = list(results), []
    for i in range(tries):
        if not any(r.strategy == "best_of_n" for r in results):
            break
        unpaired = [p for p in (pair(r, results, "best_of_n") for r in results
                                if r.strategy in ("mcts",) + SEARCHES and len(r.solved) >= 2) if p.baseline is None]
        if not unpaired:
            break
        done = {r.budget for r in results if r.strategy == "best_of_n"}
        budget = min(p.covering_budget for p in unpaired)
        while budget in done:  # that budget fell short already: one more sample
            budget += 1
        results.append(run_best_of_n(budget, i))
        added.append(("best_of_n", budget))
    return results, added


def comparison_table(comparisons: Sequence[Pairing], added: Sequence[tuple[str, int]] = ()) -> str:
    """`equal_token_comparisons` as markdown: the rule, then one row per MCTS budget with both token counts.
    `added`: (strategy, budget) runs made only so that a fair pair exists (marked *)."""
    added = set(added)
    star = lambda r: "*" if (r.strategy, r.budget) in added else ""  # noqa: E731
    rows = [f"Rule: {PAIRING_RULE}. Paired differences in accuracy on the same problems."]
    if any(c.baseline is not None and star(c.baseline) for c in comparisons):
        rows[0] += (" * : a best-of-N budget the configured ones lacked, run automatically because no configured "
                    "budget had as many tokens as an MCTS budget or another tree search.")
    rows += ["", "| MCTS (tokens / problem) | best-of-N (tokens / problem) | accuracy difference +- 1 SE |",
             "|---|---|---:|"]
    for c in comparisons:
        r, b = c.result, c.baseline
        left = f"{r.strategy}:{r.budget} ({r.tokens_per_problem:.1f})"
        if b is None:
            rows.append(f"| {left} | no best-of-N budget with >= {r.tokens_per_problem:.1f} tokens; run best-of-N "
                        f"at budget {c.covering_budget} | not paired |")
        else:
            rows.append(f"| {left} | {b.strategy}:{b.budget}{star(b)} ({b.tokens_per_problem:.1f}) | "
                        f"{c.mean:+.3f} +- {c.se:.3f} |")
    return "\n".join(rows)


def markdown_table(results: Sequence[evaluation.Result], added: Sequence[tuple[str, int]] = ()) -> str:
    """One row per result; a budget run only for the equal-token pairing (`added`) is marked *."""
    rows = ["| strategy | budget | accuracy | generated tokens / problem | seconds |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {r.strategy} | {r.budget}{'*' if (r.strategy, r.budget) in set(added) else ''} | {r.accuracy:.3f} "
             f"| {r.tokens_per_problem:.1f} | {r.seconds:.1f} |" for r in results]
    return "\n".join(rows)


def per_level_table(results: Sequence[evaluation.Result]) -> str:
    levels = sorted({lv for r in results for lv in r.per_level})
    rows = ["| strategy | budget | " + " | ".join(f"L{lv}" for lv in levels) + " |",
            "|---|---:|" + "---:|" * len(levels)]
    for r in results:
        rows.append(f"| {r.strategy} | {r.budget} | " +
                    " | ".join(f"{r.per_level.get(lv, float('nan')):.2f}" for lv in levels) + " |")
    return "\n".join(rows)


def scaling_plot(results: Sequence[evaluation.Result], path, versus: Sequence[Pairing] = ()) -> None:
    """Accuracy against generated tokens per problem: a curve per strategy with several budgets (a lone
    marker otherwise), each point labelled with its budget, accuracy on [0, 1], and a dotted line joining
    each equal-token pair of `versus` (MCTS and the best-of-N it is compared with)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r.strategy for r in results):
        pts = sorted((r.tokens_per_problem, r.accuracy, r.budget) for r in results if r.strategy == name)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(pts) > 1 else "none", label=name)
        for x, y, budget in pts:
            ax.annotate(str(budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    paired = [c for c in versus if c.baseline is not None]
    for i, c in enumerate(paired):
        r, b = c.result, c.baseline
        ax.plot([r.tokens_per_problem, b.tokens_per_problem], [r.accuracy, b.accuracy], ":", color="black",
                linewidth=1, label="equal-token pair" if i == 0 else None)
        ax.scatter([r.tokens_per_problem, b.tokens_per_problem], [r.accuracy, b.accuracy], s=90,
                   facecolors="none", edgecolors="black", linewidths=0.8, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # plain token counts, not 2x10^1
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy")
    ax.set_title("test-time compute scaling (labels: budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the other tree searches, each compared with best-of-N and with MCTS
SEARCHES = ("beam", "tot_bfs", "dvts", "tot_dfs", "got", "sr_mcts")


def search_comparisons(results: Sequence[evaluation.Result]) -> list[tuple[Pairing, Pairing]]:
    """For each result of a tree search in SEARCHES: (its pairing with best-of-N, with MCTS), each by the MCTS rule
    (the baseline budget with the fewest tokens at or above the strategy's own)."""
    return [(pair(r, results, "best_of_n"), pair(r, results, "mcts")) for r in results
            if r.strategy in SEARCHES and len(r.solved) >= 2]


def _pair_cell(c: Pairing, added=frozenset()) -> str:
    if c.baseline is None:
        return f"no budget with >= {c.result.tokens_per_problem:.1f} tokens"
    b = c.baseline
    star = "*" if (b.strategy, b.budget) in added else ""
    return f"{b.strategy}:{b.budget}{star} ({b.tokens_per_problem:.1f}): {c.mean:+.3f} +- {c.se:.3f}"


def search_comparison_table(pairs: Sequence[tuple[Pairing, Pairing]], added: Sequence[tuple[str, int]] = ()) -> str:
    """`search_comparisons` as markdown; `added` budgets (run only for a pairing) are marked *."""
    added = {tuple(a) for a in added}
    rows = ["Each against the budget of best-of-N and of MCTS with the fewest generated tokens at or above its "
            "own (paired differences in accuracy on the same problems, +- one SE; *: run only for a pairing).", "",
            "| strategy (tokens / problem) | minus best-of-N | minus MCTS |", "|---|---|---|"]
    rows += [f"| {a.result.strategy}:{a.result.budget} ({a.result.tokens_per_problem:.1f}) | {_pair_cell(a, added)} | "
             f"{_pair_cell(b, added)} |" for a, b in pairs]
    return "\n".join(rows)


def search_comparisons_json(results) -> list[dict]:
    side = lambda c: None if c.baseline is None else {  # noqa: E731
        "strategy": c.baseline.strategy, "budget": c.baseline.budget, "tokens": c.baseline.tokens_per_problem,
        "mean": c.mean, "se": c.se}
    return [{"strategy": a.result.strategy, "budget": a.result.budget, "tokens": a.result.tokens_per_problem,
             "vs_best_of_n": side(a), "vs_mcts": side(b)} for a, b in search_comparisons(results)]


def strategies_section(results, versus: Sequence[Pairing], added: Sequence[tuple[str, int]] = ()) -> list[str]:
    """The strategy table, the equal-token comparisons (when there are any) and the per-level table."""
    lines = ["## Strategies (final models)", "",
             "Seconds include compilation. Tokens: all tokens sampled, proposals not chosen included."
             + (" *: run only for the equal-token pairing below (not in eval.strategies)." if added else ""), "",
             markdown_table(results, added), ""]
    if versus:
        lines += ["## MCTS against best-of-N at equal tokens", "", comparison_table(versus, added), ""]
    searches = search_comparisons(results)
    if searches:
        lines += ["## Other tree searches against best-of-N and MCTS at equal tokens", "",
                  search_comparison_table(searches, added), ""]
    return lines + ["## Accuracy per level", "", per_level_table(results), ""]


def comparisons_json(versus: Sequence[Pairing], added: Sequence[tuple[str, int]] = ()) -> list[dict]:
    """One entry per MCTS budget; an unpaired one has best_of_n, mean and se None and names the best-of-N
    budget to run (`covering_budget`). best_of_n_added: that budget was run only for this pairing."""
    added = set(added)
    return [{"mcts": c.result.budget, "mcts_tokens": c.result.tokens_per_problem,
             "best_of_n": None if c.baseline is None else c.baseline.budget,
             "best_of_n_tokens": None if c.baseline is None else c.baseline.tokens_per_problem,
             "best_of_n_added": c.baseline is not None and (c.baseline.strategy, c.baseline.budget) in added,
             "mean": c.mean, "se": c.se, "covering_budget": c.covering_budget, "rule": PAIRING_RULE}
            for c in versus]


def write_run_report(workdir, c: RunConfig, greedy: dict, differences, results, value_info: dict, ceiling=None,
                     refit_info: dict | None = None, added: Sequence[tuple[str, int]] = (),
                     search_free_info: dict | None = None) -> Path:
    """report.md, eval.json and scaling.png of the main job; returns report.md's path. `added`: (strategy,
    budget) results run only so that an equal-token pair exists (not in eval.strategies). `search_free_info`:
    `training/search_free.summary`, when the search-free baseline ran."""
    wd = Path(workdir)
    added = [tuple(a) for a in added]
    versus = equal_token_comparisons(results)
    scaling_plot(results, wd / "scaling.png", versus)
    (wd / "eval.json").write_text(json.dumps(
        {"greedy_by_phase": greedy, "paired_differences": [dict(zip(("a", "b", "mean", "se"), d)) for d in differences],
         "mcts_vs_best_of_n": comparisons_json(versus, added), "added_for_pairing": [list(a) for a in added],
         "searches_vs_baselines": search_comparisons_json(results),
         "selection_ceiling": ceiling and ceiling.__dict__, "search_free_baseline": search_free_info,
         "results": [r.__dict__ for r in results]}, indent=1))
    lines = [f"# rlm_jax report: {c.task.name}", "",
             f"Held-out problems: {c.task.num_eval} (strategies: the first "
             f"{c.strategy_problem_count(c.task.num_eval)}); "
             f"model: d_model={c.model['d_model']}, layers={c.model['num_layers']}; "
             f"pretraining: {c.pretrain.steps} steps on random task steps; "
             f"search: K={c.search.num_slots}, L={c.search.step_len}, D={c.search.max_depth}; "
             f"RL: {c.rl.iterations} iteration{'s' if c.rl.iterations != 1 else ''} of {c.rl.algorithm} "
             f"({c.rl.simulations} MCTS simulations, {c.rl.preset}).", "",
             "## Greedy accuracy by phase", "", "| after | greedy accuracy |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in greedy.items()]
    if differences:
        lines += ["", "Paired differences in greedy accuracy on the same problems (+- one standard error):", "",
                  "| | difference |", "|---|---:|"]
        lines += [f"| {a} - {b} | {m:+.3f} +- {se:.3f} |" for a, b, m, se in differences]
    if search_free_info:
        lines += [""] + search_free_section(c, greedy, differences, search_free_info)
    if value_info:
        nan = float("nan")
        lines += ["", "## Value model (after the value phase, before RL)", "",
                  f"Held-out accuracy of sign(V) against exact solvability labels: "
                  f"{value_info.get('value_accuracy', nan):.3f} (best constant predictor: "
                  f"{value_info.get('constant_accuracy', nan):.3f}, {value_info.get('labelled_states', 0)} states). "
                  f"How well it ranks finished solutions (solved above failed; 0.5 = chance; the final value model's "
                  f"is under Selection ceiling): AUC {value_info.get('finished_auc', nan):.3f}."]
    if refit_info:
        lines += ["", "## Value model refit on exact step labels (the final value model)", "",
                  f"Refit after RL on the task's exact labels of the final policy's samples ({c.value_refit.problems} "
                  f"training problems). Held-out accuracy of sign(V): {refit_info['accuracy_before']:.3f} before, "
                  f"{refit_info['value_accuracy']:.3f} after (best constant predictor: "
                  f"{refit_info['constant_accuracy']:.3f}); AUC on finished states: {refit_info['auc_before']:.3f} "
                  f"before, {refit_info['finished_auc']:.3f} after."]
    if ceiling is not None:
        lines += ["", "## Selection ceiling (final models)", "",
                  f"{ceiling.samples} samples per problem at T = {c.eval.temperature} hold "
                  f"{ceiling.distinct_finished:.2f} distinct finished solutions per problem. A perfect verifier's "
                  f"pick among them solves {ceiling.pass_at_n:.3f} of the problems: the ceiling of best-of-N, "
                  f"self-consistency and any other choice among these samples. The value model's pick solves "
                  f"{ceiling.value_pick:.3f}; it ranks solved above failed finished samples with AUC "
                  f"{ceiling.value_auc:.3f}."]
    lines += [""] + strategies_section(results, versus, added) + ["![scaling](scaling.png)", ""]
    (wd / "report.md").write_text("\n".join(lines))
    return wd / "report.md"


def search_free_section(c: RunConfig, greedy: dict, differences, info: dict) -> list[str]:
    """report.md's "RL from search against search-free GRPO" section: both policies' greedy accuracy, their
    paired difference and the training tokens each generated (the baseline at no more than the search)."""
    label = _search_free_label(greedy)
    diff = next(((m, se) for a, b, m, se in differences if a == "RL" and b == label), None)
    out = ["## RL from search against search-free GRPO at equal training tokens", "",
           f"Both from the SFT policy, {c.rl.iterations} iteration{'s' if c.rl.iterations != 1 else ''} on the same "
           f"problems in the same order (the baseline as far as its budget reaches) with the same update schedule "
           f"and rehearsal. RL from search ({c.rl.algorithm} on what "
           f"{c.rl.simulations}-simulation MCTS found) against GRPO over {c.rl.group_size} sampled completions "
           f"per problem (`rl.algorithm=grpo_sampled`), each of its iterations within the tokens the search "
           f"generated in the same iteration.", "",
           "| training | generated tokens | policy update steps | greedy accuracy |", "|---|---:|---:|---:|",
           f"| RL from search | {info['search_generated_tokens']:,} | {info['search_policy_updates']:,} | "
           f"{greedy.get('RL', float('nan')):.3f} |",
           f"| search-free GRPO ({info['problems']:,} problems sampled, {info['solutions']:,} verified solutions) | "
           f"{info['generated_tokens']:,} | {info['policy_updates']:,} | {greedy.get(label, float('nan')):.3f} |"]
    if diff is not None:
        out += ["", f"RL from search - search-free GRPO: {diff[0]:+.3f} +- {diff[1]:.3f} (paired, same problems)."]
    return out


# ----------------------------------------------------------------------- several seeds (experiments/sweep.py)
def _control_label(labels) -> str | None:
    """The control's row label (report.md's greedy table names it "... (control)")."""
    return next((k for k in labels if "control" in k), None)


def _search_free_label(labels) -> str | None:
    """The search-free baseline's row label (`training/search_free.LABEL`)."""
    return next((k for k in labels if k.startswith("search-free")), None)


def seed_figures(workdir) -> dict:
    """The headline figures of one finished run, from its eval.json and progress.json: {figure: value}, a
    value being a float, a (mean, se) paired difference, or for MCTS a dict (an eval.json pairing entry)."""
    wd = Path(workdir)
    ev = json.loads((wd / "eval.json").read_text())
    greedy = ev["greedy_by_phase"]
    control = _control_label(greedy)
    out = {"SFT greedy": greedy.get("SFT"), "control greedy": greedy.get(control) if control else None,
           "RL greedy": greedy.get("RL")}
    diffs = {(d["a"], d["b"]): (d["mean"], d["se"]) for d in ev["paired_differences"]}
    out["RL - control"] = diffs.get(("RL", control))
    out["RL - SFT"] = diffs.get(("RL", "SFT"))
    search_free = _search_free_label(greedy)
    if search_free:
        out["RL - search-free GRPO"] = diffs.get(("RL", search_free))
    phases = json.loads((wd / "progress.json").read_text())["phases"]
    final_value = "value_refit" if phases.get("value_refit", {}).get("info", {}).get("finished_auc") is not None \
        else "value"  # the value model the strategies use: the refit one when the run refit it
    out[f"value AUC ({final_value}, finished held-out states)"] = \
        phases.get(final_value, {}).get("info", {}).get("finished_auc")
    for entry in ev.get("mcts_vs_best_of_n", []):
        out[f"MCTS:{entry['mcts']} - best-of-N at >= its tokens"] = entry
    return out


def _mean_se(values, signed: bool) -> str:
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    fmt = "+.3f" if signed else ".3f"
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:{fmt}} (1 seed)"
    return f"{v.mean():{fmt}} +- {v.std(ddof=1) / np.sqrt(len(v)):.3f} ({len(v)} seeds)"


def sweep_summary(runs) -> str:
    """summary.md of several seeds of one config: each headline figure per seed (runs: {seed: workdir}, each
    finished) and the mean +- standard error across seeds (of the seeds that have the figure). A paired
    difference's cell is its own mean +- SE on that seed's problems; "> 2 SE" counts the seeds where it
    exceeds two of its standard errors (the bar a result must clear on every seed)."""
    seeds = list(runs)
    figures = {s: seed_figures(runs[s]) for s in seeds}
    names = list(dict.fromkeys(name for s in seeds for name in figures[s]))
    lines = [f"# Sweep over seeds {', '.join(map(str, seeds))}", "",
             "Per seed: accuracy on that seed's held-out problems; a difference is paired on the same problems "
             "(+- one standard error). Across seeds: mean +- standard error of the per-seed figures. MCTS "
             f"against best-of-N: {PAIRING_RULE}; the cell gives both budgets and both token counts.", "",
             "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- SE across seeds | seeds > 2 SE |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for name in names:
        cells, values, clear = [], [], []
        for s in seeds:
            v = figures[s].get(name)
            if isinstance(v, dict) and v.get("best_of_n") is None:  # an MCTS budget without a fair pair
                cells.append(f"not paired: no best-of-N with >= {v['mcts_tokens']:.0f} tokens")
            elif isinstance(v, dict):  # an MCTS pairing: the difference, both budgets, both token counts
                cells.append(f"{v['mean']:+.3f} +- {v['se']:.3f} (best-of-{v['best_of_n']}; "
                             f"{v['mcts_tokens']:.0f} vs {v['best_of_n_tokens']:.0f} tokens)")
                values.append(v["mean"])
                clear.append(v["mean"] > 2 * v["se"])
            elif isinstance(v, (tuple, list)):  # a paired difference
                cells.append(f"{v[0]:+.3f} +- {v[1]:.3f}")
                values.append(v[0])
                clear.append(v[0] > 2 * v[1])
            elif v is None:
                cells.append("-")
            else:
                cells.append(f"{v:.3f}")
                values.append(v)
        count = f"{sum(clear)}/{len(seeds)}" if clear else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_se(values, bool(clear))} | {count} |")
    return "\n".join(lines) + "\n"
