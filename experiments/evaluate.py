"""Re-run the evaluation of a finished (or partly finished) run, on its held-out split or on any file.

    python experiments/evaluate.py --workdir=runs/countdown
    python experiments/evaluate.py --workdir=runs/countdown \
        --data=problems.json.bz2 --strategies=greedy:1,mcts:16 --out=runs/countdown/eval_file

--data reads a problem file in x1's format ({"version": 1, "data": [...]}, plain or .bz2; see
experiments/make_dataset.py) and reports accuracy per level. Models: the latest RL iteration if RL ran,
else the value model and SFT policy. The run's config is the one it recorded (workdir/config.json);
--config=FILE overrides it (runs started before config.json existed).
"""
import json
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from rlm_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (default: workdir/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's output directory.")
_DATA = flags.DEFINE_string("data", None, "Problem file in x1's format (default: the run's eval split).")
_STRATEGIES = flags.DEFINE_list("strategies", None, "strategy:budget entries (default: the config's).")
_OUT = flags.DEFINE_string("out", None, "Where to write report.md/scaling.png/eval.json (default: workdir/eval_rerun).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cli.initialize_distributed_from_flags()
    import jax

    from rlm_jax import evaluation, report
    from rlm_jax import workdir as wd_lib
    from rlm_jax.tasks import get_task, io as task_io
    from rlm_jax.tokenizer import load_tokenizer

    workdir = Path(_WORKDIR.value)
    if not (workdir / "tokenizer").exists():
        raise app.UsageError(f"{workdir} holds no trained run (no tokenizer/); run experiments/train.py first")
    c = cli.workdir_config(_CONFIG.value, workdir)
    try:
        strategies = evaluation.parse_strategies(_STRATEGIES.value or c.eval.strategies)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    task = get_task(c.task.name)
    problems = task_io.load_records(_DATA.value or workdir / "data" / "eval.json")
    if not _DATA.value:  # the run's own held-out split: the problems its report's strategy table used
        problems = problems[:c.strategy_problem_count(len(problems))]
    wrong = sorted({p["type"] for p in problems if p["type"].lower() != task.name.lower()})
    if wrong:
        raise app.UsageError(f"--data holds {wrong} problems but the run was trained on {task.name}")
    tok = load_tokenizer(workdir / "tokenizer")
    cfg = c.model_config(tok.vocab_size)
    mesh = c.mesh.make()
    try:
        policy, value, label = wd_lib.load_trained_models(c, workdir, cfg, mesh)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    spec = c.lm_spec(cfg, tok)
    if value is None:
        spec = spec.__class__(**{**spec.__dict__, "value": None, "head": None})
    print(f"evaluating {label} models on {len(problems)} problems", flush=True)
    results = evaluation.evaluate(spec, policy, value, tok, task, problems, strategies, jax.random.key(c.seed),
                                  c.eval.batch_size, c.search.prompt_len, c.eval.mcts_preset,
                                  progress=lambda r: print(f"{r.strategy}:{r.budget} accuracy {r.accuracy:.3f}",
                                                           flush=True), mesh=mesh,
                                  num_parallel=c.search.num_parallel)
    if jax.process_index() != 0:  # every host evaluated its rows; one writes the report
        return
    out = Path(_OUT.value or workdir / "eval_rerun")
    out.mkdir(parents=True, exist_ok=True)
    report.scaling_plot(results, out / "scaling.png")
    versus = report.equal_token_comparisons(results)
    text = "\n".join([f"# evaluation of {label} on {_DATA.value or 'the eval split'}", ""]
                     + report.strategies_section(results, versus))
    (out / "report.md").write_text(text)
    (out / "eval.json").write_text(json.dumps({"models": label, "data": _DATA.value or "eval split",
                                               "mcts_vs_best_of_n": report.comparisons_json(versus),
                                               "results": [r.__dict__ for r in results]}, indent=1))
    print(text)


if __name__ == "__main__":
    app.run(main)
