"""What a run or an evaluation writes: report.md (tables), eval.json (the figures, for tools) and scaling.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rlm_jax import evaluation, statistics
from rlm_jax.config import RunConfig


def equal_token_comparisons(results: Sequence[evaluation.Result], strategy: str = "mcts", baseline: str = "best_of_n"):
    """[(result, baseline result, mean, se)]: each `strategy` result against the `baseline` result with the
    fewest tokens at or above its own (the baseline never gets less compute), else the baseline's largest,
    as a paired difference on the same problems. Empty when either strategy is missing."""
    base = sorted((r for r in results if r.strategy == baseline), key=lambda r: r.tokens_per_problem)
    out = []
    for r in results:
        if r.strategy != strategy or not base or len(r.solved) < 2:
            continue
        b = next((b for b in base if b.tokens_per_problem >= r.tokens_per_problem), base[-1])
        out.append((r, b, *statistics.paired_difference(r.solved, b.solved)))
    return out


def comparison_table(comparisons) -> str:
    """`equal_token_comparisons` as markdown: what was paired with what, then the table."""
    rows = ["Each MCTS budget against the best-of-N budget with the fewest generated tokens at or above its own "
            "(where none has that many, the largest best-of-N budget): paired differences in accuracy on the same "
            "problems.", "", "| strategy (tokens) | against (tokens) | accuracy difference +- 1 SE |", "|---|---|---:|"]
    rows += [f"| {r.strategy}:{r.budget} ({r.tokens_per_problem:.0f}) | {b.strategy}:{b.budget} "
             f"({b.tokens_per_problem:.0f}) | {m:+.3f} +- {se:.3f} |" for r, b, m, se in comparisons]
    return "\n".join(rows)


def markdown_table(results: Sequence[evaluation.Result]) -> str:
    rows = ["| strategy | budget | accuracy | generated tokens / problem | seconds |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {r.strategy} | {r.budget} | {r.accuracy:.3f} | {r.tokens_per_problem:.1f} | {r.seconds:.1f} |"
             for r in results]
    return "\n".join(rows)


def per_level_table(results: Sequence[evaluation.Result]) -> str:
    levels = sorted({lv for r in results for lv in r.per_level})
    rows = ["| strategy | budget | " + " | ".join(f"L{lv}" for lv in levels) + " |",
            "|---|---:|" + "---:|" * len(levels)]
    for r in results:
        rows.append(f"| {r.strategy} | {r.budget} | " +
                    " | ".join(f"{r.per_level.get(lv, float('nan')):.2f}" for lv in levels) + " |")
    return "\n".join(rows)


def scaling_plot(results: Sequence[evaluation.Result], path) -> None:
    """Accuracy against generated tokens per problem, one curve per strategy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.strategy for r in results):
        pts = sorted((r.tokens_per_problem, r.accuracy) for r in results if r.strategy == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy")
    ax.set_title("test-time compute scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def strategies_section(results, versus) -> list[str]:
    """The strategy table, the equal-token comparison (when there is one) and the per-level table."""
    lines = ["## Strategies (final models)", "",
             "Seconds include compilation. Tokens: all tokens sampled, proposals not chosen included.", "",
             markdown_table(results), ""]
    if versus:
        lines += ["## MCTS against best-of-N at equal tokens", "", comparison_table(versus), ""]
    return lines + ["## Accuracy per level", "", per_level_table(results), ""]


def comparisons_json(versus) -> list[dict]:
    return [{"mcts": r.budget, "mcts_tokens": r.tokens_per_problem, "best_of_n": b.budget,
             "best_of_n_tokens": b.tokens_per_problem, "mean": m, "se": se} for r, b, m, se in versus]


def write_run_report(workdir, c: RunConfig, greedy: dict, differences, results, value_info: dict, ceiling=None,
                     refit_info: dict | None = None) -> Path:
    """report.md, eval.json and scaling.png of the main job; returns report.md's path."""
    wd = Path(workdir)
    scaling_plot(results, wd / "scaling.png")
    versus = equal_token_comparisons(results)
    (wd / "eval.json").write_text(json.dumps(
        {"greedy_by_phase": greedy, "paired_differences": [dict(zip(("a", "b", "mean", "se"), d)) for d in differences],
         "mcts_vs_best_of_n": comparisons_json(versus),
         "selection_ceiling": ceiling and ceiling.__dict__, "results": [r.__dict__ for r in results]}, indent=1))
    lines = [f"# rlm_jax report: {c.task.name}", "",
             f"Held-out problems: {c.task.num_eval} (strategies: the first "
             f"{c.strategy_problem_count(c.task.num_eval)}); "
             f"model: d_model={c.model['d_model']}, layers={c.model['num_layers']}; "
             f"pretraining: {c.pretrain.steps} steps on random task steps; "
             f"search: K={c.search.num_slots}, L={c.search.step_len}, D={c.search.max_depth}; "
             f"RL: {c.rl.iterations} iterations of {c.rl.algorithm} "
             f"({c.rl.simulations} MCTS simulations, {c.rl.preset}).", "",
             "## Greedy accuracy by phase", "", "| after | greedy accuracy |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in greedy.items()]
    if differences:
        lines += ["", "Paired differences in greedy accuracy on the same problems (+- one standard error):", "",
                  "| | difference |", "|---|---:|"]
        lines += [f"| {a} - {b} | {m:+.3f} +- {se:.3f} |" for a, b, m, se in differences]
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
    lines += [""] + strategies_section(results, versus) + ["![scaling](scaling.png)", ""]
    (wd / "report.md").write_text("\n".join(lines))
    return wd / "report.md"
