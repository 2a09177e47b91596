"""Phase 1, value model: fit V(s) to Monte-Carlo rollout targets of the current policy.

States are partial solutions: prefixes of the policy's own samples and of the reference traces, so the
value model sees both good and bad states. Targets: a finished state's verifier reward (+-1); an
unfinished state's depth-discounted mean rollout reward (`rollouts.rollout_values`), raised to
+gamma^(steps left) when the state is a prefix of a verified solution (a reference trace or a solved
sample): a solution from it is known to exist, whatever the current policy's rollouts find, which
keeps a weak early policy from teaching the value model that every state is lost. Where the task
has exact labels (`Task.can_succeed`), `label_accuracy` reports how often sign(V) agrees with them,
against the best constant predictor, and `finished_auc` how well V ranks solved above failed finished
states (sign accuracy alone can be won by reading the depth: an empty state is always solvable).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from rlm_jax import evaluation, formatting, parallel
from rlm_jax.models import heads
from rlm_jax.models.config import ModelConfig
from rlm_jax.tasks.base import Problem, Score, Task
from rlm_jax.tokenizer import Tokenizer
from rlm_jax.training import loop, optim, rl, rollouts, sft


def collect_states(cfg: ModelConfig, policy_params, tok: Tokenizer, task: Task, problems: Sequence[Problem],
                   key, samples_per_problem: int, max_new_tokens: int,
                   temperature: float = 1.0) -> list[tuple[Problem, list[str], bool, int | None]]:
    """(problem, steps, finished, steps to a verified solution or None) states: every prefix of policy
    samples and of reference traces."""
    contexts = [formatting.prompt_ids(tok, task, p) for p in problems for _ in range(samples_per_problem)]
    samples = rollouts.sample_continuations(cfg, policy_params, tok, contexts, key, max_new_tokens, temperature)
    traces = [(p, s) for i, p in enumerate(problems)
              for s in samples[i * samples_per_problem:(i + 1) * samples_per_problem]]
    traces += [(p, task.solve(p)) for p in problems]
    solved = {(p["problem"], tuple(t)) for p, t in traces if task.verify(p, "\n".join(t)) == Score.SOLVED}
    # steps left to a verified solution, for every prefix of one
    to_go = {(key[0], key[1][:d]): len(key[1]) - d for key in solved for d in range(len(key[1]) + 1)}
    seen, states = set(), []
    for p, trace in traces:
        for d in range(len(trace) + 1):
            key_ = (p["problem"], tuple(trace[:d]))
            if key_ not in seen:
                seen.add(key_)
                states.append((p, list(trace[:d]), d == len(trace) and d > 0, to_go.get(key_)))
    return states


def state_targets(cfg, policy_params, tok, task, states, key, num_rollouts: int, max_new_tokens: int,
                  gamma: float) -> np.ndarray:
    """Finished states: the verifier's +-1. Unfinished: discounted mean rollout reward, or
    gamma^(steps left) on a verified solution's path if that is higher."""
    targets = np.zeros(len(states), np.float32)
    open_idx = [i for i, st in enumerate(states) if not st[2]]
    for i, (p, s, fin, _) in enumerate(states):
        if fin:
            targets[i] = 1.0 if task.verify(p, "\n".join(s)) == Score.SOLVED else -1.0
    if open_idx:
        vals = rollouts.rollout_values(cfg, policy_params, tok, task, [states[i][:2] for i in open_idx], key,
                                       num_rollouts, max_new_tokens, gamma)
        known = np.asarray([-1.0 if states[i][3] is None else gamma ** states[i][3] for i in open_idx])
        targets[open_idx] = np.maximum(vals, known)
    return targets


def state_arrays(tok: Tokenizer, task: Task, states, seq_len: int) -> dict[str, np.ndarray]:
    """Token arrays of the states; a finished state ends with EOS (as the policy writes it)."""
    examples = []
    for p, s, fin, _ in states:
        ids = formatting.prompt_ids(tok, task, p)
        for k, st in enumerate(s):
            ids += formatting.step_ids(tok, st, final=fin and k == len(s) - 1)
        examples.append((ids, [False] * len(ids)))
    arr = formatting.pad_examples(examples, tok.pad_id, seq_len, truncate=True)
    del arr["loss_mask"]
    return arr


def exact_labels(task: Task, states) -> np.ndarray:
    """+1 / -1 where the task can tell whether a state can still be solved; 0 where it cannot."""
    out = np.zeros(len(states), np.float32)
    for i, (p, s, fin, _) in enumerate(states):
        if fin:
            out[i] = 1.0 if task.verify(p, "\n".join(s)) == Score.SOLVED else -1.0
        else:
            ok = task.can_succeed(p, s)
            out[i] = 0.0 if ok is None else (1.0 if ok else -1.0)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "head_cfg"))
def _predict(cfg, head_cfg, params, tokens, mask):
    return heads.sequence_score(cfg, head_cfg, params, tokens, mask)


def predict(cfg: ModelConfig, head_cfg: heads.HeadConfig, params, arrays) -> np.ndarray:
    """The value model's score of every row of `arrays` (tokens, mask [N, T]) -> [N]."""
    return loop.map_batches(lambda t, m: _predict(cfg, head_cfg, params, t, m), arrays["tokens"], arrays["mask"])


def label_accuracy(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of sign(pred) on states with an exact label, and the best constant predictor's."""
    known = labels != 0
    if not known.any():
        return {"value_accuracy": float("nan"), "constant_accuracy": float("nan"), "labelled_states": 0}
    y = labels[known] > 0
    acc = float(np.mean((pred[known] > 0) == y))
    const = float(max(y.mean(), 1 - y.mean()))
    return {"value_accuracy": acc, "constant_accuracy": const, "labelled_states": int(known.sum())}


def finished_auc(pred: np.ndarray, labels: np.ndarray, finished: np.ndarray) -> float:
    """How well V ranks finished states (what best-of-N and MCTS's final pick rely on): the probability
    that a random solved state scores above a random failed one (ties count half); NaN without both."""
    known = finished & (labels != 0)
    return evaluation.ranking_auc(pred[known], labels[known] > 0)


def run_value_training(cfg: ModelConfig, head_cfg: heads.HeadConfig, value_params, arrays, targets, tc,
                       ckpt_dir, writer, seed: int, mesh, name: str = "value"):
    """MSE (or BCE, `tc.loss`) of the value head against `targets` [N], sharded on `mesh`; returns
    (params, last metrics)."""
    tx = optim.make_optimizer(tc.lr, tc.steps, tc.warmup_steps, tc.weight_decay, tc.clip_norm)
    loss_fn = functools.partial(rl.value_regression_loss, cfg, head_cfg, loss=tc.loss)
    step_fn, params, opt_state = parallel.sharded_trainer(cfg, mesh, tx, value_params, loss_fn=loss_fn,
                                                          head_cfg=head_cfg)
    batch_at = sft.batch_fn({**arrays, "q": targets.astype(np.float32)}, tc.batch_size, seed)
    params, _, last = loop.train(name, step_fn, params, opt_state, batch_at, tc.steps,
                                 ckpt_dir, writer, save_every=tc.save_every, log_every=tc.log_every)
    return params, last
