"""Scalar metrics to `workdir/metrics.jsonl` and TensorBoard, and a tqdm progress bar.

    writer = MetricsWriter(workdir)                        # only process 0 writes
    bar = progress(num_steps, desc="sft", initial=start_step)
    for step in range(start_step, num_steps):
        ...
        logged = writer.write(step, {"loss": loss, "accuracy": acc}, prefix="sft")
        bar.set_metrics(logged)
        bar.update()
    bar.close(); writer.close()

One JSON line per `write`: `{"step": 10, "time": 1712345678.9, "prefix": "sft", "loss": 0.52, ...}`.
`read_metrics(workdir)` reads them back (e.g. into a pandas DataFrame). A resumed run appends, so steps
between the last checkpoint and the preemption appear twice; keep the last occurrence.
TensorBoard tags are `prefix/name` (`sft/loss`), under `workdir/tensorboard`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time", "prefix")


def _primary() -> bool:
    import jax
    return jax.process_index() == 0


def to_scalar(name: str, value) -> bool | int | float:
    """A Python bool / int / float from a Python, numpy or jax scalar (or any size-1 array).

    Raises a ValueError naming the metric for non-scalars: log a mean, a norm or a histogram instead.
    """
    if isinstance(value, (bool, int, float)):
        return value
    arr = np.asarray(value)  # a jax array: blocks until computed, then copies one number to host
    if arr.size != 1:
        raise ValueError(f"metric {name!r} has shape {arr.shape}, not a scalar; log a reduction of it "
                         "(e.g. its mean) instead")
    arr = arr.reshape(())
    if arr.dtype == np.bool_:
        return bool(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    try:
        return float(arr)  # float16/32/64 and ml_dtypes (bfloat16) alike
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {name!r} has dtype {arr.dtype}, not a real number") from e


class MetricsWriter:
    """Appends scalar metrics to `workdir/metrics.jsonl` and (optionally) TensorBoard.

    Args:
      workdir: run directory (created if needed).
      tensorboard: also write TensorBoard event files (via tensorboardX) under `workdir/tensorboard`;
        skipped with a warning if tensorboardX is not installed.
      is_primary: whether this process writes; default `jax.process_index() == 0`, so every process can
        call `write` unconditionally in a multi-host run.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, is_primary: bool | None = None):
        self.workdir = Path(workdir)
        self.is_primary = _primary() if is_primary is None else bool(is_primary)
        self._file = None
        self._tb = None
        if not self.is_primary:
            return
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: each record reaches the OS as one line; a crash loses at most the last one.
            self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)
        except OSError as e:
            raise type(e)(e.errno, f"cannot write metrics to {self.workdir / METRICS_FILE} ({e.strerror}); "
                                   "pass a writable --workdir") from e
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logging is off (metrics.jsonl is still "
                            "written); pip install tensorboardX to enable it")
            else:
                self._tb = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float]:
        """Log scalar `metrics` at `step` under `prefix` (e.g. the phase name); returns them as Python numbers.

        Every process must pass the same values, but only the primary one writes; the conversion (which
        waits for jax values) happens everywhere so the return value is the same on every process.
        """
        values = {str(k): to_scalar(str(k), v) for k, v in metrics.items()}
        if clash := [k for k in values if k in _RESERVED]:
            raise ValueError(f"metric names {clash} are reserved for the record's own fields {_RESERVED}; rename them")
        if not self.is_primary or self._file is None:
            return values
        now = time.time()
        record = {"step": int(step), "time": now, "prefix": prefix, **values}
        self._file.write(json.dumps(record) + "\n")  # NaN / Infinity are written as such; json.loads reads them
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, float(v), global_step=int(step), walltime=now)
        return values

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir: str | os.PathLike, prefix: str | None = None) -> list[dict]:
    """The records of `workdir/metrics.jsonl` in file order ([] if none), optionally only one `prefix`.

    A torn last line (the process died mid-write) is skipped with a warning; a bad line elsewhere is an error.
    """
    path = Path(workdir) / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: skipping a torn last line (%s)", path, e)
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON ({e}); remove or fix that line") from e
    if prefix is not None:
        records = [r for r in records if r.get("prefix") == prefix]
    return records


# -------------------------------------------------------------------------------------------- progress

def progress_enabled(is_primary: bool | None = None) -> bool:
    """Progress bars show on the primary process unless the environment sets RLM_NO_PROGRESS=1."""
    if os.environ.get("RLM_NO_PROGRESS", "0") not in ("", "0"):
        return False
    return _primary() if is_primary is None else bool(is_primary)


def _fmt(v) -> str:
    if isinstance(v, float) and math.isfinite(v) and v != 0 and not 1e-3 <= abs(v) < 1e5:
        return f"{v:.3e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress(tqdm):
    """tqdm with `set_metrics`: the latest metrics as the postfix."""

    def set_metrics(self, metrics: Mapping[str, Any], refresh: bool = False) -> None:
        """Show `metrics` (name -> scalar) after the bar, e.g. `loss=0.523, acc=0.81`."""
        if not self.disable:
            self.set_postfix({k: _fmt(to_scalar(k, v)) for k, v in metrics.items()}, refresh=refresh)


def progress(iterable_or_total: Iterable | int, desc: str = "", *, initial: int = 0,
             is_primary: bool | None = None, **tqdm_kwargs) -> Progress:
    """A tqdm bar over an iterable, or over `total` steps when given an int (advance with `.update()`).

    It shows the step count, rate and ETA; `bar.set_metrics({"loss": ..., "accuracy": ...})` puts the latest
    metrics in the postfix (formatted compactly, jax / numpy scalars accepted). `initial` is the resumed step,
    so the ETA counts only the remaining work. Disabled (a no-op that still iterates) on non-primary
    processes and when RLM_NO_PROGRESS=1. Extra keyword arguments go to tqdm.
    """
    disable = not progress_enabled(is_primary)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    if isinstance(iterable_or_total, (int, np.integer)):
        return Progress(total=int(iterable_or_total), desc=desc, initial=initial, disable=disable, **tqdm_kwargs)
    return Progress(iterable_or_total, desc=desc, initial=initial, disable=disable, **tqdm_kwargs)
