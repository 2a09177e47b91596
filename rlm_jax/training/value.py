"""Phase 1, value model: fit V(s) to Monte-Carlo rollout targets of the current policy (or, with
value.targets=exact, to the task's exact step labels, as a PRM is fit).

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
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import formatting, parallel, statistics
from rlm_jax import workdir as wd_lib
from rlm_jax.models import heads, hf, lora
from rlm_jax.models.config import ModelConfig
from rlm_jax.models.heads import HeadConfig
from rlm_jax.tasks.base import Problem, Score, Task
from rlm_jax.tokenizer import HFTokenizer, Tokenizer
from rlm_jax.training import data, loop, rollouts, sums as sums_lib, trainer
from rlm_jax.training.phases import Phase


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


def labelled_states(run, setting: str, states) -> tuple[list, np.ndarray]:
    """The states the task can label exactly, with their +-1 labels; `setting` names the config that asked."""
    labels = exact_labels(run.task, states)
    known = labels != 0
    if not known.any():
        raise ValueError(f"config {setting}: task {run.c.task.name} gave no exact label for any state (its "
                         "can_succeed cannot tell); train the value model on rollouts (value.targets=rollouts, "
                         "value_refit.steps=0)")
    return [st for st, k in zip(states, known) if k], labels[known]


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
    return statistics.ranking_auc(pred[known], labels[known] > 0)


def value_sums(cfg: ModelConfig, head_cfg: HeadConfig, params, batch, *, loss: str = "mse",
               target_key: str = "q") -> sums_lib.Sums:
    """Regression of the value/Q head on its targets (the blueprint's Algorithm 7: mean (Q_phi(s, a) - q)^2;
    Algorithm 3 for the BCE variant), as (sum, denominator) pairs (`training/sums.py`).

    The head is read at the last real token of each sample, i.e. the end of the step for a Q head
    (`heads.sequence_score`; x1 instead fits every token of the last step and reads 3 tokens early).
    Args:
      params: value params {"trunk", "head"} (`heads.init_value_params`).
      batch: tokens, mask [B, T]; batch[target_key] [B]: in the head's range for "mse" ([-1, 1] for
        value/q heads, [0, 1] for prm/orm); for "bce" a probability in [0, 1] (hard or soft labels, e.g.
        the fraction of correct rollouts) for prm/orm heads, or a signed target y in [-1, 1] for value/q
        heads, read as P(correct) = (y + 1) / 2 (their 2 sigmoid - 1 squash has the same logit).
      loss: "mse" (continuous bounded rewards) or "bce" (binary rewards, on the logit: stable).
    """
    if loss not in ("mse", "bce"):
        raise ValueError(f"value loss {loss!r} unknown; use 'mse' or 'bce'")
    sums_lib.require(batch, ["tokens", "mask", target_key], "value_regression_loss")
    b = batch["tokens"].shape[0]
    sums_lib.check_shape(batch, target_key, (b,), "value_regression_loss", "one target per sample")
    logit = heads.read_last(heads.head_logits(cfg, head_cfg, params, batch["tokens"], batch["mask"]),
                            batch["mask"])
    pred = heads.squash(head_cfg, logit)
    y = jnp.asarray(batch[target_key], jnp.float32)
    if loss == "mse":
        per = (pred - y) ** 2
    else:
        p = (y + 1.0) / 2.0 if head_cfg.signed else y
        per = jax.nn.softplus(logit) - p * logit  # BCE with logits: -[p log s(z) + (1-p) log(1-s(z))]
    sw = sums_lib.sample_weight(batch, b)
    n = sw.sum()
    mean = lambda x: ((sw * x).sum(), n)  # noqa: E731
    return {"loss": mean(per), "abs_error": mean(jax.lax.stop_gradient(jnp.abs(pred - y))),
            "prediction": mean(jax.lax.stop_gradient(pred))}


def value_regression_loss(cfg: ModelConfig, head_cfg: HeadConfig, params, batch, loss: str = "mse",
                          target_key: str = "q"):
    """(loss, metrics) of `value_sums`: loss, abs_error, prediction (sample means), weight (samples)."""
    return sums_lib.finalize(value_sums(cfg, head_cfg, params, batch, loss=loss, target_key=target_key))


def objective(cfg: ModelConfig, head_cfg: HeadConfig, loss: str = "mse") -> trainer.Objective:
    return trainer.Objective(value_regression_loss, (cfg, head_cfg), (("loss", loss),))


def fit(run, name: str, tc, cfg, vparams, arrays, targets, ckpt_dir):
    """`tc.loss` of the value head of `vparams` against `targets` [N]; returns (params, last metrics)."""
    batches = trainer.example_batches({**arrays, "q": targets.astype(np.float32)}, tc.batch_size, run.c.seed)
    return trainer.train(name, tc, objective(cfg, run.c.value_head, tc.loss), cfg, vparams, batches, ckpt_dir,
                         run.writer, run.mesh, head=run.c.value_head)


def held_out_states(run, cfg, policy, tok, ev, key) -> dict:
    """States of `policy`'s samples of evaluation problems (2 per problem) with their exact labels: what
    `held_out_check` scores a value model on."""
    states = collect_states(cfg, policy, tok, run.task, ev, key, 2, run.c.search.max_new_tokens)
    return {"arrays": state_arrays(tok, run.task, states, run.c.seq_len),
            "labels": exact_labels(run.task, states), "finished": np.asarray([st[2] for st in states])}


def held_out_check(run, name: str, cfg, vparams, held_out) -> dict:
    """The value model against the exact labels of `held_out`: sign accuracy, the best constant's, and the
    finished-state AUC; logged as `{name}_eval`."""
    pred = predict(cfg, run.c.value_head, vparams, held_out["arrays"])
    labels = held_out["labels"]
    acc = {**label_accuracy(pred, labels), "finished_auc": finished_auc(pred, labels, held_out["finished"])}
    run.writer.write(0, acc, prefix=f"{name}_eval")
    run.log(f"{name}: held-out label accuracy {acc['value_accuracy']:.3f} (constant predictor "
            f"{acc['constant_accuracy']:.3f}, {acc['labelled_states']} states); AUC on finished states "
            f"{acc['finished_auc']:.3f}")
    return acc


def initial_trunk(run, results, key):
    """Where the value model's trunk starts: value.init's folder (with fresh LoRA adapters under
    model.lora_rank), whose tokenizer must read the run's text as the policy's does; else the SFT policy's."""
    if not run.c.value.init:
        return results["sft"]
    folder, tok = Path(run.c.value.init[3:]), results["tokenizer"]
    vcfg = run.value_config(results)
    probes = [run.task.prompt(p) for p in results["data"]["train"][:8]]
    theirs = HFTokenizer.from_folder(folder)
    if any(theirs.encode(t) != tok.encode(t) for t in probes):
        raise ValueError(f"config value.init={run.c.value.init}: its tokenizer splits the task's text differently from "
                         "the policy's; the value model must share the policy's tokenizer (the same family's folder)")
    _, trunk = hf.load_hf(folder, vcfg.param_dtype, compute_dtype=vcfg.dtype)
    trunk = lora.add_adapters(vcfg, trunk, key)
    return parallel.place_params(trunk, parallel.param_shardings(vcfg, run.mesh))


def _value(run, results):
    """Phase 1's value model: a head on a copy of the SFT trunk (or on value.init's folder), fit to rollout
    targets of the SFT policy or to exact step labels of its states (value.targets)."""
    c, tok, cfg, policy = run.c.value, results["tokenizer"], run.model_config(results), results["sft"]
    vcfg = run.value_config(results)
    ev = results["data"]["eval"]
    k_states, k_targets, k_eval, k_init = jax.random.split(run.phase_key("value"), 4)
    max_new = run.c.search.max_new_tokens
    pool = data.training_pool(results["data"])  # the SFT problems first
    states = collect_states(cfg, policy, tok, run.task, pool[:c.problems], k_states, c.samples_per_problem, max_new,
                            c.temperature)
    if c.targets == "exact":
        states, targets = labelled_states(run, "value.targets=exact", states)
    else:
        targets = state_targets(cfg, policy, tok, run.task, states, k_targets, c.rollouts, max_new, c.gamma)
    arrays = state_arrays(tok, run.task, states, run.c.seq_len)
    run.log(f"value: {len(states)} states ({c.targets} targets), mean target {targets.mean():+.3f}")
    vparams = heads.init_value_params(vcfg, run.c.value_head, k_init, trunk=initial_trunk(run, results, jax.random.fold_in(k_init, 1)))
    vparams, last = fit(run, "value", c, vcfg, vparams, arrays, targets, run.workdir / "value" / "ckpt")
    acc = held_out_check(run, "value", vcfg, vparams, held_out_states(run, cfg, policy, tok, ev, k_eval))
    return vparams, {**last, **acc}


def _refit(run, results):
    """The final value model: the last one refit on the task's exact labels (`Task.can_succeed`: can this
    partial solution still be completed; the verifier for finished ones) of the final policy's samples on
    training problems, as a PRM is fit to step labels (ablations: value_refit.init starts from phase 1's value
    model instead of RL's, value_refit.samples_from="sft" labels the SFT policy's samples). Rollout and backed-up values judge the policy's own
    steps only as well as the policy completes them; these labels judge the steps themselves."""
    c, tok, cfg, vcfg = run.c.value_refit, results["tokenizer"], run.model_config(results), run.value_config(results)
    policy = results["sft"] if c.samples_from == "sft" else results["rl"]["policy"]
    vparams = results["value"] if c.init == "phase1" else results["rl"]["value"]
    pool, ev = data.training_pool(results["data"]), results["data"]["eval"]
    k_states, k_eval = jax.random.split(run.phase_key("value_refit"))
    states = collect_states(cfg, policy, tok, run.task, pool[:c.problems], k_states, c.samples_per_problem,
                            run.c.search.max_new_tokens, c.temperature)
    states, labels = labelled_states(run, "value_refit.steps>0", states)
    run.log(f"value_refit: {len(states)} labelled states of {min(c.problems, len(pool))} training problems "
            f"({sum(st[2] for st in states)} finished), mean label {labels.mean():+.3f}")
    held_out = held_out_states(run, cfg, policy, tok, ev, k_eval)
    before = held_out_check(run, "value_before_refit", vcfg, vparams, held_out)
    folder = refit_folder(run)
    vparams, last = fit(run, "value_refit", c, vcfg, vparams, state_arrays(tok, run.task, states, run.c.seq_len), labels,
                        folder / "ckpt")
    acc = held_out_check(run, "value_refit", vcfg, vparams, held_out)
    return vparams, {**last, **acc, "auc_before": before["finished_auc"], "accuracy_before": before["value_accuracy"]}


def refit_folder(run):
    return wd_lib.refit_folder(run.workdir, run.c.rl.iterations)


_VALUE_LIKE = lambda run, results: run.like(run.value_config(results), value_model=True)  # noqa: E731
PHASE = Phase("value", _value, like=_VALUE_LIKE)
REFIT_PHASE = Phase("value_refit", _refit, like=_VALUE_LIKE, enabled=lambda c: c.value_refit.steps > 0,
                    skipped=lambda results: results["rl"]["value"],
                    stamp=lambda run: {"rl_iterations": run.c.rl.iterations},
                    folder=lambda run: refit_folder(run) / "final")
