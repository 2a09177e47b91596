"""The search-free baseline (rl.search_free_baseline): sampled GRPO at no more tokens than RL from search generated.

`search_rl.budget_batches` is checked against its contract on random spends; the phase runs in-process on the
tiny config from random models, with RL's record of a token budget per iteration.
"""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlm_jax import config, parallel
from rlm_jax import progress as progress_lib
from rlm_jax.config_utils import load_config
from rlm_jax.models import heads
from rlm_jax.training import phases, pipeline, search_free
from rlm_jax.training import search_rl
from rlm_jax.training.search_rl import budget_batches

ROOT = Path(__file__).resolve().parents[1]


def test_budget_batches_never_exceed_the_budget_and_stop_only_when_nothing_fits():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n, batch, worst = int(rng.integers(1, 60)), int(rng.integers(1, 9)), int(rng.integers(1, 50))
        budget = int(rng.integers(0, n * worst + 50))
        spent, covered = 0, 0
        for lo, hi in budget_batches(n, batch, budget, worst, lambda: spent):
            assert lo == covered and 0 < hi - lo <= batch and hi <= n
            spent += int(rng.integers(1, worst + 1, size=hi - lo).sum())  # what each problem actually cost
            covered = hi
        assert spent <= budget
        assert covered == n or budget - spent < worst  # it stopped only where one more problem might not fit
    assert list(budget_batches(10, 4, None, 7, lambda: 0)) == [(0, 10)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config's data and tokenizer phases, and random SFT and value models on its mesh."""
    workdir = tmp_path_factory.mktemp("search_free")
    c = config.from_configdict(load_config(ROOT / "configs" / "tiny.py"))
    c = dataclasses.replace(c, rl=dataclasses.replace(c.rl, iterations=2, group_size=4, search_free_baseline=True))
    run, results = phases.run_phases(c, workdir, pipeline.PHASES[:2])
    cfg, vcfg = run.model_config(results), run.value_config(results)
    policy = parallel.init_sharded_params(cfg, jax.random.key(0), run.mesh)
    value = heads.init_value_params(vcfg, c.value_head, jax.random.key(1))
    return c, workdir, {**results, "sft": policy, "value": value}


@pytest.mark.slow  # ~45 s; the budget rule itself is checked above in the default run
def test_the_baseline_samples_within_each_iterations_budget_and_trains(tiny_run):
    c, workdir, results = tiny_run
    worst = c.rl.group_size * c.lm_spec(c.model_config(results["tokenizer"].vocab_size), results["tokenizer"]).context_len
    budgets = [700, 3 * worst + 5]
    for it, b in enumerate(budgets):
        progress_lib.mark_done(workdir, f"rl_{it}", {"generated_tokens": b})
    run = phases.Run(c, workdir)
    before = jax.tree.map(np.asarray, results["sft"])
    trained = phases.run_phase(run, search_free.PHASE, results)
    run.writer.close()
    progress = json.loads((workdir / "progress.json").read_text())["phases"]
    for it, b in enumerate(budgets):
        info = progress[f"{search_free.NAME}_{it}"]["info"]
        assert info["token_budget"] == b and 0 < info["generated_tokens"] <= b
        assert info["problems"] == c.rl.problems_per_iteration or b - info["generated_tokens"] < worst, info
        assert info["samples"] == info["problems"] * c.rl.group_size
        assert info["policy_updates"] > 0 and "value_loss" not in info  # the baseline's value model is never used
    total = progress[search_free.NAME]["info"]
    assert total["search_generated_tokens"] == sum(budgets)
    assert total["policy_updates"] == sum(progress[f"{search_free.NAME}_{it}"]["info"]["policy_updates"]
                                          for it in range(2))
    assert total["generated_tokens"] == sum(progress[f"{search_free.NAME}_{it}"]["info"]["generated_tokens"]
                                            for it in range(2))
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained)))


def test_without_rls_token_record_the_baseline_says_what_to_do(tiny_run, tmp_path):
    c, _, results = tiny_run
    run = phases.Run(c, tmp_path)
    with pytest.raises(ValueError, match="recorded no generated_tokens.*rl.search_free_baseline=False"):
        search_free.token_budgets(run)
    run.writer.close()


def test_rl_from_search_still_searches_all_its_problems_at_once_with_the_phase_key(tiny_run, tmp_path, monkeypatch):
    """Without budgets an iteration is RL from search as before: one run_search call over every problem of the
    iteration, with the iteration's key unchanged (so earlier runs' figures come back)."""
    c, _, results = tiny_run
    calls = []
    monkeypatch.setattr(search_rl, "run_search", lambda spec, pol, val, prompts, pad, key, *a, **kw: calls.append(
        (len(prompts), list(kw["problem_ids"]), key)) or iter(()))
    run = phases.Run(c, tmp_path)
    iters = search_rl.Iterations(run, results)
    iters.search(1)
    run.writer.close()
    (n, ids, key), = calls
    assert n == len(ids) == c.rl.problems_per_iteration
    assert ids == search_rl.iteration_problems(len(iters.pool), 1, c.rl.problems_per_iteration)
    assert (jax.random.key_data(key) == jax.random.key_data(jax.random.fold_in(run.phase_key("rl"), 1))).all()
    with pytest.raises(ValueError, match="grpo_sampled"):
        search_rl.Iterations(run, results, budgets=[10])  # a budget bounds sampling only


def test_the_baseline_runs_only_beside_rl_from_search():
    c = config.from_configdict(load_config(ROOT / "configs" / "countdown.py"))
    assert c.rl.search_free_baseline and search_free.PHASE.enabled(c)  # the default runs it
    for change in ({"algorithm": "grpo_sampled"}, {"iterations": 0}, {"search_free_baseline": False}):
        assert not search_free.PHASE.enabled(dataclasses.replace(c, rl=dataclasses.replace(c.rl, **change)))
