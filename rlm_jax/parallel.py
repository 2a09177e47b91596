"""Device meshes, logical-axis sharding rules, and placement: sharded init, batches, search inputs, host copies.

The mesh has three axes (MaxText / Levanter style):
  - `data`:   pure data parallelism (params replicated over it);
  - `fsdp`:   data parallelism whose params (and optimizer state) are sharded along `embed`, all-gathered
              by XLA for compute (ZeRO-3 style);
  - `tensor`: tensor (model) parallelism over heads / mlp / vocab.
The batch is split over `data` x `fsdp`.

Every weight carries logical axis names (`rlm_jax.models.transformer.logical_axes`); `DEFAULT_RULES`, a
plain table (data, not code), maps them to mesh axes, and `logical_to_spec` turns one array's names into a
`PartitionSpec`. The mesh uses `AxisType.Auto`: we place params and batch, and XLA (Shardy) propagates the
rest and inserts the collectives, so the model code carries no sharding annotations; the one exception is
`pin_batch`, which keeps arrays a search creates from nothing split over the batch. The sharded result
equals the single-device one within float tolerance (tests/test_parallel.py).

Typical use:

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)                  # -1: all remaining devices
    params = init_sharded_params(cfg, key, mesh)                  # never materialised unsharded
    fwd = jit_forward(cfg, mesh)                                  # a sharded forward pass
    logits, hidden = fwd(params, *shard_batch((tokens, mask), mesh).values())
Train steps with these shardings: `rlm_jax.training.trainer`. Data-parallel search: below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlm_jax.models import heads, transformer
from rlm_jax.models.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# A rules table: ordered (logical axis name, mesh axis | tuple of mesh axes | None) pairs.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # weights
    ("layers", None),  # the scan axis: each step needs its whole layer, so never shard it
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("lora", None),  # LoRA's rank axis: small, replicated
)


def with_rules(rules: Rules, **overrides: str | tuple[str, ...] | None) -> Rules:
    """A copy of `rules` with some entries replaced or added, e.g. `with_rules(DEFAULT_RULES, embed=None)`
    replicates weights over `fsdp` (as tunix does for sampling)."""
    table = dict(rules)
    table.update(overrides)
    return tuple(table.items())


# ----------------------------------------------------------------------------------------------- mesh

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1, meaning "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for `num_devices` devices, or a ValueError saying why not."""
        sizes = (self.data, self.fsdp, self.tensor)
        shown = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {shown}: every axis size must be >= 1, or -1 for 'all remaining devices'")
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {shown}: at most one axis may be -1 (all remaining devices); "
                             "give the others explicit sizes")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {shown}: the fixed axes use {known} devices, which does not divide the {num_devices} "
                    f"available devices; choose fixed sizes whose product divides {num_devices}")
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        elif known != num_devices:
            raise ValueError(
                f"mesh {shown} needs {known} devices but {num_devices} are available; choose sizes whose "
                f"product is {num_devices}, or set one axis to -1 to take all remaining devices")
        return sizes

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return make_mesh(self.data, self.fsdp, self.tensor, devices=devices)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices, every process).

    Axis types are Auto: `jax.make_mesh` defaults to Explicit now, and this code relies on sharding
    propagation. `jax.make_mesh` orders devices to follow the physical topology (TPU ICI), so `tensor`,
    the last and most communication-heavy axis, gets the nearest neighbours.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = MeshConfig(data, fsdp, tensor).resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ------------------------------------------------------------------------------------- logical -> mesh

def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int | None] | None = None) -> P:
    """The PartitionSpec of one array from its logical axis names.

    Args:
      axes: one logical name (or None: replicated) per dimension, e.g. ("layers", "embed", "kv_heads", "head_dim").
      rules: the table mapping logical names to mesh axes (`DEFAULT_RULES`).
      shape: the array's shape, to check divisibility; a None entry (or no shape) skips the check.
    Returns:
      A PartitionSpec with one entry per dimension.

    A mesh axis is dropped from a dimension (that dimension is replicated over it instead) when
      - it does not divide the dimension, e.g. kv_heads=2 on tensor=4: replicating the small k/v
        projections costs little, whereas uneven sharding pads and is not supported everywhere;
      - it already shards an earlier dimension of the same array (a mesh axis can split only one
        dimension), e.g. the hidden activations [batch, length, embed] when batch takes fsdp.
    The first dimension (in order) to claim a mesh axis keeps it; for a logical name mapped to several
    mesh axes, each one is kept or dropped on its own, in order.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} have {len(axes)} names but the shape {tuple(shape)} "
                         f"has {len(shape)} dimensions; give one name per dimension")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table "
                           f"(known: {sorted(table)}), mapped to None to replicate it")
        mesh_axes = table[name]
        mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        dim = None if shape is None else shape[i]
        kept, size = [], 1
        for ax in mesh_axes:
            if ax not in mesh.shape:
                raise ValueError(f"rule {name!r} -> {ax!r}: the mesh has no axis {ax!r} (its axes are "
                                 f"{tuple(mesh.axis_names)}); fix the rules table or the mesh")
            if ax in used or (dim is not None and dim % (size * mesh.shape[ax])):
                continue
            kept.append(ax)
            size *= mesh.shape[ax]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_specs(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """PartitionSpecs of the params: a dict shaped like `init_params(cfg, key)`."""
    return jax.tree.map(lambda axes, a: logical_to_spec(axes, rules, mesh, a.shape),
                        transformer.logical_axes(cfg), transformer.abstract_params(cfg), is_leaf=_is_axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings of the params: a dict shaped like `init_params(cfg, key)`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def abstract_model_params(cfg: ModelConfig, head_cfg: heads.HeadConfig | None = None):
    """ShapeDtypeStructs of a policy's params (`head_cfg` None) or of a value model's {"trunk", "head"}."""
    if head_cfg is None:
        return transformer.abstract_params(cfg)
    return jax.eval_shape(lambda: heads.init_value_params(cfg, head_cfg, jax.random.key(0)))


def model_param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                          head_cfg: heads.HeadConfig | None = None):
    """`param_shardings` of a policy, or of a value model: its trunk sharded like a policy, its small
    scalar head replicated."""
    trunk = param_shardings(cfg, mesh, rules)
    if head_cfg is None:
        return trunk
    head = abstract_model_params(cfg, head_cfg)["head"]
    return {"trunk": trunk, "head": jax.tree.map(lambda _: replicated(mesh), head)}


def shard_params(params, shardings):
    """Places existing params (host or device arrays, e.g. loaded weights) onto their shardings."""
    return jax.device_put(params, shardings)


def init_sharded_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """`transformer.init_params(cfg, key)`, created directly in its shards: each device only ever holds
    its own slice, so models larger than one device's memory can be initialised. Same values as the
    unsharded init (threefry is partitionable)."""
    init = jax.jit(functools.partial(transformer.init_params, cfg),
                   out_shardings=param_shardings(cfg, mesh, rules))
    return init(key)


def data_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of [batch, ...] arrays: batch split over the rule's mesh axes (data x fsdp), other
    dimensions replicated. The batch size must be a multiple of that product."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, mesh))


def pin_batch(x: jax.Array, axis: int = 0, rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Inside a jitted function traced under `jax.set_mesh(mesh)`: x with its dimension `axis` (the batch)
    split over the batch mesh axes (data x fsdp), its other dimensions left to XLA. No mesh set: x as is.

    Why: arrays a search creates inside its program (a fresh KV cache, rows repeated or gathered from the
    prompt's KV) depend on no sharded input, and propagation would replicate them, and every decode step
    that reads them, on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[axis] = logical_to_spec(("batch",), rules, mesh, shape=(x.shape[axis],))[0]
    return jax.lax.with_sharding_constraint(x, P(*spec))


def search_mesh(mesh: Mesh | None):
    """The context a search over `mesh`-sharded inputs runs in (`jax.set_mesh`, read by `pin_batch`); no mesh:
    a context that does nothing."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def pin_cache_batch(cache):
    """`pin_batch` on a KVCache or PrefixKV (k, v: [layers, batch, ...]; mask, next_pos: [batch, ...])."""
    return cache.replace(**{f: pin_batch(getattr(cache, f), axis=1 if f in ("k", "v") else 0)
                            for f in ("k", "v", "mask", "next_pos") if hasattr(cache, f)})


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Places a pytree of [batch, ...] host arrays with `data_sharding`.

    Single process: `batch` is the global batch. Multi-process: each process passes its own slice of
    the global batch (rows in process order), assembled with `jax.make_array_from_process_local_data`.
    """
    sharding = data_sharding(mesh, rules)
    spec = sharding.spec[0] if len(sharding.spec) else None
    ways = batch_ways(mesh, rules)
    multiprocess = jax.process_count() > 1

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        rows = x.shape[0] * (jax.process_count() if multiprocess else 1) if x.ndim else None
        if rows is None or rows % ways:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {x.shape}: its leading (batch) dimension "
                f"{rows} must be a multiple of {ways} (the mesh axes {spec} it is split over); use a global "
                f"batch size that is a multiple of {ways}")
        if multiprocess:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


def put_global(x, sharding: NamedSharding):
    """Places `x` with `sharding`, on one process or several. A host value (numpy, or a jax.Array local to
    this process) must be the same on every process: each process fills only its own devices from it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a (collective) reshard
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = put_global(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
        return jax.random.wrap_key_data(data, impl=impl)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx], dtype=host.dtype)


def shard_global_batch(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Like `shard_batch`, but every process passes the same *global* batch (e.g. drawn from a shared
    seed, as the training loops do) and keeps only its own rows. Same divisibility rule."""
    sharding = data_sharding(mesh, rules)
    ways = batch_ways(mesh, rules)

    def put(path, x):
        if not np.ndim(x) or np.shape(x)[0] % ways:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {np.shape(x)}: its leading (batch) dimension "
                f"must be a multiple of {ways} (the ways the mesh {dict(mesh.shape)} splits the batch); use a "
                f"batch size that is a multiple of {ways}")
        return put_global(x, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


def batch_ways(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch is split (data x fsdp with the default rules): batch sizes must be a multiple."""
    spec = data_sharding(mesh, rules).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


# ------------------------------------------------------------------------------------- jitted functions

def jit_forward(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Callable:
    """A jitted, sharded `fwd(params, tokens, mask) -> (logits, hidden)` (no KV cache).

    params: placed with `param_shardings` (`init_sharded_params` / `shard_params`); tokens [B, T] int and
    mask [B, T] bool placed with `data_sharding` (`shard_batch`); B a multiple of data x fsdp.
    Returns logits [B, T, vocab] float32 (batch-sharded, vocab over tensor) and hidden [B, T, embed].
    """
    d_sh = data_sharding(mesh, rules)
    logits_sh = NamedSharding(mesh, logical_to_spec(("batch", "length", "vocab"), rules, mesh,
                                                    (None, None, cfg.vocab_size)))
    hidden_sh = NamedSharding(mesh, logical_to_spec(("batch", "length", "embed"), rules, mesh,
                                                    (None, None, cfg.d_model)))

    def fwd(params, tokens, mask):
        logits, hidden, _ = transformer.forward(cfg, params, tokens, mask=mask)
        return logits, hidden

    return jax.jit(fwd, in_shardings=(param_shardings(cfg, mesh, rules), d_sh, d_sh),
                   out_shardings=(logits_sh, hidden_sh))


# ------------------------------------------------------------------------------- data-parallel search
# The strategies are jitted programs over a [B, ...] batch, and jit follows the shardings of its inputs: place
# the inputs with `shard_search_inputs` (prompt rows over data x fsdp, params replicated or FSDP-sharded, the
# key replicated) and call the strategy as usual. The same key gives the same trees and answers as on one
# device (threefry depends on the key and the global shape only; tests/test_data_parallel_search.py). A
# verifier (a pure_callback) runs on the mesh's first device with the whole global batch and global problem
# indices, so on several hosts process 0's verifier must know every problem.

BATCH_KEYS = ("prompt", "prompt_mask", "problem_index")  # the [B, ...] leaves of a search's `inputs`
PARAM_KEYS = ("policy", "value")



def process_batch_slice(global_batch: int, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> slice:
    """The rows of a global batch of `global_batch` problems that this process feeds to
    `shard_search_inputs` / `shard_batch` (all of them on one process).

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
    index_map = data_sharding(mesh, rules).addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"process {jax.process_index()} holds batch rows {starts} of {global_batch}: not one "
                         "contiguous block; build the mesh with each host's devices adjacent along the batch "
                         "axes (make_mesh does)")
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
    return jax.tree.map(lambda x: put_global(x, rep), tree)


def place_params(params, shardings):
    """Params onto `shardings`: one sharding for every leaf, or a prefix tree of them, e.g.
    `{"trunk": param_shardings(cfg, mesh), "head": replicated}` for value params."""
    is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)
    return jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: put_global(x, sh), sub),
                        shardings, params, is_leaf=is_sharding)


def shard_search_inputs(inputs: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                        policy_shardings=None, value_shardings=None, global_batch: bool = False) -> dict:
    """A search `inputs` dict (`lm.search_inputs`) placed for a data-parallel search on `mesh`.

    prompt [B, P], prompt_mask [B, P], problem_index [B]: split over the batch axes (`shard_batch`):
      on one process B is the global batch; on several, each passes its own rows of the global batch
      (`process_batch_slice`), with *global* problem indices (a verifier on process 0 sees them all).
    policy / value params: replicated (default: no all-gathers inside the search), or placed with
      `policy_shardings` / `value_shardings` (e.g. `param_shardings(cfg, mesh)` for models too
      large to replicate); each a sharding or a prefix tree of them (value params are
      {"trunk": <policy-like>, "head": ...}: `{"trunk": param_shardings(cfg, mesh), "head": replicated}`).
    The global batch must be a multiple of `batch_ways(mesh)`; see `pad_batch`. With `global_batch`, every
    process passes the whole global batch instead (the same on every process) and keeps its own rows.
    """
    missing = [k for k in BATCH_KEYS + PARAM_KEYS if k not in inputs]
    if missing:
        raise KeyError(f"search inputs lack {missing}; build them with rlm_jax.search.lm.search_inputs")
    out = dict(inputs)
    put = shard_global_batch if global_batch else shard_batch
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
