"""A run's workdir: where each phase keeps its result, the recorded config, and loading the trained models.

    config.json                  the run's resolved config (written at the first start)
    progress.json                finished phases (`progress.mark_done`)
    data/{train,eval,rl}.json    problems (x1's format)
    tokenizer/                   the tokenizer
    pretrain/, sft/, value/      `<phase>/final` (result) and `<phase>/ckpt` (training checkpoints)
    rl/iter_N, rl/replay_N       RL iteration N's models and replay buffers; rl/control: the control policy
    rl_search_free/              the search-free baseline's iterations (iter_N, replay_N) and its policy (final)
    value_refit/after_rl_N/      the value model refit on the policy after N RL iterations
    metrics.jsonl, report.md, scaling.png, eval.json

Evaluation and solving read a workdir through this module only (they import nothing from training/).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import progress
from rlm_jax import parallel
from rlm_jax.config import RunConfig, from_configdict, to_dict
from rlm_jax.models import lora
from rlm_jax.models.config import ModelConfig
from rlm_jax.models.heads import HeadConfig


CONFIG_FILE = "config.json"


def final(workdir, phase: str) -> Path:
    return Path(workdir) / phase / "final"


def iteration(workdir, phase: str, it: int) -> Path:
    """Iteration `it`'s models of an iterated phase (RL's, the search-free baseline's)."""
    return Path(workdir) / phase / f"iter_{it}"


def rl_iteration(workdir, it: int) -> Path:
    return iteration(workdir, "rl", it)


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


# Fields a rerun may change: they decide no finished phase's result (evaluation reruns when they change,
# more RL iterations extend the run, the mesh only places arrays, the KV cache only saves recomputation,
# logging and save intervals are bookkeeping).
SAFE_TO_CHANGE = ("eval.", "rl.iterations", "rl.search_free_baseline", "mesh.", "search.kv_cache")
_BOOKKEEPING = (".save_every", ".log_every")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every field that differs."""
    a, b = _flat(json.loads(json.dumps(to_dict(old)))), _flat(json.loads(json.dumps(to_dict(new))))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(workdir, c: RunConfig) -> list[tuple[str, Any, Any]]:
    """A rerun on `workdir` with config `c`: refused (ValueError naming each field and both values) when a field
    that decides a finished phase's result changed; returns the changes that are safe (they rerun only what
    they affect). A workdir with no finished phase takes any config."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists() or not done_phases(workdir):
        return []
    changes = config_changes(read_config(workdir), c)
    unsafe = [ch for ch in changes if not ch[0].startswith(SAFE_TO_CHANGE) and not ch[0].endswith(_BOOKKEEPING)]
    if unsafe:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in unsafe)
        raise ValueError(f"{workdir} was trained with another config ({listed}). These fields decide phases that "
                         f"are done; pass a new --workdir, or drop the override(s). Safe to change on a rerun: "
                         f"{', '.join(SAFE_TO_CHANGE)}* and *{', *'.join(_BOOKKEEPING)}")
    return changes


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
    shardings on `mesh` (default: the config's mesh); under LoRA the value model's frozen base is the policy's
    own arrays (`lora.share_base`).
    Raises FileNotFoundError, saying what to run, if no policy has been trained yet."""
    policy, value, label = _load_trained_models(c, workdir, cfg, mesh)
    return policy, value if value is None else lora.share_base(value, policy), label


def _load_trained_models(c: RunConfig, workdir, cfg: ModelConfig, mesh=None):
    workdir = Path(workdir)
    mesh = c.mesh.make() if mesh is None else mesh
    done = done_phases(workdir)
    vcfg = c.value_model_config(cfg.vocab_size) if c.value.init else cfg
    policy_like, value_like = abstract_like(cfg, mesh), abstract_like(vcfg, mesh, c.value_head)
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
