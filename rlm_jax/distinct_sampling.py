"""k distinct samples per prompt: sampling without replacement by stochastic beam search.

    out = generate_distinct(cfg, params, prompt [B, T], mask, key, k=4, max_new_tokens=12, temperature=0.5)

Independent samples from a confident policy repeat each other: a search that asks for K proposals of a
step then holds fewer than K distinct ones, and pays for the repeats. Stochastic beam search (Kool, van
Hoof and Welling 2019, "Stochastic Beams and Where to Find Them") draws k sequences *without*
replacement from the policy at temperature T, for the tokens of k samples: beams are ranked by
Gumbel-perturbed log-probabilities, and a child's perturbation is conditioned on its parent's maximum
(the "truncated Gumbel"), so the top-k of the final beams are an exact sample without replacement of
whole sequences. Slot 0 is distributed as one ordinary sample; slot j as the next draw given slots
0..j-1 were drawn (tests/test_distinct_sampling.py checks both against the exact probabilities).

One prefill per prompt (the k beams share it), then a `lax.while_loop` over tokens: each step scores
the k*V children of the k beams, keeps the top k per prompt and reorders the KV cache rows to follow
their parents. A beam that stopped (a stop token) stays in the beam as itself. `active` [B] False rows
generate nothing (length 0): e.g. the proposals of a search node that ended the solution.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from rlm_jax.decoding import (DecodeOutput, check_lengths, output_lengths, prefill,
                              require_static, static_stop_tokens)
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def truncated_gumbel(parent_max, children):
    """Children's Gumbels [..., V] conditioned on their maximum being `parent_max` [...] (Kool et al.
    2019, appendix B.3, the numerically stable form)."""
    z = jnp.max(children, axis=-1, keepdims=True)
    t = parent_max[..., None]
    v = t - children + _log1mexp(children - z)
    return t - jax.nn.relu(v) - jnp.log1p(jnp.exp(-jnp.abs(v)))


def _gather_rows(cache: transformer.KVCache, rows):
    """The cache with its batch rows [B*k] taken from `rows` [B*k]."""
    return cache.replace(k=cache.k[:, rows], v=cache.v[:, rows], mask=cache.mask[rows],
                         next_pos=cache.next_pos[rows])


def generate_distinct(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      key: jax.Array, *, k: int, max_new_tokens: int, temperature: float,
                      stop_tokens: Sequence[int] = (), pad_id: int = 0,
                      active: jax.Array | None = None) -> DecodeOutput:
    """k samples without replacement per prompt, from the policy at `temperature`.

    prompt_tokens, prompt_mask: [B, T] (left-padded, as `decoding.generate`). k, max_new_tokens,
    temperature (> 0), stop_tokens, pad_id: static. active: [B] bool or None (all).
    Returns DecodeOutput with rows [B*k] grouped by prompt (row b*k + j is prompt b's j-th draw):
    tokens, logprobs [B*k, max_new_tokens] (logprobs under the model at temperature 1, as `generate`),
    lengths, stop_token [B*k]. Inactive prompts' rows are empty (length 0, stop_token -1).
    """
    require_static(temperature=temperature)
    if not temperature > 0:
        raise ValueError(f"generate_distinct samples at temperature > 0, got {temperature}; at temperature 0 "
                         f"use beam search")
    b, t = prompt_tokens.shape
    check_lengths(cfg, t, max_new_tokens)
    if active is None:
        active = jnp.ones((b,), bool)
    stop = jnp.asarray(static_stop_tokens(stop_tokens) or (-1,), jnp.int32)
    cache, logits = prefill(cfg, params, prompt_tokens, prompt_mask, max_new_tokens)
    bk = b * k
    cache = _gather_rows(cache, jnp.repeat(jnp.arange(b), k))
    logits = jnp.repeat(logits, k, axis=0)  # [B*k, V]
    vocab = logits.shape[-1]
    if k > vocab:
        raise ValueError(f"generate_distinct: k={k} distinct samples need k <= vocabulary size {vocab} at the "
                         "first token")

    # Beam state [B, k]: only beam 0 exists before the first token (all k share the prompt).
    first = jnp.arange(k)[None, :] == 0
    exists = first & active[:, None]
    phi = jnp.zeros((b, k), jnp.float32)  # log-prob at temperature T of the beam's tokens
    perturbed = jnp.where(exists, 0.0, -jnp.inf)  # its Gumbel-perturbed log-prob G (the root's is 0)
    done = ~exists
    tokens = jnp.full((b, k, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((b, k, max_new_tokens), jnp.float32)
    stop_token = jnp.full((b, k), -1, jnp.int32)

    def cond(carry):
        i, _, _, _, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, phi, perturbed, tokens, logprobs, stop_token, done, key = carry
        key, sub = jax.random.split(key)
        logits = logits.reshape(b, k, vocab)
        lp_t = jax.nn.log_softmax(logits / temperature, axis=-1)
        child_phi = phi[..., None] + lp_t
        child_g = truncated_gumbel(perturbed, child_phi + jax.random.gumbel(sub, child_phi.shape))
        # A stopped beam has one child, itself (token slot 0 stands for it); a missing beam has none.
        itself = jnp.where(jnp.arange(vocab) == 0, perturbed[..., None], -jnp.inf)
        live = ~done & (perturbed > -jnp.inf)
        score = jnp.where(live[..., None], child_g, itself).reshape(b, k * vocab)
        new_g, flat = jax.lax.top_k(score, k)
        parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, parent.reshape((b, k) + (1,) * (x.ndim - 2)), axis=1)
        was_live = take(live)
        phi = jnp.where(was_live, jnp.take_along_axis(child_phi.reshape(b, k * vocab), flat, axis=1), take(phi))
        lp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k * vocab)
        tok_lp = jnp.take_along_axis(lp, flat, axis=1)
        tokens = take(tokens).at[:, :, i].set(jnp.where(was_live, tok, pad_id))
        logprobs = take(logprobs).at[:, :, i].set(jnp.where(was_live, tok_lp, 0.0))
        is_stop = was_live & jnp.any(tok[..., None] == stop, axis=-1)
        stop_token = jnp.where(is_stop, tok, take(stop_token))
        done = ~was_live | is_stop
        perturbed = new_g
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(bk)
        cache = _gather_rows(cache, rows)  # a copy of the cache per token: cheap for steps of a few tokens
        feed = (was_live & ~done).reshape(bk)
        _, hidden, cache = transformer.forward(cfg, params, tok.reshape(bk, 1), mask=feed[:, None], cache=cache,
                                               compute_logits=False)
        logits = transformer.lm_logits(cfg, params, hidden[:, 0])
        return i + 1, cache, logits, phi, perturbed, tokens, logprobs, stop_token, done, key

    carry = (jnp.zeros((), jnp.int32), cache, logits, phi, perturbed, tokens, logprobs, stop_token, done, key)
    out = jax.lax.while_loop(cond, body, carry)
    tokens, logprobs, stop_token = (x.reshape((bk,) + x.shape[2:]) for x in out[5:8])
    return DecodeOutput(tokens=tokens, lengths=output_lengths(tokens, stop_token, stop, jnp.repeat(active, k)),
                        logprobs=logprobs, stop_token=stop_token)
