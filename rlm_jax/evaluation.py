"""Test-time compute evaluation: strategies x budgets on a problem set -> `Result`s (tables: `report.py`).

Strategies (all jitted over a batch of problems; `budget` means):
  greedy (1)            chain of thought, greedy decoding
  sample (1)            one sample at the search temperature
  best_of_n (N)         N samples ranked by the value model (ORM-style read at the final token)
  self_consistency (N)  N samples, majority vote over the final answers
  beam (W)              step-level beam search, width W, 2 expansions per beam, value-scored
  tot_bfs (W)           Tree-of-Thoughts BFS: the same search as beam:W (the W best-valued states kept per depth)
  dvts (T)              diverse verifier tree search: T independent width-1 beams, 2 expansions each, the
                        best subtree's answer (beam:W's cost at T = W)
  mcts (S)              MCTS with S simulations, PUCT with step priors, value model at the leaves
  tot_dfs (S)           Tree-of-Thoughts DFS creating at most S nodes (mcts:S creates S): children valued below
                        -0.5 pruned, backtracking, stops at the first finished step valued >= -0.5 (`search/dfs.py`)
  got (W)               Graph of Thoughts: beam:W whose candidates also include merges of min(W, W(W-1)/2) pairs
                        of beams (one path's steps, then the other's after their common prefix; `search/got.py`)
  sr_mcts (S)           self-refine MCTS writing S whole solutions: UCT picks one to refine, the value model flags
                        the step to rewrite, 2 new steps there, the best-valued different one kept, the rest
                        regenerated (`search/sr_mcts.py`; 2 rewrites cost 0.6x the tokens of K = 4 at equal
                        accuracy, README)
Evaluation is inference mode: no verifier inside any strategy, the verifier only grades the answer.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from rlm_jax import decoding, formatting, parallel, statistics
from rlm_jax.search import beam, dfs, got, lm, mcts, sampling, sr_mcts
from rlm_jax.search.base import LMSpec, SearchOutput
from rlm_jax.tasks.base import Problem, Score, Task
from rlm_jax.tokenizer import Tokenizer

STRATEGIES = ("greedy", "sample", "best_of_n", "self_consistency", "beam", "tot_bfs", "dvts", "mcts", "tot_dfs", "got",
              "sr_mcts")
# Strategies the value model drives beyond ranking samples: GoT scores merged partial solutions nobody sampled,
# SR-MCTS takes its feedback (which step to rewrite) from it.
NEEDS_VALUE = {"got": "scores merged partial solutions with", "sr_mcts": "takes the step to rewrite from"}
PRESETS = mcts.PRESETS  # MCTS presets by name (`eval.mcts_preset`, `rl.preset`)
EVAL_KEY_INDEX = 5  # the main job's evaluation phase key is fold_in(key(seed), 5) (training/phases.LEGACY_KEY_INDEX)


def run_eval_key(seed: int) -> jax.Array:
    """The key of a run's evaluation phase: re-evaluating its checkpoints with it (experiments/evaluate.py)
    draws the same samples, so the report's figures come back to the last digit."""
    return jax.random.fold_in(jax.random.key(seed), EVAL_KEY_INDEX)


def parse_strategies(entries: str | Sequence[str], value_model: bool = True) -> list[tuple[str, int]]:
    """"name:budget" entries (a sequence, or one comma-separated string) -> [(name, budget)]. value_model:
    whether the evaluation has one (the strategies in NEEDS_VALUE are refused without it)."""
    if isinstance(entries, str):
        entries = [e.strip() for e in entries.split(",") if e.strip()]
    if not entries:
        raise ValueError("no evaluation strategy given; e.g. eval.strategies='greedy:1,mcts:16'")
    out = []
    for e in entries:
        name, _, budget = str(e).partition(":")
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r} in {e!r}; valid strategies: {', '.join(STRATEGIES)}")
        try:
            b = int(budget or 1)
        except ValueError:
            raise ValueError(f"strategy {e!r}: budget must be an integer, e.g. {name}:8") from None
        if b < 1:
            raise ValueError(f"strategy {e!r}: budget must be >= 1, got {b}")
        if name in NEEDS_VALUE and not value_model:
            raise ValueError(f"strategy {e!r} {NEEDS_VALUE[name]} a value model, and this evaluation has "
                             f"none; use beam:{b} (ranked by log-probability) or a trained run's models (--workdir)")
        out.append((name, b))
    return out


def answer_key(text: str):
    """A task-agnostic final answer: the last line, after its last '=' if any (countdown: the final
    number; True/False tasks: the answer line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    return lines[-1].rsplit("=", 1)[-1].strip().lower()


def mcts_tokens(out: SearchOutput) -> np.ndarray:
    """Tokens the MCTS generated per problem: every created node's K proposals (root included; finished
    nodes sample none) and its rollouts' tokens (LMSpec.num_rollouts): `lm.generated_tokens`."""
    return np.asarray(lm.generated_tokens(jax.device_get(out.tree)))


@dataclasses.dataclass
class Result:
    strategy: str
    budget: int
    accuracy: float
    tokens_per_problem: float
    seconds: float
    per_level: dict
    solved: list = dataclasses.field(default_factory=list, repr=False)  # per problem, in order


def run_strategy(name: str, budget: int, spec: LMSpec, inputs, key, tok: Tokenizer,
                 mcts_preset: str = "puct", num_parallel: int = 1):
    """One batch -> (answer texts, generated tokens per problem). MCTS: preset `mcts_preset`, `num_parallel`
    leaves per iteration. `inputs` may be sharded over a mesh
    (`parallel.shard_search_inputs`): outputs are gathered to every host before decoding."""
    if name == "greedy":
        out = sampling.greedy_jit(spec, inputs, key)
    elif name == "sample":
        out = sampling.best_of_n_jit(spec, inputs, key, n=1, scorer="logprob")
    elif name == "best_of_n":
        out = sampling.best_of_n_jit(spec, inputs, key, n=budget, scorer="value")
    elif name == "self_consistency":
        def key_fn(r, s, m):
            return answer_key("\n".join(sampling.decode_steps(tok, s, m)))
        out = sampling.self_consistency(spec, inputs, key, budget, key_fn)
    elif name in ("beam", "tot_bfs"):  # Tree-of-Thoughts BFS is step-level beam search: breadth b = budget states,
        # k = 2 proposals each, the b best by value kept at every depth (the rest pruned)
        out = beam.beam_search_jit(spec, inputs, key, width=budget, expansions=2)
    elif name == "dvts":
        out = beam.dvts_jit(spec, inputs, key, trees=budget, expansions=2)
    elif name == "tot_dfs":
        out = dfs.tot_dfs_jit(spec, inputs, key, nodes=budget).answer
    elif name == "got":
        out = got.got_jit(spec, inputs, key, width=budget, expansions=2).answer
    elif name == "sr_mcts":
        out = sr_mcts.sr_mcts_jit(spec, inputs, key, solutions=budget, rewrites=2).answer
    elif name == "mcts":
        res = lm.lm_mcts_jit(spec, inputs, key, budget, mcts.preset(mcts_preset, num_parallel=num_parallel))
        steps, mask = parallel.to_host(lm.solution_steps(spec, res))
        texts = ["\n".join(sampling.decode_steps(tok, s, m)) for s, m in zip(steps, mask)]
        return texts, mcts_tokens(parallel.to_host(res))
    else:
        raise ValueError(f"unknown strategy {name!r}")
    out = parallel.to_host(out)
    return list(sampling.solution_texts(tok, out)), np.asarray(out.generated_tokens)


def _batches(policy_params, value_params, tok: Tokenizer, task: Task, problems: Sequence[Problem],
             batch_size: int, prompt_len: int, mesh=None):
    """Yields (first problem index, real rows, search inputs) per fixed-size batch of `problems` (the last
    one padded with copies of its first prompt, so one program serves every batch)."""
    prompts = [formatting.prompt_ids(tok, task, p) for p in problems]
    if mesh is not None:
        policy_params, value_params = (parallel.place_params(p, parallel.replicated(mesh))
                                       for p in (policy_params, value_params))
    for start in range(0, len(problems), batch_size):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real)
        t, m = decoding.pad_prompts(chunk, tok.pad_id, length=prompt_len)
        inputs = lm.search_inputs(policy_params, value_params, t, m)
        if mesh is not None:
            inputs = parallel.shard_search_inputs(inputs, mesh, global_batch=True)
        yield start, real, inputs


def _next_key(key, mesh):
    """(carried key, this batch's key), replicated over `mesh` when there is one."""
    key, sub = jax.random.split(key)
    return key, (sub if mesh is None else parallel.replicate(sub, mesh))


def evaluate(spec: LMSpec, policy_params, value_params, tok: Tokenizer, task: Task,
             problems: Sequence[Problem], strategies: Sequence[tuple[str, int]], key, batch_size: int,
             prompt_len: int, mcts_preset: str = "puct", progress=None, mesh=None,
             num_parallel: int = 1) -> list[Result]:
    """Accuracy (verifier score == SOLVED), generated tokens and wall seconds (compilation included)
    of each strategy over `problems`, in fixed-size batches. With a `mesh`, every batch is split over its
    data axes (batch_size a multiple of `parallel.batch_ways(mesh)`); every process passes the same
    problems and gets the same results."""
    results = []
    for name, budget in strategies:
        t0 = time.perf_counter()
        solved, tokens = [], []
        for start, real, inputs in _batches(policy_params, value_params, tok, task, problems, batch_size,
                                            prompt_len, mesh):
            key, sub = _next_key(key, mesh)
            with parallel.search_mesh(mesh):
                texts, ntok = run_strategy(name, budget, spec, inputs, sub, tok, mcts_preset, num_parallel)
            for p, text in zip(problems[start:start + real], texts[:real]):
                solved.append(task.verify(p, text) == Score.SOLVED)
            tokens.extend(np.asarray(ntok)[:real].tolist())
        secs = time.perf_counter() - t0
        levels = {}
        for p, s in zip(problems, solved):
            levels.setdefault(int(p["level"]), []).append(s)
        r = Result(name, budget, float(np.mean(solved)), float(np.mean(tokens)), secs,
                   {lv: float(np.mean(v)) for lv, v in sorted(levels.items())}, [bool(s) for s in solved])
        results.append(r)
        if progress is not None:
            progress(r)
    return results


@dataclasses.dataclass
class SelectionCeiling:
    """What N samples per problem offer any selection rule (best-of-N, voting, a verifier)."""
    samples: int                 # N per problem
    distinct_finished: float     # distinct finished solutions per problem (mean)
    pass_at_n: float             # fraction of problems with a solved sample: a perfect verifier's pick
    value_pick: float            # fraction solved by the value model's pick among the finished (best-of-N)
    value_auc: float             # the value model's ranking of solved above failed finished samples


def ceiling_from_samples(samples: Sequence[Sequence[tuple[str, float, bool]]], solves) -> SelectionCeiling:
    """`samples[i]`: problem i's (solution text, value score, finished) samples; `solves(i, text)` -> bool.
    A text sampled twice counts once (its first score); unfinished samples are not answers."""
    distinct, any_solved, picked, scores, labels = [], [], [], [], []
    for i, rows in enumerate(samples):
        seen: dict[str, float] = {}
        for text, score, finished in rows:
            if finished:
                seen.setdefault(text, float(score))
        ok = {text: bool(solves(i, text)) for text in seen}
        distinct.append(len(seen))
        any_solved.append(any(ok.values()))
        picked.append(bool(seen) and ok[max(seen, key=seen.get)])
        scores += list(seen.values())
        labels += list(ok.values())
    return SelectionCeiling(max((len(r) for r in samples), default=0), float(np.mean(distinct)),
                            float(np.mean(any_solved)), float(np.mean(picked)),
                            statistics.ranking_auc(np.asarray(scores), np.asarray(labels, bool)))


def selection_ceiling(spec: LMSpec, policy_params, value_params, tok: Tokenizer, task: Task,
                      problems: Sequence[Problem], n: int, key, batch_size: int, prompt_len: int,
                      mesh=None) -> SelectionCeiling:
    """Samples N solutions per problem at the spec's temperature (one jitted call per batch) and measures
    how many distinct finished ones there are, whether any is solved, and how well the value model picks
    and ranks them. A policy whose samples agree leaves no strategy anything to choose from, whatever its
    value model."""
    samples = []
    for start, real, inputs in _batches(policy_params, value_params, tok, task, problems, batch_size,
                                        prompt_len, mesh):
        key, sub = _next_key(key, mesh)
        with parallel.search_mesh(mesh):
            steps, mask, score, finished, _ = parallel.to_host(sampling.sample_slots(
                spec, inputs, sub, n, spec.temperature))
        samples += [[("\n".join(sampling.decode_steps(tok, steps[j], mask[j])), score[j], finished[j])
                     for j in range(r * n, (r + 1) * n)] for r in range(real)]
    ceiling = ceiling_from_samples(samples, lambda i, text: task.verify(problems[i], text) == Score.SOLVED)
    return ceiling if spec.value is not None else dataclasses.replace(ceiling, value_auc=float("nan"))
