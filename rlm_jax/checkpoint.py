"""Checkpoints of plain pytrees with orbax, and a progress file for phase-structured runs.

`Checkpointer` is a thin wrapper over `orbax.checkpoint.CheckpointManager`. One checkpoint (one step) holds
  - `state`: any pytree of arrays (params, optax state, PRNG keys, step counters), saved with
    `StandardSave` (tensorstore / OCDBT, sharded arrays written shard by shard);
  - `meta`: a JSON-able dict (phase name, step, data cursor, config hash, ...), saved with `JsonSave`;
  - `prng_keys`: bookkeeping written by this module: which `state` leaves were typed PRNG keys.

Typical use:

    ckpt = Checkpointer(Path(workdir) / "sft" / "checkpoints", max_to_keep=3, save_interval_steps=500)
    if ckpt.latest_step() is not None:                                 # resume
        abstract = {"params": jax.eval_shape(init, key), "opt": ..., "key": jax.eval_shape(jax.random.key, 0)}
        abstract = with_shardings(abstract, {"params": param_shardings(cfg, mesh), ...})
        state, meta = ckpt.restore(abstract_state=abstract)           # arrays land in their shardings
    for step in ...:
        ...
        ckpt.save(step, {"params": params, "opt": opt_state, "key": key}, {"phase": "sft", "step": step})
    ckpt.close()                                                       # waits for the last async save

Guarantees, and where they come from:
  - Atomic commits. Orbax writes step N into `N.orbax-checkpoint-tmp` and renames it to `N` only once every
    array and the metadata are on disk; `latest_step()` / `all_steps()` list only committed step
    directories, so a save interrupted by preemption is never picked up, and the stale tmp directory is
    removed when the next `Checkpointer` opens the directory (`cleanup_tmp_directories=True`).
  - Corrupt steps are skipped, not fatal. `restore()` moves a step whose files are missing, truncated or
    undecodable aside to `<step>.corrupt-<n>` (renamed, never deleted), warns, and restores the previous one;
    with none left it returns None. A target that does not match an intact step still raises.
  - Nothing saved is lost. Old steps beyond `max_to_keep` are deleted only after the new step is committed
    (orbax's finalize: wait for the write, then delete), and existing steps are never overwritten.
  - Async saves. `save` returns once the arrays are copied off the device; the write continues in a
    background thread. `wait()` blocks until it is committed: call it before recording a phase as done.
  - PRNG keys. Typed keys (`jax.random.key`) are stored as `jax.random.key_data` (uint32) and wrapped back
    with their implementation's name on restore, with or without `abstract_state`. Legacy uint32 keys
    (`jax.random.PRNGKey`) are ordinary arrays.

Restoring structure: orbax stores arrays, not Python types. Without `abstract_state`, containers come back
as dicts and lists (an optax `ScaleByAdamState` as a dict, tuples as lists) and arrays in the shardings
they were saved with. Pass `abstract_state` (same structure as what was saved; leaves
`jax.ShapeDtypeStruct`, ideally with `.sharding`, or concrete arrays) to get the exact containers back and
each array directly in its target sharding, never materialised whole on one device.

Multi-host: every process must call `Checkpointer(...)`, `save`, `restore`, `wait` and `close` (they are
collective; orbax synchronises processes with barriers). For a sharded `jax.Array`, each process writes only
the shards it owns (its addressable shards, de-duplicated across replicas) into a shared OCDBT store, and the
primary process (index 0) writes the metadata and performs the commit rename; on restore each process reads
only the shards its devices need for the target sharding. The directory must therefore be on storage every
process sees (GCS, NFS, Lustre); per-host local disks do not work. The progress file is written by the
primary process only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_cm

from rlm_jax import multihost

log = logging.getLogger(__name__)

_STATE, _META, _KEYS = "state", "meta", "prng_keys"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's marker of an uncommitted save (atomicity_types.TMP_DIR_SUFFIX)
# Files orbax needs but does not reliably report missing (without state/_METADATA it guesses the structure and
# blames abstract_state). _CHECKPOINT_METADATA (timestamps) is not needed to restore, so not listed.
_REQUIRED_FILES = (f"{_STATE}/_METADATA", f"{_META}/metadata", f"{_KEYS}/metadata")
# Tensorstore's status for a missing, truncated or undecodable file (not INVALID_ARGUMENT, a caller mistake,
# nor UNAVAILABLE / DEADLINE_EXCEEDED / PERMISSION_DENIED: storage trouble that moving steps aside won't fix).
_TS_CORRUPT = re.compile(r"(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION): .*"
                         r"(Error reading|Error decoding|does not exist)", re.S)


def _corruption(error: BaseException) -> BaseException | None:
    """The exception in `error`'s chain showing a step's files are missing, truncated or undecodable (a
    FileNotFoundError, JSONDecodeError, tensorstore read error), or None (e.g. a wrong abstract_state)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, json.JSONDecodeError)) or _TS_CORRUPT.match(str(error)):
            return error
        error = error.__cause__ or error.__context__
    return None


# ------------------------------------------------------------------------------------------- pytrees

def _path_str(path) -> str:
    """A container-independent name for a leaf path: "opt/0/mu/w".

    A namedtuple field (GetAttrKey) and the dict key it turns into when restored without a target give the
    same name, so PRNG-key bookkeeping matches with and without `abstract_state`.
    """
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _keys_to_data(state):
    """(state with every typed PRNG key replaced by its uint32 key data, {path: key impl name})."""
    impls: dict[str, str] = {}

    def leaf(path, x):
        if not _is_key(x):
            return x
        impls[_path_str(path)] = str(jax.random.key_impl(x))
        return jax.random.key_data(x)

    return jax.tree_util.tree_map_with_path(leaf, state), impls


def _data_to_keys(state, impls: Mapping[str, str]):
    """Inverse of `_keys_to_data`: wrap the leaves named in `impls` back into typed keys."""
    found = set()

    def leaf(path, x):
        name = _path_str(path)
        if name not in impls:
            return x
        found.add(name)
        return jax.random.wrap_key_data(x, impl=impls[name])

    state = jax.tree_util.tree_map_with_path(leaf, state)
    if missing := set(impls) - found:
        raise ValueError(f"the checkpoint stored PRNG keys at {sorted(missing)}, which the restored state lacks; "
                         "abstract_state must have the same structure as the state that was saved")
    return state


def _key_data_abstract(x) -> jax.ShapeDtypeStruct:
    """The ShapeDtypeStruct of `jax.random.key_data(x)` for a key (array or ShapeDtypeStruct) `x`.

    The key's sharding carries over, a NamedSharding extended with None for the trailing key-data dims.
    """
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        trailing = (None,) * (data.ndim - x.ndim)
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, *trailing))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def abstract_of(tree):
    """The abstract version of a concrete pytree: each array becomes a ShapeDtypeStruct keeping its sharding.

    Handy to restore "into the same layout as this freshly initialised state" without keeping its buffers.
    """
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


def with_shardings(abstract, shardings):
    """Set `.sharding` on every ShapeDtypeStruct of `abstract` from the matching leaf of `shardings`.

    `shardings` is a prefix tree of `abstract`: a single sharding (e.g. `parallel.replicated(mesh)`) applies
    to a whole subtree, so `with_shardings({"params": p, "key": k}, {"params": param_shardings(cfg, mesh),
    "key": replicated(mesh)})` works.
    """
    def put(sharding, sub):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), sub)

    return jax.tree.map(put, shardings, abstract,
                        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


# ---------------------------------------------------------------------------------------- directories

def _check_writable(directory: str) -> None:
    """Create `directory` if needed and prove it is writable, or raise an OSError naming it and the fix.

    Without this, an unwritable directory surfaces only at the first (async) save, possibly hours in.
    Remote paths (gs://, s3://) are left to orbax.
    """
    if "://" in directory:
        return
    probe = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise type(e)(e.errno, f"checkpoint directory {directory} is not writable ({e.strerror}); pass a "
                               "directory you can create and write to (e.g. under your --workdir), or fix its "
                               "permissions") from e


def unfinished_saves(directory: str | os.PathLike) -> list[str]:
    """Names of the uncommitted (interrupted or in-flight) orbax save directories in `directory`."""
    try:
        return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n)
    except FileNotFoundError:
        return []


def check_json(obj, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable ({e}); convert arrays with .tolist() or float(), "
                        "and paths with str()") from e


# ---------------------------------------------------------------------------------------- Checkpointer

class Checkpointer:
    """Save / restore a `state` pytree plus a JSON `meta` dict per step, in `directory/<step>/`.

    Args:
      directory: where step directories go; created if missing (must be writable, else OSError).
        Must be on storage shared by all processes in a multi-host run.
      max_to_keep: how many most recent steps to keep (>= 1), or None to keep all. Older steps are
        deleted only after a newer one is committed.
      save_interval_steps: `save` writes only at multiples of this (plus the first save of a run and
        preemption sync points, as orbax's default policy does); `save(..., force=True)` always writes.
      async_save: write in a background thread (default). `wait()` / `close()` block until committed.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True):
        self.directory = os.fspath(directory)
        if "://" not in self.directory:
            self.directory = os.path.abspath(self.directory)
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}: must be >= 1 (keeping 0 would delete the last good "
                             "checkpoint), or None to keep every checkpoint")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps}: must be >= 1 (1 = every step)")
        _check_writable(self.directory)
        if unfinished := unfinished_saves(self.directory):
            log.warning("%s: removing %d unfinished save(s) %s, interrupted before their commit; the latest "
                        "committed step is restored instead", self.directory, len(unfinished), unfinished)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp_cm.LatestN(n=max_to_keep),  # `max_to_keep=` is deprecated in orbax
            cleanup_tmp_directories=True,  # drop saves a preemption interrupted in an earlier run
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __repr__(self):
        return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (an in-flight or interrupted save is not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled preemption and all processes reached `step` (multi-host JAX's
        preemption sync point; always False without `jax.distributed`). Save (force=True), wait, and exit."""
        return self._manager.reached_preemption(step)

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Start saving `state` (pytree of arrays) and `meta` (JSON-able dict) as step `step`.

        Returns True if a save was started, False if skipped by `save_interval_steps` or because `step` is not
        newer than the latest committed step (a resumed run re-reaching a saved step). The write completes in
        the background: call `wait()` before relying on it (e.g. before `mark_done`). Arrays may be donated or
        overwritten right after this returns: orbax has already copied them to host memory.
        Raises ValueError if `force=True` and step `step` already exists (checkpoints are never overwritten).
        """
        meta = dict(meta or {})
        check_json(meta, f"meta of step {step}")
        data, impls = _keys_to_data(state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(data), _META: ocp.args.JsonSave(meta),
                                     _KEYS: ocp.args.JsonSave(impls)})
        try:
            return self._manager.save(int(step), args=args, force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise ValueError(f"step {step} already has a checkpoint in {self.directory}; checkpoints are never "
                             "overwritten: save under a new step number, or delete "
                             f"{os.path.join(self.directory, str(step))} yourself first") from e

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict] | None:
        """Load step `step` (default: the latest intact one) and return `(state, meta)`, or None when every
        step was corrupt (then `latest_step()` is None too: start from scratch). A corrupt step (`_corruption`)
        is moved aside to `<directory>/<step>.corrupt-<n>` with a one-line warning, and the next older one tried.

        Args:
          abstract_state: optional target with the saved structure; leaves are `jax.ShapeDtypeStruct` (with
            `.sharding` to restore each array straight into that sharding, e.g. on a mesh; see
            `with_shardings`) or concrete arrays (restored like them). Typed-key leaves may be given as key
            ShapeDtypeStructs (`jax.eval_shape(jax.random.key, 0)`). Without it, containers come back as
            dicts / lists and arrays in their saved shardings.
        Raises:
          FileNotFoundError: no committed checkpoint (names the directory and any interrupted saves), no
            step `step` (lists the available ones), or an explicit `step` was corrupt (moved aside).
          ValueError: `abstract_state` does not match an intact checkpoint (nothing is moved aside).
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                unfinished = unfinished_saves(self.directory)
                extra = (f" (ignored {len(unfinished)} unfinished save(s): {unfinished}, interrupted before "
                         "their commit)" if unfinished else "")
                raise FileNotFoundError(
                    f"no checkpoint to restore in {self.directory}{extra}; check the path (--workdir / phase "
                    "name), or start from scratch when latest_step() is None")
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")

        target = None
        if abstract_state is not None:
            target = jax.tree.map(lambda x: _key_data_abstract(x) if _is_key(x) else x, abstract_state)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore(),
                                     _KEYS: ocp.args.JsonRestore()})
        for s in ([step] if step is not None else steps[::-1]):
            step_dir = epath.Path(self.directory) / str(s)
            error = restored = None
            why = next((f"missing {f}" for f in _REQUIRED_FILES if not (step_dir / f).exists()), None)
            if why is None:
                try:
                    restored = self._manager.restore(s, args=args)
                except Exception as e:  # noqa: BLE001 -- re-raised below unless it is corruption
                    error, bad = e, _corruption(e)
                    why = bad and " ".join(f"{type(bad).__name__}: {bad}".strip().split("\n")[0].split())[:300]
            # 0 intact, 1 corrupt, 2 another error: the worst across processes, so all take the same branch.
            verdict = 2 if error is not None and why is None else int(why is not None)
            if jax.process_count() > 1:
                verdict = int(np.max(multihost_utils.process_allgather(np.int32(verdict))))
            if verdict == 2:
                if isinstance(error, ValueError):
                    raise ValueError(
                        f"cannot restore step {s} from {self.directory} into abstract_state: {error}\nabstract_state "
                        "must have the same tree structure, shapes and dtypes as the saved state; build it with "
                        "jax.eval_shape on the same init functions and config that produced the checkpoint") from error
                raise error or RuntimeError(f"restoring step {s} from {self.directory} failed on another process")
            if verdict == 0:
                state = _data_to_keys(restored[_STATE], restored[_KEYS] or {})
                log.info("restored step %d from %s", s, self.directory)
                return state, dict(restored[_META] or {})
            aside, rest = self._move_aside(step_dir), [t for t in self.all_steps() if t < s]
            then = (f"available steps: {self.all_steps()}" if step is not None else f"trying step {rest[-1]}"
                    if rest else f"no intact checkpoint left in {self.directory}: the phase restarts")
            msg = (f"corrupt checkpoint {step_dir} ({why or 'unreadable on another process'}); moved aside to "
                   f"{aside}; {then}")
            if step is not None:
                raise FileNotFoundError(msg)
            log.warning(msg)
        return None

    def _move_aside(self, step_dir) -> epath.Path:
        """Rename `step_dir` to the first free `<step>.corrupt-<n>` (primary process) and forget the step."""
        n = 1
        while (aside := step_dir.parent / f"{step_dir.name}.corrupt-{n}").exists():
            n += 1
        multihost.barrier(f"rlm_jax:checkpoint-aside-named:{step_dir}")  # every process has chosen the name
        if jax.process_index() == 0:
            step_dir.rename(aside)
        multihost.barrier(f"rlm_jax:checkpoint-aside:{step_dir}")
        self._manager.reload()
        return aside

    # ------------------------------------------------------------------ lifetime

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed and old steps are cleaned up."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the in-flight save, then release orbax's threads. Call once at the end of a run."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------ phase results

def save_result(directory, tree: Any) -> None:
    """Saves a phase's result (e.g. final params) as step 0 of its own checkpoint directory.

    A committed result is kept: a job killed after saving it but before marking its phase done reruns
    the phase from its last training checkpoint, which reproduces the same result."""
    ckpt = Checkpointer(directory, max_to_keep=1)
    try:
        if ckpt.latest_step() is None:
            ckpt.save(0, tree, {"step": 0}, force=True)
    finally:
        ckpt.wait()
        ckpt.close()


def load_result(directory, like: Any) -> Any:
    """Loads what `save_result` saved, with the structure, shapes, dtypes (and shardings, where its
    ShapeDtypeStructs carry them) of `like`."""
    ckpt = Checkpointer(directory)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no saved result in {directory}; rerun the phase that writes it")
        restored = ckpt.restore(abstract_state=abstract_of(like))
        if restored is None:
            raise FileNotFoundError(f"the saved result in {directory} is corrupt (moved aside); rerun the phase that "
                                    "writes it")
        return restored[0]
    finally:
        ckpt.close()
