"""Graph of Thoughts (rlm_jax/search/got.py): the Aggregate of two partial solutions against a Python merge,
the strategy without merges against beam search, and with merges the graph it builds against a Python walk
of its parents (every finished candidate backed up once at each ancestor). A tiny random policy, as in
tests/test_search_strategies.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_search import PAD, D, L, WordTokenizer, path_steps as _steps, tiny_inputs as _inputs, tiny_models
from helpers_search import tiny_spec as _spec
from rlm_jax import evaluation
from rlm_jax.search import beam, got
from rlm_jax.search.tree import NONE


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _random_path(rng, depth, base=None):
    """depth steps of 1..L tokens; the first steps copied from `base` where given (a shared prefix)."""
    steps = [list(s) for s in (base or [])][:depth]
    while len(steps) < depth:
        steps.append(list(rng.integers(3, 9, size=rng.integers(1, L + 1))))
    arr, mask = np.full((D, L), PAD), np.zeros((D, L), bool)
    for i, s in enumerate(steps):
        arr[i, :len(s)], mask[i, :len(s)] = s, True
    return arr, mask, [tuple(s) for s in steps]


def test_merge_is_one_path_then_the_others_steps_after_their_common_prefix():
    rng = np.random.default_rng()
    cases = []
    for _ in range(200):
        da, db = rng.integers(0, D + 1, size=2)
        a, am, a_steps = _random_path(rng, da)
        shared = rng.integers(0, min(da, db) + 1)
        b, bm, b_steps = _random_path(rng, db, a_steps[:shared])
        cases.append((a, am, da, b, bm, db, a_steps, b_steps))
    stack = lambda i: jnp.asarray(np.stack([c[i] for c in cases]))
    steps, mask, depth, ok = jax.jit(got.merge)(*(stack(i) for i in range(6)))
    seen_ok = 0
    for i, (*_, a_steps, b_steps) in enumerate(cases):
        common = next((j for j, (x, y) in enumerate(zip(a_steps, b_steps)) if x != y), min(len(a_steps), len(b_steps)))
        want = a_steps + b_steps[common:]
        want_ok = common < len(a_steps) and common < len(b_steps) and len(want) <= D
        assert bool(ok[i]) == want_ok, i
        if want_ok:
            seen_ok += 1
            assert _steps(steps[i], mask[i]) == want and int(depth[i]) == len(want)
    assert seen_ok >= 20


@pytest.mark.parametrize("width, merges", [(3, 0), (1, None)])  # W = 1 has no pair to merge
def test_without_merges_it_is_beam_search(models, width, merges):
    policy, value = models
    spec = _spec(temperature=1.0)
    inputs, key = _inputs(policy, value, 0, 8), jax.random.key(3)
    want = jax.tree.map(np.asarray, beam.beam_search_jit(spec, inputs, key, width=width, expansions=2))
    out = jax.tree.map(np.asarray, got.got_jit(spec, inputs, key, width=width, expansions=2, merges=merges))
    for field in ("steps", "mask", "score", "finished", "generated_tokens"):
        np.testing.assert_array_equal(getattr(out.answer, field), getattr(want, field), err_msg=field)
    # The same reads, less decoding: beam search also decodes its empty beam slots (the first round's).
    assert (out.answer.cost <= want.cost).all() and (out.answer.cost >= 0.9 * want.cost).all()
    assert (out.graph.parents[..., 1] == NONE).all(), "no merge: every node has one parent"


def test_merges_are_graph_nodes_with_two_parents_and_finished_answers_are_backed_up_once(models):
    policy, value = models
    spec = _spec(temperature=1.0)
    inputs = _inputs(policy, value, 1, 16)
    out = jax.tree.map(np.asarray, got.got_jit(spec, inputs, jax.random.key(5), width=3, expansions=2))
    g, answer = out.graph, out.answer
    merged = 0
    for b in range(16):
        used = int(g.num_nodes[b])
        parents = [set(p[p != NONE].tolist()) for p in g.parents[b, :used]]
        merged += sum(len(p) == 2 for p in parents)
        done = [n for n in range(1, used) if g.terminal[b, n]]
        # Each finished candidate was backed up once at itself and at every ancestor, however many paths.
        above = {n: {n} for n in range(used)}
        for n in range(1, used):
            assert parents[n] and max(parents[n]) < n
            for p in parents[n]:
                above[n] |= above[p]
        for n in range(used):
            below = [t for t in done if n in above[t]]
            assert g.visits[b, n] == 1 + len(below), (b, n)
            np.testing.assert_allclose(g.value_sum[b, n], g.raw_value[b, n] + sum(g.raw_value[b, t] for t in below),
                                       rtol=1e-5, atol=1e-5)
        # The answer is the best finished candidate, whose score is its node's value.
        assert bool(answer.finished[b]) == bool(done)
        if done:
            np.testing.assert_allclose(answer.score[b], max(g.raw_value[b, t] for t in done), rtol=1e-6)
    assert merged >= 4, f"{merged} merged nodes: the test needs merges"


def test_got_needs_a_value_model(models):
    policy, _ = models
    spec = _spec(value=None, head=None)
    with pytest.raises(ValueError, match="value model"):
        got.got_jit(spec, _inputs(policy, None, 0, 2), jax.random.key(0), width=2)


def test_the_evaluation_runs_it_by_name(models):
    """`eval.strategies=...,got:W` runs got_jit at width W with 2 expansions; its token count is the strategy's."""
    policy, value = models
    spec, inputs, key = _spec(), _inputs(policy, value, 2, 4), jax.random.key(1)
    assert evaluation.parse_strategies("got:2") == [("got", 2)]
    texts, tokens = evaluation.run_strategy("got", 2, spec, inputs, key, WordTokenizer())
    want = got.got_jit(spec, inputs, key, width=2, expansions=2).answer
    np.testing.assert_array_equal(tokens, np.asarray(want.generated_tokens))
    assert len(texts) == 4 and (tokens > 0).all()


def test_tot_bfs_is_beam_search_under_tree_of_thoughts_name(models):
    """`tot_bfs:W` (Tree-of-Thoughts BFS: keep the W best-valued states per depth) runs the same search as beam:W."""
    policy, value = models
    spec, inputs, key = _spec(), _inputs(policy, value, 3, 4), jax.random.key(2)
    assert evaluation.parse_strategies("tot_bfs:2") == [("tot_bfs", 2)]
    bfs = evaluation.run_strategy("tot_bfs", 2, spec, inputs, key, WordTokenizer())
    beam_ = evaluation.run_strategy("beam", 2, spec, inputs, key, WordTokenizer())
    assert bfs[0] == beam_[0]
    np.testing.assert_array_equal(bfs[1], beam_[1])
    want = beam.beam_search_jit(spec, inputs, key, width=2, expansions=2)
    np.testing.assert_array_equal(bfs[1], np.asarray(want.generated_tokens))
