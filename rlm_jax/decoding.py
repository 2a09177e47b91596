"""Jitted prefill + decode loop with an explicit KV cache.

`generate` is a pure function of (params, prompt, key): jit it at the top (`generate_jit`) or call it
inside a larger jitted program (search does). The loop is a `lax.while_loop`: no host round trip per
token, and it ends as soon as every sequence has stopped.

Prompts are left-padded (`pad_prompts`), bucketed to powers of two so a handful of shapes covers all
prompt lengths (one compilation per bucket, as tunix's sampler does). The KV cache holds every padded
slot, so the padded width, not the real prompt length, must fit: pass
`max_length=cfg.max_seq_len - max_new_tokens` to `pad_prompts` to cap the bucket.

`cfg`, `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_tokens` and `pad_id` are static: they
pick the compiled program (greedy vs sampling, filter shapes, loop length). Inside a larger jitted
program pass them as Python values, not traced arrays; each distinct value compiles once.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import parallel
from rlm_jax import uncertainty as token_uncertainty
from rlm_jax.models import transformer
from rlm_jax.models.config import ModelConfig


@chex.dataclass
class DecodeOutput:
    """tokens: [B, M] int32 generated ids (`pad_id` after a sequence stopped); lengths: [B] int32
    tokens generated, the stop token included; logprobs: [B, M] float32 log-probability of each
    generated token under the model at temperature 1 (0 after the stop): the policy's own probability,
    which PPO ratios and search priors need, whatever the sampling settings; stop_token: [B] int32
    the stop token that ended the sequence, -1 if it ran out of `max_new_tokens`; uncertainty:
    [B, M, 3] float32 entropy, varentropy and Gini of the temperature-1 distribution each token was
    drawn from (`uncertainty.FIELDS`; 0 after the stop), or None unless `decode(..., uncertainty=True)`."""

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    stop_token: jax.Array
    uncertainty: jax.Array | None = None


def require_static(**values) -> None:
    """Raises a TypeError naming the argument when a sampling setting is a traced array."""
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"{name} must be a static Python number, got a traced array ({value.aval}): it selects the "
                f"compiled program (greedy vs sampling, filter shapes). Pass a Python float/int (mark it "
                f"static in your own jax.jit, as generate_jit does) instead of a jnp array or a jit argument")


def sample_token(key, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 rows: jax.Array | None = None, num_rows: int | None = None):
    """Samples one token per row. logits: [B, V] float32 -> [B] int32.

    temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 disable those filters. temperature,
    top_k and top_p are static Python numbers (a traced one raises a TypeError).
    rows [B], num_rows: these B rows are rows `rows` of a batch of num_rows, and draw that batch's noise:
    a compacted batch samples exactly what the whole batch would (categorical = argmax(logits + Gumbel)).
    """
    require_static(temperature=temperature, top_k=top_k, top_p=top_p)
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
    if rows is not None:
        noise = jax.random.gumbel(key, (num_rows, logits.shape[-1]), logits.dtype)[rows]
        return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def diverse_tokens(logits, group: int, penalty: float, live):
    """Diverse Beam Search's token choice (Vijayakumar et al. 2018) with one beam per group, as x1 decodes
    its proposals (transformers' `num_beams = num_beam_groups = k`, `diversity_penalty=1.0`, no sampling).

    logits: [B, V], B = n * group, the `group` rows of a context consecutive; live: [B] bool.
    Row j of a group takes the argmax of its log-probabilities minus `penalty` times how many live rows
    0..j-1 of its group chose each token at this position (Hamming diversity); row 0 is greedy. -> [B] int32.
    """
    require_static(penalty=penalty)
    b, vocab = logits.shape
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b // group, group, vocab)
    live = live.reshape(b // group, group)
    counts = jnp.zeros((b // group, vocab), jnp.float32)
    chosen = []
    for j in range(group):  # static and small (k proposals): the groups choose in order
        tok = jnp.argmax(lp[:, j] - penalty * counts, axis=-1).astype(jnp.int32)
        counts = counts + jax.nn.one_hot(tok, vocab, dtype=jnp.float32) * live[:, j, None]
        chosen.append(tok)
    return jnp.stack(chosen, axis=1).reshape(b)


def check_lengths(cfg: ModelConfig, prompt_width: int, max_new_tokens: int) -> None:
    """Raises a clear error when the padded prompt width + generation do not fit the model's context.

    `prompt_width` is T of the [B, T] prompt array, padding included: the KV cache holds every slot.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                         f"(max_seq_len={cfg.max_seq_len}); lower max_new_tokens")
    if prompt_width + max_new_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - max_new_tokens
        raise ValueError(
            f"prompts padded to {prompt_width} slots + {max_new_tokens} new tokens = "
            f"{prompt_width + max_new_tokens} exceeds the model's context (max_seq_len={cfg.max_seq_len}); the "
            f"cache holds padding too. Pad to at most {room} slots (pad_prompts(..., max_length={room}) caps "
            f"the power-of-two bucket), shorten the prompts, or lower max_new_tokens")


def prefill(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, max_new_tokens: int):
    """The prompts [B, T] through the model -> (KV cache with room for max_new_tokens more, logits [B, V]
    of the first new token)."""
    b, t = prompt_tokens.shape
    cache = transformer.init_cache(cfg, b, t + max_new_tokens)
    _, hidden, cache = transformer.forward(cfg, params, prompt_tokens, mask=prompt_mask, cache=cache,
                                           compute_logits=False)
    # The last real token need not sit in the last slot: prompts may hold masked holes (search
    # concatenates fixed-width step slots), so read the hidden state where the mask last is True.
    last = t - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
    return cache, transformer.lm_logits(cfg, params, jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])


def generate(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array,
             *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, active: jax.Array | None = None,
             uncertainty: bool = False) -> DecodeOutput:
    """Samples up to `max_new_tokens` per prompt; each sequence stops at its first stop token.

    Args:
      prompt_tokens: [B, T] int32, left-padded. prompt_mask: [B, T] bool, True on real tokens; masked
        holes inside the prompt are allowed (positions count real tokens only).
      key: a PRNG key (unused when greedy).
      max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id: static Python values (see the
        module docstring); a traced temperature/top_k/top_p raises a TypeError.
      stop_tokens: ids that end a sequence (e.g. the step delimiter and EOS); they are emitted.
      active: [B] bool or None (all): False rows generate nothing (length 0, stop_token -1).
      uncertainty: static; also return each token's entropy/varentropy/Gini (DecodeOutput.uncertainty).
    Returns:
      DecodeOutput with tokens, logprobs [B, max_new_tokens] and lengths, stop_token [B].
    """
    b, t = prompt_tokens.shape
    check_lengths(cfg, t, max_new_tokens)
    cache, logits = prefill(cfg, params, prompt_tokens, prompt_mask, max_new_tokens)
    return decode(cfg, params, cache, logits, key, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id, active=active,
                  uncertainty=uncertainty).out


class Decoded(NamedTuple):
    """What `decode` leaves behind besides the tokens: the cache holding their KV (the generated token
    j of a row sits in slot `start + j`, masked after the row stopped), the hidden state [B, embed]
    after each row's last generated token (the next token's logits are `lm_logits` of it; a value
    head on the policy's trunk reads it), `steps` [] the decode iterations run, and `positions` []
    the token positions computed (rows fed per iteration, finished rows still in the batch included)."""

    out: DecodeOutput
    cache: transformer.KVCache
    last_hidden: jax.Array
    steps: jax.Array
    positions: jax.Array


def compaction_sizes(rows: int, smallest: int = 8) -> tuple[int, ...]:
    """Batch sizes a compacting decode runs at: rows, then halves down to `smallest`."""
    sizes = [rows]
    while sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def _take_rows(x, idx, axis):
    return jnp.take(x, idx, axis=axis)


def _put_rows(x, idx, value, axis):
    index = (slice(None),) * axis + (idx,)
    return x.at[index].set(value)


def decode(cfg: ModelConfig, params, cache: transformer.KVCache, logits: jax.Array, key: jax.Array, *,
           max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           stop_tokens: Sequence[int] = (), pad_id: int = 0, active: jax.Array | None = None,
           prefix: transformer.PrefixKV | None = None, last_hidden: jax.Array | None = None,
           compact: bool = False, smallest: int = 8, uncertainty: bool = False,
           greedy_rows: jax.Array | None = None, diverse: int = 0, diversity_penalty: float = 1.0) -> Decoded:
    """The decode loop of `generate` from a filled cache: logits [B, V] of each row's next token, the
    cache with room for `max_new_tokens` more (and optionally a read-only `prefix` it continues, see
    transformer.PrefixKV). Every sampled token, the stop token included, is fed once, so its KV is in
    the returned cache. last_hidden: [B, embed] returned for rows that generate nothing (default 0).

    compact: finished rows stop costing compute: once at most half of the batch is still live, the live
    rows move into a batch of half the size (`compaction_sizes`), and so on; every row samples exactly
    the tokens it samples without compaction (the noise is drawn for the whole batch). The cache rows
    and the prefix rows of the live rows move with them (a prefix row is then gathered per query row).

    uncertainty: also return the token-level uncertainty of every sampled token (`DecodeOutput.uncertainty`),
    from the logits it was sampled from: no extra forward pass.
    greedy_rows: [B] bool or None; True rows take the argmax whatever the temperature (search continues a
    node it does not branch at greedily).
    diverse: k > 0 decodes each group of k consecutive rows (one context's) by `diverse_tokens` with
    `diversity_penalty` instead of sampling (deterministic; the rows of a group must stay together, so no
    compaction)."""
    b = logits.shape[0]
    require_static(temperature=temperature, top_k=top_k, top_p=top_p, diverse=diverse)
    if diverse and (compact or b % diverse):
        raise ValueError(f"decode(diverse={diverse}): the batch ({b} rows) must be whole groups of {diverse} "
                         "consecutive rows and compact=False (compaction would split a group)")
    stop = jnp.asarray(static_stop_tokens(stop_tokens) or (-1,), jnp.int32)
    group = 1 if prefix is None else b // prefix.mask.shape[0]
    full = dict(cache=cache, logits=logits, tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
                # None when not asked for: the loop carries nothing more.
                stats=jnp.zeros((b, max_new_tokens, len(token_uncertainty.FIELDS)), jnp.float32) if uncertainty else None,
                stop_token=jnp.full((b,), -1, jnp.int32),
                done=jnp.zeros((b,), bool) if active is None else ~active,
                hidden=jnp.zeros((b, cfg.d_model), cfg.jnp_dtype) if last_hidden is None else last_hidden)
    # Split over the batch axes under a mesh (`parallel.pin_batch`): the buffers are fresh, and a search's
    # cache and logits come from rows it repeated or gathered.
    full = {k: v if v is None else parallel.pin_cache_batch(v) if k == "cache" else parallel.pin_batch(v)
            for k, v in full.items()}
    i, positions = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    sizes = compaction_sizes(b, smallest) if compact else (b,)
    for level, size in enumerate(sizes):
        nxt = sizes[level + 1] if level + 1 < len(sizes) else 0
        # The live rows first (the whole batch keeps its order: the prefix groups its rows).
        idx = jnp.arange(b) if size == b else jnp.argsort(full["done"], stable=True)[:size]
        c = full["cache"]
        sub_cache = c.replace(k=_take_rows(c.k, idx, 1), v=_take_rows(c.v, idx, 1), mask=c.mask[idx],
                              next_pos=c.next_pos[idx])
        sub_prefix = prefix
        if prefix is not None and size < b:
            rows = idx // group
            sub_prefix = transformer.PrefixKV(k=_take_rows(prefix.k, rows, 1), v=_take_rows(prefix.v, rows, 1),
                                              mask=prefix.mask[rows])
        carry = (i, key, sub_cache, full["logits"][idx], full["tokens"], full["logprobs"], full["stats"],
                 full["stop_token"], full["done"][idx], full["hidden"][idx])

        def cond(carry, nxt=nxt):
            i, _, _, _, _, _, _, _, done, _ = carry
            live = jnp.sum(~done)
            return (i < max_new_tokens) & (live > 0) & (live > nxt)

        sub_greedy = None if greedy_rows is None else greedy_rows[idx]

        def body(carry, idx=idx, sub_prefix=sub_prefix, sub_greedy=sub_greedy):
            i, key, cache, logits, tokens, logprobs, stats, stop_token, done, hidden_last = carry
            key, sub = jax.random.split(key)
            whole = idx.shape[0] == b  # uncompacted: the batch's own draw
            if diverse:
                tok = diverse_tokens(logits, diverse, diversity_penalty, ~done)
            else:
                tok = sample_token(sub, logits, temperature, top_k, top_p, rows=None if whole else idx, num_rows=b)
            if sub_greedy is not None:
                tok = jnp.where(sub_greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), tok)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
            live = ~done
            # Rows outside the compacted batch are done: their slots keep pad / 0, as in `decode`.
            tokens = tokens.at[idx, i].set(jnp.where(live, tok, pad_id))
            logprobs = logprobs.at[idx, i].set(jnp.where(live, lp, 0.0))
            if uncertainty:
                stats = stats.at[idx, i].set(jnp.where(live[:, None], token_uncertainty.token_stats(logits), 0.0))
            is_stop = live & jnp.any(tok[:, None] == stop[None, :], axis=-1)
            stop_token = stop_token.at[idx].set(jnp.where(is_stop, tok, stop_token[idx]))
            done = done | is_stop
            _, hidden, cache = transformer.forward(cfg, params, tok[:, None], mask=live[:, None], cache=cache,
                                                   prefix=sub_prefix, compute_logits=False)
            hidden_last = jnp.where(live[:, None], hidden[:, 0].astype(hidden_last.dtype), hidden_last)
            logits = transformer.lm_logits(cfg, params, hidden[:, 0])
            return i + 1, key, cache, logits, tokens, logprobs, stats, stop_token, done, hidden_last

        start = i
        i, key, sub_cache, sub_logits, tokens, logprobs, stats, stop_token, sub_done, sub_hidden = jax.lax.while_loop(
            cond, body, carry)
        positions = positions + size * (i - start)
        full = dict(cache=c.replace(k=_put_rows(c.k, idx, sub_cache.k, 1), v=_put_rows(c.v, idx, sub_cache.v, 1),
                                    mask=c.mask.at[idx].set(sub_cache.mask),
                                    next_pos=c.next_pos.at[idx].set(sub_cache.next_pos), index=sub_cache.index),
                    logits=full["logits"].at[idx].set(sub_logits), tokens=tokens, logprobs=logprobs, stats=stats,
                    stop_token=stop_token, done=full["done"].at[idx].set(sub_done),
                    hidden=full["hidden"].at[idx].set(sub_hidden))
    out = DecodeOutput(tokens=full["tokens"], lengths=output_lengths(full["tokens"], full["stop_token"], stop, active),
                       logprobs=full["logprobs"], stop_token=full["stop_token"],
                       uncertainty=full["stats"] if uncertainty else None)
    return Decoded(out, full["cache"], full["hidden"], i, positions)


def decode_compacting(*args, **kwargs) -> Decoded:
    """`decode(..., compact=True)`."""
    return decode(*args, compact=True, **kwargs)


def output_lengths(tokens, stop_token, stop, active=None):
    """Tokens generated per row [B]: up to and including the first stop token, all of tokens [B, M] if
    none stopped the row (stop_token -1), 0 for inactive rows. Counts up to the first stop rather than
    non-pad tokens: pad_id may be a legitimate output."""
    first_stop = jnp.argmax(jnp.any(tokens[:, :, None] == stop[None, None, :], axis=-1), axis=1)
    lengths = jnp.where(stop_token >= 0, first_stop + 1, tokens.shape[1])
    if active is not None:
        lengths = jnp.where(active, lengths, 0)
    return lengths.astype(jnp.int32)


def static_stop_tokens(stop_tokens: Sequence[int]) -> tuple[int, ...]:
    """stop_tokens (list, tuple, numpy ints) -> a hashable tuple of Python ints, as jit's static args need."""
    if isinstance(stop_tokens, jax.core.Tracer):
        raise TypeError("stop_tokens must be static Python ints (a list or tuple), got a traced array; "
                        "pass them as Python values")
    return tuple(int(s) for s in np.asarray(stop_tokens, np.int64).reshape(-1))


_generate_jit = jax.jit(generate, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                                   "stop_tokens", "pad_id", "uncertainty"))


def generate_jit(cfg: ModelConfig, params, prompt_tokens, prompt_mask, key, *, stop_tokens: Sequence[int] = (),
                 **static) -> DecodeOutput:
    """`generate` compiled once per static setting; stop_tokens may be any sequence (made a tuple)."""
    return _generate_jit(cfg, params, prompt_tokens, prompt_mask, key,
                         stop_tokens=static_stop_tokens(stop_tokens), **static)


def _lower_generate(cfg: ModelConfig, params, prompt_tokens, prompt_mask, key, *, stop_tokens=(), **static):
    """generate_jit.lower(...): the jax.stages.Lowered program (`.compile()` it to time compilation)."""
    return _generate_jit.lower(cfg, params, prompt_tokens, prompt_mask, key,
                               stop_tokens=static_stop_tokens(stop_tokens), **static)


generate_jit.lower = _lower_generate


def bucket_length(n: int, minimum: int = 8, maximum: int | None = None) -> int:
    """The next power of two >= n (and >= minimum): bounds the number of compiled prompt shapes.

    `maximum` caps the bucket (e.g. `max_seq_len - max_new_tokens`), but never below n itself.
    """
    length = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return length if maximum is None else max(n, min(length, maximum))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
                bucket: bool = True, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists -> (tokens [B, T] int32, mask [B, T] bool).

    T is `length` if given, else the longest prompt rounded up to a power of two when `bucket`, the
    bucket capped at `max_length` (but never below the longest prompt). For generation pass
    `max_length=cfg.max_seq_len - max_new_tokens`: the cache holds every padded slot.
    """
    longest = max(len(p) for p in prompts)
    if length is None:
        length = bucket_length(longest, maximum=max_length) if bucket else longest
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, longer than the padded length {length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            mask[i, length - len(p):] = True
    return tokens, mask
