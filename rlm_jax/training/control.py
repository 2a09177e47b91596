"""The control run: what RL's search data added beyond more training.

The SFT policy trained with RL's exact updates (per iteration: as many steps, the same optimizer, schedule
and batch size, `rl.policy_update`) on SFT reference traces only: the next-token loss on traces in place of the
replayed search samples, plus the same rehearsal rows. Runs when RL rehearses SFT traces (rl.sft_mix > 0; otherwise the control is
plain SFT) and rl.control is set.
"""
from __future__ import annotations

from rlm_jax import workdir as wd_lib
from rlm_jax.training import rl, search_rl, sft, trainer
from rlm_jax.training.phases import Phase

LABEL = "SFT + RL's update steps on SFT traces only (control)"  # its row in the report


def _control(run, results):
    c, tok, cfg = run.c.rl, results["tokenizer"], run.model_config(results)
    traces = sft.trace_arrays(run, tok, results["data"]["train"])
    n_sft = c.rehearsal_rows
    policy = results["sft"]
    for it in range(c.iterations):
        n_steps = int(wd_lib.phase_info(run.workdir, f"rl_{it}").get("policy_updates", 0))
        if not n_steps:
            continue
        seed = run.c.seed + 1000 + it
        batches = search_rl.rehearsal_batches(trainer.example_batches(traces, c.policy_update.batch_size - n_sft, seed),
                                              traces, n_sft, seed)
        policy, _ = trainer.train(f"rl_control_{it}", c.policy_update, trainer.Objective(rl.rehearsal_loss, (cfg, None)),
                                  cfg, policy, batches, run.workdir / "rl" / f"ckpt_control_{it}", run.writer,
                                  run.mesh, updates=n_steps)
    return policy, {}


PHASE = Phase("rl_control", _control, like=lambda run, results: run.like(run.model_config(results)),
              enabled=lambda c: c.rl.control and c.rl.rehearsal_rows > 0 and c.rl.iterations > 0,
              stamp=lambda run: {"iterations": run.c.rl.iterations},
              folder=lambda run: run.workdir / "rl" / "control")
