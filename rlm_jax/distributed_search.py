"""Data-parallel search: a batch of problems split over the mesh's data axes, on one or many hosts.

The strategies (`lm.lm_mcts_jit`, `beam.beam_search_jit`, `sampling.best_of_n_jit`, `sampling.greedy_jit`)
are unchanged: they are jitted programs over a [B, ...] batch, and jit follows the shardings of its
inputs. Place the inputs with `shard_search_inputs` (prompt rows split over `data` x `fsdp`, params
replicated or FSDP-sharded, the PRNG key replicated) and call the strategy as usual:

    mesh = parallel.make_mesh(data=1, fsdp=-1)                     # every device, every host
    rows = process_batch_slice(B, mesh)                            # this host's rows of the global batch
    inputs = lm.search_inputs(policy, value, prompt[rows], mask[rows], problem_index=np.arange(B)[rows])
    inputs = shard_search_inputs(inputs, mesh)
    out = lm.lm_mcts_jit(spec, inputs, replicate(key, mesh), num_simulations, mcts.muzero())
    out = to_host(out)                                             # numpy, the global batch, on every host

Equality with the single-device run: the sharded program computes each problem's rows with the same
ops, and jax's threefry random numbers depend on the key and the global shape only, not on how the
array is split, so the same key gives the same samples, trees and answers (tests/test_data_parallel_search.py
checks every leaf of every strategy's output). That holds with `jax_threefry_partitionable` True (the
default since jax 0.5: each device generates only its own rows) and False (XLA generates the whole
array's bits and all-gathers them); the two modes draw *different* streams, so compare runs made
with the same setting, and keep the default on every process of a multi-host job.

What XLA makes of it (8 CPU devices, MCTS): model forwards, decoding and the tree arrays [B, N, ...]
stay batch-sharded; the collectives left are small: all-gathers of each iteration's new-node arrays
([B, M] parent / slot choices, [B, M, K, L] proposal tokens) around the tree scatters, and one scalar
all-reduce per while-loop test (`jnp.any` over the batch).

Training mode (`LMSpec.verifier`, a `jax.pure_callback`) works sharded but is not data-parallel: a
callback without a sharding runs on the first device of the mesh (`{maximal device=0}`), so XLA
gathers the verifier's operands from every device to it, calls the Python verifier once with the
whole global batch, and scatters the scores back (its "Involuntary full rematerialization" warnings
say so). On several hosts that device belongs to process 0: only process 0's verifier is called, and
it receives global problem indices, so it must know every problem of the global batch (the pipeline's
verifiers do: every process loads the same problem list). Inference mode has no callback.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlm_jax import parallel

BATCH_KEYS = ("prompt", "prompt_mask", "problem_index")  # the [B, ...] leaves of a search's `inputs`
PARAM_KEYS = ("policy", "value")


batch_ways = parallel.batch_ways


def process_batch_slice(global_batch: int, mesh: Mesh, rules: parallel.Rules = parallel.DEFAULT_RULES) -> slice:
    """The rows of a global batch of `global_batch` problems that this process feeds to
    `shard_search_inputs` / `parallel.shard_batch` (all of them on one process).

    Read from the data sharding (which devices of this process hold which rows), not assumed; raises if
    this process's rows are not one contiguous block, which `jax.make_array_from_process_local_data`
    needs for "local rows in order".
    """
    ways = batch_ways(mesh, rules)
    if global_batch % ways:
        raise ValueError(f"global batch {global_batch} is not a multiple of {ways}, the number of ways the mesh "
                         f"{dict(mesh.shape)} splits the batch; pad it (pad_batch) to a multiple of {ways}")
    if jax.process_count() == 1:
        return slice(0, global_batch)
    index_map = parallel.data_sharding(mesh, rules).addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds batch rows {starts} of {global_batch}: not one "
                         "contiguous block; build the mesh with each host's devices adjacent along the batch "
                         "axes (parallel.make_mesh does)")
    return slice(lo, hi)


def pad_batch(inputs: Mapping[str, Any], multiple: int) -> tuple[dict, int]:
    """Pads the batch leaves of a search `inputs` dict to a multiple of `multiple` rows by repeating the
    last row; returns (padded inputs, real row count). Drop the padding rows of the outputs after."""
    inputs = dict(inputs)
    b = int(np.shape(inputs["prompt"])[0])
    pad = -b % multiple
    if pad:
        for k in BATCH_KEYS:
            if k in inputs:
                x = np.asarray(inputs[k])
                inputs[k] = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return inputs, b


def replicate(tree, mesh: Mesh):
    """Every leaf (arrays, typed PRNG keys) replicated over the mesh; on several processes each must
    pass the same value. Use it for the key of a sharded search."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: parallel.put_global(x, rep), tree)


def place_params(params, shardings):
    """Params onto `shardings`: one sharding for every leaf, or a prefix tree of them, e.g.
    `{"trunk": parallel.param_shardings(cfg, mesh), "head": replicated}` for value params."""
    is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)
    return jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: parallel.put_global(x, sh), sub),
                        shardings, params, is_leaf=is_sharding)


def shard_search_inputs(inputs: Mapping[str, Any], mesh: Mesh, rules: parallel.Rules = parallel.DEFAULT_RULES,
                        policy_shardings=None, value_shardings=None, global_batch: bool = False) -> dict:
    """A search `inputs` dict (`lm.search_inputs`) placed for a data-parallel search on `mesh`.

    prompt [B, P], prompt_mask [B, P], problem_index [B]: split over the batch axes (`parallel.shard_batch`):
      on one process B is the global batch; on several, each passes its own rows of the global batch
      (`process_batch_slice`), with *global* problem indices (a verifier on process 0 sees them all).
    policy / value params: replicated (default: no all-gathers inside the search), or placed with
      `policy_shardings` / `value_shardings` (e.g. `parallel.param_shardings(cfg, mesh)` for models too
      large to replicate); each a sharding or a prefix tree of them (value params are
      {"trunk": <policy-like>, "head": ...}: `{"trunk": param_shardings(cfg, mesh), "head": replicated}`).
    The global batch must be a multiple of `batch_ways(mesh)`; see `pad_batch`. With `global_batch`, every
    process passes the whole global batch instead (the same on every process) and keeps its own rows.
    """
    missing = [k for k in BATCH_KEYS + PARAM_KEYS if k not in inputs]
    if missing:
        raise KeyError(f"search inputs lack {missing}; build them with rlm_jax.search.lm.search_inputs")
    out = dict(inputs)
    put = parallel.shard_global_batch if global_batch else parallel.shard_batch
    out.update(put({k: np.asarray(inputs[k]) for k in BATCH_KEYS}, mesh, rules))
    rep = NamedSharding(mesh, P())
    for k, sh in (("policy", policy_shardings), ("value", value_shardings)):
        if inputs[k] is not None:
            out[k] = place_params(inputs[k], rep if sh is None else sh)
    return out


def to_host(tree):
    """Numpy copies of a (sharded) output's leaves, the whole global batch, on every process (an
    all-gather across processes when there are several: call it on every process)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
