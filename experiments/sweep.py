"""The main job once per seed, then summary.md: each headline figure per seed and mean +- SE across seeds.

    python experiments/sweep.py --config=configs/countdown.py --seeds=0,1,2 --workdir=runs/sweep
    python experiments/sweep.py --config=configs/tiny.py --seeds=0,1 --workdir=runs/s --config.sft.steps=50

Seed k runs in `<workdir>/seed<k>` exactly as `experiments/train.py --config=... --config.seed=k
--workdir=<workdir>/seed<k>` would (the same `pipeline.run`, in this one process, so later seeds reuse the
compiled programs); other `--config.*` overrides apply to every seed. Rerunning resumes: a seed whose run
finished with the same config is skipped, an unfinished one resumes where it stopped. summary.md
(`report.sweep_summary`) reads each seed's eval.json and progress.json: greedy accuracy after SFT, RL and
the control, RL - control and RL - SFT (paired, with each seed's SE), RL - search-free GRPO where the run has
that baseline (rl.search_free_baseline), the final value model's AUC on
finished held-out states, and each MCTS budget against best-of-N at equal or more tokens.
"""
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from rlm_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/countdown.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: one run per seed in <workdir>/seed<k>.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run each (config field `seed`).")
flags.mark_flag_as_required("workdir")


def finished(workdir: Path, c) -> bool:
    """The run in `workdir` evaluated with config `c` (no field changed since): nothing left to do."""
    from rlm_jax import progress
    from rlm_jax import workdir as wd_lib
    return ((workdir / "eval.json").exists() and progress.is_done(workdir, "eval")
            and not wd_lib.config_changes(wd_lib.read_config(workdir), c))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rlm_jax import multihost, report
    from rlm_jax import workdir as wd_lib
    from rlm_jax.training import phases, pipeline

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cli.initialize_distributed_from_flags()
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(f"--seeds must be integers, e.g. --seeds=0,1,2; got {','.join(_SEEDS.value)}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--seeds must list distinct seeds, got {','.join(_SEEDS.value)}")
    root = Path(_WORKDIR.value)
    runs = {}
    for seed in seeds:
        cfg = _CONFIG.value.copy_and_resolve_references()
        cfg.seed = seed
        c = cli.run_config(cfg, sizes=True)  # as train.py: sizes against the data, before any phase
        wd = root / f"seed{seed}"
        runs[seed] = wd
        if wd.exists() and finished(wd, c):
            print(f"seed {seed}: finished in {wd}, skipped", flush=True)
            continue
        try:
            phases.check_workdir(wd)
            wd_lib.check_resumable(wd, c)  # a rerun with a changed field stops here, naming it
        except (PermissionError, ValueError) as e:
            raise app.UsageError(str(e)) from None
        print(f"seed {seed}: running in {wd}", flush=True)
        pipeline.run(c, wd)
    if multihost.is_primary():
        (root / "summary.md").write_text(report.sweep_summary(runs))
        print((root / "summary.md").read_text())


if __name__ == "__main__":
    cli.run(main)
