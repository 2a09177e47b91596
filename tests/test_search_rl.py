"""Phase 2 wiring: search samples -> each algorithm's training rows -> replay buffer -> a loss step.

The losses themselves are checked against float64 references in test_rl_losses.py; here: the rows each
algorithm builds from (state, step, q) samples (advantages, DPO pairs, GRPO groups), that they fit the
replay buffer's fields, and that batches drawn from the buffer train.
"""
import functools

import jax
import numpy as np
import pytest

from rlm_jax import config
from rlm_jax.config import TrainerConfig
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import replay, rl, search_rl, steps, trainer, value

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32, max_seq_len=32)
PAD, SEQ = 0, 24
GAMMA = 0.96


def _samples(seed, n_groups=6, per_group=3):
    """Sibling steps under n_groups parents: random prompt + path states, random steps, q in [-1, 1]."""
    rng = np.random.default_rng(seed)
    samples, solutions = [], []
    for g in range(n_groups):
        state = rng.integers(3, CFG.vocab_size, rng.integers(4, 12)).tolist()
        v_parent = float(rng.uniform(-1, 1))
        for _ in range(per_group):
            action = rng.integers(3, CFG.vocab_size, rng.integers(1, 6)).tolist()
            q = float(rng.choice([-1.0, 1.0])) if rng.random() < 0.3 else float(rng.uniform(-1, 1))
            samples.append({"state": state, "action": action, "q": q, "v_parent": v_parent, "group": 100 * g + 7})
            if q == 1.0:
                solutions.append((state[:3], state[3:] + action))
    return samples, solutions


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.key(0))


def test_ppo_rows_carry_the_blueprint_advantage(params):
    samples, solutions = _samples(1)
    arr = search_rl.policy_arrays(CFG, "ppo", samples, solutions, params, params, PAD, SEQ, gamma=GAMMA)
    q = np.array([s["q"] for s in samples], np.float64)
    v_parent = np.array([s["v_parent"] for s in samples], np.float64)
    # A = r + gamma v_next - v_current with v = q / gamma and r = 0: q - v_parent / gamma (float64 reference).
    np.testing.assert_allclose(arr["advantage"], q - v_parent / GAMMA, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arr["v_next"], q / GAMMA, rtol=1e-6)
    # Loss only on the step's tokens; the behaviour log-probs are the policy's own on those rows.
    for row, s in zip(range(len(samples)), samples):
        assert arr["loss_mask"][row].sum() == len(s["action"])
        assert arr["tokens"][row][arr["mask"][row]].tolist() == s["state"] + s["action"]
    np.testing.assert_allclose(arr["old_logprobs"], arr["ref_logprobs"])


def test_grpo_advantages_are_normalised_within_each_parent(params):
    samples, solutions = _samples(2)
    arr = search_rl.policy_arrays(CFG, "grpo", samples, solutions, params, params, PAD, SEQ)
    for g in set(arr["group"].tolist()):
        q = arr["q"][arr["group"] == g].astype(np.float64)
        want = (q - q.mean()) / (q.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(arr["advantage"][arr["group"] == g], want, rtol=1e-4, atol=1e-5)


def test_dpo_pairs_the_best_and_worst_sibling(params):
    samples, solutions = _samples(3)
    arr = search_rl.policy_arrays(CFG, "dpo", samples, solutions, params, params, PAD, SEQ)
    groups = {}
    for s in samples:
        groups.setdefault(s["group"], []).append(s)
    want = [(max(g, key=lambda s: s["q"]), min(g, key=lambda s: s["q"])) for g in groups.values()
            if max(s["q"] for s in g) - min(s["q"] for s in g) > 0.25]
    assert 0 < len(want) == arr["chosen_tokens"].shape[0]
    for row, (best, worst) in enumerate(want):
        assert arr["chosen_tokens"][row][arr["chosen_mask"][row]].tolist() == best["state"] + best["action"]
        assert arr["rejected_tokens"][row][arr["rejected_mask"][row]].tolist() == worst["state"] + worst["action"]


def test_sft_rows_are_the_verified_solutions(params):
    samples, solutions = _samples(4)
    assert solutions
    arr = search_rl.policy_arrays(CFG, "sft", samples, solutions, params, params, PAD, SEQ)
    for row, (prompt, sol) in enumerate(solutions):
        assert arr["tokens"][row][arr["mask"][row]].tolist() == prompt + sol
        assert arr["loss_mask"][row].sum() == len(sol)
    assert search_rl.policy_arrays(CFG, "sft", samples, [], params, params, PAD, SEQ) is None


LOSSES = {
    "sft": None,
    "ppo": functools.partial(rl.ppo_loss, CFG, clip_eps=0.2, kl_coef=0.01, entropy_coef=0.01),
    "grpo": functools.partial(rl.ppo_loss, CFG, clip_eps=0.2, kl_coef=0.01, entropy_coef=0.01),
    "grpo_sampled": functools.partial(rl.ppo_loss, CFG, clip_eps=0.2, kl_coef=0.01, entropy_coef=0.01),
    "dpo": functools.partial(rl.dpo_loss, CFG, beta=0.1),
}


@pytest.mark.parametrize("algorithm", config.RL_ALGORITHMS)
def test_replay_batches_of_every_algorithm_train(params, algorithm):
    """Rows of two iterations go through the buffer (its fields are the algorithm's); batches drawn from
    it take optimizer steps that lower the algorithm's loss on them."""
    buf = replay.init(64, SEQ, search_rl.replay_fields(algorithm))
    for it in range(2):
        samples, solutions = _samples(10 + it)
        buf = replay.add(buf, search_rl.policy_arrays(CFG, algorithm, samples, solutions, params, params, PAD, SEQ,
                                                      gamma=GAMMA))
    assert int(buf.size) > 0
    batch_at = search_rl.replay_sampler(buf, 8, seed=0)
    np.testing.assert_array_equal(batch_at(3)["tokens" if algorithm != "dpo" else "chosen_tokens"],
                                  batch_at(3)["tokens" if algorithm != "dpo" else "chosen_tokens"])  # seeded
    tx = trainer.make_optimizer(TrainerConfig(lr=3e-2, steps=20, warmup_steps=0, weight_decay=0.0, clip_norm=1.0))
    step = steps.make_train_step(CFG, tx, loss_fn=LOSSES[algorithm])
    p, o = jax.tree.map(lambda x: x.copy(), params), None
    o = tx.init(p)
    fixed = batch_at(0)
    losses = []
    for _ in range(8):
        p, o, m = step(p, o, fixed)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_value_rows_regress_on_backed_up_values():
    samples, _ = _samples(5)
    arr = search_rl.value_arrays(samples, PAD, SEQ)
    assert set(arr) == set(search_rl.VALUE_FIELDS)
    np.testing.assert_allclose(arr["q"], [s["q"] for s in samples])
    head = heads.HeadConfig(kind="value", hidden=(8,))
    buf = replay.add(replay.init(32, SEQ, search_rl.VALUE_FIELDS), arr)
    batch = search_rl.replay_sampler(buf, 16, seed=1)(0)
    v = heads.init_value_params(CFG, head, jax.random.key(1))
    tx = trainer.make_optimizer(TrainerConfig(lr=1e-2, steps=30, warmup_steps=0, weight_decay=0.0, clip_norm=1.0))
    step = steps.make_train_step(CFG, tx, loss_fn=functools.partial(value.value_regression_loss, CFG, head))
    o = tx.init(v)
    first = None
    for _ in range(15):
        v, o, m = step(v, o, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.7 * first



@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_rehearsal_adds_the_sft_loss_of_reference_traces(params, algorithm):
    samples, solutions = _samples(4)
    arrays = search_rl.policy_arrays(CFG, algorithm, samples, solutions, params, params, PAD, SEQ, GAMMA)
    rng = np.random.default_rng(5)
    traces = [(rng.integers(3, CFG.vocab_size, 10).tolist(), [False] * 4 + [True] * 6) for _ in range(4)]
    batch = {"rl": arrays, "sft": search_rl._pad_rows(traces, PAD, SEQ)}
    base = None if algorithm == "sft" else functools.partial(rl.dpo_loss, CFG, beta=0.1)
    rl_only = base or functools.partial(steps.next_token_loss, CFG)
    both = functools.partial(rl.rehearsal_loss, CFG, base, sft_weight=0.5)
    (total, metrics), g = jax.jit(jax.value_and_grad(both, has_aux=True))(params, batch)
    (rl_alone, _), g_rl = jax.jit(jax.value_and_grad(lambda p, b: rl_only(p, b["rl"]), has_aux=True))(params, batch)
    sft_alone = jax.jit(lambda p, b: steps.next_token_loss(CFG, p, b["sft"])[0])(params, batch)
    np.testing.assert_allclose(total, rl_alone + 0.5 * sft_alone, rtol=1e-5)
    np.testing.assert_allclose(metrics["sft_loss"], sft_alone, rtol=1e-5)
    np.testing.assert_allclose(metrics["rl_loss"], rl_alone, rtol=1e-5)
    # the rehearsal term has a gradient of its own
    diff = sum(float(np.abs(x - y).sum()) for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_rl)))
    assert diff > 1e-3
