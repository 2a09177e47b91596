"""The search-free baseline (`rl.search_free_baseline`): does search pay during training?

RL's iterations again, from the same SFT policy, with `grpo_sampled` in place of the search: `rl.group_size`
sampled completions per problem, group-normalised verifier rewards, the clipped-ratio + KL update, the same
problems in the same order, the same update schedule and SFT rehearsal. Each iteration may generate no more
tokens than RL from search generated in its own (`generated_tokens` of `rl_<it>`): a sampling batch holds
only the problems sure to fit in what is left of that budget (`search_rl.budget_batches`), so the
baseline ends at or below RL's training tokens, never above. The report pairs the two policies' greedy
accuracy on the same held-out problems and states both token counts.
"""
from __future__ import annotations

from rlm_jax import workdir as wd_lib
from rlm_jax.training import search_rl
from rlm_jax.training.phases import Phase

NAME = "rl_search_free"
LABEL = "search-free GRPO at RL's training tokens"  # its row in the report


def token_budgets(run) -> list[int]:
    """Per RL iteration, the tokens RL from search generated in it (what the baseline may spend)."""
    out = []
    for it in range(run.c.rl.iterations):
        spent = wd_lib.phase_info(run.workdir, f"rl_{it}").get("generated_tokens")
        if spent is None:
            raise ValueError(f"{run.workdir}: RL iteration {it} recorded no generated_tokens (it ran before they were "
                             "counted), so the search-free baseline has no budget; rerun RL in a new --workdir, or set "
                             "rl.search_free_baseline=False")
        out.append(int(spent))
    return out


def _search_free(run, results):
    budgets = token_budgets(run)
    iters = search_rl._Iterations(run, results, name=NAME, algorithm="grpo_sampled", budgets=budgets,
                                  train_value=False)  # only its policy is compared
    totals = {"generated_tokens": 0, "problems": 0, "solutions": 0}
    for it in range(run.c.rl.iterations):
        run.resumable(f"{NAME}_{it}", lambda: iters.step(it), lambda _: iters.save(it), lambda: iters.load(it))
        info = wd_lib.phase_info(run.workdir, f"{NAME}_{it}")
        totals = {k: v + int(info[k]) for k, v in totals.items()}
    return iters.state["policy"], {**totals, "search_generated_tokens": sum(budgets)}


PHASE = Phase(NAME, _search_free, like=lambda run, results: run.like(run.model_config(results)),
              enabled=lambda c: c.rl.search_free_baseline and c.rl.iterations > 0,
              stamp=lambda run: {"iterations": run.c.rl.iterations, "group_size": run.c.rl.group_size})
