"""The blueprint's operators as small pure functions over batched arrays.

| operator  | here                                                                            |
|-----------|---------------------------------------------------------------------------------|
| Generate  | `generate_steps` (k next steps per context), `generate_solutions`               |
| Evaluate  | `evaluate_value` (value/Q/PRM/ORM head, in [-1, 1]), `verify` (the task's        |
|           | verifier), `simulate` (rollouts to the end, scored by either)                    |
| Select    | PUCT / UCT / x1 / Gumbel rules in `selection.py`, `gumbel.py` (MCTS);            |
|           | `select_top_k` (beam search: the top W candidates continue, the rest are pruned) |
| Prune     | `proposal_logits` (truncated and repeated proposals get -inf: never chosen);     |
|           | `select_top_k` in beam search                                                    |
| Aggregate | `majority_vote`, `weighted_vote` (self-consistency); merges of two paths (got.py)|
| Refine    | `weakest_step` of `evaluate_steps` (the critic's feedback: where the value fell  |
|           | most), then a new step there and the rest regenerated (sr_mcts.py)              |

Backtrack has no operator of its own: MCTS starts every simulation at the root again and backs values up
along `parent` (backup.py), which is how a search abandons a branch.

Text layout (`rlm_jax.formatting`): prompt [STEP] step_1 [STEP] ... step_n [EOS]. A node's context is the
prompt (left-padded, [P]) followed by D fixed-width step slots ([D, L]); unused slot positions are
masked holes, which the transformer skips (positions count real tokens only), so a context is built by
concatenation, without compaction.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import decoding, distinct_sampling
from rlm_jax.models import heads, transformer
from rlm_jax.search import paged
from rlm_jax.search.base import LMSpec, Proposals


def context(prompt: chex.Array, prompt_mask: chex.Array, steps: chex.Array, steps_mask: chex.Array):
    """prompt [..., P], steps [..., D, L] -> (tokens, mask) [..., P + D*L]."""
    lead = steps.shape[:-2]
    prompt = jnp.broadcast_to(prompt, lead + prompt.shape[-1:])
    prompt_mask = jnp.broadcast_to(prompt_mask, lead + prompt_mask.shape[-1:])
    flat = steps.reshape(lead + (-1,))
    flat_mask = steps_mask.reshape(lead + (-1,))
    return jnp.concatenate([prompt, flat], -1), jnp.concatenate([prompt_mask, flat_mask], -1)


def generate_steps(spec: LMSpec, policy_params, tokens: chex.Array, mask: chex.Array, key: chex.PRNGKey,
                   k: int, temperature: float | None = None, active: chex.Array | None = None) -> Proposals:
    """Generate: k next steps for each of n contexts. tokens, mask: [n, T] -> Proposals [n, k, ...].

    Each sample stops at its first STEP or EOS token (kept in the step's tokens). active: [n] bool or
    None (all): contexts that get no proposals (e.g. finished solutions): empty, not ok, no tokens.
    `spec.proposals == "distinct"` draws the k without replacement (when k > 1 and temperature > 0);
    "diverse" decodes them by Diverse Beam Search (`decoding.diverse_tokens`).
    """
    n, t = tokens.shape
    temperature = spec.temperature if temperature is None else temperature
    stops = spec.stops
    cfg, l = spec.policy, spec.step_len
    decoding.check_lengths(cfg, t, l)
    if spec.proposals == "distinct" and k > 1 and temperature > 0:
        cache, logits = decoding.prefill(cfg, policy_params, tokens, mask, l)  # one prefill, k beams
        cache = distinct_sampling.gather_rows(cache, jnp.repeat(jnp.arange(n), k))
        dec = distinct_sampling.decode_distinct(cfg, policy_params, cache, jnp.repeat(logits, k, axis=0), key,
                                                k=k, max_new_tokens=l, temperature=temperature, stop_tokens=stops,
                                                pad_id=spec.pad_id, active=active)
        prefill_rows = 1
    else:
        rep = lambda x: None if x is None else jnp.repeat(x, k, axis=0)
        cache, logits = decoding.prefill(cfg, policy_params, rep(tokens), rep(mask), l)
        dec = decoding.decode(cfg, policy_params, cache, logits, key, **{
            **dict(max_new_tokens=l, temperature=temperature, top_k=spec.top_k, stop_tokens=stops,
                   pad_id=spec.pad_id, active=rep(active)), **paged.diversity(spec, k)})
        prefill_rows = k
    cost = jnp.full((n,), prefill_rows * t + dec.positions / n, jnp.float32)
    props = paged.proposals(spec, dec.out, n, k, cost)
    return props if spec.tool is None else paged.call_tools(spec, props)[0]


def proposal_logits(spec: LMSpec, props: Proposals) -> chex.Array:
    """Prior logits of the k slots [n, k]: the step's (mean or summed) log-prob; -inf for truncated
    steps and, with `dedupe`, for repeats of an earlier slot's step."""
    logits = props.logprob / jnp.maximum(props.sampled_tokens, 1) if spec.prior == "mean" else props.logprob
    valid = props.ok
    if spec.dedupe:
        toks = jnp.where(props.mask, props.tokens, -1)
        same = jnp.all(toks[:, :, None, :] == toks[:, None, :, :], axis=-1)  # [n, k, k]
        earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), k=-1)
        valid = valid & ~jnp.any(same & earlier & props.ok[:, None, :], axis=-1)
    return jnp.where(valid, logits, -jnp.inf)


def evaluate_value(spec: LMSpec, value_params, tokens: chex.Array, mask: chex.Array) -> chex.Array:
    """Evaluate: the value model's score of each context [n, T] -> [n] in [-1, 1] (0 without a value
    model), read at the last real token. value / q heads are in [-1, 1] already; a prm / orm head's
    probability p in [0, 1] (heads.py) is mapped to 2p - 1, the range the searches assume (x1's
    normalisation from [-1, 1], terminal rewards +-1, the value-weighted vote's (v + 1) / 2)."""
    if spec.value is None:
        return jnp.zeros(tokens.shape[:1], jnp.float32)
    return signed(spec, heads.sequence_score(spec.value, spec.head, value_params, tokens, mask))


def signed(spec: LMSpec, score: chex.Array) -> chex.Array:
    """A head's score in [-1, 1]: value / q heads are already; a prm / orm probability p becomes 2p - 1."""
    return score if spec.head.signed else 2.0 * score - 1.0


def evaluate_steps(spec: LMSpec, value_params, prompt: chex.Array, prompt_mask: chex.Array, steps: chex.Array,
                   steps_mask: chex.Array) -> chex.Array:
    """Evaluate every prefix of n paths in one read: values [n, D + 1] in [-1, 1], column 0 the prompt's and
    column j the value after step j (read at that step's last token, which the causal model computes from
    the prompt and steps 1..j only: `evaluate_value` of that prefix). Empty slots repeat the value before them.
    prompt, prompt_mask [n, P] (left-padded); steps, steps_mask [n, D, L] (a step's tokens first in its slot)."""
    if spec.value is None:
        raise ValueError("evaluate_steps needs a value model (LMSpec.value/head)")
    _, d, l = steps.shape
    p = prompt.shape[1]
    tokens, mask = context(prompt, prompt_mask, steps, steps_mask)
    values = signed(spec, heads.squash(spec.head, heads.head_logits(spec.value, spec.head, value_params, tokens, mask)))
    length = jnp.sum(steps_mask, -1)  # [n, D]
    last = p + jnp.arange(d)[None, :] * l + jnp.maximum(length, 1) - 1
    after = jnp.take_along_axis(values, last, axis=1)  # [n, D]
    before = values[:, p - 1]
    # Carry the last real value through empty slots (a running "latest" along D).
    idx = jax.lax.cummax(jnp.where(length > 0, jnp.arange(d)[None, :] + 1, 0), axis=1)
    column = jnp.concatenate([before[:, None], after], 1)
    return jnp.concatenate([before[:, None], jnp.take_along_axis(column, idx, axis=1)], 1)


def weakest_step(values: chex.Array, depth: chex.Array) -> chex.Array:
    """Refine's feedback: the step to rewrite, [n] int32 in [0, max(depth - 1, 0)]: the one after which the
    value fell most (values [n, D + 1] from `evaluate_steps`; depth [n] steps of each path; the first such
    step on ties; 0 for an empty path)."""
    drop = values[:, 1:] - values[:, :-1]  # [n, D]
    inside = jnp.arange(drop.shape[1])[None, :] < depth[:, None]
    return jnp.argmin(jnp.where(inside, drop, jnp.inf), axis=1).astype(jnp.int32)


def verify(spec: LMSpec, problem_index: chex.Array, steps: chex.Array, steps_mask: chex.Array) -> chex.Array:
    """Evaluate with the task's verifier (host callback, batched: one call for all n solutions).

    problem_index [n]; steps, steps_mask [n, D, L] -> [n] float32 score in [-1, 1].
    """
    if spec.verifier is None:
        raise ValueError("verify needs LMSpec.verifier (training mode); inference mode uses the value model")
    out = jax.ShapeDtypeStruct(problem_index.shape, jnp.float32)
    return jax.pure_callback(lambda i, s, m: np.asarray(spec.verifier(i, s, m), np.float32), out,
                             problem_index, steps, steps_mask, vmap_method="sequential")


def simulate(spec: LMSpec, policy_params, value_params, prompt: chex.Array, prompt_mask: chex.Array,
             steps: chex.Array, steps_mask: chex.Array, problem_index: chex.Array, active: chex.Array,
             key: chex.PRNGKey) -> tuple[chex.Array, chex.Array, chex.Array]:
    """Evaluate by simulation: the mean reward of R = spec.num_rollouts rollouts from each of n nodes,
    re-reading each rollout's whole context at every step (`paged.rollouts` decodes from the cache).

    prompt, prompt_mask [n, P]; steps, steps_mask [n, D, L] the node's path (its depth d = the number of
    non-empty slots); problem_index [n]; active [n] bool (rows to simulate; the others get -1).
    -> (mean reward [n] float32 in [-1, 1], tokens [n] int32 sampled by the node's R rollouts,
    positions [n] float32 the models computed for them).

    A rollout samples whole steps (at `rollout_temperature`) into slots d, d+1, ... until one ends with
    EOS: its reward is the verifier's score of the finished solution (training mode), else the value
    model's score of it (inference mode: ORM-style read at the final token), times
    rollout_discount ** (steps added). A rollout that does not finish within D steps, or writes a step
    longer than L tokens, gave no answer: reward -1 (like a truncated step in the tree). Steps are
    sampled one slot at a time, so a context never grows beyond P + D*L + L tokens (as for proposals);
    the loop stops as soon as every rollout has ended.
    """
    r = spec.num_rollouts
    rep = lambda x: jnp.repeat(x, r, axis=0)
    prompt, prompt_mask, steps, steps_mask = rep(prompt), rep(prompt_mask), rep(steps), rep(steps_mask)
    depth0 = jnp.sum(jnp.any(steps_mask, -1), -1)  # [nR]
    temperature = spec.temperature if spec.rollout_temperature is None else spec.rollout_temperature
    steps, steps_mask, depth, finished, ntok, cost = complete_paths(spec, policy_params, prompt, prompt_mask, steps,
                                                                    steps_mask, rep(active), key, temperature)
    if spec.verifier is not None:
        score = verify(spec, rep(problem_index), steps, steps_mask)
    else:
        tokens, mask = context(prompt, prompt_mask, steps, steps_mask)
        score = evaluate_value(spec, value_params, tokens, mask)
        cost = cost + tokens.shape[1]
    return rollout_return(spec, score, finished, depth - depth0, ntok, cost)


def complete_paths(spec: LMSpec, policy_params, prompt: chex.Array, prompt_mask: chex.Array, steps: chex.Array,
                   steps_mask: chex.Array, active: chex.Array, key: chex.PRNGKey, temperature: float):
    """Generate the rest of n paths: whole steps sampled one slot at a time after each path's last step until one
    ends with EOS, is truncated (longer than L) or the D slots are full; the loop stops once every path has.

    prompt, prompt_mask [n, P]; steps, steps_mask [n, D, L] (the path's depth = its non-empty slots);
    active [n] bool (the other rows are left as they are) -> (steps, steps_mask [n, D, L], depth [n] int32,
    finished [n] bool (the last step ended with EOS), tokens [n] int32 sampled, positions [n] float32
    computed). Each step re-reads its whole context (P + D*L tokens)."""
    d = spec.max_depth

    def body(state):
        key, steps, steps_mask, depth, live, finished, ntok, cost = state
        key, sub = jax.random.split(key)
        tokens, mask = context(prompt, prompt_mask, steps, steps_mask)
        props = generate_steps(spec, policy_params, tokens, mask, sub, 1, temperature)
        at = (live[:, None] & (jnp.arange(d) == depth[:, None]))[..., None]  # [n, D, 1]
        steps = jnp.where(at, props.tokens[:, :1], steps)
        steps_mask = jnp.where(at, props.mask[:, :1], steps_mask)
        ok, end = props.ok[:, 0], props.terminal[:, 0]
        finished = finished | (live & ok & end)
        ntok = ntok + jnp.where(live, props.sampled_tokens[:, 0], 0)
        depth = depth + live
        return key, steps, steps_mask, depth, live & ok & ~end & (depth < d), finished, ntok, cost + props.cost

    depth0 = jnp.sum(jnp.any(steps_mask, -1), -1).astype(jnp.int32)
    live = active & (depth0 < d)
    state = (key, steps, steps_mask, depth0, live, jnp.zeros_like(live), jnp.zeros(live.shape, jnp.int32),
             jnp.zeros(live.shape, jnp.float32))
    _, steps, steps_mask, depth, _, finished, ntok, cost = jax.lax.while_loop(lambda s: jnp.any(s[4]), body, state)
    return steps, steps_mask, depth, finished, ntok, cost


def rollout_return(spec: LMSpec, score: chex.Array, finished: chex.Array, added: chex.Array, tokens: chex.Array,
                   cost: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array]:
    """Per-rollout figures [n * R] (R = spec.num_rollouts consecutive rows per node) -> per node [n]: the
    mean reward (score * rollout_discount ** steps added where the rollout finished, else -1: it gave no
    answer), the tokens sampled and the positions computed, summed."""
    r = spec.num_rollouts
    reward = jnp.where(finished, score * spec.rollout_discount ** added, -1.0)
    per_node = lambda x: jnp.sum(x.reshape(-1, r), axis=1)
    return jnp.mean(reward.reshape(-1, r), axis=1), per_node(tokens), per_node(cost)


def append_steps(steps: chex.Array, steps_mask: chex.Array, depth: chex.Array, more: chex.Array,
                 more_mask: chex.Array) -> tuple[chex.Array, chex.Array]:
    """A path [n, D, L] of depth [n] steps followed by more steps [n, D, L] (slot j = the j-th one) in
    slots depth, depth + 1, ... (those beyond D are dropped)."""
    d = steps.shape[1]
    j = jnp.arange(d)[None, :] - depth[:, None]  # [n, D]: index into `more`
    idx = jnp.clip(j, 0, d - 1)[..., None]
    later = (j >= 0)[..., None]
    return (jnp.where(later, jnp.take_along_axis(more, idx, 1), steps),
            jnp.where(later, jnp.take_along_axis(more_mask, idx, 1), steps_mask))


def select_top_k(scores: chex.Array, k: int) -> tuple[chex.Array, chex.Array]:
    """Select / Prune: (indices [..., k], scores [..., k]) of the k best entries along the last axis."""
    top, idx = jax.lax.top_k(scores, k)
    return idx, top


def majority_vote(answer_ids: chex.Array, valid: chex.Array | None = None) -> chex.Array:
    """Aggregate: index [B] of a sample carrying the most frequent answer id among answer_ids [B, N]."""
    return weighted_vote(answer_ids, jnp.ones(answer_ids.shape, jnp.float32), valid)


def weighted_vote(answer_ids: chex.Array, weights: chex.Array, valid: chex.Array | None = None) -> chex.Array:
    """Aggregate: index [B] of a sample whose answer has the largest total weight (e.g. value-weighted
    vote). Invalid samples (unparseable answers) get no vote; ties go to the earliest sample."""
    if valid is None:
        valid = jnp.ones(answer_ids.shape, bool)
    same = answer_ids[:, :, None] == answer_ids[:, None, :]  # [B, N, N]
    w = jnp.where(valid, weights, 0.0)
    totals = jnp.sum(jnp.where(same, w[:, None, :], 0.0), axis=-1)
    return jnp.argmax(jnp.where(valid, totals, -jnp.inf), axis=-1)


def generate_solutions(spec: LMSpec, policy_params, prompt: chex.Array, prompt_mask: chex.Array,
                       key: chex.PRNGKey, n: int, temperature: float | None = None) -> decoding.DecodeOutput:
    """Generate: n whole solutions per prompt [B, P] (up to D*L tokens, stop at EOS) -> DecodeOutput
    with leaves [B*n, ...] (sample j of problem b at row b*n + j). With `spec.kv_cache` the prompt is
    read once and the n samples decode from one shared copy of its KV; else each sample re-reads it.
    Positions computed: `solutions_cost`."""
    temperature = spec.temperature if temperature is None else temperature
    settings = dict(max_new_tokens=spec.context_len, temperature=temperature, top_k=spec.top_k,
                    stop_tokens=(spec.eos_id,), pad_id=spec.pad_id)
    if not spec.kv_cache:
        return decoding.generate(spec.policy, policy_params, jnp.repeat(prompt, n, axis=0),
                                 jnp.repeat(prompt_mask, n, axis=0), key, **settings)
    decoding.check_lengths(spec.policy, prompt.shape[1], spec.context_len)
    ctx = paged.prompt_context(spec.policy, policy_params, prompt, prompt_mask)
    cache = transformer.init_cache(spec.policy, prompt.shape[0] * n, spec.context_len)
    logits = jnp.repeat(transformer.lm_logits(spec.policy, policy_params, ctx.hidden), n, axis=0)
    decode = decoding.decode_compacting if spec.compact else decoding.decode
    return decode(spec.policy, policy_params, cache.replace(next_pos=jnp.repeat(ctx.length, n)),
                  logits, key, prefix=ctx.prefix, **settings).out


def solutions_cost(spec: LMSpec, prompt_len: int, n: int, out: decoding.DecodeOutput) -> chex.Array:
    """Positions the policy computed per problem [B] for `generate_solutions`, from its outputs: without the
    cache every row is decoded until the longest sample ends; with it, a row stops costing compute once
    the batch compacts (`decoding.decode_compacting`, replayed here from the rows' lengths)."""
    lengths = out.lengths
    b = lengths.shape[0] // n
    if not spec.kv_cache or not spec.compact:
        prompt = n * prompt_len if not spec.kv_cache else prompt_len
        return jnp.full((b,), prompt + n * jnp.max(lengths), jnp.float32)
    sizes = decoding.compaction_sizes(lengths.shape[0])
    steps = jnp.arange(spec.context_len)
    live = jnp.sum(lengths[None, :] > steps[:, None], axis=1)  # rows still live at each step
    # At each step the batch runs at the smallest size that holds the rows live when its level began.
    level_size = jnp.full(steps.shape, sizes[0])
    for size in sizes[1:]:
        level_size = jnp.where(live <= size, size, level_size)
    level_size = jax.lax.cummin(level_size)  # a level, once reached, is kept
    positions = jnp.sum(jnp.where(live > 0, level_size, 0))
    return jnp.full((b,), prompt_len + positions / b, jnp.float32)


def value_of_solutions(spec: LMSpec, inputs, steps: chex.Array, mask: chex.Array, n: int):
    """Evaluate n solutions per problem (step slots [B*n, D, L]) with the value model, read at their last
    token -> (score [B*n] in [-1, 1], positions computed per problem [B]). With the cache the value model
    reads each problem's prompt once, then each solution after it."""
    b, p = inputs["prompt"].shape
    value_params = inputs["value"]
    cfg = spec.value
    if spec.shared_trunk:
        value_params = {"trunk": inputs["policy"], "head": inputs["value"]["head"]}
    if not spec.kv_cache:
        ctx, ctx_mask = context(jnp.repeat(inputs["prompt"], n, axis=0), jnp.repeat(inputs["prompt_mask"], n, axis=0),
                                steps, mask)
        return evaluate_value(spec, value_params, ctx, ctx_mask), jnp.full((b,), n * ctx.shape[1], jnp.float32)
    vctx = paged.prompt_context(cfg, value_params["trunk"], inputs["prompt"], inputs["prompt_mask"])
    flat = lambda x: x.reshape(x.shape[0], -1)
    score, _, cost = paged.value_of_steps(spec, value_params, vctx, flat(steps), flat(mask))
    return score, p + jnp.sum(cost.reshape(b, n), axis=1)


def to_step_slots(spec: LMSpec, tokens: chex.Array, length: chex.Array) -> tuple[chex.Array, chex.Array]:
    """A generated solution [n, D*L] (valid up to `length`) -> step slots ([n, D, L], mask), splitting
    after each STEP/EOS. Steps longer than L are cut (their slot is full); steps beyond D are dropped."""
    n, t = tokens.shape
    d, l = spec.max_depth, spec.step_len
    pos = jnp.arange(t)[None, :]
    real = pos < length[:, None]
    ends = real & jnp.isin(tokens, jnp.asarray(spec.stops, jnp.int32))
    step_idx = jnp.cumsum(ends, axis=1) - ends  # step of each token (the terminator belongs to it)
    start = jnp.where(ends, pos + 1, 0)
    step_start = jax.lax.cummax(jnp.concatenate([jnp.zeros((n, 1), start.dtype), start[:, :-1]], 1), axis=1)
    within = pos - step_start
    keep = real & (step_idx < d) & (within < l)
    flat = jnp.where(keep, step_idx * l + within, d * l)  # out of range -> dropped
    rows = jnp.arange(n)[:, None]
    slots = jnp.full((n, d * l), spec.pad_id, tokens.dtype).at[rows, flat].set(tokens, mode="drop")
    slot_mask = jnp.zeros((n, d * l), bool).at[rows, flat].set(True, mode="drop")
    return slots.reshape(n, d, l), slot_mask.reshape(n, d, l)
