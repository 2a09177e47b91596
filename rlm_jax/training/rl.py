"""Phase-2 policy objectives: PPO (and GRPO, PPO with group-relative advantages) and DPO, plus SFT rehearsal.
(The value head's regression is in `training/value.py`.)

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

Reductions. Every objective first returns `Sums`: {name: (weighted sum, denominator)} (`training/sums.py`),
so a mean over micro-batches equals the full-batch mean (the trainer weights micro-batch gradients by the
denominator). `*_loss` wraps `*_sums` with `finalize` and has the `loss_fn(params, batch) -> (loss, metrics)`
shape `steps.make_train_step` takes:

    loss_fn = functools.partial(rl.ppo_loss, cfg, clip_eps=0.2)
    step = steps.make_train_step(cfg, optax.adam(1e-5), loss_fn=loss_fn)
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.training import sums as sums_lib
from rlm_jax.training.steps import next_token_loss, target_log_probs, target_weights

Sums = sums_lib.Sums

_PAIR_FIELDS = ("tokens", "mask", "loss_mask", "ref_logprobs")


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
    mean = sums_lib.safe_div(jax.ops.segment_sum(w * r, seg, num_segments=b), n)
    dev = r - mean[seg]
    var = sums_lib.safe_div(jax.ops.segment_sum(w * dev * dev, seg, num_segments=b), jnp.maximum(n - 1.0, 0.0))
    adv = dev / (jnp.sqrt(var)[seg] + eps) if scale_by_std else dev
    return jnp.where(w > 0, adv, 0.0)


# ----------------------------------------------------------------------------------------------------
# policy objectives


def _check_policy_batch(batch, kl_coef: float, who: str):
    """Key and shape checks for the PPO/GRPO core, before any forward pass."""
    sums_lib.require(batch, ["tokens", "mask", "loss_mask", "old_logprobs"], who,
             "old_logprobs are the sampling policy's per-token log-probs (steps.target_log_probs)")
    b, t = batch["tokens"].shape
    aligned = "[B, T-1], aligned with steps.target_log_probs"
    sums_lib.check_shape(batch, "old_logprobs", (b, t - 1), who, aligned)
    if kl_coef != 0.0:
        sums_lib.require(batch, ["ref_logprobs"], who, "pass the reference policy's log-probs or kl_coef=0")
        sums_lib.check_shape(batch, "ref_logprobs", (b, t - 1), who, aligned)


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
    sw = sums_lib.sample_weight(batch, b)
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
        sums_lib.require(batch, ["reward", "v_next", "v_current"], "ppo_loss",
                 "pass batch['advantage'] [B] or the fields blueprint_advantage needs")
        adv = blueprint_advantage(batch["reward"], batch["v_next"], batch["v_current"], gamma)
    logp, logits = _log_probs_and_logits(cfg, params, batch["tokens"], batch["mask"], logit_temperature)
    return policy_clip_sums(logp, logits, batch, adv, clip_eps=clip_eps, kl_coef=kl_coef,
                            entropy_coef=entropy_coef, who="ppo_loss")


def ppo_loss(cfg: ModelConfig, params, batch, clip_eps: float = 0.2, kl_coef: float = 0.01,
             entropy_coef: float = 0.01, logit_temperature: float = 1.0, gamma: float = 0.96):
    """(loss, metrics) of `ppo_sums`. metrics: loss, policy_loss, kl, entropy, clip_fraction, approx_kl,
    ratio (token means), advantage (sample mean), weight (counted tokens)."""
    return sums_lib.finalize(ppo_sums(cfg, params, batch, clip_eps=clip_eps, kl_coef=kl_coef,
                             entropy_coef=entropy_coef, logit_temperature=logit_temperature, gamma=gamma))


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
    sums_lib.require(batch, keys, "dpo_loss")
    b, t = batch["chosen_tokens"].shape
    for k in keys:
        want = (b, t - 1) if k.endswith("logprobs") else (b, t)
        sums_lib.check_shape(batch, k, want, "dpo_loss", "chosen_* and rejected_* share [B, T]; log-probs [B, T-1]")
    cat = {f: jnp.concatenate([batch[f"chosen_{f}"], batch[f"rejected_{f}"]]) for f in _PAIR_FIELDS}
    logp, _ = _log_probs_and_logits(cfg, params, cat["tokens"], cat["mask"], 1.0)
    w = target_weights(cat)
    policy = (logp * w).sum(-1)
    ref = (jnp.asarray(cat["ref_logprobs"], jnp.float32) * w).sum(-1)
    reward = beta * (policy - jax.lax.stop_gradient(ref))  # DPO's implicit reward of each step
    r_c, r_r = reward[:b], reward[b:]
    margin = r_c - r_r
    sw = sums_lib.sample_weight(batch, b)
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
    return sums_lib.finalize(dpo_sums(cfg, params, batch, beta=beta))


def rehearsal_loss(cfg: ModelConfig, loss_fn, params, batch, sft_weight: float = 1.0):
    """A policy loss plus SFT rehearsal: `(params, {"rl": batch, "sft": batch})` -> (loss, metrics) with

        loss = loss_fn(params, batch["rl"]) + sft_weight * next_token_loss(params, batch["sft"])

    (loss_fn None: next-token loss on the RL batch too). Rehearsing reference traces keeps an RL update
    on a few hundred search paths from drifting away from what SFT taught. metrics: the RL loss's, plus
    sft_loss, sft_accuracy; "loss" is the total."""
    rl_loss, metrics = (loss_fn(params, batch["rl"]) if loss_fn is not None
                        else next_token_loss(cfg, params, batch["rl"]))
    sft_loss, sft_metrics = next_token_loss(cfg, params, batch["sft"])
    total = rl_loss + sft_weight * sft_loss
    return total, {**metrics, "rl_loss": rl_loss, "loss": total, "sft_loss": sft_loss,
                   "sft_accuracy": sft_metrics["accuracy"]}
