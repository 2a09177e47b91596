"""The main job: the phases of one run, in order, from one config.

    report = pipeline.run(config.from_configdict(get_config()), workdir)

Each phase is declared in the module of its concept (`Phase(name, body, ...)`) and driven by
`phases.run_phases`, which records it in `workdir/progress.json`, saves its result under `workdir`
(`rlm_jax/workdir.py` has the layout) and skips or resumes it on a rerun. Every phase runs on the mesh of
`c.mesh`; multi-host jobs run the same phases on every process (docs/pod.md).
"""
from __future__ import annotations

from pathlib import Path

from rlm_jax.config import RunConfig
from rlm_jax.training import control, data, final_eval, phases, pretrain, search_free, search_rl, sft, value

PHASES = (
    data.DATA,              # problems, split by hash: SFT's, RL's own, held out
    data.TOKENIZER,         # sentencepiece on the reference traces
    pretrain.PHASE,         # phase 0: random legal task steps (pretrain.steps > 0)
    sft.PHASE,              # phase 1: the policy on reference traces
    value.PHASE,            # phase 1: the value model on rollout targets
    search_rl.PHASE,        # phase 2: RL from search (rl.iterations > 0)
    control.PHASE,          # RL's update steps on SFT traces only (rl.control)
    search_free.PHASE,      # RL's iterations with sampled GRPO at RL's tokens (rl.search_free_baseline)
    value.REFIT_PHASE,      # the value model refit on exact step labels (value_refit.steps > 0)
    final_eval.PHASE,       # greedy per phase, every strategy, report.md / eval.json / scaling.png
)


def run(c: RunConfig, workdir) -> Path:
    """Runs (or resumes) every phase; returns the path of report.md."""
    phases.run_phases(c, workdir, PHASES)
    return Path(workdir) / "report.md"
