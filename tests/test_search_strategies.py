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
from rlm_jax.search.tree import NONE

PAD, STEP, EOS = 0, 1, 2
CFG = ModelConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                  max_seq_len=64, init_std=1.0)
HEAD = heads.HeadConfig(kind="value", hidden=(8,))
D, L, P = 3, 6, 8  # steps, tokens per step, prompt length


def _spec(**kw):
    base = dict(policy=CFG, step_id=STEP, eos_id=EOS, pad_id=PAD, num_slots=3, step_len=L, max_depth=D)
    return ops.LMSpec(**{**base, **kw})


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


@pytest.mark.parametrize("preset", ["muzero", "gumbel"])
def test_lm_mcts_presets_build_consistent_trees(models, preset):
    """Inference mode; x1 runs in training mode below."""
    policy, value = models
    config = {"muzero": mcts.muzero, "gumbel": mcts.gumbel_muzero}[preset]()
    # muzero reads a value model; gumbel values every non-terminal node 0 (no value model).
    spec = _spec(temperature=1.0, value=CFG, head=HEAD) if preset == "muzero" else _spec(temperature=1.0)
    sims = 6
    out = lm.lm_mcts_jit(spec, _inputs(policy, value, seed=5, batch=4), jax.random.key(3), sims, config)
    _check_tree(spec, out, sims, config)
    assert int(np.max(np.asarray(out.tree.depth))) >= 2, "the search never went below the root's children"
    _check_render(out)


LINE = re.compile(r"((?:│  |   )*)[├└]─ n(\d+)  N=(\d+) V=([-+]\d\.\d\d) P=(\d\.\d\d)( \[END\])?( \*)?")


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
            assert bool(m.group(6)) == bool(t.terminal[b, node]) and bool(m.group(7)) == (node in best)
            stack.append(node)
            seen.append(node)
        assert sorted(seen) == list(range(1, used))
        for node in range(used):  # siblings in listing order have non-increasing visits
            order = [n for n in seen if t.parent[b, n] == node]
            assert all(t.visits[b, x] >= t.visits[b, y] for x, y in zip(order, order[1:]))
    capped = render.render_tree(out.tree, 0, max_depth=1, max_children=1).splitlines()
    kids = int((t.children[0, 0] != NONE).sum())
    assert len(capped) <= 1 + 1 + 1 + (kids > 1), capped  # root, one child, its "below" line, "more"
    assert any("more" in line for line in capped) == (kids > 1)


def test_x1_training_mode_verifier_scores_terminal_nodes(models):
    """x1 preset with a verifier (host callback): its scores are the values of the finished nodes."""
    policy, _ = models
    calls = []

    def verifier(problem_index, steps, steps_mask):
        calls.append(len(problem_index))
        # Deterministic and problem-dependent, in [-1, 1].
        sums = np.where(steps_mask, steps, 0).sum(axis=(1, 2))
        return ((sums + 3 * problem_index) % 5 - 2) / 2.0

    spec = _spec(temperature=1.0, verifier=verifier)  # no value model: non-terminal nodes are valued 0
    problem_index = np.array([5, 9, 2, 7], np.int32)
    inputs = _inputs(policy, None, seed=6, batch=4, problem_index=problem_index)
    sims = 8
    config = mcts.x1()
    out = lm.lm_mcts_jit(spec, inputs, jax.random.key(4), sims, config)
    _check_tree(spec, out, sims, config)
    assert calls, "the verifier was never called"
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
                want = ((sum(map(sum, steps)) + 3 * problem_index[b]) % 5 - 2) / 2.0
                assert t.raw_value[b, node] == pytest.approx(want), (b, node)
                assert values[b, node] == pytest.approx(want)  # terminal values are never overwritten
                scored += 1
    assert scored >= 4, f"only {scored} finished solutions in the trees"
