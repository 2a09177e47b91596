"""The search-free baseline (`rl.search_free_baseline`): does search pay during training?

RL's iterations again, from the same SFT policy, with `grpo_sampled` in place of the search: `rl.group_size`
sampled completions per problem, group-normalised verifier rewards, the clipped-ratio + KL update, the same
problems in the same order, the same update schedule and SFT rehearsal. Each iteration may generate no more
tokens than RL from search generated in its own (`generated_tokens` of `rl_<it>`): a sampling batch holds
only the problems sure to fit in what is left of that budget (`search_rl.budget_batches`), so the
baseline ends at or below RL's training tokens, never above (short by less than group_size x D x L tokens
an iteration; the small tail batches this takes cost some sampling time). The report pairs the two policies' greedy
accuracy on the same held-out problems and states both token counts.
"""
from __future__ import annotations

from rlm_jax import progress
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


def summary(run) -> dict:
    """The report's figures, summed over the iterations of both: tokens generated, update steps, problems sampled
    and verified solutions of the baseline; tokens and update steps of RL from search."""
    its = range(run.c.rl.iterations)
    recorded = progress.read_progress(run.workdir)
    total = lambda phase, k: sum(int(recorded.get(f"{phase}_{it}", {}).get("info", {}).get(k, 0))  # noqa: E731
                                 for it in its)
    return {**{k: total(NAME, k) for k in ("generated_tokens", "policy_updates", "problems", "solutions")},
            "search_generated_tokens": total("rl", "generated_tokens"),
            "search_policy_updates": total("rl", "policy_updates")}


def _search_free(run, results):
    iters = search_rl.Iterations(run, results, name=NAME, algorithm="grpo_sampled", budgets=token_budgets(run),
                                  train_value=False)  # only its policy is compared
    for it in range(run.c.rl.iterations):
        run.resumable(f"{NAME}_{it}", lambda: iters.step(it), lambda _: iters.save(it), lambda: iters.load(it))
    return iters.state["policy"], summary(run)


PHASE = Phase(NAME, _search_free, like=lambda run, results: run.like(run.model_config(results)),
              # a grpo_sampled run is its own search-free baseline
              enabled=lambda c: c.rl.search_free_baseline and c.rl.iterations > 0 and c.rl.algorithm != "grpo_sampled",
              stamp=lambda run: {"iterations": run.c.rl.iterations, "group_size": run.c.rl.group_size})
