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
    """`multihost.initialize_distributed` with the flags above (environment and auto-detection fill the rest).
    Call first in `main`, before anything touches a device."""
    from rlm_jax.multihost import initialize_distributed
    return initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def run_config(c):
    """The typed config of an ml_collections config (`config.from_configdict`) with the device checks; a bad
    field is an absl UsageError: one line naming the field, the value and the fix."""
    import jax
    from absl import app

    from rlm_jax import config

    try:
        rc = config.from_configdict(c)
        config.check_devices(rc, jax.device_count())
    except (ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    return rc


def workdir_config(config_flag_value, workdir):
    """The config of a trained run: `--config` where given (runs started before config.json), else the one the
    run recorded in `workdir/config.json`; a UsageError naming the fix otherwise."""
    from absl import app

    from rlm_jax import workdir as wd_lib

    if config_flag_value is not None:
        return run_config(config_flag_value)
    try:
        return wd_lib.read_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
