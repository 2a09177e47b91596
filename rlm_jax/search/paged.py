"""The tree is the paged KV cache: a search that never recomputes a prefix.

A node is one page: the KV of its own step (at most L tokens). The pool lives beside the tree, in the
node embedding, indexed like it:
- `props_k`, `props_v` [B, N, K, layers, L, kv_heads, head_dim]: the KV the policy computed while it
  sampled node n's K proposals, and `props_hidden` [B, N, K, embed] its hidden state after each
  proposal's last token. When proposal a of node n becomes a child, that KV *is* the child's page and
  that hidden state gives the child's first-token logits (and a shared-trunk value): creating a child
  costs no forward pass at all. Node c's page is `props_*[parent[c], action_from_parent[c]]`.
- `value_k`, `value_v` [B, N, layers_v, L, ...]: a separate value model's KV of node n's step, computed
  when it evaluates n (it reads only the new step: L positions).
- The prompt's KV, once per problem, is in the search inputs (`prompt_pages`).

A node's context is the prompt plus the pages on its root path: the page table is `path_to_root`. Pages
keep the RoPE positions of their true offsets (positions count real tokens), so variable-length steps
leave no padding inside a context: masked page slots are never attended and never go through a matmul.
K proposals of a node decode from one shared copy of its context (`transformer.PrefixKV`).

Bytes of KV per problem: `kv_bytes`.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import decoding, distinct_sampling, uncertainty
from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig
from rlm_jax.search.base import LMSpec, Proposals
from rlm_jax.search.tree import NONE, Tree, path_to_root

POOL_KEYS = ("props_k", "props_v", "props_hidden", "value_k", "value_v")


@chex.dataclass(frozen=True)
class Context:
    """n contexts as a read-only prefix: `prefix` (PrefixKV [layers, n, S]), `length` [n] real tokens in
    it (the next token's position) and `hidden` [n, embed], the hidden state after its last token."""

    prefix: transformer.PrefixKV
    length: chex.Array
    hidden: chex.Array


def prompt_context(cfg: ModelConfig, params, prompt: chex.Array, prompt_mask: chex.Array) -> Context:
    """The prompts [B, P] (left-padded) through the model once: their KV, lengths and last hidden state."""
    b, p = prompt.shape
    cache = transformer.init_cache(cfg, b, p)
    _, hidden, cache = transformer.forward(cfg, params, prompt, mask=prompt_mask, cache=cache, compute_logits=False)
    last = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)
    return Context(prefix=transformer.PrefixKV(k=cache.k, v=cache.v, mask=cache.mask), length=cache.next_pos,
                   hidden=jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])


def extend(prompt: Context, rows: chex.Array, pages_k: chex.Array, pages_v: chex.Array,
           pages_mask: chex.Array, hidden: chex.Array) -> Context:
    """Contexts of n nodes: prompt row `rows` [n] followed by the pages on their paths.

    pages_k, pages_v: [n, D, layers, L, kv_heads, head_dim]; pages_mask [n, D, L]; hidden [n, embed]
    (after the node's last token)."""
    n, d, layers, l = pages_k.shape[:4]
    flat = lambda x: jnp.moveaxis(x, 2, 0).reshape((layers, n, d * l) + x.shape[4:])
    pre = prompt.prefix
    prefix = transformer.PrefixKV(k=jnp.concatenate([pre.k[:, rows], flat(pages_k).astype(pre.k.dtype)], 2),
                                  v=jnp.concatenate([pre.v[:, rows], flat(pages_v).astype(pre.v.dtype)], 2),
                                  mask=jnp.concatenate([pre.mask[rows], pages_mask.reshape(n, d * l)], 1))
    return Context(prefix=prefix, length=prompt.length[rows] + jnp.sum(pages_mask, (1, 2), dtype=jnp.int32),
                   hidden=hidden)


def generate_steps(spec: LMSpec, policy_params, ctx: Context, key: chex.PRNGKey, k: int,
                   temperature: float | None = None, active: chex.Array | None = None):
    """Generate from cached contexts: k next steps for each of n contexts -> (Proposals [n, k, ...],
    pages (k, v) [n, k, layers, L, kv_heads, head_dim], hidden [n, k, embed] after each step's last
    token). As `operators.generate_steps`, but no context is re-read: the k samples decode from one
    shared copy of it. Proposals.cost [n]: positions the policy computed (k rows x decode iterations).
    With spec.branch_entropy, a context whose first-token entropy is at most the threshold decodes slot 0
    only, greedily (`branching_slots`)."""
    cfg, l = spec.policy, spec.step_len
    n = ctx.length.shape[0]
    temperature = spec.temperature if temperature is None else temperature
    stops = spec.stops
    cache = transformer.init_cache(cfg, n * k, l).replace(next_pos=jnp.repeat(ctx.length, k))
    first = transformer.lm_logits(cfg, policy_params, ctx.hidden)  # [n, V]
    entropy = uncertainty.token_stats(first)[:, 0]
    logits = jnp.repeat(first, k, axis=0)
    hidden0 = jnp.repeat(ctx.hidden, k, axis=0)
    if spec.proposals == "distinct" and k > 1 and temperature > 0:
        dec = distinct_sampling.decode_distinct(cfg, policy_params, cache, logits, key, k=k, max_new_tokens=l,
                                                temperature=temperature, stop_tokens=stops, pad_id=spec.pad_id,
                                                active=active, prefix=ctx.prefix, last_hidden=hidden0, compact=spec.compact)
    else:
        rows_active, greedy = jnp.repeat(jnp.ones((n,), bool) if active is None else active, k), None
        if spec.branch_entropy:
            slots, greedy = branching_slots(spec, entropy, k)
            rows_active, greedy = rows_active & slots.reshape(-1), jnp.repeat(greedy, k)
        diverse = diversity(spec, k)
        decode = decoding.decode_compacting if spec.compact and not diverse else decoding.decode
        dec = decode(cfg, policy_params, cache, logits, key, **{
            **dict(max_new_tokens=l, temperature=temperature, top_k=spec.top_k, stop_tokens=stops,
                   pad_id=spec.pad_id, active=rows_active, prefix=ctx.prefix, last_hidden=hidden0,
                   greedy_rows=greedy), **diverse})
    pages = lambda x: jnp.moveaxis(x.reshape((x.shape[0], n, k) + x.shape[2:]), 0, 2)  # -> [n, k, layers, L, ..]
    cost = jnp.full((n,), dec.positions / n, jnp.float32)  # the batch's positions, spread over its contexts
    props = proposals(spec, dec.out, n, k, cost).replace(entropy=entropy)
    page_k, page_v, hidden = dec.cache.k, dec.cache.v, dec.last_hidden
    if spec.tool is not None:  # a step a tool wrote into is read again from its context: its page and hidden state
        props, changed = call_tools(spec, props)
        rows = changed.reshape(-1)

        def reread():
            hid, (k2, v2) = read_rows(cfg, policy_params, ctx.prefix, jnp.repeat(ctx.length, k),
                                      props.tokens.reshape(n * k, l), props.mask.reshape(n * k, l))
            at = lambda x: rows.reshape((1, n * k) + (1,) * (x.ndim - 2))
            return (jnp.where(at(page_k), jnp.moveaxis(k2, 1, 0).astype(page_k.dtype), page_k),
                    jnp.where(at(page_v), jnp.moveaxis(v2, 1, 0).astype(page_v.dtype), page_v),
                    jnp.where(rows[:, None], hid.astype(hidden.dtype), hidden), jnp.float32(k * l))

        page_k, page_v, hidden, extra = jax.lax.cond(jnp.any(rows), reread,
                                                     lambda: (page_k, page_v, hidden, jnp.float32(0)))
        props = props.replace(cost=props.cost + extra)
    return props, (pages(page_k), pages(page_v)), hidden.reshape(n, k, -1)


def call_tools(spec: LMSpec, props: Proposals) -> tuple[Proposals, chex.Array]:
    """Tool steps: the task's tools (`spec.tool`, one batched host callback) run on every proposal [n, k]
    -> (the proposals with the tools' results written in, changed [n, k] bool). `sampled` keeps the
    tokens the model sampled, the log-prob stays the model's; the step keeps its terminator."""
    n, k, l = props.tokens.shape
    flat = lambda x: x.reshape(n * k, l)
    out = (jax.ShapeDtypeStruct((n * k, l), jnp.int32), jax.ShapeDtypeStruct((n * k, l), jnp.bool_))
    tokens, mask = jax.pure_callback(
        lambda t, m: tuple(np.asarray(x, d) for x, d in zip(spec.tool(t, m), (np.int32, np.bool_))), out,
        flat(props.tokens).astype(jnp.int32), flat(props.mask), vmap_method="sequential")
    tokens, mask = tokens.reshape(n, k, l), mask.reshape(n, k, l)
    changed = jnp.any((mask != props.mask) | (mask & (tokens != props.tokens)), axis=-1)
    return props.replace(tokens=tokens.astype(props.tokens.dtype), mask=mask, length=jnp.sum(mask, -1, dtype=props.length.dtype),
                         sampled=props.sampled_tokens), changed


@chex.dataclass(frozen=True)
class Rollouts:
    """What `rollouts` sampled, nR = n * R rows (R rollouts of context i in rows i*R .. i*R + R - 1):
    steps, mask [nR, D, L] the rollout's own steps (slot j = its j-th step, not the absolute depth);
    hidden [nR, embed] after its last token; finished [nR] it ended with EOS within the depth and step
    limits; added [nR] steps it wrote; tokens [nR] tokens it sampled; cost [nR] positions computed."""

    steps: chex.Array
    mask: chex.Array
    hidden: chex.Array
    finished: chex.Array
    added: chex.Array
    tokens: chex.Array
    cost: chex.Array


def rollouts(spec: LMSpec, policy_params, ctx: Context, depth: chex.Array, active: chex.Array,
             key: chex.PRNGKey, temperature: float) -> Rollouts:
    """x1's simulations from cached contexts: R = spec.num_rollouts rollouts from each of n contexts ctx
    (a node's prompt and path pages, depth [n] steps on it), whole steps sampled one at a time until one
    ends with EOS, a step runs past L tokens or the depth reaches D. No context is re-read: each step
    decodes from the node's pages plus the rollout's own pages so far, and its KV becomes the next page.
    The draws are `operators.simulate`'s (the same key split per step, one sample per context): on the
    same key the two give the same rollouts. active [n]: contexts to roll out (the others sample
    nothing and are not finished)."""
    r, d, l = spec.num_rollouts, spec.max_depth, spec.step_len
    n = depth.shape[0]
    rows = jnp.repeat(jnp.arange(n), r)
    base = Context(prefix=ctx.prefix, length=ctx.length, hidden=ctx.hidden)
    one_sample = dataclasses.replace(spec, branch_entropy=0.0)  # a rollout samples; it never branches
    cfg = spec.policy
    page_shape = (n * r, d, cfg.num_layers, l, cfg.num_kv_heads, cfg.head_dim)
    dtype = ctx.prefix.k.dtype

    def body(state):
        key, steps, mask, pk, pv, hidden, added, live, finished, ntok, cost = state
        key, sub = jax.random.split(key)
        here = extend(base, rows, pk, pv, mask, hidden)
        props, (k, v), last = generate_steps(one_sample, policy_params, here, sub, 1, temperature, active=live)
        at = live[:, None] & (jnp.arange(d) == added[:, None])  # [nR, D]
        put = lambda new, old: jnp.where(at.reshape(at.shape + (1,) * (old.ndim - 2)), new[:, None], old)
        steps, mask = put(props.tokens[:, 0], steps), put(props.mask[:, 0], mask)
        pk, pv = put(k[:, 0].astype(dtype), pk), put(v[:, 0].astype(dtype), pv)
        hidden = jnp.where(live[:, None], last[:, 0], hidden)
        ok, end = props.ok[:, 0], props.terminal[:, 0]
        finished = finished | (live & ok & end)
        ntok = ntok + jnp.where(live, props.sampled_tokens[:, 0], 0)
        added = added + live
        return (key, steps, mask, pk, pv, hidden, added, live & ok & ~end & (depth[rows] + added < d), finished,
                ntok, cost + props.cost)

    zeros = lambda shape, dt: jnp.zeros(shape, dt)
    live = jnp.repeat(active & (depth < d), r)
    state = (key, jnp.full((n * r, d, l), spec.pad_id, jnp.int32), zeros((n * r, d, l), bool),
             zeros(page_shape, dtype), zeros(page_shape, dtype), jnp.repeat(ctx.hidden, r, axis=0),
             zeros((n * r,), jnp.int32), live, zeros((n * r,), bool), zeros((n * r,), jnp.int32),
             zeros((n * r,), jnp.float32))
    _, steps, mask, _, _, hidden, added, _, finished, ntok, cost = jax.lax.while_loop(lambda s: jnp.any(s[7]), body,
                                                                                      state)
    return Rollouts(steps=steps, mask=mask, hidden=hidden, finished=finished, added=added, tokens=ntok, cost=cost)


def diversity(spec: LMSpec, k: int) -> dict:
    """`decoding.decode`'s arguments for spec.proposals == "diverse" (k rows per context), else none."""
    if spec.proposals != "diverse" or k < 2:
        return {}
    return dict(diverse=k, diversity_penalty=spec.diversity_penalty, temperature=0.0, top_k=0)


def branching_slots(spec: LMSpec, entropy: chex.Array, k: int):
    """Uncertainty-triggered branching. entropy [n] of each context's first-token distribution -> (slots
    [n, k] bool: the slots to decode, greedy [n] bool: the contexts continued by one greedy step): all k
    slots where the entropy exceeds spec.branch_entropy, else slot 0 alone."""
    branch = entropy > spec.branch_entropy
    slots = branch[:, None] | (jnp.arange(k) == 0)[None, :]
    return slots, ~branch


def proposals(spec: LMSpec, out: decoding.DecodeOutput, n: int, k: int, cost: chex.Array) -> Proposals:
    """DecodeOutput rows [n*k] -> Proposals [n, k]."""
    step_mask = jnp.arange(spec.step_len)[None, :] < out.lengths[:, None]
    logprob = jnp.sum(jnp.where(step_mask, out.logprobs, 0.0), axis=1)
    shape = (n, k)
    return Proposals(tokens=out.tokens.reshape(shape + (-1,)), mask=step_mask.reshape(shape + (-1,)),
                     logprob=logprob.reshape(shape), length=out.lengths.reshape(shape),
                     terminal=(out.stop_token == spec.eos_id).reshape(shape),
                     ok=(out.stop_token >= 0).reshape(shape), cost=cost)


def head_value(spec: LMSpec, head_params, hidden: chex.Array) -> chex.Array:
    """A value head's score of hidden states [..., embed] -> [...] in [-1, 1] (as operators.evaluate_value)."""
    score = heads.squash(spec.head, heads.apply_head(spec.value, spec.head, head_params, hidden))
    return score if spec.head.signed else 2.0 * score - 1.0


def value_of_steps(spec: LMSpec, value_params, ctx: Context, step: chex.Array, step_mask: chex.Array,
                   live: chex.Array | None = None):
    """A separate value model's score of contexts extended by one step each: reads only the step.

    ctx: the value model's cached contexts, c rows (hidden unused); step, step_mask: [n, L], n a
    multiple of c (rows n/c * i .. of context i) -> (value [n], pages (k, v) [n, layers_v, L, ...] of
    the step, positions computed [n]). Masked holes in the step are skipped (positions count real
    tokens), so a solution's step slots [D*L] read as its text. live: [n] bool or None (all): only live
    rows are read, in the smallest batch of `decoding.compaction_sizes` that holds them (the others get
    value 0 and empty pages)."""
    cfg, (n, l) = spec.value, step.shape
    group = n // ctx.length.shape[0]
    if live is None:
        return _value_rows(cfg, spec, value_params, ctx.prefix, jnp.repeat(ctx.length, group), step, step_mask)
    sizes = decoding.compaction_sizes(n, smallest=1)
    idx = jnp.argsort(~live, stable=True)  # live rows first

    def at_size(size):
        rows = idx[:size]
        pre = rows // group
        prefix = transformer.PrefixKV(k=ctx.prefix.k[:, pre], v=ctx.prefix.v[:, pre], mask=ctx.prefix.mask[pre])
        value, (k, v), _ = _value_rows(cfg, spec, value_params, prefix, ctx.length[pre], step[rows], step_mask[rows])
        full = lambda x: jnp.zeros((n,) + x.shape[1:], x.dtype).at[rows].set(x)
        return full(value), (full(k), full(v)), jnp.full((n,), size * l / n, jnp.float32)

    count = jnp.sum(live)
    branch = jnp.sum(jnp.asarray(sizes[1:]) >= count)  # the smallest size that holds the live rows
    return jax.lax.switch(branch, [lambda size=size: at_size(size) for size in sizes])


def _value_rows(cfg, spec, value_params, prefix, length, step, step_mask):
    n, l = step.shape
    hidden, pages = read_rows(cfg, value_params["trunk"], prefix, length, step, step_mask)
    return head_value(spec, value_params["head"], hidden), pages, jnp.full((n,), l, jnp.float32)


def read_rows(cfg: ModelConfig, params, prefix: transformer.PrefixKV, length: chex.Array, tokens: chex.Array,
              mask: chex.Array):
    """A trunk reads n rows of tokens [n, T] (mask [n, T]; masked holes skipped) after their cached contexts
    (prefix: c rows, n a multiple of c; length [n] the next position) -> (hidden state [n, embed] after
    each row's last real token, pages (k, v) [n, layers, T, kv_heads, head_dim])."""
    n, t = tokens.shape
    cache = transformer.init_cache(cfg, n, t).replace(next_pos=length)
    _, hidden, cache = transformer.forward(cfg, params, tokens, mask=mask, cache=cache, prefix=prefix,
                                           compute_logits=False)
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], 1)[:, 0]
    return hidden, (jnp.moveaxis(cache.k, 0, 1), jnp.moveaxis(cache.v, 0, 1))


def child_pages(tree: Tree, parent: chex.Array, slot: chex.Array, max_depth: int):
    """The page table of the children in `slot` of `parent` [B, M]: for each of their D path slots
    (depth 1..D) the owner node and proposal slot holding the page, and whether it exists:
    (owner, slot, valid) [B, M, D]. Also the parent's path nodes [B, M, D] (depth 1..D, NONE-padded),
    the value model's page table (its pages are indexed by node)."""
    rows = jnp.arange(tree.batch_size)[:, None, None]
    path = path_to_root(tree, parent, max_depth + 1)  # [B, M, D + 1]: the parent's ancestors, depth 0..D
    depth = tree.depth[rows[..., 0], parent][..., None]  # [B, M, 1]
    levels = jnp.arange(max_depth)
    at_child, below = levels == depth, levels < depth
    from_parent = tree.action_from_parent[rows, jnp.maximum(path[..., 1:], 0)]
    owner = jnp.where(at_child, parent[..., None], path[..., :-1])
    slots = jnp.where(at_child, slot[..., None], from_parent)
    return jnp.maximum(owner, 0), jnp.maximum(slots, 0), below | at_child, jnp.where(below, path[..., 1:], NONE)


def kv_bytes(spec: LMSpec, capacity: int, prompt_len: int) -> int:
    """Bytes of KV one problem's search holds: the prompt's KV and every node's K proposal pages (policy),
    plus the prompt and one page per node for a separate value model.

    = 2 * bytes(dtype) * layers * kv_heads * head_dim * (P + N * K * L)   (policy)
    + 2 * bytes(dtype) * layers_v * kv_heads_v * head_dim_v * (P + N * L)  (separate value model)."""
    def per_token(cfg: ModelConfig) -> int:
        return 2 * np.dtype(cfg.jnp_dtype).itemsize * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim

    total = per_token(spec.policy) * (prompt_len + capacity * spec.num_slots * spec.step_len)
    if spec.value is not None and not spec.shared_trunk:
        total += per_token(spec.value) * (prompt_len + capacity * spec.step_len)
    return total
