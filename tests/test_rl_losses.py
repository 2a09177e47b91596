"""Phase-2 RL objectives (rlm_jax.training.rl) against independent float64 numpy reimplementations,
plus behaviour: exact micro-batch accumulation, on-policy PPO = policy gradient, PPO/DPO updates move
log-probs the right way."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import rl, steps, sums, value

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  init_std=0.2, max_seq_len=64)
B, T = 6, 12
GAMMA = 0.9


# jitted once: eager forwards of the scanned transformer cost ~0.5 s each
_forward = jax.jit(lambda p, tokens, mask: transformer.forward(CFG, p, tokens, mask=mask)[0])


@pytest.fixture(scope="module")
def params():
    return jax.jit(transformer.init_params, static_argnums=0)(CFG, jax.random.key(0))


# ----------------------------------------------------------------------------------------------------
# numpy references, written from the formulas


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_logits(params, tokens, mask):
    return np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)


def counted(mask, loss_mask, b, t):
    """Is target token t + 1 of row b a counted action token?"""
    return bool(loss_mask[b, t + 1] and mask[b, t + 1] and mask[b, t])


def np_token_logp(logits, tokens, b, t, temperature=1.0):
    return np_log_softmax(logits[b, t] / temperature)[tokens[b, t + 1]]


def np_ppo(logits, batch, adv, clip_eps, kl_coef, ent_coef, temperature):
    """Loss and metrics by explicit loops over rows and counted tokens."""
    tokens, mask, lm = batch["tokens"], batch["mask"], batch["loss_mask"]
    sw = batch.get("sample_weight", np.ones(len(tokens)))
    acc = dict(loss=0.0, policy_loss=0.0, kl=0.0, entropy=0.0, clip_fraction=0.0, approx_kl=0.0)
    den = 0.0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if not counted(mask, lm, b, t):
                continue
            lp_all = np_log_softmax(logits[b, t] / temperature)
            logp = lp_all[tokens[b, t + 1]]
            old, ref = float(batch["old_logprobs"][b, t]), float(batch["ref_logprobs"][b, t])
            ratio = np.exp(logp - old)
            a = float(adv[b])
            surr1, surr2 = ratio * a, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a
            pg = -min(surr1, surr2)
            kl = np.exp(ref - logp) - (ref - logp) - 1
            ent = -np.sum(np.exp(lp_all) * lp_all)
            terms = dict(loss=pg + kl_coef * kl - ent_coef * ent, policy_loss=pg, kl=kl, entropy=ent,
                         clip_fraction=float(surr2 < surr1), approx_kl=ratio - 1 - np.log(ratio))
            for k, v in terms.items():
                acc[k] += sw[b] * v
            den += sw[b]
    return {k: v / den for k, v in acc.items()}


def np_grpo_advantages(rewards, groups, eps, valid=None, scale=True):
    valid = np.ones(len(rewards), bool) if valid is None else valid
    out = np.zeros(len(rewards))
    for g in set(groups.tolist()):
        idx = [i for i in range(len(rewards)) if groups[i] == g and valid[i]]
        r = np.asarray(rewards, np.float64)[idx]
        std = np.std(r, ddof=1) if len(r) > 1 else 0.0
        for i in idx:
            out[i] = (rewards[i] - r.mean()) / ((std + eps) if scale else 1.0)
    return out


def random_policy_batch(rng, params, b=B, t=T, noise=0.5):
    """Left-padded rows with varied prompt lengths; loss_mask also set on some padding (must be ignored);
    old/ref log-probs = current ones + noise, so some ratios leave the clip range."""
    tokens = rng.integers(1, CFG.vocab_size, (b, t))
    mask = np.ones((b, t), bool)
    loss_mask = np.zeros((b, t), bool)
    for i in range(b):
        pad = int(rng.integers(0, t // 2))
        mask[i, :pad] = False
        tokens[i, :pad] = 0
        step = int(rng.integers(2, t - pad))
        loss_mask[i, t - step:] = True
        loss_mask[i, :pad] = rng.random(pad) < 0.5
    logits = np_logits(params, tokens, mask)
    cur = np.array([[np_token_logp(logits, tokens, i, j) for j in range(t - 1)] for i in range(b)])
    return {
        "tokens": tokens, "mask": mask, "loss_mask": loss_mask,
        "old_logprobs": (cur + noise * rng.normal(size=cur.shape)).astype(np.float32),
        "ref_logprobs": (cur + noise * rng.normal(size=cur.shape)).astype(np.float32),
        "sample_weight": rng.uniform(0.5, 1.5, b).astype(np.float32),
    }, logits


# ----------------------------------------------------------------------------------------------------
# advantages


def test_blueprint_advantage_is_algorithm_6():
    q_step, q_parent, r = np.array([0.5, -0.2, 1.0]), np.array([0.3, 0.4, 0.6]), np.array([0.0, 0.0, 0.0])
    v_next, v_cur = rl.mcts_state_values(q_step, q_parent, GAMMA)
    np.testing.assert_allclose(v_next, q_step / GAMMA, rtol=1e-6)
    adv = rl.blueprint_advantage(r, v_next, v_cur, GAMMA)
    # r + gamma * (q_step / gamma) - q_parent / gamma
    np.testing.assert_allclose(adv, q_step - q_parent / GAMMA, rtol=1e-6)
    assert float(rl.blueprint_advantage(1.0, 0.0, 0.5, GAMMA)) == pytest.approx(0.5)


_grpo_jit = jax.jit(rl.grpo_advantages, static_argnames="scale_by_std")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 40), st.floats(-2, 2), st.booleans()), min_size=1, max_size=12),
       st.booleans())
def test_grpo_advantages_match_per_group_loop(rows, scale):
    # padded to 12 rows with invalid ones (as a fixed-shape batch is), so one compile serves all examples
    rows = rows + [(0, 9.0, False)] * (12 - len(rows))
    groups = np.array([g for g, _, _ in rows])
    rewards = np.array([r for _, r, _ in rows], np.float32)
    valid = np.array([v for _, _, v in rows])
    got = _grpo_jit(rewards, groups, 1e-4, valid=valid, scale_by_std=scale)
    want = np_grpo_advantages(rewards, groups, 1e-4, valid, scale)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grpo_advantages_jit_and_known_values():
    f = jax.jit(rl.grpo_advantages)
    got = f(jnp.array([1.0, 0.0, 1.0, 0.0, 5.0]), jnp.array([70, 70, 3, 3, 9]))
    # mean 0.5, deviations +-0.5, sample std sqrt(0.5); the singleton group gets 0
    np.testing.assert_allclose(got, [np.sqrt(0.5), -np.sqrt(0.5)] * 2 + [0.0], rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# PPO


@pytest.fixture(scope="module")
def ppo_setup(params):
    kw = dict(clip_eps=0.2, kl_coef=0.05, entropy_coef=0.02, logit_temperature=0.9, gamma=GAMMA)
    fn = jax.jit(functools.partial(rl.ppo_loss, CFG, **kw))
    return fn, kw


def test_ppo_matches_numpy_reference(params, ppo_setup):
    fn, kw = ppo_setup
    rng = np.random.default_rng(1)
    batch, _ = random_policy_batch(rng, params)
    # no 'advantage' key: the loss computes Algorithm 6's r + gamma v_next - v_current
    batch.update(reward=rng.normal(size=B).astype(np.float32), v_next=rng.normal(size=B).astype(np.float32),
                 v_current=rng.normal(size=B).astype(np.float32))
    adv = batch["reward"] + GAMMA * batch["v_next"].astype(np.float64) - batch["v_current"]
    logits = np_logits(params, batch["tokens"], batch["mask"])
    want = np_ppo(logits, batch, adv, kw["clip_eps"], kw["kl_coef"], kw["entropy_coef"],
                  kw["logit_temperature"])
    loss, metrics = fn(params, batch)
    assert 0.05 < want["clip_fraction"] < 0.95, "test data should clip some tokens and not others"
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
    np.testing.assert_allclose(loss, want["loss"], rtol=2e-5, atol=2e-6)


def test_ppo_ignores_everything_outside_counted_tokens(params, ppo_setup):
    fn, _ = ppo_setup
    rng = np.random.default_rng(2)
    batch, _ = random_policy_batch(rng, params)
    batch.update(reward=np.ones(B, np.float32), v_next=np.zeros(B, np.float32),
                 v_current=np.zeros(B, np.float32))
    w = np.asarray(steps.target_weights({k: jnp.asarray(v) for k, v in batch.items()}))
    assert 0 < w.sum() < w.size
    moved = dict(batch)
    for k in ("old_logprobs", "ref_logprobs"):
        moved[k] = np.where(w > 0, batch[k], batch[k] + rng.normal(size=w.shape) * 3).astype(np.float32)
    moved["tokens"] = np.where(batch["mask"], batch["tokens"], rng.integers(1, CFG.vocab_size, (B, T)))
    a, b = fn(params, batch), fn(params, moved)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_ppo_on_policy_is_plain_policy_gradient(params):
    """old_logprobs = the current log-probs: ratio 1, nothing clipped, and the PPO gradient is
    REINFORCE's, -sum_t w_t A grad log pi(a_t) / sum_t w_t. Checked with respect to the logits (every
    entry of [B, T, V]): ppo_loss is this core applied to the transformer's logits, so the chain rule
    carries the equality to the params unchanged, without compiling a transformer backward pass."""
    rng = np.random.default_rng(3)
    batch, _ = random_policy_batch(rng, params, noise=0.0)
    batch.pop("sample_weight")
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    adv = jnp.asarray(rng.normal(size=B), jnp.float32)
    logits0 = jnp.asarray(rng.normal(size=(B, T, CFG.vocab_size)) * 2, jnp.float32)
    jb["old_logprobs"] = steps.target_log_probs(logits0, jb["tokens"])  # the sampler's own log-probs
    w = steps.target_weights(jb)

    def ppo(logits):
        s = rl.policy_clip_sums(steps.target_log_probs(logits, jb["tokens"]), logits, jb, adv,
                                clip_eps=0.2, kl_coef=0.0, entropy_coef=0.0)
        return sums.finalize(s)

    def pg(logits):
        return -(steps.target_log_probs(logits, jb["tokens"]) * w * adv[:, None]).sum() / w.sum()

    (loss, metrics), g_ppo = jax.jit(jax.value_and_grad(ppo, has_aux=True))(logits0)
    g_pg = jax.jit(jax.grad(pg))(logits0)
    assert float(metrics["clip_fraction"]) == 0.0
    np.testing.assert_allclose(metrics["ratio"], 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=1e-6)
    # at ratio 1 the surrogate's value is -mean(A) over counted tokens; its gradient is REINFORCE's
    np.testing.assert_allclose(loss, -(w * adv[:, None]).sum() / w.sum(), rtol=1e-5)
    assert float(jnp.abs(g_pg).max()) > 1e-3
    np.testing.assert_allclose(g_ppo, g_pg, rtol=1e-5, atol=1e-8)


def test_ppo_steps_raise_positive_and_lower_negative_advantage_steps(params):
    prompt = [5, 9, 11, 2]
    good, bad = [20, 21, 22], [30, 31, 32]
    tokens = np.array([prompt + good, prompt + bad])
    mask = np.ones_like(tokens, bool)
    loss_mask = np.zeros_like(mask)
    loss_mask[:, len(prompt):] = True

    def token_logp(p):
        return np.asarray(steps.target_log_probs(_forward(p, jnp.asarray(tokens), jnp.asarray(mask)),
                                                 jnp.asarray(tokens)))

    def step_logp(p):
        return (token_logp(p) * loss_mask[:, 1:]).sum(-1)

    p0 = jax.tree.map(jnp.array, params)  # a copy: the train step donates its input
    before = step_logp(p0)
    old = token_logp(p0)
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "old_logprobs": old,
             "ref_logprobs": old, "advantage": np.array([1.0, -1.0], np.float32)}
    opt = optax.adam(3e-3)
    step = steps.make_train_step(CFG, opt, loss_fn=functools.partial(rl.ppo_loss, CFG))
    p, state = jax.tree.map(jnp.array, p0), opt.init(p0)
    for _ in range(4):
        p, state, metrics = step(p, state, batch)
    after = step_logp(p)
    assert after[0] > before[0] + 0.05, (before, after)
    assert after[1] < before[1] - 0.05, (before, after)
    assert float(metrics["clip_fraction"]) >= 0.0 and np.isfinite(float(metrics["loss"]))


def test_ppo_clear_errors(params):
    batch, _ = random_policy_batch(np.random.default_rng(4), params)
    batch["advantage"] = np.ones(B, np.float32)
    with pytest.raises(KeyError, match="old_logprobs"):
        rl.ppo_loss(CFG, params, {k: v for k, v in batch.items() if k != "old_logprobs"})
    with pytest.raises(ValueError, match=r"ref_logprobs.*\(6, 11\)"):
        rl.ppo_loss(CFG, params, {**batch, "ref_logprobs": batch["ref_logprobs"][:, 1:]})
    with pytest.raises(KeyError, match="v_next"):
        rl.ppo_loss(CFG, params, {k: v for k, v in batch.items() if k != "advantage"})


# ----------------------------------------------------------------------------------------------------
# DPO


def dpo_batch(rng, params):
    """Chosen/rejected siblings: one shared state, two different steps."""
    half, _ = random_policy_batch(rng, params, b=4)
    other = half["tokens"].copy()
    step = half["loss_mask"] & half["mask"]
    other[step] = rng.integers(1, CFG.vocab_size, int(step.sum()))
    batch = {"sample_weight": half["sample_weight"]}
    for side, toks in (("chosen", half["tokens"]), ("rejected", other)):
        batch[f"{side}_tokens"] = toks
        batch[f"{side}_mask"] = half["mask"]
        batch[f"{side}_loss_mask"] = half["loss_mask"]
        batch[f"{side}_ref_logprobs"] = (rng.normal(-4, 1, (4, T - 1))).astype(np.float32)
    return batch


def np_dpo(params, batch, beta):
    num = den = 0.0
    acc = 0.0
    for i in range(batch["chosen_tokens"].shape[0]):
        r = {}
        for side in ("chosen", "rejected"):
            tok, m, lm = (batch[f"{side}_{f}"] for f in ("tokens", "mask", "loss_mask"))
            lg = np_logits(params, tok, m)
            ts = [t for t in range(T - 1) if counted(m, lm, i, t)]
            pol = sum(np_token_logp(lg, tok, i, t) for t in ts)
            ref = sum(batch[f"{side}_ref_logprobs"][i, t] for t in ts)
            r[side] = beta * (pol - ref)
        margin = r["chosen"] - r["rejected"]
        w = batch["sample_weight"][i]
        num += w * -np.log(1 / (1 + np.exp(-margin)))
        acc += w * (margin > 0)
        den += w
    return num / den, acc / den


def test_dpo_matches_reference_and_sgd_widens_the_margin(params):
    rng = np.random.default_rng(6)
    batch = dpo_batch(rng, params)
    fn = jax.jit(jax.value_and_grad(functools.partial(rl.dpo_loss, CFG, beta=0.5), has_aux=True))
    (loss, metrics), grads = fn(params, batch)
    want_loss, want_acc = np_dpo(params, batch, 0.5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_accuracy"], want_acc, rtol=1e-6)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    (loss2, metrics2), _ = fn(stepped, batch)
    assert float(metrics2["margin"]) > float(metrics["margin"]) + 1e-3
    assert float(loss2) < float(loss)


# ----------------------------------------------------------------------------------------------------
# value / Q head


@pytest.mark.parametrize("kind,loss", [("q", "mse"), ("q", "bce"), ("orm", "bce")])
def test_value_losses_match_reference(params, kind, loss):
    head_cfg = heads.HeadConfig(kind=kind, hidden=(16,))
    vparams = heads.init_value_params(CFG, head_cfg, jax.random.key(1), trunk=params)
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, CFG.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    for i in range(B):
        mask[i, :i] = False
    y = rng.uniform(-1, 1, B) if head_cfg.signed else rng.uniform(0, 1, B)
    sw = rng.uniform(0.5, 1.5, B)
    batch = {"tokens": tokens, "mask": mask, "q": y.astype(np.float32),
             "sample_weight": sw.astype(np.float32)}
    loss_fn = jax.jit(functools.partial(value.value_regression_loss, CFG, head_cfg, loss=loss))
    got, metrics = loss_fn(vparams, batch)
    z_all = np.asarray(jax.jit(functools.partial(heads.head_logits, CFG, head_cfg))(vparams, tokens, mask),
                       np.float64)
    z = np.array([z_all[i, max(np.nonzero(mask[i])[0])] for i in range(B)])
    sig = 1 / (1 + np.exp(-z))
    pred = 2 * sig - 1 if head_cfg.signed else sig
    if loss == "mse":
        per = (pred - y) ** 2
    else:
        p = (y + 1) / 2 if head_cfg.signed else y
        per = -(p * np.log(sig) + (1 - p) * np.log(1 - sig))
    np.testing.assert_allclose(got, (sw * per).sum() / sw.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["prediction"], (sw * pred).sum() / sw.sum(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# micro-batch accumulation


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _add_sums(a, b):
    """Two objectives' Sums added pair by pair (what one batch of both micro-batches' rows would give)."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def test_ppo_micro_batch_sums_add_up_to_the_full_batch(params):
    """Transformer PPO: the Sums of 3 micro-batches, added, give the full-batch loss and metrics
    (gradients: `test_grad_accum_in_the_step_equals_the_full_batch`)."""
    rng = np.random.default_rng(8)
    batch, _ = random_policy_batch(rng, params)
    batch["advantage"] = rng.normal(size=B).astype(np.float32)
    sums_fn = jax.jit(functools.partial(rl.ppo_sums, CFG, clip_eps=0.2, kl_coef=0.05, entropy_coef=0.02))
    loss, metrics = sums.finalize(sums_fn(params, batch))
    parts = [sums_fn(params, {k: v[i:i + 2] for k, v in batch.items()}) for i in (0, 2, 4)]
    loss_a, metrics_a = sums.finalize(functools.reduce(_add_sums, parts))
    np.testing.assert_allclose(loss_a, loss, rtol=2e-5, atol=1e-7)
    _assert_trees_close(metrics_a, metrics)
    naive = np.mean([float(sums.finalize(p)[0]) for p in parts])
    assert abs(naive - float(loss)) > 1e-4, "a mean of micro-batch means should differ here"


def test_grad_accum_in_the_step_equals_the_full_batch(params):
    """make_train_step(grad_accum=3) on a [3 * 2, T] batch takes the same update as grad_accum=1 on it:
    micro-batches are weighted by their counted tokens (next_token_loss's num_tokens), not averaged as
    means. The micro-batches here count very different numbers of tokens, so a mean of per-micro-batch
    gradients moves the params elsewhere."""
    rng = np.random.default_rng(10)
    tokens = rng.integers(1, CFG.vocab_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[:, :2] = np.arange(2)[None] >= rng.integers(0, 3, (B, 1))  # some left padding
    tokens = np.where(mask, tokens, 0)
    counted_from = np.array([T - 2, T - 3, 1, 2, T - 5, 4])  # micro-batches count ~3, ~20 and ~14 tokens
    loss_mask = np.arange(T)[None] >= counted_from[:, None]
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2, 4)]
    counts = [float(steps.target_weights(m).sum()) for m in micro]
    assert len(set(counts)) == 3, counts

    opt = optax.sgd(1.0)
    loss_fn = functools.partial(steps.next_token_loss, CFG)

    def stepped(grad_accum):
        step = jax.jit(steps.make_train_step(CFG, opt, loss_fn=loss_fn, jit=False, grad_accum=grad_accum))
        p = jax.tree.map(jnp.array, params)
        return step(p, opt.init(p), batch)

    p_full, _, m_full = stepped(1)
    p_acc, _, m_acc = stepped(3)
    _assert_trees_close(p_acc, p_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_acc["accuracy"], m_full["accuracy"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)

    # the naive alternative: one SGD step on the mean of the micro-batches' mean-loss gradients
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    mean_grads = jax.tree.map(lambda *g: sum(g) / len(g), *[grad_fn(params, m) for m in micro])
    p_naive = jax.tree.map(lambda p, g: p - g, params, mean_grads)
    gap = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(p_naive), jax.tree.leaves(p_full)))
    assert gap > 1e-3, "a mean of micro-batch means should move the params differently here"


def test_value_sums_add_up_to_the_full_batch(params):
    """Per-sample denominators (weights 1 + 0 and 2 + 0.5) combine exactly across micro-batches."""
    head_cfg = heads.HeadConfig(kind="q", hidden=(16,))
    vparams = heads.init_value_params(CFG, head_cfg, jax.random.key(2), trunk=params)
    rng = np.random.default_rng(9)
    batch = {"tokens": rng.integers(1, CFG.vocab_size, (4, T)), "mask": np.ones((4, T), bool),
             "q": rng.uniform(-1, 1, 4).astype(np.float32),
             "sample_weight": np.array([1.0, 0.0, 2.0, 0.5], np.float32)}
    sums_fn = jax.jit(functools.partial(value.value_sums, CFG, head_cfg))
    loss, metrics = sums.finalize(sums_fn(vparams, batch))
    parts = [sums_fn(vparams, {k: v[i:i + 2] for k, v in batch.items()}) for i in (0, 2)]
    loss_a, metrics_a = sums.finalize(_add_sums(*parts))
    np.testing.assert_allclose(loss_a, loss, rtol=2e-5)
    _assert_trees_close(metrics_a, metrics)
    assert float(metrics["weight"]) == pytest.approx(3.5)
    naive = np.mean([float(sums.finalize(p)[0]) for p in parts])
    assert abs(naive - float(loss)) > 1e-4, "a mean of micro-batch means should differ here"
