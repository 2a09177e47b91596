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

from rlm_jax.decoding import (Decoded, DecodeOutput, check_lengths, compaction_sizes, output_lengths, prefill,
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


def gather_rows(cache: transformer.KVCache, rows):
    """The cache with its batch rows taken from `rows`."""
    return cache.replace(k=cache.k[:, rows], v=cache.v[:, rows], mask=cache.mask[rows],
                         next_pos=cache.next_pos[rows])


def scatter_rows(cache: transformer.KVCache, rows, sub: transformer.KVCache):
    """The cache with its batch rows `rows` replaced by `sub`'s (and `sub`'s slot index)."""
    return cache.replace(k=cache.k.at[:, rows].set(sub.k), v=cache.v.at[:, rows].set(sub.v),
                         mask=cache.mask.at[rows].set(sub.mask), next_pos=cache.next_pos.at[rows].set(sub.next_pos),
                         index=sub.index)


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
    b, t = prompt_tokens.shape
    check_lengths(cfg, t, max_new_tokens)
    cache, logits = prefill(cfg, params, prompt_tokens, prompt_mask, max_new_tokens)
    cache = gather_rows(cache, jnp.repeat(jnp.arange(b), k))
    return decode_distinct(cfg, params, cache, jnp.repeat(logits, k, axis=0), key, k=k,
                           max_new_tokens=max_new_tokens, temperature=temperature, stop_tokens=stop_tokens,
                           pad_id=pad_id, active=active).out


def decode_distinct(cfg: ModelConfig, params, cache: transformer.KVCache, logits: jax.Array, key: jax.Array, *,
                    k: int, max_new_tokens: int, temperature: float, stop_tokens: Sequence[int] = (),
                    pad_id: int = 0, active: jax.Array | None = None,
                    prefix: transformer.PrefixKV | None = None, last_hidden: jax.Array | None = None,
                    compact: bool = False) -> Decoded:
    """The loop of `generate_distinct` from a filled cache: cache and logits [B*k, ...] (the k rows of a
    prompt are copies), optionally continuing a read-only `prefix` of B rows (one per prompt: the k beams
    share it, only their own new slots are reordered). Every sampled token, the stop token included,
    is fed once, so its KV is in the returned cache (`decoding.Decoded`). active: [B]. compact: prompts
    whose beams all stopped leave the batch (halving it, as `decoding.decode_compacting`): the same draws."""
    require_static(temperature=temperature)
    if not temperature > 0:
        raise ValueError(f"generate_distinct samples at temperature > 0, got {temperature}; at temperature 0 "
                         f"use beam search")
    bk = logits.shape[0]
    b = bk // k
    if active is None:
        active = jnp.ones((b,), bool)
    if last_hidden is None:
        last_hidden = jnp.zeros((bk, cfg.d_model), cfg.jnp_dtype)
    stop = jnp.asarray(static_stop_tokens(stop_tokens) or (-1,), jnp.int32)
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

    state = dict(cache=cache, logits=logits, phi=phi, perturbed=perturbed, tokens=tokens, logprobs=logprobs,
                 stop_token=stop_token, done=done, hidden=last_hidden)
    i, positions = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    # Prompts whose k beams have all stopped leave the batch (decoding.decode_compacting, by prompt).
    sizes = compaction_sizes(b, smallest=2) if compact else (b,)
    for level, size in enumerate(sizes):
        nxt = sizes[level + 1] if level + 1 < len(sizes) else 0
        gidx = jnp.arange(b) if size == b else jnp.argsort(jnp.all(state["done"], 1), stable=True)[:size]
        ridx = (gidx[:, None] * k + jnp.arange(k)).reshape(-1)
        sub = {name: (gather_rows(x, ridx) if name == "cache" else x[ridx if name in ("logits", "hidden") else gidx])
               for name, x in state.items()}
        sub_prefix = prefix
        if prefix is not None and size < b:
            sub_prefix = transformer.PrefixKV(k=prefix.k[:, gidx], v=prefix.v[:, gidx], mask=prefix.mask[gidx])
        start = i
        i, key, sub = jax.lax.while_loop(
            lambda c, nxt=nxt: (c[0] < max_new_tokens) & (jnp.sum(~jnp.all(c[2]["done"], 1)) > nxt)
            & ~jnp.all(c[2]["done"]),
            lambda c, gidx=gidx, size=size, sub_prefix=sub_prefix: _step(
                cfg, params, c, gidx, b, size, k, vocab, temperature, stop, pad_id, sub_prefix),
            (i, key, sub))
        positions = positions + size * k * (i - start)
        state = {name: (scatter_rows(x, ridx, sub[name]) if name == "cache"
                        else x.at[ridx if name in ("logits", "hidden") else gidx].set(sub[name]))
                 for name, x in state.items()}
    tokens, logprobs, stop_token = (state[name].reshape((bk,) + state[name].shape[2:])
                                    for name in ("tokens", "logprobs", "stop_token"))
    decoded = DecodeOutput(tokens=tokens, lengths=output_lengths(tokens, stop_token, stop, jnp.repeat(active, k)),
                           logprobs=logprobs, stop_token=stop_token)
    return Decoded(decoded, state["cache"], state["hidden"], i, positions)


def _step(cfg, params, carry, gidx, b, size, k, vocab, temperature, stop, pad_id, prefix):
    """One token of stochastic beam search for the prompts `gidx` [size] of b (their state in `carry`)."""
    i, key, st = carry
    bk = size * k
    key, sub = jax.random.split(key)
    logits = st["logits"].reshape(size, k, vocab)
    phi, perturbed, done = st["phi"], st["perturbed"], st["done"]
    lp_t = jax.nn.log_softmax(logits / temperature, axis=-1)
    child_phi = phi[..., None] + lp_t
    noise = jax.random.gumbel(sub, (b, k, vocab))[gidx]  # the whole batch's noise: compaction changes no draw
    child_g = truncated_gumbel(perturbed, child_phi + noise)
    # A stopped beam has one child, itself (token slot 0 stands for it); a missing beam has none.
    itself = jnp.where(jnp.arange(vocab) == 0, perturbed[..., None], -jnp.inf)
    live = ~done & (perturbed > -jnp.inf)
    score = jnp.where(live[..., None], child_g, itself).reshape(size, k * vocab)
    new_g, flat = jax.lax.top_k(score, k)
    parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, parent.reshape((size, k) + (1,) * (x.ndim - 2)), axis=1)
    was_live = take(live)
    phi = jnp.where(was_live, jnp.take_along_axis(child_phi.reshape(size, k * vocab), flat, axis=1), take(phi))
    lp = jax.nn.log_softmax(logits, axis=-1).reshape(size, k * vocab)
    tok_lp = jnp.take_along_axis(lp, flat, axis=1)
    tokens = take(st["tokens"]).at[:, :, i].set(jnp.where(was_live, tok, pad_id))
    logprobs = take(st["logprobs"]).at[:, :, i].set(jnp.where(was_live, tok_lp, 0.0))
    is_stop = was_live & jnp.any(tok[..., None] == stop, axis=-1)
    stop_token = jnp.where(is_stop, tok, take(st["stop_token"]))
    done = ~was_live | is_stop
    rows = (jnp.arange(size)[:, None] * k + parent).reshape(bk)
    cache = gather_rows(st["cache"], rows)  # a copy of the new slots per token (a prefix is never copied)
    last_hidden = st["hidden"][rows]
    feed = was_live.reshape(bk)  # the stop token too: its KV and hidden state end the step
    _, hidden, cache = transformer.forward(cfg, params, tok.reshape(bk, 1), mask=feed[:, None], cache=cache,
                                           prefix=prefix, compute_logits=False)
    last_hidden = jnp.where(feed[:, None], hidden[:, 0].astype(last_hidden.dtype), last_hidden)
    logits = transformer.lm_logits(cfg, params, hidden[:, 0])
    return i + 1, key, dict(cache=cache, logits=logits, phi=phi, perturbed=new_g, tokens=tokens, logprobs=logprobs,
                            stop_token=stop_token, done=done, hidden=last_hidden)
