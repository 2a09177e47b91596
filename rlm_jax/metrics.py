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
`read_metrics(workdir)` reads them back (e.g. into a pandas DataFrame). A resumed run appends; a prefix's rows at
or past a step it writes again (the steps between the last checkpoint and the preemption) are dropped first, so
each (prefix, step) has one row, the latest.
TensorBoard tags are `prefix/name` (`sft/loss`), under `workdir/tensorboard`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm import tqdm  # the text bar (not tqdm.auto's widgets): `Progress` writes plain lines off a terminal

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
        self._last: dict[str, int] = {}  # prefix -> the last step written
        if not self.is_primary:
            return
        try:
            for r in read_metrics(self.workdir):
                prefix = r.get("prefix", "")
                self._last[prefix] = max(self._last.get(prefix, r["step"]), r["step"])
        except ValueError as e:  # a damaged file: keep appending, without dropping repeated steps
            log.warning("%s; repeated steps after a resume will not be deduplicated", e)
            self._last = {}
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
        if prefix in self._last and step <= self._last[prefix]:  # a resumed run repeats steps: keep the new row
            self._drop_from(prefix, int(step))
        self._last[prefix] = int(step)
        now = time.time()
        record = {"step": int(step), "time": now, "prefix": prefix, **values}
        self._file.write(json.dumps(record) + "\n")  # NaN / Infinity are written as such; json.loads reads them
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, float(v), global_step=int(step), walltime=now)
        return values

    def _drop_from(self, prefix: str, step: int) -> None:
        """Rewrites metrics.jsonl without `prefix`'s rows at or past `step` (atomically: a crash keeps the old file)."""
        path = self.workdir / METRICS_FILE
        self._file.close()
        keep = [r for r in read_metrics(self.workdir) if r.get("prefix", "") != prefix or r["step"] < step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

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


class _Lines:
    """The stream tqdm writes to when it is not a terminal: `Progress.display` writes whole lines itself, so the
    carriage returns and clearing writes tqdm adds around them are dropped (a log gets no `\\r`-joined lines)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        if s.strip("\r\n "):
            self.stream.write(s)

    def flush(self):
        self.stream.flush()


class Progress(tqdm):
    """tqdm with `set_metrics` (the latest metrics as the postfix), two changes for long jitted loops, and a
    log-file mode:

    - the first update (the step that compiles) is timed apart: the description shows `[first step 12.3s]`
      and the rate and ETA count only the steps after it, so the first ETA is not hours of compilation;
    - a finished bar is shown once (tqdm's close re-displays the last state);
    - on a stream that is not a terminal (a log file), one plain line every `every` steps and at the end
      instead of `\\r`-updated bars (`every`: about a tenth of the total by default).
    """

    def __init__(self, *args, every: int | None = None, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self._lines = not getattr(stream, "isatty", lambda: False)()
        if self._lines:
            total = kwargs.get("total") or (len(args[0]) if args and hasattr(args[0], "__len__") else 0)
            self._every = max(1, every or -(-total // 10) or 100)
            self._stream = stream
            kwargs.update(file=_Lines(stream), mininterval=0, miniters=1, dynamic_ncols=False,
                          bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        kwargs.setdefault("smoothing", 0)  # average rate since the first step (with `format_dict` below)
        self._warm = None  # (n, time) once the first step is done
        self._shown = None  # the n last displayed
        self._closing = False
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        if self._warm is None and not self.disable:
            first = self._time() - self.start_t
            self._warm = (self.n + n, self._time())
            self.set_description_str(f"{self.desc} [first step {first:.1f}s]", refresh=False)
        return super().update(n)

    @property
    def format_dict(self):
        d = super().format_dict
        if self._warm is not None and "n" in d:
            steps, since = d["n"] - self._warm[0], self._time() - self._warm[1]
            d["rate"] = steps / since if steps > 0 and since > 0 else 0  # 0: ETA '?' until a warm step is timed
        return d

    def display(self, msg=None, pos=None, **kwargs):
        if self._lines:
            due = self.n == self.total or self.n % self._every == 0 or msg is not None
            if msg == "" or self.n == self._shown or not due:
                return True
            self._shown = self.n
            self._stream.write((msg or self.format_meter(**self.format_dict)) + "\n")
            self._stream.flush()
            return True
        if self._closing and self._shown == self.n:  # the finished state is on screen already
            return True
        self._shown = self.n
        return super().display(msg, pos, **kwargs)

    def close(self):
        self._closing = True
        super().close()

    def set_metrics(self, metrics: Mapping[str, Any], refresh: bool = False) -> None:
        """Show `metrics` (name -> scalar) after the bar, e.g. `loss=0.523, acc=0.81`."""
        if not self.disable:
            self.set_postfix({k: _fmt(to_scalar(k, v)) for k, v in metrics.items()}, refresh=refresh)


def progress(iterable_or_total: Iterable | int, desc: str = "", *, initial: int = 0,
             is_primary: bool | None = None, every: int | None = None, **tqdm_kwargs) -> Progress:
    """A tqdm bar over an iterable, or over `total` steps when given an int (advance with `.update()`).

    It shows the step count, rate and ETA; `bar.set_metrics({"loss": ..., "accuracy": ...})` puts the latest
    metrics in the postfix (formatted compactly, jax / numpy scalars accepted). `initial` is the resumed step,
    so the ETA counts only the remaining work; the first step (compilation) is timed apart. In a log file
    (stderr not a terminal) it writes one line every `every` steps instead (see `Progress`). Disabled (a no-op
    that still iterates) on non-primary processes and when RLM_NO_PROGRESS=1. Extra keyword arguments go to tqdm.
    """
    disable = not progress_enabled(is_primary)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    if isinstance(iterable_or_total, (int, np.integer)):
        return Progress(total=int(iterable_or_total), desc=desc, initial=initial, disable=disable, every=every,
                        **tqdm_kwargs)
    return Progress(iterable_or_total, desc=desc, initial=initial, disable=disable, every=every, **tqdm_kwargs)
