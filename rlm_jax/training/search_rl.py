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
"grpo_sampled" replaces step 1-2 with `rl.group_size` sampled completions per problem (no search; see
`training/group_samples.py`).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import decoding, evaluation, formatting, parallel
from rlm_jax import metrics as metrics_lib
from rlm_jax import workdir as wd_lib
from rlm_jax.models import lora
from rlm_jax.models.config import ModelConfig
from rlm_jax.search import lm, mcts
from rlm_jax.search.tree import NONE
from rlm_jax.training import data, group_samples, loop, replay, rl, sft, steps, trainer, value
from rlm_jax.training.phases import Phase
from rlm_jax.training.rollouts import make_verifier


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
    if algorithm in ("grpo", "grpo_sampled"):  # over the whole iteration, so replay batches need not hold whole groups
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
               num_simulations: int, config, batch_size: int, prompt_len: int, mesh=None, problem_ids=None,
               strategy=None):
    """Training-mode MCTS over prompts in fixed-size batches; yields (batch start, real rows, SearchOutput
    as numpy, the global batch). `problem_ids` [len(prompt_ids)]: what the verifier gets for each prompt
    (default its position). With a `mesh`, each batch is split over its data axes
    (`parallel.shard_search_inputs`); every process passes the same prompts. strategy(spec, inputs, key)
    replaces the MCTS (num_simulations and config unused then), e.g. `group_samples.sample_groups_jit`."""
    if mesh is not None:
        policy_params, value_params = (parallel.place_params(p, parallel.replicated(mesh))
                                       for p in (policy_params, value_params))
    for start in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        tokens, mask = decoding.pad_prompts(chunk, pad_id, length=prompt_len)
        ids = np.arange(len(prompt_ids)) if problem_ids is None else np.asarray(problem_ids)
        idx = np.full(batch_size, ids[start], np.int32)  # padding rows repeat the first problem
        idx[:real] = ids[start:start + real]
        inputs = lm.search_inputs(policy_params, value_params, tokens, mask, idx)
        key, sub = jax.random.split(key)
        if mesh is not None:
            inputs = parallel.shard_search_inputs(inputs, mesh, global_batch=True)
            sub = parallel.replicate(sub, mesh)
        with parallel.search_mesh(mesh):
            out = (lm.lm_mcts_jit(spec, inputs, sub, num_simulations, config) if strategy is None
                   else strategy(spec, inputs, sub))
        yield start, real, parallel.to_host(out)


def budget_batches(n: int, batch_size: int, budget: int | None, worst: int, spent: Callable[[], int]):
    """(lo, hi) ranges of n problems, processed in order, at most `batch_size` each. With a token `budget`, a
    range holds only as many problems as are sure to fit in what is left of it (`spent()` tokens so far; one
    problem costs at most `worst`), so the total never exceeds the budget; it stops when not one more problem
    is sure to fit. Without one: the whole range at once (the search batches it itself)."""
    if budget is None:
        yield 0, n
        return
    lo = 0
    while lo < n:
        fit = (budget - spent()) // worst
        if fit < 1:
            return
        hi = lo + min(fit, batch_size, n - lo)
        yield lo, hi
        lo = hi


def replay_sampler(buffer: replay.ReplayBuffer, batch_size: int, seed: int):
    """batch_at(step): `batch_size` rows drawn uniformly with replacement from the buffer's stored rows,
    seeded by (seed, step) (a resumed loop draws the same batches), as host arrays."""
    sample = jax.jit(replay.sample, static_argnames=("batch_size",))

    def batch_at(step):
        batch, _ = sample(buffer, jax.random.fold_in(jax.random.key(seed), step), batch_size=batch_size)
        return jax.device_get(batch)

    return batch_at


# ------------------------------------------------------------------------------------------ the phase

def iteration_problems(pool_size: int, it: int, n: int) -> list[int]:
    """RL iteration `it`'s problems (indices into the pool): the pool's next `n` (at most the whole pool),
    cycling through it."""
    return [(it * n + i) % pool_size for i in range(min(n, pool_size))]


def policy_objective(c, cfg: ModelConfig, rehearse: bool, algorithm: str | None = None) -> trainer.Objective:
    """The policy update's loss for `algorithm` (default `c.algorithm`), plus SFT rehearsal when `rehearse`."""
    algorithm = algorithm or c.algorithm
    if algorithm == "sft":
        inner = None if rehearse else trainer.Objective(steps.next_token_loss, (cfg,))
    elif algorithm == "dpo":
        inner = trainer.Objective(rl.dpo_loss, (cfg,), (("beta", c.dpo_beta),))
    else:  # ppo and both grpo (grpo advantages were computed over each iteration's groups)
        inner = trainer.Objective(rl.ppo_loss, (cfg,), (("clip_eps", c.clip_eps), ("kl_coef", c.kl_coef),
                                                       ("entropy_coef", c.entropy_coef)))
    return trainer.Objective(rl.rehearsal_loss, (cfg, inner)) if rehearse else inner


def rehearsal_batches(replayed, traces, n_sft: int, seed: int):
    """Update batches whose `n_sft` rows of SFT traces (`traces`, padded arrays) are rehearsed beside `replayed`."""
    rehearsed = trainer.example_batches(traces, n_sft, seed)
    return lambda step: {"rl": replayed(step), "sft": rehearsed(step)}


class Iterations:
    """RL's state across iterations: models, replay buffers, and what every iteration shares (one spec and
    verifier over the whole pool, so the search compiles once per run)."""

    def __init__(self, run, results, name: str = "rl", algorithm: str | None = None,
                 budgets: Sequence[int] | None = None, train_value: bool = True):
        """name: the phase (its folder under the workdir, random stream and log prefix); algorithm: rl.algorithm
        unless given; budgets: per iteration, the most tokens its sampling may generate (grpo_sampled only;
        None: no cap); train_value: False keeps the value model as it came (a baseline's is never used)."""
        self.run, c = run, run.c.rl
        self.name, self.algorithm, self.budgets = name, algorithm or c.algorithm, budgets
        if budgets is not None and self.algorithm != "grpo_sampled":
            raise ValueError(f"token budgets bound sampling only (grpo_sampled), not rl.algorithm={self.algorithm!r}")
        self.train_value = train_value
        self.folder = run.workdir / name
        self.tok, self.cfg, self.vcfg = results["tokenizer"], run.model_config(results), run.value_config(results)
        self.pool = data.rl_problems(results["data"])
        self.prompts = [formatting.prompt_ids(self.tok, run.task, p) for p in self.pool]
        self.spec = run.c.lm_spec(self.cfg, self.tok, verifier=make_verifier(self.tok, run.task, self.pool),
                                  task=run.task)
        self.preset = mcts.PRESETS[c.preset](num_parallel=run.c.search.num_parallel)
        self.ref = results["sft"]
        self.rehearsal = sft.trace_arrays(run, self.tok, results["data"]["train"]) if c.rehearsal_rows else None
        self.state = {"policy": results["sft"], "value": lora.share_base(results["value"], results["sft"]),
                      "policy_replay": replay.init(c.replay_capacity, run.c.seq_len, replay_fields(self.algorithm)),
                      "value_replay": replay.init(c.replay_capacity, run.c.seq_len, VALUE_FIELDS)}

    def like(self):
        return models_like(self.run, self.cfg, self.vcfg)

    def _buffers(self):
        return parallel.replicate({k: self.state[k] for k in ("policy_replay", "value_replay")}, self.run.mesh)

    def load(self, it: int):
        saved = ckpt_lib.load_result(self.folder / f"replay_{it}", self._buffers())
        models = ckpt_lib.load_result(wd_lib.iteration(self.run.workdir, self.name, it), self.like())
        self.state = {"policy": models["policy"], "value": lora.share_base(models["value"], models["policy"]),
                      **jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), saved)}  # host-local again
        return self.state

    def save(self, it: int):
        ckpt_lib.save_result(wd_lib.iteration(self.run.workdir, self.name, it),
                             {k: self.state[k] for k in ("policy", "value")})
        ckpt_lib.save_result(self.folder / f"replay_{it}", self._buffers())

    def search(self, it: int):
        """Iteration `it`'s data: MCTS with the verifier on its problems (or, for grpo_sampled, `rl.group_size`
        sampled completions per problem, within the iteration's token budget when there is one)
        -> (samples, solutions, info)."""
        run, c = self.run, self.run.c.rl
        ids = iteration_problems(len(self.pool), it, c.problems_per_iteration)
        prompts = [self.prompts[i] for i in ids]
        key = jax.random.fold_in(run.phase_key(self.name), it)
        sampled = self.algorithm == "grpo_sampled"
        strategy = functools.partial(group_samples.sample_groups_jit, group_size=c.group_size) if sampled else None
        budget = None if self.budgets is None else int(self.budgets[it])
        samples, solutions, generated, done = [], [], 0, 0
        bar = metrics_lib.progress(len(ids), desc=f"{self.name} {it}: " + ("sample" if sampled else "search"))
        worst = c.group_size * self.spec.context_len  # the most tokens one problem's sampling can generate
        for lo, hi in budget_batches(len(ids), c.batch_size, budget, worst, lambda: generated):
            for s0, real, out in run_search(self.spec, self.state["policy"], self.state["value"], prompts[lo:hi],
                                            # one uncapped call keeps RL from search's key (its earlier runs' draws)
                                            self.tok.pad_id, key if budget is None else jax.random.fold_in(key, lo),
                                            c.simulations, self.preset,
                                            c.batch_size, run.c.search.prompt_len, run.mesh, problem_ids=ids[lo:hi],
                                            strategy=strategy):
                s0 += lo
                if sampled:
                    smp, sol, ntok = group_samples.extract_samples(out, c.group_size, prompts[s0:s0 + real],
                                                                   [self.pool[i] for i in ids[s0:s0 + real]],
                                                                   run.task, self.tok, s0)
                else:
                    out = jax.tree.map(lambda x: x[:real], out)
                    smp, sol = extract_samples(out, prompts[s0:s0 + real], s0)
                    ntok = int(evaluation.mcts_tokens(out).sum())
                samples += smp
                solutions += sol
                generated += ntok
                done += real
                bar.update(real)
        bar.close()
        solved_rate = len({tuple(p) for p, _ in solutions}) / max(1, done)
        run.log(f"{self.name} {it}: {'sampling' if sampled else 'search'} solved {solved_rate:.3f} of {done} problems, "
                f"{len(samples)} samples, {len(solutions)} verified solutions, {generated} tokens generated"
                + (f" (budget {budget})" if budget is not None else ""))
        info = {"samples": len(samples), "solutions": len(solutions), "search_solved": solved_rate,
                "generated_tokens": generated, "problems": done}
        return samples, solutions, info if budget is None else {**info, "token_budget": budget}

    def step(self, it: int):
        """One iteration: search, fill the buffers, update the policy and the value model; -> (state, info)."""
        run, c, cfg, state = self.run, self.run.c.rl, self.cfg, self.state
        samples, solutions, info = self.search(it)
        arrays = policy_arrays(cfg, self.algorithm, samples, solutions, state["policy"], self.ref, self.tok.pad_id,
                               run.c.seq_len, gamma=self.preset.discount or 1.0)
        varrays = value_arrays(samples, self.tok.pad_id, run.c.seq_len) if self.train_value else None
        state = dict(state)
        if arrays is not None:
            state["policy_replay"] = replay.add(state["policy_replay"], arrays)
        if varrays is not None:
            state["value_replay"] = replay.add(state["value_replay"], varrays)
        seed, rl_dir, name = run.c.seed + it, self.folder, self.name
        # Policy update: a few epochs over the buffer, at most policy_update.steps (many passes over a handful of
        # solutions collapse the policy onto them).
        rows = int(state["policy_replay"].size)
        if rows:
            n_sft = c.rehearsal_rows if self.rehearsal is not None else 0
            n_new = c.policy_update.batch_size - n_sft
            n_steps = int(min(c.policy_update.steps, max(1, np.ceil(c.policy_epochs * rows / n_new))))
            batches = replay_sampler(state["policy_replay"], n_new, seed)
            if n_sft:  # SFT rehearsal: rl.sft_mix of every batch are reference traces of the SFT problems
                batches = rehearsal_batches(batches, self.rehearsal, n_sft, seed)
            state["policy"], last = trainer.train(f"{name}_policy_{it}", c.policy_update,
                                                  policy_objective(c, cfg, bool(n_sft), self.algorithm),
                                                  cfg, state["policy"], batches, rl_dir / f"ckpt_policy_{it}",
                                                  run.writer, run.mesh, updates=n_steps)
            info.update({f"policy_{k}": v for k, v in last.items()})
            info["policy_updates"] = n_steps
        # Value update: regression on the backed-up values in the buffer (value_update.steps=0: the value model
        # stays as phase 1 fit it, e.g. on exact step labels).
        if c.value_update.steps and int(state["value_replay"].size):  # empty without train_value
            state["value"], last = trainer.train(
                f"{name}_value_{it}", c.value_update, value.objective(self.vcfg, run.c.value_head), self.vcfg, state["value"],
                replay_sampler(state["value_replay"], c.value_update.batch_size, seed), rl_dir / f"ckpt_value_{it}",
                run.writer, run.mesh, head=run.c.value_head)
            info.update({f"value_{k}": v for k, v in last.items()})
        state["value"] = lora.share_base(state["value"], state["policy"])  # LoRA: one frozen base for the pair
        info["replay_rows"], info["value_rows"] = rows, int(state["value_replay"].size)
        run.writer.write(it, info, prefix=f"{name}_iteration")
        self.state = state
        return state, info


def _rl(run, results):
    """`rl.iterations` iterations from the SFT policy and the value model; each is resumable on its own."""
    iters = Iterations(run, results)
    for it in range(run.c.rl.iterations):
        run.resumable(f"rl_{it}", lambda: iters.step(it), lambda _: iters.save(it), lambda: iters.load(it))
    return {k: iters.state[k] for k in ("policy", "value")}, {}


def models_like(run, cfg, vcfg):
    """The abstract {"policy", "value"} pair an RL iteration saves."""
    return {"policy": run.like(cfg), "value": run.like(vcfg, value_model=True)}


PHASE = Phase("rl", _rl, like=lambda run, results: models_like(run, run.model_config(results), run.value_config(results)),
              enabled=lambda c: c.rl.iterations > 0,
              skipped=lambda results: {"policy": results["sft"], "value": results["value"]},
              stamp=lambda run: {"iterations": run.c.rl.iterations},
              folder=lambda run: wd_lib.rl_iteration(run.workdir, run.c.rl.iterations - 1))
