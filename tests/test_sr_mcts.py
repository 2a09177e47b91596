"""Self-refine MCTS (rlm_jax/search/sr_mcts.py) and its Refine operator: prefix values against the value model
read on each prefix alone, the flagged step against a Python argmin, and a whole search replayed in Python
(UCT selection from the backed-up statistics, the kept prefix, the scores, the answer). Tiny random models
(tests/helpers_search.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_search import D, EOS, L, PAD, WordTokenizer, path_steps, tiny_inputs, tiny_models, tiny_spec
from rlm_jax import evaluation
from rlm_jax.search import lm
from rlm_jax.search import operators as ops
from rlm_jax.search import sampling, sr_mcts
from rlm_jax.search.base import Proposals
from rlm_jax.search.tree import NONE, ROOT


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _random_paths(rng, n):
    """n paths of 0..D steps of 1..L random tokens (slots after the last step empty)."""
    steps, mask = np.full((n, D, L), PAD), np.zeros((n, D, L), bool)
    for i in range(n):
        for j in range(rng.integers(0, D + 1)):
            size = rng.integers(1, L + 1)
            steps[i, j, :size], mask[i, j, :size] = rng.integers(3, 16, size=size), True
    return jnp.asarray(steps), jnp.asarray(mask)


def test_step_values_are_the_value_model_read_on_each_prefix(models):
    policy, value = models
    spec, rng = tiny_spec(), np.random.default_rng()
    inputs = tiny_inputs(policy, value, int(rng.integers(1 << 30)), 12)
    steps, mask = _random_paths(rng, 12)
    got = np.asarray(jax.jit(ops.evaluate_steps, static_argnums=0)(spec, value, inputs["prompt"],
                                                                   inputs["prompt_mask"], steps, mask))
    depth = np.asarray(mask.any(-1).sum(-1))
    for j in range(D + 1):
        keep = (jnp.arange(D) < j)[None, :, None]
        ctx, ctx_mask = ops.context(inputs["prompt"], inputs["prompt_mask"], jnp.where(keep, steps, PAD), mask & keep)
        want = np.asarray(ops.evaluate_value(spec, value, ctx, ctx_mask))
        # Past the last step the prefix is the whole path: its value repeats.
        np.testing.assert_allclose(got[:, j], np.where(j <= depth, want, got[np.arange(12), depth]), atol=2e-5)
    assert np.ptp(got[:, 1:][depth > 1]) > 0.05, "the values must vary for this test to mean something"


def test_weakest_step_is_the_largest_value_drop_within_the_path():
    rng = np.random.default_rng()
    values = rng.uniform(-1, 1, size=(500, D + 1)).astype(np.float32)
    depth = rng.integers(0, D + 1, size=500)
    got = np.asarray(ops.weakest_step(jnp.asarray(values), jnp.asarray(depth)))
    for v, d, j in zip(values, depth, got):
        assert j == (int(np.argmin(np.diff(v)[:d])) if d else 0)


def _replay(out, b, exploration, verifier_scores=None):
    """Replays one problem's search from its outputs: every node's parent is the UCT choice given the nodes
    before it, keeps its parent's steps before the rewritten slot, which is the parent's weakest step; its score
    is its last prefix value (or the verifier's) when finished, else -1; the statistics are the backups."""
    g = out.graph
    used = int(g.num_nodes[b])
    visits, vsum = [1], [float(out.values[b, ROOT, 0])]
    parent_of = [NONE]
    for i in range(1, used):
        total = visits[ROOT]
        uct = [vsum[n] / visits[n] + exploration * math.sqrt(math.log(total) / visits[n]) for n in range(i)]
        p = int(g.parents[b, i, 0])
        assert uct[p] >= max(uct) - 1e-4, (b, i, p, uct)
        j = int(out.rewritten[b, i])
        pv, pm = out.values[b, p], out.mask[b, p]
        p_depth = int(pm.any(-1).sum())
        assert j == (0 if p == ROOT else (int(np.argmin(np.diff(pv)[:p_depth])) if p_depth else 0)), (b, i)
        mine, parents = path_steps(out.steps[b, i], out.mask[b, i]), path_steps(out.steps[b, p], pm)
        assert mine[:j] == parents[:j], (b, i, "the steps before the rewritten one are kept")
        finished = bool(g.terminal[b, i])
        assert finished == (len(mine) > 0 and mine[-1][-1] == EOS and all(s[-1] != EOS for s in mine[:-1]))
        score = (verifier_scores(mine) if verifier_scores else float(out.values[b, i, -1])) if finished else -1.0
        np.testing.assert_allclose(g.raw_value[b, i], score, atol=1e-5)
        visits.append(1)
        vsum.append(score)
        parent_of.append(p)
        n = i
        while n != NONE:  # the backup: the node and each ancestor, once
            visits[n] += 1
            vsum[n] += score
            n = parent_of[n]
    np.testing.assert_array_equal(g.visits[b, :used], visits)
    np.testing.assert_allclose(g.value_sum[b, :used], vsum, atol=1e-4)
    return used


SEARCH = dict(seed=int(np.random.default_rng().integers(1 << 30)), batch=16, solutions=8)


@pytest.fixture(scope="module")
def search(models):
    """One inference-mode search of 8 solutions on 16 fresh problems: (spec, inputs, key, output)."""
    policy, value = models
    spec, inputs = tiny_spec(temperature=1.0), tiny_inputs(policy, value, SEARCH["seed"], SEARCH["batch"])
    key = jax.random.key(SEARCH["seed"])
    return spec, inputs, key, jax.tree.map(np.asarray, sr_mcts.sr_mcts_jit(spec, inputs, key, solutions=8))


def test_a_search_replayed_in_python(search):
    *_, out = search
    refined, rewrote_later = 0, 0
    for b in range(SEARCH["batch"]):
        assert _replay(out, b, 1.0) == 9
        refined += int(np.sum(out.graph.parents[b, 1:, 0] != ROOT))
        rewrote_later += int(np.sum(out.rewritten[b, 1:] > 0))
        done = [i for i in range(1, 9) if out.graph.terminal[b, i]]
        a = out.answer
        assert bool(a.finished[b]) == bool(done)
        if done:  # the best-scored finished solution
            best = max(done, key=lambda i: out.graph.raw_value[b, i])
            assert path_steps(a.steps[b], a.mask[b]) == path_steps(out.steps[b, best], out.mask[b, best])
    assert refined >= 40 and rewrote_later >= 10, (refined, rewrote_later)


def test_fewer_solutions_are_the_start_of_the_same_search_at_lower_cost(search):
    spec, inputs, key, large = search
    small = jax.tree.map(np.asarray, sr_mcts.sr_mcts_jit(spec, inputs, key, solutions=3))
    np.testing.assert_array_equal(small.steps, large.steps[:, :4])
    np.testing.assert_array_equal(small.graph.parents, large.graph.parents[:, :4])
    assert (large.answer.generated_tokens > small.answer.generated_tokens).all()
    assert (large.answer.cost > small.answer.cost).all()
    # Every token written from a rewritten slot on was sampled (besides the K - 1 proposals not kept).
    regenerated = np.sum(large.mask[:, 1:] & (np.arange(D) >= large.rewritten[:, 1:, None])[..., None], axis=(1, 2, 3))
    assert (large.answer.generated_tokens >= regenerated).all()


def test_in_training_mode_finished_solutions_are_scored_by_the_verifier(models):
    policy, value = models
    score_of = lambda steps: 1.0 if sum(map(len, steps)) % 2 else -1.0  # noqa: E731

    def verifier(index, steps, mask):
        return np.array([score_of(path_steps(s, m)) for s, m in zip(steps, mask)], np.float32)

    spec = tiny_spec(temperature=1.0, verifier=verifier)
    inputs = tiny_inputs(policy, value, 5, 6)
    inputs = lm.search_inputs(inputs["policy"], inputs["value"], inputs["prompt"], inputs["prompt_mask"],
                              jnp.arange(6, dtype=jnp.int32))
    out = jax.tree.map(np.asarray, sr_mcts.sr_mcts_jit(spec, inputs, jax.random.key(2), solutions=5))
    for b in range(6):
        _replay(out, b, 1.0, verifier_scores=score_of)
    assert out.graph.terminal.any()


def test_it_needs_a_value_model_and_the_evaluation_runs_it_by_name(models, search):
    policy, _ = models
    with pytest.raises(ValueError, match="value model"):
        sr_mcts.sr_mcts_jit(tiny_spec(value=None, head=None), tiny_inputs(policy, None, 0, 2), jax.random.key(0),
                            solutions=2)
    with pytest.raises(ValueError, match="value model"):
        evaluation.parse_strategies("sr_mcts:4", value_model=False)
    with pytest.raises(ValueError, match="rewrites=0"):
        sr_mcts.sr_mcts_jit(tiny_spec(), tiny_inputs(policy, None, 0, 2), jax.random.key(0), solutions=2, rewrites=0)
    spec, inputs, key, out = search
    assert evaluation.parse_strategies("sr_mcts:8") == [("sr_mcts", 8)]
    assert spec.num_slots == 2, "the evaluation proposes 2 rewrites; the fixture's search must too"
    texts, tokens = evaluation.run_strategy("sr_mcts", 8, spec, inputs, key, WordTokenizer())
    np.testing.assert_array_equal(tokens, out.answer.generated_tokens)
    assert texts == list(sampling.solution_texts(WordTokenizer(), out.answer))


def test_the_rewrite_is_the_best_valued_usable_proposal_that_differs_from_the_old_step():
    rng = np.random.default_rng()
    b, k = 400, 3
    tokens = rng.integers(3, 6, size=(b, k, 2))  # few distinct steps: repeats of the old one are common
    old = rng.integers(3, 6, size=(b, 2))
    ok = rng.random((b, k)) < 0.8
    has_old = rng.random(b) < 0.8
    value = rng.uniform(-1, 1, size=(b, k)).astype(np.float32)
    props = Proposals(tokens=jnp.asarray(tokens), mask=jnp.ones((b, k, 2), bool), logprob=jnp.zeros((b, k)),
                      length=jnp.full((b, k), 2), terminal=jnp.zeros((b, k), bool), ok=jnp.asarray(ok))
    got = np.asarray(sr_mcts.choose_rewrite(tiny_spec(), props, jnp.asarray(value), jnp.asarray(old),
                                            jnp.asarray(has_old)))
    for i in range(b):
        # Usable: not truncated, and not a repeat of an earlier usable proposal (`dedupe`).
        usable = [c for c in range(k) if ok[i, c] and not any(ok[i, e] and (tokens[i, e] == tokens[i, c]).all()
                                                             for e in range(c))]
        differ = [c for c in usable if not (has_old[i] and (tokens[i, c] == old[i]).all())]
        pool = differ or usable
        if pool:
            assert got[i] == max(pool, key=lambda c: value[i, c]), i
