"""Flags shared by the absl entry points in experiments/ (multi-host start-up)."""
from __future__ import annotations

import sys

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


def run_config(c, sizes: bool = False):
    """The typed config of an ml_collections config (`config.from_configdict`) with the device checks and, with
    `sizes` (a run about to start), the sizes against the task's data (`config.check_sizes`); a bad field is an
    absl UsageError: one line naming the field, the value and the fix."""
    import jax
    from absl import app

    from rlm_jax import config

    try:
        rc = config.from_configdict(c)
        config.check_devices(rc, jax.device_count())
        if sizes:
            config.check_sizes(rc)
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


def load_run_models(c, workdir, mesh=None):
    """A trained run's tokenizer and models for the CLIs: (tok, model config, policy, value or None, label naming
    the phase they come from). A missing or mismatched checkpoint is a UsageError naming the fix."""
    from absl import app

    from rlm_jax import workdir as wd_lib
    from rlm_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(workdir / "tokenizer")
    cfg = c.model_config(tok.vocab_size)
    try:
        policy, value, label = wd_lib.load_trained_models(c, workdir, cfg, mesh)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    except Exception as e:  # orbax reports a shape mismatch as a bare Exception from tensorstore
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise app.UsageError(f"cannot load the models of {workdir} with a {c.task.name!r} config (model "
                             f"d_model={c.model['d_model']}, layers={c.model['num_layers']}); pass the config the run "
                             f"was trained with, e.g. --config=configs/tiny.py ({first})") from None
    return tok, cfg, policy, value, label


def run(main) -> None:
    """`app.run(main)` for the entry points in experiments/: flag and config mistakes (`parse_flags`) and a
    UsageError raised by `main` print one line and exit 1, without absl's help text around it."""
    from absl import app

    def checked(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            sys.stderr.write(f"FATAL {e}\n")
            sys.exit(1)

    app.run(checked, flags_parser=parse_flags)


def parse_flags(argv):
    """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`), with the config flag's mistakes (a
    missing config file, an unknown --config.<field>) as one line like absl's own, not an ml_collections
    traceback."""
    try:
        args = flags.FLAGS(argv)
        if "config" in flags.FLAGS:  # config_flags defers a file's load error to the first read: read it now
            value = flags.FLAGS["config"].value
            if value is not None:
                hasattr(value, "to_dict")  # an unloaded config raises its OSError on any attribute
        return args
    except flags.Error as e:
        message = str(e)
    except (KeyError, AttributeError, OSError) as e:  # raised by config_flags while it loads and overrides
        message = _config_flag_error(argv, e)
    sys.stderr.write(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def define_config(default: str | None, help_text: str):
    """`config_flags.DEFINE_config_file("config", ...)`. With a default file, ml_collections applies the
    --config.<field> overrides at once (at import): a bad one is one line and exit 1 here, like `parse_flags`."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_text)
    except (KeyError, AttributeError, OSError) as e:
        sys.stderr.write(f"FATAL Flags parsing error: {_config_flag_error(sys.argv, e, default)}\n")
        sys.exit(1)


def _config_flag_error(argv, error: Exception, default: str | None = None) -> str:
    """The --config file or --config.<field> override that `error` came from, named with the fix."""
    from rlm_jax import config_utils

    args = [a for a in argv[1:] if a.startswith("--config")]
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), default)
    try:
        fields = config_utils.load_config(path).to_dict() if path else flags.FLAGS["config"].default.to_dict()
    except (FileNotFoundError, ValueError) as e:
        return f"flag --config={path}: {e}"
    except (KeyError, AttributeError):
        return str(error).splitlines()[0]
    for arg in args:
        if not arg.startswith("--config."):
            continue
        names, node = arg[len("--config."):].split("=", 1)[0].split("."), fields
        for depth, name in enumerate(names):
            if not isinstance(node, dict) or name not in node:
                section = ".".join(names[:depth]) or "the config"
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "none: it is a value, not a section"
                return f"flag {arg}: unknown config field {'.'.join(names[:depth + 1])}; valid fields of {section}: {valid}"
            node = node[name]
    return str(error).splitlines()[0]
