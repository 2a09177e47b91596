"""Multi-process jobs: joining one (`initialize_distributed`), barriers, and decisions all processes share.

Every process runs the same program on the same config; only process 0 writes shared files (data, progress,
metrics, the report), and the others wait for it at a barrier.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def is_primary() -> bool:
    """Process 0: the one that writes shared files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agreed(flag: bool) -> bool:
    """Process 0's `flag` on every process (a collective: every process calls it in the same order), so all
    take the same branch around a barrier."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> bool:
    """Joins a multi-process JAX job; call once per process, before anything touches a device.

    Each argument falls back to an environment variable: JAX_COORDINATOR_ADDRESS ("host:port" of process
    0), JAX_NUM_PROCESSES, JAX_PROCESS_ID. Anything still unset is auto-detected by
    `jax.distributed.initialize` (Cloud TPU pod slices, SLURM, Open MPI), so on Cloud TPU a bare call
    works on every host. With no cluster detected and nothing given, or with num_processes=1, this is a
    single-process run and nothing is done.

    Returns True when the process is part of an initialised distributed job.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes == 1:
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    except ValueError as e:
        # jax's message when no argument was given and no cluster was detected: a single-process run.
        if "coordinator_address should be defined" not in str(e) or explicit:
            raise ValueError(
                f"initialize_distributed: {e} (got coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes}, process_id={process_id}); pass all three, or set "
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, on every process") from e
        log.info("initialize_distributed: no cluster detected; running as a single process")
        return False
    log.info("initialize_distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
