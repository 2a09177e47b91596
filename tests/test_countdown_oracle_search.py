"""On countdown with a hand-made oracle policy/value (no learning), MCTS finds solutions the greedy
chain misses, and its success rises with the number of simulations.

The environment (rlm_jax.search.countdown_env) is checked against the task's brute-force solver
(`final_values`, `Rules.moves`); every claimed solution is replayed by the task's verifier.
"""
import random

import jax
import numpy as np
import pytest

from rlm_jax.search import countdown_env as ce
from rlm_jax.search import mcts
from rlm_jax.tasks.base import Score
from rlm_jax.tasks.countdown import CountdownTask, Rules, final_values

RULES = Rules(fractions=False, non_negative=True)
ENV = ce.CountdownEnv(num_numbers=4, logit_noise=1.0, hint_bonus=3.0, hint_prob=0.5, value_mean=0.5,
                      value_noise=0.6)
SIMULATIONS = (4, 16, 64)


def _random_states(rng, count):
    """4 slots, 1..4 of them live, values 0..40 (0 arises from a-a), targets half reachable."""
    states, targets = [], []
    for _ in range(count):
        live = rng.randint(1, 4)
        vals = [rng.randint(0, 40) if rng.random() < 0.9 else 0 for _ in range(live)]
        slots = vals + [ce.USED] * (4 - live)
        rng.shuffle(slots)
        reachable = sorted(final_values(tuple(sorted(vals)), RULES))
        targets.append(rng.choice(reachable) if rng.random() < 0.5 else rng.randint(0, 120))
        states.append(slots)
    return np.array(states, np.int32), np.array(targets, np.int32)


def test_env_moves_and_solvability_match_the_task_solver():
    rng = random.Random(0)
    nums, targets = _random_states(rng, 200)
    got = np.asarray(jax.jit(lambda n, t: ce.reaches(n, t, 4))(nums, targets))
    nxt, legal, _ = map(np.asarray, jax.jit(lambda n: ce.successors(n, 4))(nums))
    for s, t, r, nx, lg in zip(nums, targets, got, nxt, legal):
        live = tuple(sorted(int(v) for v in s if v != ce.USED))
        assert r == (t in final_values(live, RULES)), (s, t)
        mine = {tuple(sorted(int(v) for v in row if v != ce.USED)) for row in nx[lg]}
        theirs = {m[-1] for m in RULES.moves(live)}
        assert mine == theirs, (s, mine ^ theirs)
    assert 0.3 < got.mean() < 0.8  # both outcomes are exercised


@pytest.fixture(scope="module")
def problems():
    task = CountdownTask(pool=3)
    probs = [task.generate(seed=1000 + i, difficulty=(i % 10) / 10) for i in range(64)]
    numbers = np.array([p["meta"]["numbers"] for p in probs], np.int32)
    target = np.array([p["meta"]["target"] for p in probs], np.int32)
    return task, probs, numbers, target


def _verified(task, probs, numbers, actions, claimed):
    """Replays each move sequence with the task's verifier; it must agree with the env's claim."""
    ok = np.array([task.verify(p, "\n".join(ce.path_texts(n, a, 4))) == Score.SOLVED
                   for p, n, a in zip(probs, numbers, actions)])
    np.testing.assert_array_equal(ok, claimed)
    return ok


def test_mcts_beats_the_greedy_chain_and_improves_with_simulations(problems):
    task, probs, numbers, target = problems
    assert np.asarray(ENV.root(numbers, target).value).shape == (64,)
    greedy, actions = jax.jit(ENV.greedy_chain)(numbers, target)
    greedy = _verified(task, probs, numbers, np.asarray(actions), np.asarray(greedy))

    config = mcts.SearchConfig(rule="puct")  # PUCT with the oracle's prior and value, no root noise
    rates, solved = {}, {}
    for sims in SIMULATIONS:
        out = mcts.mcts(None, jax.random.key(0), ENV.root(numbers, target), ENV, sims, config)
        path = np.asarray(out.best_path)
        moves = np.asarray(out.tree.action_from_parent)[np.arange(64)[:, None], np.maximum(path, 0)]
        claimed = np.asarray(ENV.solved(out))
        seqs = [m[1:][p[1:] >= 0] if c else [] for m, p, c in zip(moves, path, claimed)]
        solved[sims] = _verified(task, probs, numbers, seqs, claimed)
        rates[sims] = solved[sims].mean()
    msg = f"greedy {greedy.mean():.3f}, mcts {rates}"
    assert greedy.mean() < rates[64], msg
    assert (solved[64] & ~greedy).sum() >= 8, msg  # solutions the greedy chain misses
    tol = 2 / 64
    assert rates[4] <= rates[16] + tol and rates[16] <= rates[64] + tol, msg
    assert rates[64] >= rates[4] + 0.2, msg
