"""Token accounting of every strategy: a strategy's count is every token the models sampled for it
(proposals not chosen, pruned beams, rollouts), and a larger budget costs more.

The reference is independent of the counters under test: a wrapper around the two sampling operators
(`operators.generate_steps`, `operators.generate_solutions`) records, on the host, the length of every
sequence they sample, call by call; Python then decides which recorded rows a strategy's count must
include, from the strategy's documented algorithm (beam: the live beams of each depth; MCTS: the
proposals of the nodes the tree holds), and compares with `evaluation.run_strategy`'s count (the one the
report prints). The policy is a tiny random LM (vocabulary 16, as tests/test_search_strategies.py): its
steps end at varied depths, some truncated. (The countdown fixture env, tests/fixtures/countdown_env.py,
has oracle priors and no tokens, so it cannot test token counts.)
"""
from collections import Counter

import jax
import numpy as np
import pytest

from rlm_jax import decoding, evaluation
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import lm
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec

try:  # the KV-cached search's step generator (from cached contexts), where the search has one
    from rlm_jax.search import paged
except ImportError:
    paged = None

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=96, init_std=1.0)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
L, P, K, B = 6, 8, 3, 64  # tokens per step, prompt length, proposals per MCTS node, problems


class FakeTokenizer:
    """What run_strategy's text decoding needs (the texts are not under test here)."""
    step_id, eos_id, pad_id, step_delimiter = STEP, EOS, PAD, "|"

    def decode(self, ids):
        return " ".join(map(str, ids))


class Recorder:
    """Host copies of every sampling call: (kind, k, lengths [n, k] (0 for inactive rows), tokens [n, k, T])."""

    def __init__(self):
        self.calls = []

    def add(self, kind, k, lengths, tokens):
        self.calls.append((kind, k, np.asarray(lengths), np.asarray(tokens)))

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


def _recording(rec, fn):
    """fn (a step generator returning Proposals, or a tuple that starts with them) recording each call."""
    def wrapped(spec, policy_params, *args, **kw):
        out = fn(spec, policy_params, *args, **kw)
        props = out[0] if isinstance(out, tuple) else out
        k = props.length.shape[1]
        jax.debug.callback(lambda n, t, k=k: rec.add("steps", k, n, t), props.length, props.tokens, ordered=True)
        return out
    return wrapped


@pytest.fixture
def recorder(monkeypatch):
    """Wraps every sampling operator (the step generators from token contexts and, where the search has
    one, from cached contexts; whole solutions) for this test; compiled programs are dropped before and
    after, so the strategies are traced with the wrappers and later tests never run them."""
    rec = Recorder()
    gen_solutions = ops.generate_solutions

    def generate_solutions(spec, policy_params, prompt, prompt_mask, key, n, temperature=None):
        out = gen_solutions(spec, policy_params, prompt, prompt_mask, key, n, temperature)
        jax.debug.callback(lambda m, t, n=n: rec.add("solutions", n, m.reshape(-1, n), t.reshape(-1, n, t.shape[-1])),
                           out.lengths, out.tokens, ordered=True)
        return out

    jax.clear_caches()
    monkeypatch.setattr(ops, "generate_steps", _recording(rec, ops.generate_steps))
    if paged is not None:
        monkeypatch.setattr(paged, "generate_steps", _recording(rec, paged.generate_steps))
    monkeypatch.setattr(ops, "generate_solutions", generate_solutions)
    yield rec
    jax.clear_caches()


@pytest.fixture(scope="module")
def models():
    policy = jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(1))
    value = heads.init_value_params(CFG, HEAD, jax.random.key(2), trunk=policy)
    return policy, value


def _spec(depth, **kw):
    return LMSpec(**{**dict(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=K, step_len=L,
                            max_depth=depth, temperature=1.0, value=CFG, head=HEAD), **kw})


def _inputs(policy, value, seed=0, batch=B):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, CFG.vocab_size, size=rng.integers(1, P))) for _ in range(batch)]
    t, m = decoding.pad_prompts(prompts, PAD, length=P)
    return lm.search_inputs(policy, value, t, m)


def _count(name, budget, spec, inputs, key=0):
    """The count the report prints: run_strategy's tokens per problem [B]."""
    _, ntok = evaluation.run_strategy(name, budget, spec, inputs, jax.random.key(key), FakeTokenizer())
    return np.asarray(ntok)


# ------------------------------------------------------------------------ best-of-N, self-consistency
@pytest.mark.parametrize("name", ["best_of_n", pytest.param("self_consistency", marks=pytest.mark.slow)])
def test_sampling_strategies_count_every_sample(models, recorder, name):
    policy, value = models
    spec, inputs = _spec(3), _inputs(*models)
    means = []
    for n in (2, 4):
        recorder.calls.clear()
        got = _count(name, n, spec, inputs)
        (call,) = recorder.of("solutions")  # one call: N whole solutions per problem
        lengths = call[2]
        assert lengths.shape == (B, n) and (lengths >= 1).all()
        np.testing.assert_array_equal(got, lengths.sum(axis=1))  # every sample, chosen or not
        means.append(got.mean())
    assert means[0] < means[1], means


# ------------------------------------------------------------------------------------------- beam
def _beam_reference(calls, width, expansions, dedupe=True, rows=B):
    """Tokens [rows] beam search must count, from the recorded proposal calls (one per depth, rows
    [rows * W, E]): at depth 0 one live beam; every live beam's E proposals count (pruned or finished ones
    included); the next depth has min(W, open candidates) live beams, an open candidate being a
    proposal that ended with STEP (not EOS, not truncated), not a repeat of a sibling (dedupe), and the
    live beams are the first ones (top-k puts the pruned, -inf, last)."""
    live = np.ones(rows, int)
    total = np.zeros(rows, int)
    for _, k, lengths, tokens in calls:
        assert k == expansions and lengths.shape == (rows * width, expansions)
        lengths, tokens = lengths.reshape(rows, width, k), tokens.reshape(rows, width, k, -1)
        for b in range(rows):
            open_ = 0
            for j in range(live[b]):
                seen = set()
                for e in range(k):
                    n = int(lengths[b, j, e])
                    total[b] += n
                    step = tuple(tokens[b, j, e, :n])
                    repeat = dedupe and step in seen
                    seen.add(step)
                    open_ += bool(n) and step[-1] == STEP and not repeat
            live[b] = min(width, open_)
    return total


def _going(policy):
    """A random policy whose steps end with STEP more often and EOS less (its columns of the output
    layer scaled), so that beams stay open and a wider beam has beams to keep."""
    return dict(policy, lm_head=policy["lm_head"].at[:, STEP].multiply(5.0).at[:, EOS].multiply(0.2))


# Distinct proposals at depth 3 (a minute of compiles) run in the slow suite.
@pytest.mark.parametrize("depth, proposals", [pytest.param(2, "sample", marks=pytest.mark.slow), (3, "sample"),
                                              pytest.param(3, "distinct", marks=pytest.mark.slow)])
def test_beam_counts_every_live_beams_proposals(models, recorder, depth, proposals):
    policy, value = models
    spec, inputs = _spec(depth, proposals=proposals), _inputs(_going(policy), value, seed=1)
    counts = {}
    widths = (1, 2, 4) if depth == 2 else (1, 2)  # depth 3 compares widths 1 and 2 only
    for width in widths:
        recorder.calls.clear()
        got = _count("beam", width, spec, inputs)
        calls = recorder.of("steps")
        assert len(calls) == depth
        np.testing.assert_array_equal(got, _beam_reference(calls, width, 2))
        counts[width] = got
    means = [counts[w].mean() for w in widths]
    if depth == 2:
        # Width 4 differs from width 2 only from the third step on: beam search starts from one beam with 2
        # expansions, so at most 2 beams are live in the first two steps, and a width-4 search of 2 steps
        # costs what a width-2 one costs in expectation (3-number countdown, solved in 2 steps: the issue's
        # beam:2 and beam:4 both at 48 tokens, 6 proposals of 8 tokens).
        assert (counts[4] <= L * (2 + 4)).all() and (counts[2] <= L * (2 + 4)).all()
        assert means[0] < means[1]
    else:  # wider beams sample more where the depth allows it: 2 + 4 + 4 proposals against 2 + 4 + 8
        assert means[0] < means[1], means


@pytest.mark.slow  # tests/test_search_strategies.py checks DVTS's sum of its subtrees' counts too
def test_dvts_counts_every_subtrees_proposals(models, recorder):
    """DVTS: T subtrees per problem, each a width-1 beam that lives while its best candidate is open; a
    problem's count is its subtrees' counts summed (the width-1 beam reference, over B * T rows)."""
    policy, value = models
    spec, inputs = _spec(3), _inputs(_going(policy), value, seed=2)
    means = []
    for trees in (1, 3):
        recorder.calls.clear()
        got = _count("dvts", trees, spec, inputs)
        calls = recorder.of("steps")
        assert len(calls) == 3
        np.testing.assert_array_equal(got, _beam_reference(calls, 1, 2, rows=B * trees).reshape(B, trees).sum(1))
        means.append(got.mean())
    assert means[0] < means[1], means


# ------------------------------------------------------------------------------------------- MCTS
def _groups(lengths, tokens):
    """A node's K proposals as a hashable group: (steps masked to their lengths)."""
    return tuple(tuple(tokens[a, :int(lengths[a])]) for a in range(lengths.shape[0]))


def _mcts_reference(spec, tree, recorder):
    """(count, tokens of the rollouts, tokens the program sampled for void entries) [B] of the search
    that built `tree`: every recorded group of K proposals that is a node's in the tree is counted once
    (the root's included); groups no node holds were sampled for void entries (a simulation that
    revisited a finished node creates nothing); rollouts: the tree's own count, which
    tests/test_search_strategies.py checks against independent rollouts."""
    emb = tree.embedding
    counted, void = np.zeros(B, int), np.zeros(B, int)
    recorded = [[] for _ in range(B)]
    for _, k, lengths, tokens in recorder.of("steps"):
        if k != spec.num_slots:  # a rollout's steps (k = 1)
            continue
        lengths, tokens = lengths.reshape(B, -1, k), tokens.reshape(B, -1, k, tokens.shape[-1])
        for b in range(B):
            recorded[b] += [(_groups(lengths[b, m], tokens[b, m]), int(lengths[b, m].sum()))
                            for m in range(lengths.shape[1])]
    for b in range(B):
        nodes = Counter(_groups(emb["props_mask"][b, i].sum(-1), emb["props"][b, i])
                        for i in range(int(tree.num_nodes[b])) if emb["props_mask"][b, i].any())
        matched = Counter()
        for group, n in recorded[b]:
            if group in nodes and matched[group] < nodes[group]:
                matched[group] += 1
                counted[b] += n
            else:
                void[b] += n
        assert matched == nodes, "a node's proposals were never sampled by the model"
    rollout = (emb["rollout_tokens"] * (np.arange(tree.parent.shape[1])[None] < tree.num_nodes[:, None])).sum(1)
    return counted + rollout, rollout, void


# Rollouts (a minute of compiles) run in the slow suite; tests/test_search_strategies.py checks them too.
@pytest.mark.parametrize("rollouts, cached", [(0, True), pytest.param(2, True, marks=pytest.mark.slow),
                                              pytest.param(0, False, marks=pytest.mark.slow)])
def test_mcts_counts_every_nodes_proposals_and_rollouts(models, recorder, rollouts, cached):
    """cached: the search decodes from its paged KV cache (`LMSpec.kv_cache`) or re-reads every context."""
    if not cached and "kv_cache" not in LMSpec.__dataclass_fields__:
        pytest.skip("this search has one decoding path")
    spec = _spec(3, num_rollouts=rollouts, **({} if cached else {"kv_cache": False}))
    inputs = _inputs(*models, seed=2)
    counts, voids = {}, {}
    budgets = (4, 8, 16) if not rollouts and not cached else (4, 8)  # the cached ones: a compile less
    for sims in budgets:
        recorder.calls.clear()
        # run_strategy's MCTS call, kept whole: its count is evaluation.mcts_tokens of this tree
        res = jax.device_get(lm.lm_mcts_jit(spec, inputs, jax.random.key(0), sims, evaluation.mcts.preset("puct")))
        got = evaluation.mcts_tokens(res)
        want, rollout_tokens, void = _mcts_reference(spec, res.tree, recorder)
        np.testing.assert_array_equal(got, want)
        if rollouts:
            assert (rollout_tokens > 0).all()
        counts[sims], voids[sims] = got, void
    # The same key: the first S simulations of a larger budget are the smaller budget's search (its
    # tree is a prefix), so a larger budget never costs less on any problem, and costs more on average.
    for small, large in zip(budgets, budgets[1:]):
        assert (counts[small] <= counts[large]).all() and counts[small].mean() < counts[large].mean()
    # What the program sampled for void entries (revisits, dropped descents) and threw away: not counted,
    # as an efficient search would not sample it. The cached search decodes nothing for them (lm.py); the
    # uncached one still does (MCTS:16 here: ~60 tokens a problem, more than it counts), so it is printed.
    if cached:
        assert all((v == 0).all() for v in voids.values()), voids
    print("MCTS tokens / problem (counted, void):",
          {s: (float(counts[s].mean()), float(voids[s].mean())) for s in counts})
