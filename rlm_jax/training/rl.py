"""Phase-2 objectives: PPO / GRPO / DPO for the policy, regression for the value (Q) head.

One training sample is a search state (prompt + earlier steps) followed by the next step (the action),
as [B, T] left-padded arrays (see `rlm_jax.training.steps`):

  tokens [B, T] int, mask [B, T] bool (real tokens), loss_mask [B, T] bool (the action step's tokens)
  old_logprobs [B, T-1]  the sampling policy's per-token log-probs, aligned with `steps.target_log_probs`
                         (entry t scores tokens[:, t + 1]); computed at the same `logit_temperature`
  ref_logprobs [B, T-1]  the reference (SFT) policy's, same alignment (needed when kl_coef != 0)
  advantage [B]          one scalar per step; if absent, PPO computes `blueprint_advantage` from
  reward, v_next, v_current [B]
  q [B]                  backed-up MCTS Q of the step, in [-1, 1] (value-head target)
  group [B] int          GRPO groups (e.g. siblings: the children of one node, or samples of one prompt)
  sample_weight [B]      optional per-sample weight (default 1): importance weights from prioritised
                         replay, or 0 for padding rows of a fixed-shape batch
DPO pairs use chosen_tokens, chosen_mask, chosen_loss_mask, chosen_ref_logprobs and the same four
rejected_* arrays (two children of one node with different backed-up values).

Reductions. Every objective first returns `Sums`: {name: (weighted sum, denominator)}, with the
objective under "loss" (tunix's LossOutput(WeightedMetric(sum, denominator)) idea). A mean over
micro-batches then equals the full-batch mean exactly: add the sums and the denominators separately,
divide once (`accumulate`), never average per-micro-batch means. Denominators never depend on params,
so d(sum / denom) = d(sum) / denom and gradients accumulate the same way. `*_loss` wraps `*_sums` with
`finalize` and has the `loss_fn(params, batch) -> (loss, metrics)` shape `steps.make_train_step` takes:

    loss_fn = functools.partial(rl.ppo_loss, cfg, clip_eps=0.2)
    step = steps.make_train_step(cfg, optax.adam(1e-5), loss_fn=loss_fn)
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.models.heads import HeadConfig
from rlm_jax.training.steps import next_token_loss, target_log_probs, target_weights

Pair = tuple  # (weighted sum, denominator): scalar float32 arrays
Sums = dict  # name -> Pair; "loss" is the objective
SumsFn = Callable  # (params, batch) -> Sums

_PAIR_FIELDS = ("tokens", "mask", "loss_mask", "ref_logprobs")


# ----------------------------------------------------------------------------------------------------
# (sum, denominator) bookkeeping


def _safe_div(s, d):
    """s / d, and 0 (not NaN) where nothing was counted."""
    return jnp.where(d > 0, s / jnp.where(d > 0, d, 1.0), 0.0)


def finalize(sums: Sums):
    """Sums -> (loss, metrics): every pair divided once. metrics also holds `weight`, the loss's
    denominator (counted tokens for PPO/GRPO, pairs for DPO, samples for the value loss)."""
    metrics = {k: _safe_div(s, d) for k, (s, d) in sums.items()}
    metrics["weight"] = sums["loss"][1]
    return metrics["loss"], metrics


def add_sums(a: Sums, b: Sums) -> Sums:
    """Elementwise sum of two Sums with the same names (sums with sums, denominators with denominators)."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot add Sums with different names: {sorted(a)} vs {sorted(b)}")
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def split_batch(batch: Mapping, num: int) -> dict:
    """Batch of [B, ...] arrays -> the same keys with [num, B // num, ...] (for `accumulate`)."""
    sizes = {k: v.shape[0] for k, v in batch.items()}
    b = next(iter(sizes.values()))
    if any(s != b for s in sizes.values()):
        raise ValueError(f"split_batch: batch fields disagree on the batch size: {sizes}")
    if b % num:
        raise ValueError(f"split_batch: batch size {b} is not divisible by num={num}; pad the batch "
                         "with sample_weight=0 rows or pick a divisor")
    return {k: v.reshape((num, b // num) + v.shape[1:]) for k, v in batch.items()}


def accumulate(sums_fn: SumsFn, params, micro_batches):
    """Gradient accumulation with exact full-batch averages.

    Args:
      sums_fn: `(params, batch) -> Sums`, e.g. `functools.partial(ppo_sums, cfg, clip_eps=0.2)`.
      micro_batches: a list of batch dicts (any sizes; unrolled), or one dict whose arrays have a
        leading micro-batch axis [M, b, ...] (`split_batch`; run with `lax.scan`, one compiled body).
    Returns:
      (loss, grads, metrics): what `finalize(sums_fn(params, full_batch))` and its gradient give.
    """
    def one(p, mb):
        sums = sums_fn(p, mb)
        return sums["loss"][0], sums

    grad_fn = jax.grad(one, has_aux=True)
    add_tree = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
    if isinstance(micro_batches, (list, tuple)):
        if not micro_batches:
            raise ValueError("accumulate: no micro-batches")
        grads, total = grad_fn(params, micro_batches[0])
        for mb in micro_batches[1:]:
            g, sums = grad_fn(params, mb)
            grads, total = add_tree(grads, g), add_sums(total, sums)
    else:
        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))

        def body(carry, mb):
            return add_tree(carry, grad_fn(params, mb)), None

        (grads, total), _ = jax.lax.scan(body, zeros, micro_batches)
    denom = total["loss"][1]
    scale = _safe_div(1.0, denom)
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    loss, metrics = finalize(total)
    return loss, grads, metrics


# ----------------------------------------------------------------------------------------------------
# advantages


def blueprint_advantage(reward, v_next, v_current, gamma: float):
    """The blueprint's replacement for GAE (arXiv 2501.11223, App. C.3.3, Algorithm 6): a one-step TD
    error on values taken from the MCTS tree, with no trained critic:

        A(s_i) = r(s_i, a_i) + gamma * v(s_{i+1}) - v(s_i),
        v(s_{i+1}) = q_MCTS(s_i) / gamma,   v(s_i) = q_MCTS(s_{i-1}) / gamma,

    where q_MCTS(s_i) is the backed-up value of the node reached by step a_i (Q of the edge) and
    q_MCTS(s_{i-1}) its parent's. The paper derives v = q / gamma from Q(s_t, a_t) = gamma V(s_{t+1})
    under sparse rewards (App. C.3.2); `mcts_state_values` does that conversion. Under the x1 reward
    convention a terminal node's q already *is* its verifier reward (+-1), so pass reward = 0 there (or
    reward = r with v_next = 0), never both: the reward would count twice.

    All arguments broadcast (typically [B]); returns float32 of the broadcast shape.
    """
    reward, v_next, v_current = (jnp.asarray(x, jnp.float32) for x in (reward, v_next, v_current))
    return reward + gamma * v_next - v_current


def mcts_state_values(q_step, q_parent, gamma: float):
    """(v_next, v_current) = (q_step / gamma, q_parent / gamma): Algorithm 6's state values from the
    backed-up q of the step's node and of its parent. [B] each."""
    return jnp.asarray(q_step, jnp.float32) / gamma, jnp.asarray(q_parent, jnp.float32) / gamma


def grpo_advantages(rewards, group_ids, eps: float = 1e-6, *, valid=None, scale_by_std: bool = True):
    """Group-relative advantages (GRPO, DeepSeekMath): (r - group mean) / (group std + eps).

    Args:
      rewards: [B] float.
      group_ids: [B] int, any values (e.g. problem or parent-node ids); equal id = same group.
      valid: optional [B] bool; invalid rows (padding) are left out of the group statistics and get 0.
      scale_by_std: False gives Dr. GRPO's mean-centred advantage (no std division, which would up-weight
        near-unanimous groups).
    Returns:
      [B] float32. The std is the sample std (ddof=1, as TRL and tunix); a singleton group gets 0.
    Vectorised with segment sums over the ids' ranks (`jnp.unique(size=B)` keeps it jittable).
    """
    r = jnp.asarray(rewards, jnp.float32)
    b = r.shape[0]
    w = jnp.ones((b,), jnp.float32) if valid is None else jnp.asarray(valid).astype(jnp.float32)
    _, seg = jnp.unique(jnp.asarray(group_ids), return_inverse=True, size=b)
    seg = seg.reshape(b)
    n = jax.ops.segment_sum(w, seg, num_segments=b)
    mean = _safe_div(jax.ops.segment_sum(w * r, seg, num_segments=b), n)
    dev = r - mean[seg]
    var = _safe_div(jax.ops.segment_sum(w * dev * dev, seg, num_segments=b), jnp.maximum(n - 1.0, 0.0))
    adv = dev / (jnp.sqrt(var)[seg] + eps) if scale_by_std else dev
    return jnp.where(w > 0, adv, 0.0)


# ----------------------------------------------------------------------------------------------------
# policy objectives


def _require(batch, keys, who: str, hint: str = ""):
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{who} needs batch keys {missing} (got {sorted(batch)}){'; ' + hint if hint else ''}")


def _check_shape(batch, key, shape, who: str, what: str):
    got = tuple(batch[key].shape)
    if got != tuple(shape):
        raise ValueError(f"{who}: batch[{key!r}] has shape {got}, expected {tuple(shape)} ({what})")


def _check_policy_batch(batch, kl_coef: float, who: str):
    """Key and shape checks for the PPO/GRPO core, before any forward pass."""
    _require(batch, ["tokens", "mask", "loss_mask", "old_logprobs"], who,
             "old_logprobs are the sampling policy's per-token log-probs (steps.target_log_probs)")
    b, t = batch["tokens"].shape
    aligned = "[B, T-1], aligned with steps.target_log_probs"
    _check_shape(batch, "old_logprobs", (b, t - 1), who, aligned)
    if kl_coef != 0.0:
        _require(batch, ["ref_logprobs"], who, "pass the reference policy's log-probs or kl_coef=0")
        _check_shape(batch, "ref_logprobs", (b, t - 1), who, aligned)


def _sample_weight(batch, b: int):
    """[B] float32: batch['sample_weight'] or ones."""
    if "sample_weight" in batch:
        return jnp.asarray(batch["sample_weight"], jnp.float32).reshape(b)
    return jnp.ones((b,), jnp.float32)


def _log_probs_and_logits(cfg: ModelConfig, params, tokens, mask, temperature: float):
    """Temperature-scaled next-token logits [B, T, V] and target log-probs [B, T-1]."""
    logits, _, _ = transformer.forward(cfg, params, tokens, mask=mask)
    if temperature != 1.0:
        logits = logits / temperature
    return target_log_probs(logits, tokens), logits


def _entropy(logits):
    """Full-vocabulary entropy of softmax(logits): [..., V] -> [...] (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def policy_clip_sums(logp, logits, batch, advantage, *, clip_eps: float, kl_coef: float,
                     entropy_coef: float, who: str = "ppo") -> Sums:
    """The token-level PPO-clip core shared by PPO and GRPO, on precomputed arrays.

    Args:
      logp: [B, T-1] current policy's target log-probs (temperature applied).
      logits: [B, T, V] the same (temperature-scaled) logits, for the entropy; None skips it.
      batch: needs tokens (for the shapes), mask, loss_mask, old_logprobs [B, T-1]; ref_logprobs
        [B, T-1] if kl_coef != 0; optional sample_weight [B].
      advantage: [B], one per sample, broadcast over the step's tokens (x1's `GAE` scalar).
    Per counted token (weights `steps.target_weights` x sample_weight):
      ratio = exp(logp - old), pg = -min(ratio A, clip(ratio, 1-eps, 1+eps) A),
      kl = exp(ref - logp) - (ref - logp) - 1   (Schulman's k3 estimator: >= 0 per token, unbiased
                                                 for KL(pi || ref) on samples from pi (here from the
                                                 sampling policy, as in GRPO), lower variance than
                                                 log(pi / ref)),
      loss = pg + kl_coef kl - entropy_coef H   (H: full-vocabulary entropy at the token's position).
    All terms share one denominator, the counted tokens of the batch (a token-level mean).
    """
    _check_policy_batch(batch, kl_coef, who)
    b, t1 = logp.shape
    sw = _sample_weight(batch, b)
    w = target_weights(batch) * sw[:, None]
    denom = w.sum()
    adv = jnp.asarray(advantage, jnp.float32).reshape(b)[:, None]

    old = jax.lax.stop_gradient(jnp.asarray(batch["old_logprobs"], jnp.float32))
    log_ratio = logp - old
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    pg = -jnp.minimum(unclipped, clipped)
    # tokens where the clipped branch wins, i.e. whose gradient is cut
    clip_active = (clipped < unclipped).astype(jnp.float32)
    # k3 estimate of KL(old || new) on the old policy's samples: how far the update moved (a metric)
    approx_kl = ratio - 1.0 - log_ratio

    loss = pg
    if kl_coef != 0.0:
        d = jax.lax.stop_gradient(jnp.asarray(batch["ref_logprobs"], jnp.float32)) - logp
        kl = jnp.exp(d) - d - 1.0
        loss = loss + kl_coef * kl
    else:
        kl = jnp.zeros_like(logp)
    if logits is not None:
        ent = _entropy(logits[:, :-1])
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent
    else:
        ent = jnp.zeros_like(logp)
    tok = lambda x: ((x * w).sum(), denom)  # noqa: E731
    return {
        "loss": tok(loss),
        "policy_loss": tok(pg),
        "kl": tok(kl),
        "entropy": tok(ent),
        "clip_fraction": tok(clip_active),
        "approx_kl": tok(jax.lax.stop_gradient(approx_kl)),
        "ratio": tok(jax.lax.stop_gradient(ratio)),
        "advantage": ((sw * adv[:, 0]).sum(), sw.sum()),
    }


def ppo_sums(cfg: ModelConfig, params, batch, *, clip_eps: float = 0.2, kl_coef: float = 0.01,
             entropy_coef: float = 0.01, logit_temperature: float = 1.0, gamma: float = 0.96) -> Sums:
    """Token-level PPO-clip on search steps (the blueprint's Algorithm 5, x1's PolicyPPOTrainer).

    The ratio is to the *sampling* policy (old_logprobs), the KL to the *reference* (ref_logprobs), as in
    standard PPO with a KL penalty. (The paper's Alg. 5 writes the ratio as pi_theta / pi_ref; pass
    old_logprobs = ref_logprobs for that literal form.) Advantage: batch['advantage'] if present, else
    `blueprint_advantage(reward, v_next, v_current, gamma)`. The entropy bonus is x1's masked token mean
    of the full-vocabulary entropy. x1 divides logits by 0.9 (`logit_temperature`); old_logprobs must be
    computed at the same temperature. Advantages are not normalised here: a batch statistic would break
    micro-batch exactness; normalise when filling the replay buffer if wanted.
    """
    _check_policy_batch(batch, kl_coef, "ppo_loss")
    if "advantage" in batch:
        adv = batch["advantage"]
    else:
        _require(batch, ["reward", "v_next", "v_current"], "ppo_loss",
                 "pass batch['advantage'] [B] or the fields blueprint_advantage needs")
        adv = blueprint_advantage(batch["reward"], batch["v_next"], batch["v_current"], gamma)
    logp, logits = _log_probs_and_logits(cfg, params, batch["tokens"], batch["mask"], logit_temperature)
    return policy_clip_sums(logp, logits, batch, adv, clip_eps=clip_eps, kl_coef=kl_coef,
                            entropy_coef=entropy_coef, who="ppo_loss")


def ppo_loss(cfg: ModelConfig, params, batch, clip_eps: float = 0.2, kl_coef: float = 0.01,
             entropy_coef: float = 0.01, logit_temperature: float = 1.0, gamma: float = 0.96):
    """(loss, metrics) of `ppo_sums`. metrics: loss, policy_loss, kl, entropy, clip_fraction, approx_kl,
    ratio (token means), advantage (sample mean), weight (counted tokens)."""
    return finalize(ppo_sums(cfg, params, batch, clip_eps=clip_eps, kl_coef=kl_coef,
                             entropy_coef=entropy_coef, logit_temperature=logit_temperature, gamma=gamma))


def grpo_sums(cfg: ModelConfig, params, batch, *, clip_eps: float = 0.2, kl_coef: float = 0.04,
              entropy_coef: float = 0.0, logit_temperature: float = 1.0, eps: float = 1e-6,
              scale_by_std: bool = True) -> Sums:
    """GRPO: the PPO-clip core with `grpo_advantages(batch['reward'], batch['group'])`.

    Normalisation: one token-level mean over the whole batch (DAPO; also what Dr. GRPO's length-bias
    fix aims at), not GRPO's per-sequence mean of per-token means. With the per-sequence mean a token of
    a short step weighs more than one of a long step, which favours short correct and long wrong steps;
    the token mean weighs all tokens alike and is exactly the (sum, denominator) form that accumulates
    over micro-batches. Defaults follow DeepSeekMath (KL coefficient 0.04, no entropy bonus).

    The group statistics are over the batch given: when accumulating micro-batches, keep whole groups in
    one micro-batch, or compute `grpo_advantages` on the full batch, store it as batch['advantage'] and
    use `ppo_sums` (the same core).
    """
    _require(batch, ["reward", "group"], "grpo_loss", "group ids say which samples share a prompt/node")
    _check_policy_batch(batch, kl_coef, "grpo_loss")
    b = batch["tokens"].shape[0]
    adv = grpo_advantages(batch["reward"], batch["group"], eps,
                          valid=_sample_weight(batch, b) > 0, scale_by_std=scale_by_std)
    logp, logits = _log_probs_and_logits(cfg, params, batch["tokens"], batch["mask"], logit_temperature)
    return policy_clip_sums(logp, logits, batch, adv, clip_eps=clip_eps, kl_coef=kl_coef,
                            entropy_coef=entropy_coef, who="grpo_loss")


def grpo_loss(cfg: ModelConfig, params, batch, clip_eps: float = 0.2, kl_coef: float = 0.04,
              entropy_coef: float = 0.0, logit_temperature: float = 1.0, eps: float = 1e-6,
              scale_by_std: bool = True):
    """(loss, metrics) of `grpo_sums`; the same metrics as `ppo_loss`."""
    return finalize(grpo_sums(cfg, params, batch, clip_eps=clip_eps, kl_coef=kl_coef,
                              entropy_coef=entropy_coef, logit_temperature=logit_temperature, eps=eps,
                              scale_by_std=scale_by_std))


def dpo_sums(cfg: ModelConfig, params, batch, *, beta: float = 0.1) -> Sums:
    """DPO (Rafailov et al. 2023) on sibling steps: chosen/rejected are two children of one node, the
    chosen one with the higher backed-up value.

        loss = -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])

    with log pi(.) the sum of the step's token log-probs (its loss_mask tokens) and log ref(.) the same
    sum of the given chosen_/rejected_ref_logprobs [B, T-1]. (The text of the paper's Alg. 5 shows only
    the policy log-ratio; the reference terms are standard DPO and keep the policy near the SFT model.)
    Chosen and rejected run as one [2B, T] forward. Mean over pairs (weighted by sample_weight).
    """
    keys = [f"{side}_{f}" for side in ("chosen", "rejected") for f in _PAIR_FIELDS]
    _require(batch, keys, "dpo_loss")
    b, t = batch["chosen_tokens"].shape
    for k in keys:
        want = (b, t - 1) if k.endswith("logprobs") else (b, t)
        _check_shape(batch, k, want, "dpo_loss", "chosen_* and rejected_* share [B, T]; log-probs [B, T-1]")
    cat = {f: jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]]) for f in _PAIR_FIELDS}
    logp, _ = _log_probs_and_logits(cfg, params, cat["tokens"], cat["mask"], 1.0)
    w = target_weights(cat)
    policy = (logp * w).sum(-1)
    ref = (jnp.asarray(cat["ref_logprobs"], jnp.float32) * w).sum(-1)
    reward = beta * (policy - jax.lax.stop_gradient(ref))  # DPO's implicit reward of each step
    r_c, r_r = reward[:b], reward[b:]
    margin = r_c - r_r
    sw = _sample_weight(batch, b)
    n = sw.sum()
    pair = lambda x: ((sw * x).sum(), n)  # noqa: E731
    return {
        "loss": pair(jax.nn.softplus(-margin)),  # = -log sigmoid(margin), stable for large |margin|
        "reward_accuracy": pair((margin > 0).astype(jnp.float32)),
        "margin": pair(jax.lax.stop_gradient(margin)),
        "chosen_reward": pair(jax.lax.stop_gradient(r_c)),
        "rejected_reward": pair(jax.lax.stop_gradient(r_r)),
    }


def dpo_loss(cfg: ModelConfig, params, batch, beta: float = 0.1):
    """(loss, metrics) of `dpo_sums`: loss, reward_accuracy, margin, chosen_reward, rejected_reward
    (pair means) and weight (pairs)."""
    return finalize(dpo_sums(cfg, params, batch, beta=beta))


def with_rehearsal(cfg: ModelConfig, loss_fn: Callable | None, sft_weight: float = 1.0) -> Callable:
    """A policy loss plus SFT rehearsal: `(params, {"rl": batch, "sft": batch})` -> (loss, metrics) with

        loss = loss_fn(params, batch["rl"]) + sft_weight * next_token_loss(params, batch["sft"])

    (loss_fn None: next-token loss on the RL batch too). Rehearsing reference traces keeps an RL update
    on a few hundred search paths from drifting away from what SFT taught. metrics: the RL loss's, plus
    sft_loss, sft_accuracy; "loss" is the total."""
    rl_fn = loss_fn or (lambda params, batch: next_token_loss(cfg, params, batch))

    def loss(params, batch):
        rl_loss, metrics = rl_fn(params, batch["rl"])
        sft_loss, sft_metrics = next_token_loss(cfg, params, batch["sft"])
        total = rl_loss + sft_weight * sft_loss
        return total, {**metrics, "rl_loss": rl_loss, "loss": total, "sft_loss": sft_loss,
                       "sft_accuracy": sft_metrics["accuracy"]}

    return loss


# ----------------------------------------------------------------------------------------------------
# value / Q head


def value_sums(cfg: ModelConfig, head_cfg: HeadConfig, params, batch, *, loss: str = "mse",
               target_key: str = "q") -> Sums:
    """Regression of the value/Q head on backed-up values (the blueprint's Algorithm 7:
    mean (Q_phi(s, a) - q_MCTS)^2; Algorithm 3 for the BCE variant).

    The head is read at the last real token of each sample, i.e. the end of the step for a Q head
    (`heads.sequence_score`; x1 instead fits every token of the last step and reads 3 tokens early).
    Args:
      params: value params {"trunk", "head"} (`heads.init_value_params`).
      batch: tokens, mask [B, T]; batch[target_key] [B]: in the head's range for "mse" ([-1, 1] for
        value/q heads, [0, 1] for prm/orm); for "bce" a probability in [0, 1] (hard or soft labels, e.g.
        the fraction of correct rollouts) for prm/orm heads, or a signed target y in [-1, 1] for value/q
        heads, read as P(correct) = (y + 1) / 2 (their 2 sigmoid - 1 squash has the same logit).
      loss: "mse" (continuous bounded rewards) or "bce" (binary rewards, on the logit: stable).
    """
    if loss not in ("mse", "bce"):
        raise ValueError(f"value loss {loss!r} unknown; use 'mse' or 'bce'")
    _require(batch, ["tokens", "mask", target_key], "value_regression_loss")
    b = batch["tokens"].shape[0]
    _check_shape(batch, target_key, (b,), "value_regression_loss", "one target per sample")
    logit = heads.read_last(heads.head_logits(cfg, head_cfg, params, batch["tokens"], batch["mask"]),
                            batch["mask"])
    pred = heads.squash(head_cfg, logit)
    y = jnp.asarray(batch[target_key], jnp.float32)
    if loss == "mse":
        per = (pred - y) ** 2
    else:
        p = (y + 1.0) / 2.0 if head_cfg.signed else y
        per = jax.nn.softplus(logit) - p * logit  # BCE with logits: -[p log s(z) + (1-p) log(1-s(z))]
    sw = _sample_weight(batch, b)
    n = sw.sum()
    mean = lambda x: ((sw * x).sum(), n)  # noqa: E731
    return {"loss": mean(per), "abs_error": mean(jax.lax.stop_gradient(jnp.abs(pred - y))),
            "prediction": mean(jax.lax.stop_gradient(pred))}


def value_regression_loss(cfg: ModelConfig, head_cfg: HeadConfig, params, batch, loss: str = "mse",
                          target_key: str = "q"):
    """(loss, metrics) of `value_sums`: loss, abs_error, prediction (sample means), weight (samples)."""
    return finalize(value_sums(cfg, head_cfg, params, batch, loss=loss, target_key=target_key))


def value_bce_loss(cfg: ModelConfig, head_cfg: HeadConfig, params, batch, target_key: str = "q"):
    """The binary-reward variant: `value_regression_loss(..., loss="bce")`."""
    return value_regression_loss(cfg, head_cfg, params, batch, loss="bce", target_key=target_key)


__all__ = [
    "Pair", "Sums", "finalize", "add_sums", "split_batch", "accumulate",
    "blueprint_advantage", "mcts_state_values", "grpo_advantages",
    "policy_clip_sums", "ppo_sums", "ppo_loss", "grpo_sums", "grpo_loss", "dpo_sums", "dpo_loss",
    "value_sums", "value_regression_loss", "value_bce_loss", "with_rehearsal",
]
