"""Phases as data, and the one driver that owns done / resume / save / mark / barrier and their random keys.

A `Phase` is a name, a body `(run, results) -> (result, info)` and what its result looks like (`like`, an
abstract pytree saved under `workdir/<phase>/final`, or `load` for results that are files). The driver runs
each phase once: a phase recorded done in progress.json with the same `stamp` (what its result depends on
beyond the earlier phases, e.g. the refit's RL iteration count) is loaded instead; otherwise its body runs
(training loops inside resume from their own checkpoints), the result is saved, then marked. Adding a phase is
a module with its body and a `Phase(...)` plus one line in `pipeline.PHASES`.

Multi-host: every process runs every phase with the same config; `primary_only` phases (files only process 0
writes: data, tokenizer, report) run on process 0 while the others wait at the phase's barrier, then load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import jax

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import progress
from rlm_jax import metrics as metrics_lib
from rlm_jax import evaluation, multihost, workdir as wd_lib
from rlm_jax.config import RunConfig, stable_hash
from rlm_jax.models.config import ModelConfig
from rlm_jax.tasks import get_task

# Random streams: the phases that existed when keys were indexed by phase order keep those indices, so their
# results stay reproducible across versions; any other phase gets `stable_hash(name)`.
LEGACY_KEY_INDEX = {"data": 0, "tokenizer": 1, "sft": 2, "value": 3, "rl": 4, "eval": evaluation.EVAL_KEY_INDEX,
                    "pretrain": 6, "value_refit": 7}

Results = dict  # phase name -> its result


def _always(c: RunConfig) -> bool:
    return True


def _no_stamp(run: "Run") -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Phase:
    """name: also its progress.json entry and default folder. body(run, results) -> (result, info dict).
    like(run, results): the abstract pytree of the result (`checkpoint.load_result`), or None with `load`
    (run, results) -> result for phases that keep their own files. enabled(config): False skips the phase and
    its result is skipped(results). stamp(run): info a recorded "done" must match. folder(run): where the
    result is saved (default workdir/<name>/final)."""

    name: str
    body: Callable[["Run", Results], tuple[Any, dict]]
    like: Callable[["Run", Results], Any] | None = None
    load: Callable[["Run", Results], Any] | None = None
    enabled: Callable[[RunConfig], bool] = _always
    skipped: Callable[[Results], Any] = lambda results: None
    stamp: Callable[["Run"], dict] = _no_stamp
    folder: Callable[["Run"], Path] | None = None
    primary_only: bool = False


class Run:
    """What the phases of one run share: the typed config, workdir, task, mesh, metrics, keys."""

    def __init__(self, c: RunConfig, workdir):
        self.c, self.workdir = c, Path(workdir)
        self.task = get_task(c.task.name)
        self.writer = metrics_lib.MetricsWriter(self.workdir)
        self.key = jax.random.key(c.seed)
        self.mesh = c.mesh.make()

    def log(self, msg: str) -> None:
        if multihost.is_primary():
            print(f"[rlm_jax] {msg}", flush=True)

    def phase_key(self, phase: str):
        return jax.random.fold_in(self.key, LEGACY_KEY_INDEX.get(phase, stable_hash(phase)))

    def model_config(self, results: Results) -> ModelConfig:
        return self.c.model_config(results["tokenizer"].vocab_size)

    def value_config(self, results: Results) -> ModelConfig:
        """The value model's trunk (value.init's folder's, else the policy's)."""
        return self.c.value_model_config(results["tokenizer"].vocab_size)

    def like(self, cfg: ModelConfig, value_model: bool = False):
        return wd_lib.abstract_like(cfg, self.mesh, self.c.value_head if value_model else None)

    def mark(self, phase: str, info=None) -> None:
        progress.mark_done(self.workdir, phase, info or {})

    def done(self, phase: str, stamp: dict | None = None) -> bool:
        """Recorded done (on process 0, agreed by all), with every `stamp` item in its info."""
        entry = progress.read_progress(self.workdir).get(phase, {})
        stamp = json.loads(json.dumps(stamp or {}))  # as progress.json stores it (tuples become lists)
        ok = bool(entry.get("done")) and all(entry.get("info", {}).get(k) == v for k, v in stamp.items())
        return multihost.agreed(ok)

    def resumable(self, name: str, body: Callable[[], tuple[Any, dict]], save: Callable[[Any], None],
                  load: Callable[[], Any], stamp: dict | None = None, primary_only: bool = False):
        """The skeleton every phase (and every RL iteration) shares: load if done, else body, save, mark. A done
        phase whose saved result cannot be read (a corrupt checkpoint is moved aside by `checkpoint`, never
        deleted) runs again, saying so."""
        if self.done(name, stamp):
            try:
                return load()
            except FileNotFoundError as e:
                self.log(f"{name}: done, but its saved result cannot be read ({e}); running it again")
        start = time.time()
        if primary_only:
            if multihost.is_primary():
                result, info = body()
                save(result)
                self.mark(name, {**info, **(stamp or {})})
                self.log(finished_line(name, time.time() - start, info))
            multihost.barrier(f"rlm_jax:{name}")
            return load()
        result, info = body()
        save(result)
        self.mark(name, {**info, **(stamp or {})})
        self.log(finished_line(name, time.time() - start, info))
        return result


def finished_line(name: str, seconds: float, info: dict, most: int = 8) -> str:
    """One line for a finished phase: its time and the numbers it recorded (at most `most`, 4 significant
    digits), e.g. `sft: done in 312s (loss 0.2113, accuracy 0.9412, grad_norm 0.8301)`."""
    figures = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    shown = ", ".join(figures[:most]) + (", ..." if len(figures) > most else "")
    return f"{name}: done in {seconds:.0f}s" + (f" ({shown})" if shown else "")


def run_phase(run: Run, phase: Phase, results: Results):
    if not phase.enabled(run.c):
        return phase.skipped(results)
    if phase.like is None:  # a phase that keeps its own files: its body writes them, `load` reads them
        return run.resumable(phase.name, lambda: phase.body(run, results), lambda result: None,
                             lambda: phase.load(run, results), phase.stamp(run), phase.primary_only)
    folder = phase.folder(run) if phase.folder else wd_lib.final(run.workdir, phase.name)
    # a phase that runs returns its result as computed; `load` is only called for one recorded done
    return run.resumable(phase.name, lambda: phase.body(run, results),
                         lambda result: ckpt_lib.save_result(folder, result),
                         lambda: ckpt_lib.load_result(folder, phase.like(run, results)), phase.stamp(run),
                         phase.primary_only)


def check_workdir(workdir) -> None:
    """The workdir exists (created) and every process can write to it."""
    wd = Path(workdir)
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write_test-{socket.gethostname()}-{os.getpid()}"  # unique: every process probes
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {wd} is not writable ({e.strerror}); pass a --workdir you can write to") from e


def run_phases(c: RunConfig, workdir, phases) -> tuple[Run, Results]:
    """Runs (or resumes) `phases` in order; returns the run and every phase's result."""
    check_workdir(workdir)
    changes = wd_lib.check_resumable(workdir, c)
    run = Run(c, workdir)
    fresh = not wd_lib.done_phases(run.workdir)  # nothing finished yet: any config may take over the workdir
    if multihost.is_primary() and (changes or fresh or not (run.workdir / wd_lib.CONFIG_FILE).exists()):
        wd_lib.write_config(run.workdir, c)  # what evaluate.py and solve.py read: the config now in force
    for field, old, new in changes:
        run.log(f"config {field} changed from {old!r} to {new!r}: rerunning what it affects")
    results: Results = {}
    for phase in phases:
        results[phase.name] = run_phase(run, phase, results)
    run.writer.close()
    return run, results
