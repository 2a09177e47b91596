"""Re-run the evaluation of a finished (or partly finished) run, on its held-out split or on any file; or
evaluate a pretrained Hugging Face model on a math benchmark with no training run.

    python experiments/evaluate.py --workdir=runs/countdown
    python experiments/evaluate.py --workdir=runs/countdown \
        --data=problems.json.bz2 --strategies=greedy:1,mcts:16 --out=runs/countdown/eval_file
    python experiments/evaluate.py --model=hf:DIR --data=problems.jsonl \
        --strategies=greedy:1,best_of_n:8,self_consistency:4,beam:4,mcts:16 --out=DIR2

With --workdir: --data reads a problem file in x1's format ({"version": 1, "data": [...]}, plain or .bz2; see
experiments/make_dataset.py) and reports accuracy per level. Models: the latest RL iteration if RL ran,
else the value model and SFT policy. The run's config is the one it recorded (workdir/config.json);
--config=FILE overrides it (runs started before config.json existed).

With --model=hf:DIR (a local folder: config.json, *.safetensors, the tokenizer; Llama, Qwen2, Qwen3): --data
is a GSM8K-format ({"question", "answer": "... #### 42"}) or MATH-format ({"problem", "solution": "...
\\boxed{..}", "level"}) JSONL file, or any layout named by --question_field / --answer_field /
--level_field. Prompts go through the tokenizer's chat template (--system_prompt, --fewshot examples;
--chat_template=none for base models). greedy / sample / best_of_n / self_consistency write whole solutions
(up to max_depth * step_len tokens, stopping at the end-of-turn token); beam and mcts search over steps
that end at a token whose text ends with "\\n\\n": the single "\\n\\n" token or one where the BPE merged it with
the characters before it (".\\n\\n"; `HFTokenizer.step_end_ids`). There is no value model: best_of_n and beam rank by log-probability,
MCTS values unfinished leaves 0 and is guided by the step priors. Answers: `\\boxed{}`, `#### x`, "the answer
is x", else the last number, compared with math-verify (rlm_jax/tasks/math_answers.py). The search shape,
strategies and temperature come from configs/math.py (or --config=FILE, with --config.x=y overrides).
Writes report.md, eval.json (per strategy: accuracy, tokens per problem, per-level accuracy) and
outputs.jsonl (every strategy's answer text per problem).
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
_OUT = flags.DEFINE_string("out", None, "Where to write report.md/scaling.png/eval.json (default: workdir/eval_rerun; "
                           "with --model: required).")
_MODEL = flags.DEFINE_string("model", None, "hf:DIR: evaluate this pretrained Hugging Face folder (no training run) "
                             "instead of a --workdir.")
_QUESTION_FIELD = flags.DEFINE_string("question_field", None, "--model: the JSONL field of the question (default: "
                                      "'question' (GSM8K) or 'problem' (MATH), detected from the first row).")
_ANSWER_FIELD = flags.DEFINE_string("answer_field", None, "--model: the JSONL field of the answer (default: 'answer' "
                                    "with 'question', 'solution' with 'problem').")
_LEVEL_FIELD = flags.DEFINE_string("level_field", "level", "--model: the JSONL field of the level (optional in rows).")
_ANSWER_FORMAT = flags.DEFINE_enum("answer_format", "solution", ["solution", "final"], "--model: the answer field is a "
                                   "worked solution (its final answer is extracted) or only the final answer.")
_SKIP_BAD_ROWS = flags.DEFINE_bool("skip_bad_rows", False, "--model: skip malformed JSONL rows with a warning instead "
                                   "of stopping.")
_LIMIT = flags.DEFINE_integer("limit", 0, "--model: evaluate only the first N problems (0: all).")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", "auto", "--model: 'auto' (the tokenizer's chat template), 'none' "
                                     "(plain 'Question: ... Answer:' text, for base models) or a .jinja file.")
_SYSTEM_PROMPT = flags.DEFINE_string("system_prompt", None, "--model: the system prompt (default: 'Please reason step "
                                     "by step, and put your final answer within \\boxed{}.'; '' for none).")
_FEWSHOT = flags.DEFINE_string("fewshot", None, "--model: a JSONL file of solved examples (same fields as --data) shown "
                               "before each question.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 0, "--model: how many --fewshot rows to show (0: all).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "--model: the weights' dtype.")

WHOLE_SOLUTION = ("greedy", "sample", "best_of_n", "self_consistency")  # stop at EOS; beam / mcts search over steps
STEP_DELIMITER = "\n\n"
MATH_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "math.py"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if (_WORKDIR.value is None) == (_MODEL.value is None):
        raise app.UsageError("give --workdir=RUN (a trained run) or --model=hf:DIR (a pretrained Hugging Face "
                             "folder), not both or neither")
    if _MODEL.value is not None:
        return evaluate_pretrained()
    cli.initialize_distributed_from_flags()
    import jax

    from rlm_jax import evaluation, report
    from rlm_jax.tasks import get_task, io as task_io

    workdir = Path(_WORKDIR.value)
    if not (workdir / "tokenizer").exists():
        raise app.UsageError(f"{workdir} holds no trained run (no tokenizer/); run experiments/train.py first")
    c = cli.workdir_config(_CONFIG.value, workdir)
    try:
        strategies = evaluation.parse_strategies(_STRATEGIES.value or c.eval.strategies)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    task = get_task(c.task.name)
    try:
        problems = task_io.load_records(_DATA.value or workdir / "data" / "eval.json")
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    if not _DATA.value:  # the run's own held-out split: the problems its report's strategy table used
        problems = problems[:c.strategy_problem_count(len(problems))]
    wrong = sorted({p["type"] for p in problems if p["type"].lower() != task.name.lower()})
    if wrong:
        raise app.UsageError(f"--data holds {wrong} problems but the run was trained on {task.name}")
    mesh = c.mesh.make()
    tok, cfg, policy, value, label = cli.load_run_models(c, workdir, mesh)
    spec = c.lm_spec(cfg, tok, task=task)
    if value is None:
        spec = spec.__class__(**{**spec.__dict__, "value": None, "head": None})
        try:  # before any strategy runs
            evaluation.parse_strategies(_STRATEGIES.value or c.eval.strategies, value_model=False)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    print(f"evaluating {label} models on {len(problems)} problems", flush=True)
    key = evaluation.run_eval_key(c.seed)  # the evaluation phase's own: the report's draws come back
    run = lambda names, k: evaluation.evaluate(  # noqa: E731
        spec, policy, value, tok, task, problems, names, k, c.eval.batch_size, c.search.prompt_len,
        c.eval.mcts_preset, progress=lambda r: print(f"{r.strategy}:{r.budget} accuracy {r.accuracy:.3f}, "
                                                     f"{r.tokens_per_problem:.1f} tokens", flush=True),
        mesh=mesh, num_parallel=c.search.num_parallel)
    results = run(strategies, key)
    # As the main job's evaluation: best-of-N also runs at a budget covering a tree search's tokens when none did.
    results, added = report.cover_search_tokens(
        results, lambda budget, i: run([("best_of_n", budget)], jax.random.fold_in(key, 100 + i))[0])
    if jax.process_index() != 0:  # every host evaluated its rows; one writes the report
        return
    out = Path(_OUT.value or workdir / "eval_rerun")
    out.mkdir(parents=True, exist_ok=True)
    versus = report.equal_token_comparisons(results)
    report.scaling_plot(results, out / "scaling.png", versus)
    text = "\n".join([f"# evaluation of {label} on {_DATA.value or 'the eval split'}", ""]
                     + report.strategies_section(results, versus, added))
    (out / "report.md").write_text(text)
    (out / "eval.json").write_text(json.dumps({"models": label, "data": _DATA.value or "eval split",
                                               "mcts_vs_best_of_n": report.comparisons_json(versus, added),
                                               "searches_vs_baselines": report.search_comparisons_json(results),
                                               "added_for_pairing": [list(a) for a in added],
                                               "results": [r.__dict__ for r in results]}, indent=1))
    print(text)


# ------------------------------------------------------------------------------- a pretrained HF model


def _model_folder(spec: str) -> Path:
    if not spec.startswith("hf:"):
        raise app.UsageError(f"--model={spec!r}: write hf:DIR, DIR a local Hugging Face model folder")
    folder = Path(spec[3:]).expanduser()
    if not folder.is_dir():
        raise app.UsageError(f"--model={spec!r}: no folder at {folder}; point at a local folder holding config.json, "
                             "*.safetensors and the tokenizer files (nothing is downloaded)")
    return folder


def _load_problems(path: str, **fields):
    from rlm_jax.tasks.jsonl_math import JSONLMathTask

    try:
        return JSONLMathTask(path, **fields)
    except (FileNotFoundError, ValueError) as e:  # JSONLError is a ValueError: bad rows with line numbers
        hint = "" if "malformed row" not in str(e) else "\n(or pass --skip_bad_rows to skip them with a warning)"
        raise app.UsageError(f"{e}{hint}") from None


def run_strategies(strategies, specs, views, params, task, problems, prompts, key, batch_size: int,
                   prompt_len: int, mcts_preset: str = "puct", num_parallel: int = 1, stop_texts=(),
                   progress=None):
    """`evaluation.evaluate` over given prompt ids (a chat template's, not `formatting.prompt_ids`'):
    strategy name -> `specs[name]` / `views[name]` (the whole-solution or the step LMSpec and tokenizer).
    Returns (results, outputs): `evaluation.Result`s and one dict per (strategy, problem) with its text."""
    import time

    import jax
    import numpy as np

    from rlm_jax import decoding, evaluation
    from rlm_jax.search import lm, sampling
    from rlm_jax.tasks.base import Score
    from rlm_jax.tasks.math_answers import AnswerGroups, cut_at

    results, outputs = [], []
    for name, budget in strategies:
        spec, view = specs[name], views[name]
        t0 = time.perf_counter()
        solved, tokens = [], []
        for start in range(0, len(problems), batch_size):
            chunk = prompts[start:start + batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[0]] * (batch_size - real)  # one program serves every batch
            t, m = decoding.pad_prompts(chunk, view.pad_id, length=prompt_len)
            inputs = lm.search_inputs(params, None, t, m)
            key, sub = jax.random.split(key)
            if name == "self_consistency":  # votes by math equivalence, not evaluation.answer_key's last line
                groups = AnswerGroups()
                def vote_key(r, s, mk, groups=groups):
                    text = cut_at("\n".join(sampling.decode_steps(view, s, mk)), stop_texts)
                    return groups.key(r, task.read_answer(text))
                out = sampling.self_consistency(spec, inputs, sub, budget, vote_key)
                texts, ntok = list(sampling.solution_texts(view, out)), np.asarray(out.generated_tokens)
            else:
                texts, ntok = evaluation.run_strategy(name, budget, spec, inputs, sub, view, mcts_preset,
                                                      num_parallel)
            for p, text, n in zip(problems[start:start + real], texts[:real], np.asarray(ntok)[:real]):
                text = cut_at(text, stop_texts)
                ok = task.verify(p, text) == Score.SOLVED
                solved.append(ok)
                outputs.append({"strategy": name, "budget": budget, "line": p["meta"]["line"],
                                "reference": task.reference_answer(p), "answer": task.read_answer(text),
                                "solved": ok, "tokens": int(n), "text": text})
            tokens.extend(np.asarray(ntok)[:real].tolist())
        levels = {}
        for p, ok in zip(problems, solved):
            levels.setdefault(int(p["level"]), []).append(ok)
        r = evaluation.Result(name, budget, float(np.mean(solved)), float(np.mean(tokens)),
                              time.perf_counter() - t0, {lv: float(np.mean(v)) for lv, v in sorted(levels.items())},
                              [bool(s) for s in solved])
        results.append(r)
        if progress is not None:
            progress(r)
    return results, outputs


def evaluate_pretrained():
    """--model=hf:DIR: see the module docstring."""
    import dataclasses

    import jax

    from rlm_jax import config, evaluation, prompting, report
    from rlm_jax.config_utils import load_config
    from rlm_jax.models import hf
    from rlm_jax.models.hf_config import HFCheckpointError
    from rlm_jax.tokenizer import HFTokenizer

    folder = _model_folder(_MODEL.value)
    if not _DATA.value:
        raise app.UsageError("--model needs --data=problems.jsonl (GSM8K- or MATH-format JSONL)")
    if not _OUT.value:
        raise app.UsageError("--model needs --out=DIR, where report.md, eval.json and outputs.jsonl go")
    if not Path(_DATA.value).is_file():
        raise app.UsageError(f"--data={_DATA.value}: no such file; pass a JSONL file with one problem per line "
                             '(e.g. {"question": "...", "answer": "... #### 42"})')
    cd = _CONFIG.value if _CONFIG.value is not None else load_config(MATH_CONFIG)
    if not cd.task.get("data"):
        cd.task.data = _DATA.value  # the file evaluated is the task's (jsonl_math reads its problems from one)
    try:  # the typed config without cli.run_config's mesh checks: this path runs on one device, unsharded
        c = config.from_configdict(cd)
    except (ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    try:
        strategies = evaluation.parse_strategies(_STRATEGIES.value or c.eval.strategies, value_model=False)
        fmt = prompting.PromptFormat(chat_template=_CHAT_TEMPLATE.value,
                                     system=prompting.DEFAULT_SYSTEM if _SYSTEM_PROMPT.value is None
                                     else _SYSTEM_PROMPT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    from rlm_jax.tasks.jsonl_math import detect_fields

    question_field, answer_field = _QUESTION_FIELD.value, _ANSWER_FIELD.value
    if question_field is None and Path(_DATA.value).is_file():  # GSM8K's or MATH's fields, by the first row
        question_field, detected = detect_fields(_DATA.value)
        answer_field = answer_field or detected
    fields = dict(question_field=question_field or "question", answer_field=answer_field or "answer",
                  level_field=_LEVEL_FIELD.value or None, strict=not _SKIP_BAD_ROWS.value,
                  answer_format=_ANSWER_FORMAT.value)
    task = _load_problems(_DATA.value, **fields)
    problems = task.problems[:_LIMIT.value or None]
    if not problems:
        raise app.UsageError(f"{_DATA.value}: no problem left to evaluate (every row was skipped)")
    if _FEWSHOT.value:
        shots = _load_problems(_FEWSHOT.value, **{**fields, "strict": True}).problems[:_NUM_FEWSHOT.value or None]
        fmt = dataclasses.replace(fmt, fewshot=tuple((p["problem"], p["solution"]) for p in shots))

    try:
        cfg, params = hf.load_hf(folder, dtype=_DTYPE.value)
    except HFCheckpointError as e:
        raise app.UsageError(str(e)) from None
    try:
        from transformers import AutoTokenizer
        hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise app.UsageError(f"cannot load the tokenizer of {folder}: {e}") from None
    steps_asked = any(name not in WHOLE_SOLUTION for name, _ in strategies)
    try:
        prompts = [prompting.prompt_ids(hf_tok, fmt, p["problem"], str(folder)) for p in problems]
        stop = prompting.primary_stop(hf_tok, fmt)
        stops = prompting.stop_ids(hf_tok, folder, fmt)
        step_id = prompting.step_token(hf_tok, STEP_DELIMITER) if steps_asked else None
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    tok = HFTokenizer(hf_tok, STEP_DELIMITER if step_id is not None else "\n")

    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n_longest, max_new = len(prompts[longest]), c.search.max_new_tokens
    if n_longest > c.search.prompt_len:
        raise app.UsageError(f"{_DATA.value}:{problems[longest]['meta']['line']}: the prompt is {n_longest} tokens, "
                             f"longer than search.prompt_len={c.search.prompt_len}; raise it "
                             f"(--config={MATH_CONFIG.relative_to(MATH_CONFIG.parents[1])} "
                             f"--config.search.prompt_len={n_longest}) or use fewer few-shot examples")
    prompt_len = min(-(-n_longest // 32) * 32, c.search.prompt_len)
    if prompt_len + max_new > cfg.max_seq_len:
        raise app.UsageError(f"prompts of {prompt_len} tokens + {max_new} generated (search.max_depth * "
                             f"search.step_len) exceed the model's context of {cfg.max_seq_len} tokens "
                             f"(max_position_embeddings in {folder / 'config.json'}); shorten the search or the prompts")

    step_view = prompting.TokenizerView(tok, eos_id=stop)
    whole_view = prompting.TokenizerView(tok, step_id=stop, step_delimiter=hf_tok.decode([stop]), eos_id=stop)
    step_spec = dataclasses.replace(c.lm_spec(cfg, step_view, task=task), value=None, head=None)
    whole_spec = dataclasses.replace(step_spec, step_id=stop, step_ends=(), max_depth=1, step_len=max_new)
    specs = {n: whole_spec if n in WHOLE_SOLUTION else step_spec for n, _ in strategies}
    views = {n: whole_view if n in WHOLE_SOLUTION else step_view for n, _ in strategies}
    stop_texts = [hf_tok.decode([i]) for i in stops if i != stop]
    print(f"evaluating {folder} on {len(problems)} problems", flush=True)
    results, outputs = run_strategies(
        strategies, specs, views, params, task, problems, prompts, jax.random.key(c.seed), c.eval.batch_size,
        prompt_len, c.eval.mcts_preset, c.search.num_parallel, stop_texts,
        progress=lambda r: print(f"{r.strategy}:{r.budget} accuracy {r.accuracy:.3f}", flush=True))

    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    versus = report.equal_token_comparisons(results)  # unpaired MCTS budgets say which best-of-N to run
    report.scaling_plot(results, out / "scaling.png", versus)
    names = {i: hf_tok.convert_ids_to_tokens(i) for i in stops}
    setup = {"model": str(folder), "data": _DATA.value, "problems": len(problems),
             "chat_template": fmt.chat_template, "system_prompt": fmt.system, "fewshot": len(fmt.fewshot),
             "prompt_tokens_max": n_longest, "stop_id": stop, "stop_ids": stops,
             "step_id": step_id, "step_delimiter": STEP_DELIMITER if step_id is not None else None,
             "num_slots": c.search.num_slots, "step_len": c.search.step_len, "max_depth": c.search.max_depth,
             "max_new_tokens": max_new, "temperature": c.eval.temperature, "mcts_preset": c.eval.mcts_preset}
    text = "\n".join([
        f"# evaluation of {folder} on {_DATA.value}", "",
        f"{len(problems)} problems; prompts: "
        + (f"the chat template ({fmt.chat_template})" if fmt.chat else "plain text (no chat template)")
        + f", {len(fmt.fewshot)} few-shot examples, system prompt {fmt.system!r}; longest prompt {n_longest} tokens.",
        f"Whole solutions (greedy, sample, best_of_n, self_consistency): up to {max_new} tokens, ending at "
        f"{names[stop]!r} (id {stop}); the text is cut at the other stop tokens "
        f"{[names[i] for i in stops if i != stop]} (decoding stops at one id: tokens after them are still counted).",
        f"Steps (beam, mcts): end at the {STEP_DELIMITER!r} token (id {step_id}) or one of the "
        f"{len(step_view.step_end_ids)} tokens where the BPE merged it with the characters before it, at most "
        f"{c.search.step_len} tokens each, at most {c.search.max_depth}; K={c.search.num_slots} proposals per node "
        f"at temperature {c.eval.temperature}." if step_id is not None else "No step-level strategy was asked for.",
        "No value model: best_of_n picks the sample with the highest log-probability and beam ranks by "
        "cumulative log-probability; MCTS values unfinished leaves 0 and follows the step priors. Answers: "
        "\\boxed{}, '#### x', 'the answer is x', else the last number, compared with math-verify.", ""]
        + report.strategies_section(results, versus))
    (out / "report.md").write_text(text)
    (out / "eval.json").write_text(json.dumps({"models": str(folder), "data": _DATA.value, "setup": setup,
                                               "mcts_vs_best_of_n": report.comparisons_json(versus),
                                               "searches_vs_baselines": report.search_comparisons_json(results),
                                               "results": [r.__dict__ for r in results]}, indent=1))
    with open(out / "outputs.jsonl", "w", encoding="utf-8") as f:
        for row in outputs:
            f.write(json.dumps(row) + "\n")
    print(text)


if __name__ == "__main__":
    cli.run(main)
