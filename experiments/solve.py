r"""Solve one problem with a trained run's models and a chosen strategy; print the answer, its
verification and (MCTS) the search tree.

    python experiments/solve.py --workdir=runs/countdown --problem="Numbers: 3 7 12 Target: 26" \
        --strategy=mcts --budget=16 [--preset=puct]

Models: the latest finished RL iteration (rl/iter_N), else the value model and SFT policy (value/final,
sft/final), else the SFT policy alone. The model and search shapes come from the run's recorded config
(workdir/config.json; --config=FILE overrides it, for runs started before config.json existed). Strategies as in evaluation: greedy, sample, best_of_n (N samples ranked
by the value model), self_consistency (N samples, majority vote), beam (width W, 2 expansions per
beam; tot_bfs is the same search by Tree-of-Thoughts' name), dvts, tot_dfs, got, sr_mcts (S solutions written by self-refine MCTS), mcts (S simulations, --preset); the
budget of each is described in rlm_jax/evaluation.py. Inference mode: the verifier only grades the final answer.
"""
from pathlib import Path

from absl import app, flags, logging

from rlm_jax import cli

_CONFIG = cli.define_config(None, "The run's config file (default: workdir/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's output directory.")
_PROBLEM = flags.DEFINE_string("problem", None, "Problem text in the task's format, e.g. 'Numbers: 3 7 12 Target: 26'.")
_STRATEGY = flags.DEFINE_string("strategy", "mcts", "greedy | sample | best_of_n | self_consistency | beam | tot_bfs | dvts | "
                                 "tot_dfs | got | sr_mcts | mcts (budgets: rlm_jax/evaluation.py)")
_BUDGET = flags.DEFINE_integer("budget", 16, "samples (best_of_n, self_consistency), beam width, MCTS simulations, "
                                "solutions written (sr_mcts)")
_PRESET = flags.DEFINE_string("preset", None,
                              "MCTS preset: puct | x1 | uct | gumbel (default: the config's eval preset)")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed")
_TREE_DEPTH = flags.DEFINE_integer("tree_depth", 3, "MCTS: deepest tree level printed")
_TREE_WIDTH = flags.DEFINE_integer("tree_width", 4, "MCTS: children printed per node (most visited first)")
flags.mark_flags_as_required(["workdir", "problem"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from rlm_jax import evaluation

    strategy, budget = _STRATEGY.value, _BUDGET.value
    if strategy not in evaluation.STRATEGIES:
        raise app.UsageError(f"unknown --strategy={strategy!r}; valid: {', '.join(evaluation.STRATEGIES)}")
    if budget < 1:
        raise app.UsageError(f"--budget must be >= 1, got {budget}")
    workdir = Path(_WORKDIR.value)
    if not workdir.is_dir():
        raise app.UsageError(f"--workdir={workdir} does not exist; train a run first with experiments/train.py")
    if not (workdir / "tokenizer").is_dir():
        raise app.UsageError(f"{workdir}: unfinished run, no tokenizer/ yet; wait for experiments/train.py")
    c = cli.workdir_config(_CONFIG.value, workdir)
    preset = _PRESET.value or c.eval.mcts_preset
    if preset not in evaluation.PRESETS:
        raise app.UsageError(f"unknown --preset={preset!r}; valid: {', '.join(sorted(evaluation.PRESETS))}")

    import jax
    import numpy as np

    from rlm_jax import decoding, formatting
    from rlm_jax.search import lm, render
    from rlm_jax.tasks import get_task
    from rlm_jax.tasks.base import Score, as_record

    task = get_task(c.task.name)
    problem = as_record(task.name, 1, _PROBLEM.value.strip(), False, None)
    try:  # unparseable text fails here, not after the search
        task.check_problem(problem)
    except ValueError as e:
        raise app.UsageError(f"--problem is not a {task.name} problem: {e}") from None

    tok, cfg, policy, value, label = cli.load_run_models(c, workdir)
    spec = c.lm_spec(cfg, tok, task=task)
    if value is None:
        spec = spec.__class__(**{**spec.__dict__, "value": None, "head": None})  # ranks by log-prob

    ids = formatting.prompt_ids(tok, task, problem)
    try:
        t, m = decoding.pad_prompts([ids], tok.pad_id, length=c.search.prompt_len)
    except ValueError as e:
        raise app.UsageError(f"--problem is too long for the run's prompt length: {e}") from None
    inputs = lm.search_inputs(policy, value, t, m)
    key = jax.random.key(_SEED.value)
    print(f"models: {label} from {workdir}")
    print(f"problem: {problem['problem']}")
    if strategy in ("greedy", "sample"):
        print(f"strategy: {strategy} (one chain; --budget ignored)")
    else:
        print(f"strategy: {strategy} (budget {budget}{f', preset {preset}' if strategy == 'mcts' else ''})")

    out = None
    if strategy == "mcts":
        out = lm.lm_mcts_jit(spec, inputs, key, budget, evaluation.PRESETS[preset]())
        steps, mask = jax.jit(lm.solution_steps, static_argnums=0)(spec, out)
        from rlm_jax.search.sampling import decode_steps
        text = "\n".join(decode_steps(tok, np.asarray(steps[0]), np.asarray(mask[0])))
        ntok = int(evaluation.mcts_tokens(out)[0])
    else:
        texts, ntoks = evaluation.run_strategy(strategy, budget, spec, inputs, key, tok, preset)
        text, ntok = texts[0], int(ntoks[0])

    score = task.verify(problem, text)
    print("\nanswer:")
    print("\n".join(f"  {line}" for line in text.splitlines()) or "  (empty)")
    reason = ""
    if task.capabilities.replay and score != Score.SOLVED:
        reason = task.replay(problem, [s for s in text.splitlines() if s.strip()])[3]
    print(f"verification: {score.name}{f' ({reason})' if reason else ''}")
    try:  # the task's reference solver: is the problem solvable at all?
        ref = task.solve(problem)
        print("reference solution: " + (" | ".join(ref) if isinstance(ref, (list, tuple)) else str(ref)))
    except ValueError as e:
        print(f"reference solution: none ({e})")
    print(f"generated tokens: {ntok}")
    if out is not None:
        tree = out.tree
        print(f"\nsearch tree ({int(tree.num_nodes[0])} nodes, {'a' if bool(out.found_terminal[0]) else 'no'} "
              f"finished solution found; depth <= {_TREE_DEPTH.value}, {_TREE_WIDTH.value} children per node shown):")
        print(render.render_tree(tree, 0, render.lm_step_labels(tok, tree, 0), max_depth=_TREE_DEPTH.value,
                                 max_children=_TREE_WIDTH.value, highlight=np.asarray(out.best_path[0])))
        print("\nthe root's proposals (first steps sampled by the policy):")
        print("\n".join(f"  {line}" for line in render.lm_proposals(tok, tree, 0).splitlines()))
    return 0


if __name__ == "__main__":
    cli.run(main)
