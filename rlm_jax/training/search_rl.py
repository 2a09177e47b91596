"""Phase 2, RL from search: MCTS in training mode -> replay samples -> policy and value updates.

One iteration (the blueprint's Algorithm 4):
1. MCTS with the current policy and value model on training problems; terminal nodes are scored by
   the task's verifier (+1 solved, -1 not).
2. Keep the nodes on paths that reach a terminal node; each kept node gives a sample (state = prompt +
   its parent's steps, action = its step, q = its backed-up value V(node)).
3. Push the samples into replay buffers (`rlm_jax.training.replay`, FIFO, kept across iterations) and
   update the policy from batches drawn from them with one of: "ppo" (the blueprint's TD advantage
   r + gamma v_next - v_current with v = q / gamma, r = 0, gamma the search's discount), "grpo" (siblings
   form a group, reward = q), "dpo" (the best vs the worst sibling when their values differ), "sft"
   (next-token loss on the verified solutions the search found); and the value model by MSE on q.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import decoding, distributed_search, formatting, parallel
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import lm
from rlm_jax.search.tree import NONE
from rlm_jax.training import loop, replay, rl, steps

ALGORITHMS = ("ppo", "grpo", "dpo", "sft")


def _node_ids(emb, b, n) -> list[int]:
    return [int(t) for t, m in zip(emb["step"][b, n], emb["step_mask"][b, n]) if m]


def extract_samples(out, prompt_ids: Sequence[list[int]], first_row: int = 0):
    """Samples from a finished search (host). out: SearchOutput (numpy-able), rows = `prompt_ids`.

    Returns (samples, solutions): samples are dicts with state ids, action ids, q, v_parent, group
    (the parent node, unique across the search batches of an iteration: pass each batch's `first_row`);
    solutions are (prompt ids, solution ids) of verified solutions (terminal nodes valued +1).
    """
    tree = jax.device_get(out.tree)
    values = np.asarray(jax.device_get(out.values))
    emb = tree.embedding
    samples, solutions = [], []
    for b in range(tree.parent.shape[0]):
        n_nodes = int(tree.num_nodes[b])
        parent = tree.parent[b]
        keep = np.zeros(n_nodes, bool)
        for t in np.nonzero(tree.terminal[b, :n_nodes])[0]:
            cur = int(t)
            while cur != NONE and not keep[cur]:
                keep[cur] = True
                cur = int(parent[cur])
        paths: dict[int, list[int]] = {0: []}

        def path_ids(node):
            if node not in paths:
                paths[node] = path_ids(int(parent[node])) + _node_ids(emb, b, node)
            return paths[node]

        for node in range(1, n_nodes):
            if not keep[node]:
                continue
            p = int(parent[node])
            action = _node_ids(emb, b, node)
            if not action:
                continue
            samples.append({"state": prompt_ids[b] + path_ids(p), "action": action, "q": float(values[b, node]),
                            "v_parent": float(values[b, p]),
                            "group": (first_row + b) * tree.parent.shape[1] + p})
            if tree.terminal[b, node] and values[b, node] > 0.5:
                solutions.append((prompt_ids[b], path_ids(node)))
    return samples, solutions


def _pad_rows(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int, seq_len: int):
    return formatting.pad_examples(rows, pad_id, seq_len, truncate=True)


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(cfg: ModelConfig, params, tokens, mask):
    """[B, T-1] per-token log-probs (steps.target_log_probs alignment)."""
    from rlm_jax.models import transformer
    logits, _, _ = transformer.forward(cfg, params, tokens, mask=mask)
    return steps.target_log_probs(logits, tokens)


def _logprobs(cfg, params, arrays):
    return loop.map_batches(lambda t, m: token_logprobs(cfg, params, t, m), arrays["tokens"], arrays["mask"])


def policy_arrays(cfg: ModelConfig, algorithm: str, samples, solutions, params, ref_params, pad_id: int,
                  seq_len: int, gamma: float = 1.0) -> dict[str, np.ndarray] | None:
    """The training arrays of one algorithm, the fields of `replay_fields(algorithm)` (None when the
    search produced nothing usable). gamma: the search's discount (PPO's advantage)."""
    if algorithm == "sft":
        if not solutions:
            return None
        return _pad_rows([(p + s, [False] * len(p) + [True] * len(s)) for p, s in solutions], pad_id, seq_len)
    if algorithm == "dpo":
        groups: dict[int, list[dict]] = {}
        for s in samples:
            groups.setdefault(s["group"], []).append(s)
        pairs = []
        for g in groups.values():
            best, worst = max(g, key=lambda s: s["q"]), min(g, key=lambda s: s["q"])
            if best["q"] - worst["q"] > 0.25:
                pairs.append((best, worst))
        if not pairs:
            return None
        out = {}
        for side, pick in (("chosen", 0), ("rejected", 1)):
            a = _pad_rows([(pr[pick]["state"] + pr[pick]["action"],
                            [False] * len(pr[pick]["state"]) + [True] * len(pr[pick]["action"])) for pr in pairs],
                          pad_id, seq_len)
            a["ref_logprobs"] = _logprobs(cfg, ref_params, a)
            out.update({f"{side}_{k}": v for k, v in a.items()})
        return out
    if not samples:
        return None
    arr = _pad_rows([(s["state"] + s["action"], [False] * len(s["state"]) + [True] * len(s["action"]))
                     for s in samples], pad_id, seq_len)
    arr["old_logprobs"] = _logprobs(cfg, params, arr)
    arr["ref_logprobs"] = _logprobs(cfg, ref_params, arr)
    q = np.asarray([s["q"] for s in samples], np.float32)
    group = np.asarray([s["group"] for s in samples], np.int32)
    v_next, v_current = rl.mcts_state_values(q, np.asarray([s["v_parent"] for s in samples], np.float32), gamma)
    arr["q"], arr["reward"], arr["group"] = q, q, group
    arr["v_next"], arr["v_current"] = np.asarray(v_next), np.asarray(v_current)
    if algorithm == "grpo":  # over the whole iteration, so replay batches need not hold whole groups
        arr["advantage"] = np.asarray(rl.grpo_advantages(jnp.asarray(q), jnp.asarray(group)))
    else:  # a step's q already holds a terminal's verifier reward: r = 0 (see rl.blueprint_advantage)
        arr["advantage"] = np.asarray(rl.blueprint_advantage(0.0, v_next, v_current, gamma))
    return arr


def replay_fields(algorithm: str) -> dict:
    """The replay-buffer fields of an algorithm's policy samples (what `policy_arrays` returns)."""
    if algorithm == "sft":
        return {k: replay.STEP_FIELDS[k] for k in ("tokens", "mask", "loss_mask")}
    if algorithm == "dpo":
        return {k: v for k, v in replay.PAIR_FIELDS.items() if k != "group"}
    return dict(replay.STEP_FIELDS)


VALUE_FIELDS = {k: replay.STEP_FIELDS[k] for k in ("tokens", "mask", "q")}


def value_arrays(samples, pad_id: int, seq_len: int) -> dict[str, np.ndarray] | None:
    """(state + action, q) rows for the value head."""
    if not samples:
        return None
    arr = _pad_rows([(s["state"] + s["action"], [False] * (len(s["state"]) + len(s["action"]))) for s in samples],
                    pad_id, seq_len)
    del arr["loss_mask"]
    arr["q"] = np.asarray([s["q"] for s in samples], np.float32)
    return arr


def run_search(spec, policy_params, value_params, prompt_ids: Sequence[list[int]], pad_id: int, key,
               num_simulations: int, config, batch_size: int, prompt_len: int, mesh=None):
    """Training-mode MCTS over prompts in fixed-size batches; yields (batch start, real rows, SearchOutput
    as numpy, the global batch). With a `mesh`, each batch is split over its data axes
    (`distributed_search`); every process passes the same prompts."""
    if mesh is not None:
        policy_params, value_params = (distributed_search.place_params(p, parallel.replicated(mesh))
                                       for p in (policy_params, value_params))
    for start in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        tokens, mask = decoding.pad_prompts(chunk, pad_id, length=prompt_len)
        idx = np.arange(start, start + batch_size, dtype=np.int32)
        idx[real:] = start  # padding rows repeat the first problem
        inputs = lm.search_inputs(policy_params, value_params, tokens, mask, idx)
        key, sub = jax.random.split(key)
        if mesh is not None:
            inputs = distributed_search.shard_search_inputs(inputs, mesh, global_batch=True)
            sub = distributed_search.replicate(sub, mesh)
        out = lm.lm_mcts_jit(spec, inputs, sub, num_simulations, config)
        yield start, real, distributed_search.to_host(out)


def replay_sampler(buffer: replay.ReplayBuffer, batch_size: int, seed: int):
    """batch_at(step): `batch_size` rows drawn uniformly with replacement from the buffer's stored rows,
    seeded by (seed, step) (a resumed loop draws the same batches), as host arrays."""
    sample = jax.jit(replay.sample, static_argnames=("batch_size",))

    def batch_at(step):
        batch, _ = sample(buffer, jax.random.fold_in(jax.random.key(seed), step), batch_size=batch_size)
        return jax.device_get(batch)

    return batch_at
