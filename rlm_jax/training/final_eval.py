"""The last phase: greedy accuracy of every phase's policy (and of model.init's pretrained one), every strategy with the final models, the report.

Greedy runs on every held-out problem, with paired differences (each later policy against SFT, RL against the
control and against the search-free baseline); the strategies (which cost far more) on the first eval.strategy_problems (0: all). When an MCTS budget
or another tree search used more tokens than every configured best-of-N budget, best-of-N also runs at a budget
that covers it (`report.cover_search_tokens`), so the report's equal-token comparisons never give best-of-N
fewer tokens. A rerun of a
finished run evaluates again only when the config changed (its stamp).
"""
from __future__ import annotations

import jax

from rlm_jax import config as config_lib
from rlm_jax import evaluation, multihost, report, statistics
from rlm_jax import workdir as wd_lib
from rlm_jax.training import control, search_free, sft
from rlm_jax.training.phases import Phase

PRETRAINED = "pretrained"  # the greedy row of model.init's weights


def policies(c, results) -> dict:
    """label -> (policy, value model) of every policy the report compares; the strategies use the last one."""
    final_value = results["value_refit"]
    out = {"SFT": (results["sft"], results["value"])}
    if results.get("rl_control") is not None:
        out[control.LABEL] = (results["rl_control"], results["value"])
    if results.get(search_free.NAME) is not None:
        out[search_free.LABEL] = (results[search_free.NAME], results["value"])
    if c.rl.iterations:
        out["RL"] = (results["rl"]["policy"], final_value)
    else:  # the strategies run with the last checkpoint's models
        out["SFT"] = (results["sft"], final_value)
    return out


def evaluate_run(run, results):
    c, tok, cfg = run.c, results["tokenizer"], run.model_config(results)
    ev, key = results["data"]["eval"], run.phase_key("eval")
    spec = c.lm_spec(cfg, tok, task=run.task)
    checkpoints = policies(c, results)
    if c.init_folder() is not None:  # the pretrained model before any training: what SFT and RL added to it
        checkpoints = {PRETRAINED: (sft.initial_policy(run, {**results, "pretrain": None}), None), **checkpoints}
    greedy, solved = {}, {}
    for label, (pol, val) in checkpoints.items():
        r = evaluation.evaluate(spec, pol, val, tok, run.task, ev, [("greedy", 1)], key, c.eval.batch_size,
                                c.search.prompt_len, mesh=run.mesh)[0]
        greedy[label], solved[label] = r.accuracy, r.solved
        run.log(f"eval: greedy accuracy after {label}: {r.accuracy:.3f}")
    pairs = [(label, "SFT") for label in solved if label != "SFT"]
    pairs += [("RL", b) for b in (control.LABEL, search_free.LABEL) if {"RL", b} <= solved.keys()]
    differences = [(a, b, *statistics.paired_difference(solved[a], solved[b])) for a, b in pairs if len(ev) > 1]
    pol, val = list(checkpoints.values())[-1]
    problems = ev[:c.strategy_problem_count(len(ev))]
    strategies = evaluation.parse_strategies(c.eval.strategies)
    run_strategies = lambda names, k: evaluation.evaluate(  # noqa: E731
        spec, pol, val, tok, run.task, problems, names, k, c.eval.batch_size, c.search.prompt_len,
        c.eval.mcts_preset, num_parallel=c.search.num_parallel, mesh=run.mesh,
        progress=lambda r: run.log(f"eval: {r.strategy}:{r.budget} accuracy {r.accuracy:.3f}, "
                                   f"{r.tokens_per_problem:.0f} tokens/problem, {r.seconds:.1f}s"))
    results_ = run_strategies(strategies, key)
    results_, added = report.cover_search_tokens(results_, lambda budget, i: run_strategies(
        [("best_of_n", budget)], jax.random.fold_in(key, 100 + i))[0])
    for name, budget in added:
        run.log(f"eval: {name}:{budget} added: a tree search used more tokens than every configured best-of-N "
                f"budget")
    # What the final policy's samples offer any selection rule, at the largest sampling budget.
    budgets = [b for name, b in strategies if name in ("best_of_n", "self_consistency")]
    ceiling = evaluation.selection_ceiling(spec, pol, val, tok, run.task, problems, max(budgets),
                                           jax.random.fold_in(key, 1), c.eval.batch_size, c.search.prompt_len,
                                           mesh=run.mesh) if budgets else None
    if ceiling is not None:
        run.log(f"eval: selection ceiling of {ceiling.samples} samples: pass@{ceiling.samples} "
                f"{ceiling.pass_at_n:.3f}, value pick {ceiling.value_pick:.3f}, AUC {ceiling.value_auc:.3f}")
    if multihost.is_primary():  # one report per run, not one per host
        path = report.write_run_report(run.workdir, c, greedy, differences, results_,
                                       wd_lib.phase_info(run.workdir, "value"), ceiling,
                                       wd_lib.phase_info(run.workdir, "value_refit") if c.value_refit.steps else None,
                                       added, search_free.summary(run) if search_free.LABEL in greedy else None)
        run.log(f"report: {path}")
    return None, {"greedy": greedy}


PHASE = Phase("eval", evaluate_run, load=lambda run, results: None,
              stamp=lambda run: {"config": config_lib.to_dict(run.c)})
