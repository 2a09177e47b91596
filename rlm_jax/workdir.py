"""A run's workdir: where each phase keeps its result, the recorded config, and loading the trained models.

    config.json                  the run's resolved config (written at the first start)
    progress.json                finished phases (`progress.mark_done`)
    data/{train,eval,rl}.json    problems (x1's format)
    tokenizer/                   the tokenizer
    pretrain/, sft/, value/      `<phase>/final` (result) and `<phase>/ckpt` (training checkpoints)
    rl/iter_N, rl/replay_N       RL iteration N's models and replay buffers; rl/control: the control policy
    value_refit/after_rl_N/      the value model refit on the policy after N RL iterations
    metrics.jsonl, report.md, scaling.png, eval.json

Evaluation and solving read a workdir through this module only (they import nothing from training/).
"""
from __future__ import annotations

import json
from pathlib import Path

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import progress
from rlm_jax import parallel
from rlm_jax.config import RunConfig, from_configdict, to_dict
from rlm_jax.models.config import ModelConfig
from rlm_jax.models.heads import HeadConfig


CONFIG_FILE = "config.json"


def final(workdir, phase: str) -> Path:
    return Path(workdir) / phase / "final"


def rl_iteration(workdir, it: int) -> Path:
    return Path(workdir) / "rl" / f"iter_{it}"


def refit_folder(workdir, rl_iterations: int) -> Path:
    """A refit belongs to the policy it was fit on: more RL iterations (a rerun with a larger rl.iterations)
    get a new one."""
    return Path(workdir) / "value_refit" / f"after_rl_{rl_iterations}"


def abstract_like(cfg: ModelConfig, mesh, head: HeadConfig | None = None):
    """Abstract params (a policy's, or a value model's with `head`) in their shardings on `mesh`: what a
    phase's saved params restore into."""
    return ckpt_lib.with_shardings(parallel.abstract_model_params(cfg, head),
                                   parallel.model_param_shardings(cfg, mesh, head_cfg=head))


def write_config(workdir, c: RunConfig) -> None:
    path = Path(workdir) / CONFIG_FILE
    path.write_text(json.dumps(to_dict(c), indent=1, sort_keys=True) + "\n")


def read_config(workdir) -> RunConfig:
    """The config a run was started with. Raises FileNotFoundError naming the fix when the workdir has none."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a run's workdir, or the run predates "
                                "config.json; pass --config=<the config file the run was trained with>")
    try:
        return from_configdict(json.loads(path.read_text()))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def done_phases(workdir) -> set[str]:
    return {k for k, v in progress.read_progress(workdir).items() if v.get("done")}


def phase_info(workdir, phase: str) -> dict:
    return progress.read_progress(workdir).get(phase, {}).get("info", {})


def refit_done(workdir, rl_iterations: int) -> bool:
    return "value_refit" in done_phases(workdir) and \
        phase_info(workdir, "value_refit").get("rl_iterations") == rl_iterations


def load_trained_models(c: RunConfig, workdir, cfg: ModelConfig, mesh=None):
    """(policy, value or None, label) of a run's most advanced finished phase (the last RL iteration, else
    SFT and the value model; the value model refit on that policy where value_refit ran), in their
    shardings on `mesh` (default: the config's mesh).
    Raises FileNotFoundError, saying what to run, if no policy has been trained yet."""
    workdir = Path(workdir)
    mesh = c.mesh.make() if mesh is None else mesh
    done = done_phases(workdir)
    policy_like, value_like = abstract_like(cfg, mesh), abstract_like(cfg, mesh, c.value_head)
    iters = sorted(int(k[3:]) for k in done if k.startswith("rl_") and k[3:].isdigit())
    rl_iterations = iters[-1] + 1 if iters else 0
    refit = (ckpt_lib.load_result(refit_folder(workdir, rl_iterations) / "final", value_like), " + value refit") \
        if refit_done(workdir, rl_iterations) else None
    if iters:
        s = ckpt_lib.load_result(rl_iteration(workdir, iters[-1]), {"policy": policy_like, "value": value_like})
        value, note = refit or (s["value"], "")
        return s["policy"], value, f"RL iteration {iters[-1]}{note}"
    if "sft" not in done:
        raise FileNotFoundError(f"{workdir}: no trained policy yet (phases done: {', '.join(sorted(done)) or 'none'}); "
                                "run experiments/train.py until SFT finishes")
    policy = ckpt_lib.load_result(final(workdir, "sft"), policy_like)
    if refit:
        return policy, refit[0], "SFT policy + value model" + refit[1]
    if "value" in done:
        return policy, ckpt_lib.load_result(final(workdir, "value"), value_like), "SFT policy + value model"
    return policy, None, "SFT policy (no value model yet)"
