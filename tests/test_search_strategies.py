"""The LM search strategies (beam, best-of-N, self-consistency, MCTS) with a tiny random policy.

References are independent of the code under test: plain `decoding.generate` and a Python splitter of
the generated tokens into steps, Python `Counter` votes, and Python walks over the tree's parent
pointers. The policy is random (vocabulary 16, init_std 1: STEP and EOS are sampled often enough that
solutions end at varied depths, some within D steps of L tokens and some not).
"""
import re
from collections import Counter

import jax
import numpy as np
import pytest

from rlm_jax import decoding
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import beam, lm, mcts, render, sampling
from rlm_jax.search import operators as ops
from rlm_jax.search.base import LMSpec
from rlm_jax.search.tree import NONE

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=64, init_std=1.0)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
D, L, P = 3, 6, 8  # steps, tokens per step, prompt length


def _spec(**kw):
    base = dict(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=3, step_len=L, max_depth=D)
    return LMSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def models():
    policy = jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(1))
    value = heads.init_value_params(CFG, HEAD, jax.random.key(2), trunk=policy)
    return policy, value


def _inputs(policy, value, seed, batch, problem_index=None):
    """Random prompts of random lengths (tokens that are not PAD/STEP/EOS), left-padded to P."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, CFG.vocab_size, size=rng.integers(1, P))) for _ in range(batch)]
    t, m = decoding.pad_prompts(prompts, PAD, length=P)
    return lm.search_inputs(policy, value, t, m, problem_index)


def _split_ref(tokens, length):
    """Python reference of a generated solution's steps: split after each STEP/EOS, keep the first L
    tokens of a step and the first D steps."""
    steps, cur = [], []
    for t in np.asarray(tokens)[:int(length)].tolist():
        cur.append(t)
        if t in (STEP, EOS):
            steps.append(cur)
            cur = []
    if cur:
        steps.append(cur)
    return [s[:L] for s in steps[:D]]


def _slots(steps, mask):
    """Step slots [D, L] -> list of steps (token lists), checking masks are left-aligned prefixes."""
    out = []
    for s, m in zip(np.asarray(steps), np.asarray(mask)):
        n = int(m.sum())
        assert m[:n].all(), "a step's mask must be a prefix of its slot"
        if n:
            out.append(s[:n].tolist())
    return out


def _well_formed(steps):
    """Ends with EOS within D steps, every step within L tokens (the `_split_ref` cut did nothing)."""
    return bool(steps) and steps[-1][-1] == EOS and all(s[-1] in (STEP, EOS) for s in steps)


# ------------------------------------------------------------------------------------- beam = greedy
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_width_one_is_greedy_decoding(models, seed):
    policy, value = models
    spec = _spec(temperature=0.0, value=CFG, head=HEAD)
    inputs = _inputs(policy, value, seed, batch=24)
    key = jax.random.key(seed)
    greedy = sampling.greedy_jit(spec, inputs, key)
    out = beam.beam_search_jit(spec, inputs, key, width=1, expansions=1)
    # Independent reference: one contiguous greedy decode of the whole solution.
    ref = decoding.generate_jit(CFG, policy, inputs["prompt"], inputs["prompt_mask"], key, max_new_tokens=D * L,
                            temperature=0.0, stop_tokens=(EOS,), pad_id=PAD)
    n_full = 0
    for b in range(24):
        want = _split_ref(ref.tokens[b], ref.lengths[b])
        assert _slots(greedy.steps[b], greedy.mask[b]) == want
        got = _slots(out.steps[b], out.mask[b])
        if _well_formed(want):
            n_full += 1
            assert got == want, b
            assert bool(out.finished[b]) and bool(greedy.finished[b])
        else:
            # The chain hit a truncated step or ran past D steps: the beam's answer is its best
            # unfinished candidate, a prefix of the chain's complete (STEP-ended) steps, never other text.
            complete = next((i for i, s in enumerate(want) if s[-1] != STEP), len(want))
            assert not bool(out.finished[b])
            assert got == want[:len(got)] and min(complete, 1) <= len(got) <= complete, b
    assert 4 <= n_full <= 20, f"{n_full} well-formed greedy chains: the test needs both kinds"


def test_dvts_subtrees_are_independent_width_one_beams_and_the_best_one_answers(models):
    """DVTS against its definition: greedily (temperature 0) every subtree is the width-1 beam, so T subtrees
    answer as one and cost T times its tokens; sampling, T = 1 is the width-1 beam, and with T = 4 the
    answer is the best-scored finished subtree of the 4, each a width-1 beam on its own copy of the prompt
    (the reference runs them as 4 separate problems)."""
    policy, value = models
    spec = _spec(value=CFG, head=HEAD, temperature=1.0)
    inputs, key, t = _inputs(policy, value, seed=3, batch=6), jax.random.key(4), 4
    cold = _spec(value=CFG, head=HEAD, temperature=0.0)
    one = beam.beam_search_jit(cold, inputs, key, width=1, expansions=2)
    many = beam.dvts_jit(cold, inputs, key, trees=3, expansions=2)
    np.testing.assert_array_equal(np.asarray(many.steps), np.asarray(one.steps))
    np.testing.assert_array_equal(np.asarray(many.generated_tokens), 3 * np.asarray(one.generated_tokens))
    single = beam.dvts_jit(spec, inputs, key, trees=1, expansions=2)
    np.testing.assert_array_equal(np.asarray(single.steps), np.asarray(beam.beam_search_jit(
        spec, inputs, key, width=1, expansions=2).steps))
    out = beam.dvts_jit(spec, inputs, key, trees=t, expansions=2)
    rows = dict(inputs, prompt=np.repeat(inputs["prompt"], t, 0), prompt_mask=np.repeat(inputs["prompt_mask"], t, 0),
                problem_index=np.repeat(inputs["problem_index"], t, 0))
    sub = jax.tree.map(np.asarray, beam.beam_search_jit(spec, rows, key, width=1, expansions=2))
    distinct = 0
    for b in range(6):
        trees = range(b * t, (b + 1) * t)
        texts = {tuple(map(tuple, _slots(sub.steps[r], sub.mask[r]))) for r in trees}
        distinct += len(texts) > 1
        finished = [r for r in trees if sub.finished[r]]
        best = max(finished or trees, key=lambda r: sub.score[r])
        assert _slots(out.steps[b], out.mask[b]) == _slots(sub.steps[best], sub.mask[best]), b
        assert bool(out.finished[b]) == bool(finished)
        assert int(out.generated_tokens[b]) == int(sub.generated_tokens[b * t:(b + 1) * t].sum())
    assert distinct >= 3, "the subtrees should differ: the test needs diverse ones"


# ------------------------------------------------------------------------------ best-of-1 = sampling
def test_best_of_one_is_plain_sampling(models):
    policy, value = models
    spec = _spec(temperature=1.0)
    inputs = _inputs(policy, value, seed=3, batch=16)
    key = jax.random.key(7)
    out = sampling.best_of_n_jit(spec, inputs, key, n=1, scorer="logprob")
    ref = decoding.generate_jit(CFG, policy, inputs["prompt"], inputs["prompt_mask"], key, max_new_tokens=D * L,
                            temperature=1.0, stop_tokens=(EOS,), pad_id=PAD)
    tokens, lengths = np.asarray(ref.tokens), np.asarray(ref.lengths)
    for b in range(16):
        assert _slots(out.steps[b], out.mask[b]) == _split_ref(tokens[b], lengths[b]), b
    np.testing.assert_allclose(out.score, np.where(np.arange(D * L) < lengths[:, None], ref.logprobs, 0).sum(1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.finished, np.asarray(ref.stop_token) == EOS)
    np.testing.assert_array_equal(out.generated_tokens, lengths)
    assert len({tuple(map(tuple, _split_ref(t, n))) for t, n in zip(tokens, lengths)}) > 8  # really sampled


# ----------------------------------------------------------------------------------- self-consistency
def _answer(steps):
    """A coarse answer with collisions: the token sum mod 3 of a finished solution, else None."""
    if not steps or steps[-1][-1] != EOS:
        return None
    return sum(map(sum, steps)) % 3


def test_self_consistency_picks_a_most_frequent_answer(models):
    policy, value = models
    spec = _spec(temperature=1.0)
    b, n = 16, 7
    inputs = _inputs(policy, value, seed=4, batch=b)
    key = jax.random.key(11)
    out = sampling.self_consistency(spec, inputs, key, n, lambda r, s, m: _answer(_slots(s, m)))
    # The same samples, drawn by plain decoding (sample j of problem r at row r*n + j).
    ref = decoding.generate_jit(CFG, policy, np.repeat(inputs["prompt"], n, 0), np.repeat(inputs["prompt_mask"], n, 0),
                            key, max_new_tokens=D * L, temperature=1.0, stop_tokens=(EOS,), pad_id=PAD)
    discriminating = 0
    for r in range(b):
        samples = [_split_ref(ref.tokens[r * n + j], ref.lengths[r * n + j]) for j in range(n)]
        votes = Counter(a for a in map(_answer, samples) if a is not None)
        chosen = _slots(out.steps[r], out.mask[r])
        assert chosen in samples, r
        if votes:
            assert votes[_answer(chosen)] == max(votes.values()), (r, votes, _answer(chosen))
            discriminating += votes[_answer(samples[0])] < max(votes.values())
    assert discriminating >= 2, "no problem where the first sample is outvoted: the check is too weak"


# ----------------------------------------------------------------------------------------------- MCTS
def _walk(tree, b, node):
    """Nodes root..node by parent pointers (Python)."""
    path = [int(node)]
    while tree.parent[b, path[-1]] != NONE:
        path.append(int(tree.parent[b, path[-1]]))
    return path[::-1]


def _path_text(tree, b, path):
    emb = tree.embedding
    return [emb["step"][b, n][emb["step_mask"][b, n]].tolist() for n in path[1:]]


_solution_steps = jax.jit(lm.solution_steps, static_argnums=0)


def _check_tree(spec, out, sims, config):
    t = jax.tree.map(np.asarray, out.tree)
    emb = t.embedding
    steps, mask = map(np.asarray, _solution_steps(spec, out))
    for b in range(t.parent.shape[0]):
        used = int(t.num_nodes[b])
        assert t.visits[b, 0] == 1 + sims  # every simulation passes the root (W = 1, tree never full)
        for node in range(used):
            kids = t.children[b, node][t.children[b, node] != NONE]
            if t.terminal[b, node]:
                assert kids.size == 0, "a terminal node was expanded"
                assert not emb["props_mask"][b, node].any(), "a terminal node sampled proposals"
            elif spec.proposals == "distinct":  # its K proposals differ from each other
                props = [tuple(emb["props"][b, node, a][emb["props_mask"][b, node, a]]) for a in range(spec.num_slots)]
                assert len(set(props)) == spec.num_slots, props
            if node:
                p, a = t.parent[b, node], t.action_from_parent[b, node]
                assert t.children[b, p, a] == node and t.depth[b, node] == t.depth[b, p] + 1 <= D
                # The node's step is the proposal its parent sampled for that slot.
                np.testing.assert_array_equal(emb["step_mask"][b, node], emb["props_mask"][b, p, a])
                m = emb["step_mask"][b, node]
                np.testing.assert_array_equal(emb["step"][b, node][m], emb["props"][b, p, a][m])
                ended_eos = emb["step"][b, node][m][-1] == EOS
                assert bool(t.terminal[b, node]) == bool(ended_eos or emb["step"][b, node][m][-1] != STEP)
            if kids.size:
                # Visits add up: sum backup counts every pass; x1 ("mean", expand all) creates the K
                # children with one visit each and counts the expansion on the parent.
                if config.expand_all:
                    assert t.visits[b, node] == 2 + (t.visits[b, kids] - 1).sum(), (b, node)
                else:
                    assert t.visits[b, node] == 1 + t.visits[b, kids].sum(), (b, node)
        # The answer is the text of a root path in the tree, and best_path is that path.
        path = _walk(t, b, out.best_node[b])
        np.testing.assert_array_equal(np.asarray(out.best_path[b])[:len(path)], path)
        assert (np.asarray(out.best_path[b])[len(path):] == NONE).all()
        assert _slots(steps[b], mask[b]) == _path_text(t, b, path)
        assert bool(out.found_terminal[b]) == bool(t.terminal[b, :used].any())


@pytest.mark.parametrize("preset, proposals", [("muzero", "sample"), ("gumbel", "sample"), ("muzero", "distinct")])
def test_lm_mcts_presets_build_consistent_trees(models, preset, proposals):
    """Inference mode; x1 runs in training mode below."""
    policy, value = models
    config = {"muzero": mcts.muzero, "gumbel": mcts.gumbel_muzero}[preset]()
    # muzero reads a value model; gumbel values every non-terminal node 0 (no value model).
    kw = dict(temperature=1.0, proposals=proposals)
    spec = _spec(**kw, value=CFG, head=HEAD) if preset == "muzero" else _spec(**kw)
    sims = 6
    out = lm.lm_mcts_jit(spec, _inputs(policy, value, seed=5, batch=4), jax.random.key(3), sims, config)
    _check_tree(spec, out, sims, config)
    assert int(np.max(np.asarray(out.tree.depth))) >= 2, "the search never went below the root's children"
    _check_render(out)


LINE = re.compile(r"((?:│  |   )*)[├└]─ n(\d+)  N=(\d+) V=([-+]\d\.\d\d) P=(\d\.\d\d)( \[END\])?( H=(\d+\.\d\d))?( \*)?")


def _check_render(out):
    """render_tree lists every node once under its parent, most-visited first, with its statistics."""
    t = jax.tree.map(np.asarray, out.tree)
    for b in range(t.parent.shape[0]):
        used = int(t.num_nodes[b])
        text = render.render_tree(out.tree, b, [f"n{i}" for i in range(used)], highlight=out.best_path[b])
        lines = text.splitlines()
        assert lines[0].startswith("root") and f"N={t.visits[b, 0]} " in lines[0]
        assert len(lines) == used
        stack, seen, best = [0], [], set(np.asarray(out.best_path[b]).tolist())
        for line in lines[1:]:
            m = LINE.fullmatch(line)
            assert m, line
            depth, node = len(m.group(1)) // 3 + 1, int(m.group(2))
            stack = stack[:depth]
            assert t.parent[b, node] == stack[-1] and t.depth[b, node] == depth, line
            assert int(m.group(3)) == t.visits[b, node]
            assert float(m.group(4)) == pytest.approx(t.value_sum[b, node] / t.visits[b, node], abs=0.006)
            assert bool(m.group(6)) == bool(t.terminal[b, node]) and bool(m.group(9)) == (node in best)
            if "entropy" in t.embedding and not t.terminal[b, node]:  # the KV-cached search records it
                assert float(m.group(8)) == pytest.approx(float(t.embedding["entropy"][b, node]), abs=0.006)
            else:
                assert m.group(7) is None
            stack.append(node)
            seen.append(node)
        assert sorted(seen) == list(range(1, used))
        for node in range(used):  # siblings in listing order have non-increasing visits
            order = [n for n in seen if t.parent[b, n] == node]
            assert all(t.visits[b, x] >= t.visits[b, y] for x, y in zip(order, order[1:]))
    # Step text with line breaks (an untrained policy's steps hold \r, \x85, \u2028...) keeps one line a node.
    used = int(t.num_nodes[0])
    odd = render.render_tree(out.tree, 0, [f"a\rb\x85c\u2028{i}\nd" for i in range(used)]).splitlines()
    assert len(odd) == used and all("a\\rb\\x85c\\u2028" in line and " d " in line for line in odd[1:]), odd
    capped = render.render_tree(out.tree, 0, max_depth=1, max_children=1).splitlines()
    kids = int((t.children[0, 0] != NONE).sum())
    assert len(capped) <= 1 + 1 + 1 + (kids > 1), capped  # root, one child, its "below" line, "more"
    assert any("more" in line for line in capped) == (kids > 1)


VERIFIER_CALLS = []


def _verify_ref(problem_index, steps):
    """The test verifier's score of a solution (token lists): deterministic, problem-dependent, in [-1, 1]."""
    return ((sum(map(sum, steps)) + 3 * problem_index) % 5 - 2) / 2.0


def _verifier(problem_index, steps, steps_mask):
    """The same on step slots (batched, as `LMSpec.verifier`); module level, so specs that use it compare
    equal and share compiled programs."""
    VERIFIER_CALLS.append(len(problem_index))
    sums = np.where(steps_mask, steps, 0).sum(axis=(1, 2))
    return ((sums + 3 * problem_index) % 5 - 2) / 2.0


X1_PROBLEMS = np.array([5, 9, 2, 7], np.int32)


def _x1_training_run(policy, **spec_kw):
    """x1 preset in training mode (verifier, no value model: non-terminal nodes are valued 0)."""
    spec = _spec(temperature=1.0, verifier=_verifier, **spec_kw)
    inputs = _inputs(policy, None, seed=6, batch=4, problem_index=X1_PROBLEMS)
    return spec, lm.lm_mcts_jit(spec, inputs, jax.random.key(4), 8, mcts.x1())


def test_x1_training_mode_verifier_scores_terminal_nodes(models):
    """x1 preset with a verifier (host callback): its scores are the values of the finished nodes."""
    policy, _ = models
    problem_index = X1_PROBLEMS
    VERIFIER_CALLS.clear()
    sims, config = 8, mcts.x1()
    spec, out = _x1_training_run(policy)
    _check_tree(spec, out, sims, config)
    assert VERIFIER_CALLS, "the verifier was never called"
    t = jax.tree.map(np.asarray, out.tree)
    values = np.asarray(out.values)
    scored = 0
    for b in range(4):
        for node in range(1, int(t.num_nodes[b])):
            steps = _path_text(t, b, _walk(t, b, node))
            if not t.terminal[b, node]:
                assert t.raw_value[b, node] == 0.0
            elif steps[-1][-1] != EOS:
                assert t.raw_value[b, node] == -1.0  # a truncated step: a dead terminal
            else:
                want = _verify_ref(problem_index[b], steps)
                assert t.raw_value[b, node] == pytest.approx(want), (b, node)
                assert values[b, node] == pytest.approx(want)  # terminal values are never overwritten
                scored += 1
    assert scored >= 4, f"only {scored} finished solutions in the trees"


# ------------------------------------------------------------------------------------------- rollouts
ROLLOUT_KW = dict(num_rollouts=2, rollout_temperature=0.0, rollout_discount=0.9)


def _stopping(policy):
    """A scaled EOS logit: the random model's greedy chains rarely end within D steps otherwise (they
    repeat STEP); most do now, after 1 to 3 steps."""
    return dict(policy, lm_head=policy["lm_head"].at[:, EOS].multiply(3.0))


def _rollout_reference(spec, policy, value, inputs, tree, problem_index, scorer):
    """Independent rollout rewards (greedy rollouts) of every non-terminal node in use: one contiguous
    greedy decode from the node's compacted text (prompt + its steps, no holes), split into steps in
    Python; reward = the score of the finished solution (verifier, or value head on the compacted
    text) times rollout_discount ** (steps added), -1 if it does not end with EOS within D steps of at
    most L tokens. -> ({(b, node): reward}, {(b, node): tokens one rollout samples}), where a rollout
    samples its steps one at a time and stops after EOS, after a step cut at L tokens, or at D steps.
    """
    t = jax.tree.map(np.asarray, tree)
    prompt = [list(np.asarray(p)[np.asarray(m)]) for p, m in zip(inputs["prompt"], inputs["prompt_mask"])]
    nodes, texts, paths = [], [], []
    for b in range(t.parent.shape[0]):
        for node in range(int(t.num_nodes[b])):
            if not t.terminal[b, node]:
                path = _path_text(t, b, _walk(t, b, node))
                nodes.append((b, node))
                paths.append(path)
                texts.append(prompt[b] + sum(path, []))
    toks, mask = decoding.pad_prompts(texts, PAD, length=P + D * L)
    out = decoding.generate_jit(CFG, policy, toks, mask, jax.random.key(0), max_new_tokens=D * L, temperature=0.0,
                                stop_tokens=(EOS,), pad_id=PAD)
    want, sampled, finished_texts, finished = {}, {}, [], []
    for i, ((b, node), path) in enumerate(zip(nodes, paths)):
        cont = np.asarray(out.tokens[i])[:int(out.lengths[i])].tolist()
        steps, cur = [], []
        for tok_id in cont:
            cur.append(tok_id)
            if tok_id in (STEP, EOS):
                steps.append(cur)
                cur = []
        sampled[b, node] = 0
        for step in (steps + [cur])[:D - len(path)]:
            sampled[b, node] += min(len(step), L)
            if len(step) > L or step[-1:] == [EOS]:
                break
        ok = (not cur and bool(steps) and steps[-1][-1] == EOS and len(path) + len(steps) <= D
              and all(len(s) <= L for s in steps))
        if not ok:
            want[b, node] = -1.0
        elif scorer == "verifier":
            want[b, node] = _verify_ref(problem_index[b], path + steps) * spec.rollout_discount ** len(steps)
        else:
            finished.append(((b, node), len(steps)))
            finished_texts.append(texts[i] + cont)
    if finished:
        ft, fm = decoding.pad_prompts(finished_texts, PAD, length=P + 2 * D * L)
        scores = np.asarray(jax.jit(heads.sequence_score, static_argnums=(0, 1))(CFG, HEAD, value, ft, fm))
        for ((b, node), n_steps), score in zip(finished, scores):
            want[b, node] = float(score) * spec.rollout_discount ** n_steps
    return want, sampled


def _check_rollouts(spec, out, want, sampled, got_value):
    """got_value [B, N] (the stored rollout value, or the node value at alpha = 1) matches `want`, and
    the R = 2 identical greedy rollouts sampled twice the reference's tokens; terminals roll nothing out."""
    tree = jax.tree.map(np.asarray, out.tree)
    for (b, node), v in want.items():
        assert got_value[b, node] == pytest.approx(v, abs=1e-4), (b, node)
    ntok = tree.embedding["rollout_tokens"]
    assert {k: int(ntok[k]) for k in want} == {k: 2 * v for k, v in sampled.items()}
    in_use = np.arange(ntok.shape[1])[None, :] < tree.num_nodes[:, None]
    assert (ntok[in_use & tree.terminal] == 0).all()
    rewards = np.array(list(want.values()))
    assert len(want) >= 12 and (rewards == -1).sum() >= 2 and (rewards != -1).sum() >= 4, rewards


def test_rollouts_with_alpha_zero_change_nothing_and_score_with_the_verifier(models):
    """Training mode (verifier), greedy rollouts, alpha = 0: the search is exactly the one without
    rollouts (they draw from their own key and leave every value and proposal as it was), and each
    node's stored rollout value (x1's simulation_value) is its rollout's verified, discounted reward."""
    policy = _stopping(models[0])
    _, plain = _x1_training_run(policy)
    spec, rolled = _x1_training_run(policy, rollout_alpha=0.0, **ROLLOUT_KW)
    rollout_fields = ("rollout_value", "rollout_tokens")
    strip = lambda out: out.replace(cost=None, tree=out.tree.replace(embedding={
        k: v for k, v in out.tree.embedding.items() if k not in rollout_fields}))
    for got, want in zip(jax.tree.leaves(strip(rolled)), jax.tree.leaves(strip(plain))):
        np.testing.assert_array_equal(got, want)
    assert (np.asarray(rolled.cost) > np.asarray(plain.cost)).all()  # the rollouts' positions are counted
    inputs = _inputs(policy, None, seed=6, batch=4, problem_index=X1_PROBLEMS)
    want, sampled = _rollout_reference(spec, policy, None, inputs, rolled.tree, X1_PROBLEMS, "verifier")
    _check_rollouts(spec, rolled, want, sampled, np.asarray(rolled.tree.embedding["rollout_value"]))


def _inference_rollout_setup(policy, value):
    """Inference mode (value model), greedy rollouts, alpha = 1, W = 2 leaves per iteration:
    (spec, inputs, the args of lm_mcts_jit after them)."""
    spec = _spec(value=CFG, head=HEAD, rollout_alpha=1.0, temperature=1.0, **ROLLOUT_KW)
    return spec, _inputs(policy, value, seed=6, batch=4), (jax.random.key(5), 4, mcts.x1(num_parallel=2))


@pytest.mark.slow  # a minute of compiles; the alpha-zero test above keeps cached rollouts in the default run
def test_rollouts_with_alpha_one_are_the_values_and_read_the_value_model(models):
    """Inference mode, alpha = 1: every non-terminal node's value is its rollout's reward, the value
    model's score at the end of the finished rollout (ORM-style), discounted."""
    policy, value = _stopping(models[0]), models[1]
    spec, inputs, args = _inference_rollout_setup(policy, value)
    out = lm.lm_mcts_jit(spec, inputs, *args)
    want, sampled = _rollout_reference(spec, policy, value, inputs, out.tree, None, "value")
    _check_rollouts(spec, out, want, sampled, np.asarray(out.tree.raw_value))


def test_rollouts_need_a_scorer():
    with pytest.raises(ValueError, match="rollouts are scored"):
        _spec(num_rollouts=2)


# --------------------------------------------------------------------------- evaluate operator
@pytest.mark.parametrize("kind", ["value", "q", "prm", "orm"])
def test_evaluate_value_is_signed_for_every_head_kind(models, kind):
    """prm / orm heads give probabilities p in [0, 1] (heads.py); the searches read 2p - 1 in [-1, 1]."""
    policy, _ = models
    head = heads.HeadConfig(kind=kind, hidden=(8,))
    params = heads.init_value_params(CFG, head, jax.random.key(9), trunk=policy)
    inputs = _inputs(policy, None, seed=9, batch=32)
    got = np.asarray(jax.jit(ops.evaluate_value, static_argnums=0)(_spec(value=CFG, head=head), params,
                                                                    inputs["prompt"], inputs["prompt_mask"]))
    logits = np.asarray(heads.head_logits(CFG, head, params, inputs["prompt"], inputs["prompt_mask"]))
    last = P - 1  # prompts are left-padded: the last real token is the last slot
    p = 1 / (1 + np.exp(-logits[:, last].astype(np.float64)))
    np.testing.assert_allclose(got, 2 * p - 1, atol=1e-5)  # value/q: 2 sigmoid - 1; prm/orm: 2p - 1
    assert got.min() < 0 < got.max()


# ------------------------------------------------------------------------------ no host round trips
def _host_calls(compiled) -> list[str]:
    """Custom-call targets of a compiled program's HLO that call back into Python (pure_callback,
    io_callback, debug.callback: xla_python_*_callback / xla_ffi_python_*_callback)."""
    targets = re.findall(r'custom_call_target="([^"]*)"', compiled.as_text())
    return [t for t in targets if "callback" in t.lower() or "python" in t.lower()]


def test_inference_mode_programs_have_no_host_callback(models):
    """Inference mode (no verifier) compiles to programs without any host callback: MCTS (PUCT; x1 with
    W = 2 leaves and rollouts in the slow test below), beam search, best-of-N and the sampling of self-consistency. (The vote
    of self-consistency itself runs on the host between two jitted calls: the answer ids come from the
    task's Python parser.) Training-mode programs (verifier) do call back, which shows the check sees
    callbacks. The programs are the ones the tests above run (compiled once, cached)."""
    policy, value = models
    key = jax.random.key(3)
    with_value = _spec(temperature=1.0, value=CFG, head=HEAD)
    programs = {
        "mcts": lm.lm_mcts_jit.lower(with_value, _inputs(policy, value, seed=5, batch=4), key, 6, mcts.muzero()),
        "beam": beam.beam_search_jit.lower(_spec(temperature=0.0, value=CFG, head=HEAD),
                                           _inputs(policy, value, seed=0, batch=24), key, width=1, expansions=1),
        "best_of_n": sampling.best_of_n_jit.lower(_spec(temperature=1.0), _inputs(policy, value, seed=3, batch=16),
                                                  key, n=1, scorer="logprob"),
        "self_consistency_samples": sampling.sample_slots.lower(
            _spec(temperature=1.0), _inputs(policy, value, seed=4, batch=16), key, 7, None),
    }
    for name, lowered in programs.items():
        assert not _host_calls(lowered.compile()), name
    train_inputs = _inputs(policy, None, seed=6, batch=4, problem_index=X1_PROBLEMS)
    train_spec = _spec(temperature=1.0, verifier=_verifier)
    assert _host_calls(lm.lm_mcts_jit.lower(train_spec, train_inputs, jax.random.key(4), 8, mcts.x1()).compile())


@pytest.mark.slow  # a large program (x1 with W = 2 leaves and cached rollouts read by the value model)
def test_inference_mode_rollouts_have_no_host_callback(models):
    policy, value = models
    spec, inputs, args = _inference_rollout_setup(policy, value)
    assert not _host_calls(lm.lm_mcts_jit.lower(spec, inputs, *args).compile())
