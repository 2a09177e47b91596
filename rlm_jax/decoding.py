"""Jitted prefill + decode loop with an explicit KV cache.

`generate` is a pure function of (params, prompt, key): jit it at the top (`generate_jit`) or call it
inside a larger jitted program (search does). The loop is a `lax.while_loop`: no host round trip per
token, and it ends as soon as every sequence has stopped.

Prompts are left-padded (`pad_prompts`), bucketed to powers of two so a handful of shapes covers all
prompt lengths (one compilation per bucket, as tunix's sampler does).
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig


@chex.dataclass
class DecodeOutput:
    """tokens: [B, M] int32 generated ids (`pad_id` after a sequence stopped); lengths: [B] int32
    tokens generated, the stop token included; logprobs: [B, M] float32 log-probability of each
    generated token under the model at temperature 1 (0 after the stop): the policy's own probability,
    which PPO ratios and search priors need, whatever the sampling settings; stop_token: [B] int32
    the stop token that ended the sequence, -1 if it ran out of `max_new_tokens`."""

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    stop_token: jax.Array


def sample_token(key, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Samples one token per row. logits: [B, V] float32 -> [B] int32.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 disable those filters.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_lengths(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Raises a clear error when prompt + generation do not fit the model's context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context "
            f"(max_seq_len={cfg.max_seq_len}); shorten the prompt or lower max_new_tokens")


def generate(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array,
             *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0) -> DecodeOutput:
    """Samples up to `max_new_tokens` per prompt; each sequence stops at its first stop token.

    Args:
      prompt_tokens: [B, T] int32, left-padded. prompt_mask: [B, T] bool, True on real tokens; masked
        holes inside the prompt are allowed (positions count real tokens only).
      stop_tokens: ids that end a sequence (e.g. the step delimiter and EOS); they are emitted.
    """
    b, t = prompt_tokens.shape
    check_lengths(cfg, t, max_new_tokens)
    stop = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
    cache = transformer.init_cache(cfg, b, t + max_new_tokens)
    _, hidden, cache = transformer.forward(cfg, params, prompt_tokens, mask=prompt_mask, cache=cache,
                                           compute_logits=False)
    # The last real token need not sit in the last slot: prompts may hold masked holes (search
    # concatenates fixed-width step slots), so read the hidden state where the mask last is True.
    last = t - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
    logits = transformer.lm_logits(cfg, params, jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])

    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((b, max_new_tokens), jnp.float32)
    stop_token = jnp.full((b,), -1, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, tokens, logprobs, stop_token, done, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(sub, logits, temperature, top_k, top_p)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        live = ~done
        tokens = tokens.at[:, i].set(jnp.where(live, tok, pad_id))
        logprobs = logprobs.at[:, i].set(jnp.where(live, lp, 0.0))
        is_stop = live & jnp.any(tok[:, None] == stop[None, :], axis=-1)
        stop_token = jnp.where(is_stop, tok, stop_token)
        done = done | is_stop
        # Finished rows still take a cache slot, but masked out: they neither attend nor advance.
        _, hidden, cache = transformer.forward(cfg, params, tok[:, None], mask=live[:, None], cache=cache,
                                               compute_logits=False)
        logits = transformer.lm_logits(cfg, params, hidden[:, 0])
        return i + 1, cache, logits, tokens, logprobs, stop_token, done, key

    carry = (jnp.zeros((), jnp.int32), cache, logits, tokens, logprobs, stop_token, done, key)
    _, _, _, tokens, logprobs, stop_token, _, _ = jax.lax.while_loop(cond, body, carry)
    # Count up to the first stop rather than non-pad tokens: pad_id may be a legitimate output.
    first_stop = jnp.argmax(jnp.any(tokens[:, :, None] == stop[None, None, :], axis=-1), axis=1)
    lengths = jnp.where(stop_token >= 0, first_stop + 1, max_new_tokens).astype(jnp.int32)
    return DecodeOutput(tokens=tokens, lengths=lengths, logprobs=logprobs, stop_token=stop_token)


generate_jit = jax.jit(generate, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                                  "stop_tokens", "pad_id"))


def bucket_length(n: int, minimum: int = 8) -> int:
    """The next power of two >= n (and >= minimum): bounds the number of compiled prompt shapes."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
                bucket: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists -> (tokens [B, T] int32, mask [B, T] bool).

    T is `length` if given, else the longest prompt rounded up to a power of two when `bucket`.
    """
    longest = max(len(p) for p in prompts)
    if length is None:
        length = bucket_length(longest) if bucket else longest
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, longer than the padded length {length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = True
    return tokens, mask
