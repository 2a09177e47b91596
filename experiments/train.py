"""The main job: train a reasoning model end to end and write the test-time-compute report.

    python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
    python experiments/train.py --config=configs/countdown.py --workdir=runs/cd --config.sft.steps=2000

Phases (rlm_jax/training/pipeline.py): data -> tokenizer -> pretraining (random task steps) -> SFT -> value
model -> RL from search -> control -> value refit -> evaluation (report.md, scaling.png, eval.json). Rerunning
the same command resumes where it stopped. Multi-host: run the same command on every host
(experiments/launch_tpu_pod.sh); --coordinator_address/--num_processes/--process_id, or the JAX_* environment
variables, or Cloud TPU's auto-detection join them into one job.
"""
from absl import app, flags, logging

from rlm_jax import cli

_CONFIG = cli.define_config("configs/countdown.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if it exists).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rlm_jax import workdir
    from rlm_jax.training import phases, pipeline

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cli.initialize_distributed_from_flags()
    c = cli.run_config(_CONFIG.value, sizes=True)
    try:
        phases.check_workdir(_WORKDIR.value)
        workdir.check_resumable(_WORKDIR.value, c)  # a rerun with a changed field stops here, naming it
    except (PermissionError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    pipeline.run(c, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
