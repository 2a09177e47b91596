"""Flags shared by the absl entry points in experiments/ (multi-host start-up)."""
from __future__ import annotations

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-process job (default: "
    "$JAX_COORDINATOR_ADDRESS, or auto-detected on Cloud TPU / SLURM / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES "
                                      "or auto-detected; 1 = a single-process run).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (default: "
                                   "$JAX_PROCESS_ID or auto-detected).")


def initialize_distributed_from_flags() -> bool:
    """`parallel.initialize_distributed` with the flags above (environment and auto-detection fill the rest).
    Call first in `main`, before anything touches a device."""
    from rlm_jax.parallel import initialize_distributed
    return initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
