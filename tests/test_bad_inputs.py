"""Bad inputs a user can give, each refused at the boundary with one clear line: a specific exception whose
message names the field or file, the bad value and the fix (never a traceback from deep inside a library).

The same cases make docs/bad_inputs.md (| input | message |); the test fails when the committed table differs
from what they produce, so it cannot go stale. Refresh it after changing a message with

    RLM_UPDATE_BAD_INPUTS=1 python -m pytest -n 0 -q tests/test_bad_inputs.py

Everything runs in-process except one subprocess for the CLI wiring (absl flag parsing and exit status).
"""
from __future__ import annotations

import bz2
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

from rlm_jax import cli, config, config_utils, evaluation, progress, workdir
from rlm_jax.tasks import get_task, io as task_io
from rlm_jax.tasks.base import as_record

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
DOC = ROOT / "docs" / "bad_inputs.md"
TMP = "<tmp>"  # case files live under a per-run folder; the table shows this instead
# What a clear refusal may be: the errors the entry points turn into one line (train.py, evaluate.py and
# solve.py catch these and exit with the message as an absl UsageError).
CLEAR = (ValueError, FileNotFoundError, app.UsageError)


def _override(path: str, value, base: Path = TINY, also: dict | None = None):
    """The typed config of `base` with one field set (and the fields of `also`), as `--config.<path>=<value>`
    would (cli.run_config: the typed config plus the device checks; 1 device, as on a laptop)."""
    c = config_utils.load_config(base)
    d = c.to_dict()
    for path, value in {path: value, **(also or {})}.items():
        *sections, name = path.split(".")
        node = d
        for s in sections:
            node = node[s]
        node[name] = value
    rc = config.from_configdict(d)
    config.check_devices(rc, 1)
    config.check_sizes(rc)
    return rc


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def _problem(task: str, text: str):
    """What solve.py does with --problem: the task parses it before any search."""
    t = get_task(task)
    return t.check_problem(as_record(t.name, 1, text, False, None))


def _countdown(text: str, task: str = "countdown3"):
    return _problem(task, text)


def _record(**changes) -> dict:
    return {"type": "Countdown3", "level": 1, "problem": "Numbers: 3 7 12 Target: 26", "unique_solution": False,
            "solution": "7+12=19\n19+3=22", **changes}


def _x1(tmp: Path, name: str, data) -> Path:
    return _write(tmp, name, json.dumps(data))


def _run_dir(tmp: Path, progress_text: str | None = None, config_text: str | None = None) -> Path:
    d = tmp / "run"
    d.mkdir(parents=True, exist_ok=True)
    if progress_text is not None:
        (d / "progress.json").write_text(progress_text)
    if config_text is not None:
        (d / "config.json").write_text(config_text)
    return d


def _finished_run(tmp: Path) -> Path:
    d = _run_dir(tmp)
    workdir.write_config(d, _override("seed", 0))
    progress.mark_done(d, "sft", is_primary=True)
    return d


# (input as a user writes it, the call that gets it, what the message must name)
CASES = [
    # --- config fields (--config.<field>=<value>)
    ("--config.sft.lr=-1", lambda t: _override("sft.lr", -1.0), "sft.lr=-1.0"),
    ("--config.sft.lr=fast", lambda t: _override("sft.lr", "fast"), "sft.lr='fast'"),
    ("--config.sft.steps=many", lambda t: _override("sft.steps", "many"), "sft.steps='many'"),
    ("--config.sft.batch_size=0", lambda t: _override("sft.batch_size", 0), "sft.batch_size=0"),
    ("--config.sft.stepz=5 (unknown field)", lambda t: _override("sft.stepz", 5), "sft.stepz"),
    ("--config.rl.control=yes", lambda t: _override("rl.control", "yes"), "rl.control='yes'"),
    ("--config.seed=-1", lambda t: _override("seed", -1), "seed=-1"),
    ("--config.task.name=chess", lambda t: _override("task.name", "chess"), "unknown task 'chess'"),
    ("--config.task.levels=0-3", lambda t: _override("task.levels", "0-3"), "task.levels='0-3'"),
    ("--config.task.levels=easy", lambda t: _override("task.levels", "easy"), "task.levels='easy'"),
    ("--config.task.num_eval=100000", lambda t: _override("task.num_eval", 100000), "task.num_eval"),
    ("--config.task.num_train=0", lambda t: _override("task.num_train", 0), "task.num_train=0"),
    ("--config.task.eval_fraction=0", lambda t: _override("task.eval_fraction", 0.0), "task.eval_fraction=0.0"),
    ("--config.task.traces_per_problem=4 with task prontoqa", lambda t: _override("task.name", "prontoqa"),
     "task.traces_per_problem=4"),
    ("--config.pretrain.steps=10 on knapsack", lambda t: _override("pretrain.steps", 10, ROOT / "configs/knapsack.py"),
     "pretrain.steps=10"),
    ("--config.tokenizer.vocab_size=100", lambda t: _override("tokenizer.vocab_size", 100), "tokenizer.vocab_size=100"),
    ("--config.seq_len=1", lambda t: _override("seq_len", 1), "seq_len=1"),
    ("--config.seq_len=10 (shorter than the examples)", lambda t: _override("seq_len", 10), "seq_len=10"),
    ("--config.search.prompt_len=4 (shorter than the prompts)", lambda t: _override("search.prompt_len", 4),
     "search.prompt_len=4"),
    ("--config.search.step_len=60 (past model.max_seq_len)", lambda t: _override("search.step_len", 60),
     "model.max_seq_len=160"),
    ("--config.search.proposals=unique", lambda t: _override("search.proposals", "unique"), "search.proposals"),
    ("--config.value.targets=mc", lambda t: _override("value.targets", "mc"), "value.targets='mc'"),
    ("--config.task.name=jsonl_math without task.data", lambda t: _override("task.name", "jsonl_math"),
     "task.data=''"),
    ("--config.task.data=/no/such.jsonl", lambda t: _override("task.data", "/no/such.jsonl"), "no such file"),
    ("--config.task.chat_template=auto without model.init", lambda t: _override("task.chat_template", "auto"),
     "task.chat_template='auto'"),
    ("--config.task.chat_template=chatml (no such file)", lambda t: _override("task.chat_template", "chatml"),
     "task.chat_template='chatml'"),
    ("--config.task.fewshot=2 without a chat template", lambda t: _override("task.fewshot", 2), "task.fewshot=2"),
    ("--config.value.init=hf:<folder> without model.init", lambda t: _override("value.init", "hf:/a/folder"),
     "set model.init=hf:<folder> too"),
    ("--config.value.init=/a/folder (no hf:)", lambda t: _override("value.init", "/a/folder"), "value.init"),
    ("--config.model.lora_rank=8 without model.init", lambda t: _override("model.lora_rank", 8), "model.lora_rank=8"),
    ("--config.model.lora_rank=-1", lambda t: _override("model.lora_rank", -1), "lora_rank"),
    ("--config.value_head.hidden=abc", lambda t: _override("value_head.hidden", "abc"), "value_head.hidden='abc'"),
    ("--config.value_head.hidden=(0,)", lambda t: _override("value_head.hidden", (0,)), "value_head.hidden"),
    ("--config.value_head.kind=critic", lambda t: _override("value_head.kind", "critic"), "value_head.kind"),
    ("--config.model.num_heads=3", lambda t: _override("model.num_heads", 3), "num_heads"),
    ("--config.model.d_model=big", lambda t: _override("model.d_model", "big"), "d_model"),
    ("--config.model.widht=64 (unknown field)", lambda t: _override("model.widht", 64), "widht"),
    ("--config.task=5 (a value for a section)", lambda t: _override("task", 5), "config task=5"),
    ("--config.value.loss=hinge", lambda t: _override("value.loss", "hinge"), "value.loss='hinge'"),
    ("--config.value.temperature=0", lambda t: _override("value.temperature", 0.0), "value.temperature=0.0"),
    ("--config.rl.algorithm=a2c", lambda t: _override("rl.algorithm", "a2c"), "rl.algorithm='a2c'"),
    ("--config.rl.sft_mix=1.5", lambda t: _override("rl.sft_mix", 1.5), "rl.sft_mix=1.5"),
    ("--config.rl.preset=alphago", lambda t: _override("rl.preset", "alphago"), "rl.preset='alphago'"),
    ("--config.rl.group_size=1 with rl.algorithm=grpo_sampled",
     lambda t: _override("rl.group_size", 1, also={"rl.algorithm": "grpo_sampled"}), "rl.group_size=1"),
    ("--config.search.branch_entropy=-1", lambda t: _override("search.branch_entropy", -1.0),
     "search.branch_entropy=-1.0"),
    ("--config.search.branch_entropy=1 with search.kv_cache=False",
     lambda t: _override("search.branch_entropy", 1.0, also={"search.kv_cache": False}), "search.branch_entropy=1.0"),
    ("--config.search.branch_entropy=1 with eval.proposals=distinct",
     lambda t: _override("search.branch_entropy", 1.0, also={"eval.proposals": "distinct"}),
     "search.branch_entropy=1.0"),
    ("--config.search.tools=True with task.name=arithmetic (no tools)",
     lambda t: _override("search.tools", True, also={"task.name": "arithmetic", "task.traces_per_problem": 1}),
     "search.tools=True"),
    ("--config.task.trace=search with task.name=prontoqa (no search traces)",
     lambda t: _override("task.trace", "search", also={"task.name": "prontoqa", "task.traces_per_problem": 1}),
     "task.trace='search'"),
    ("--config.task.trace=dfs", lambda t: _override("task.trace", "dfs"), "task.trace='dfs'"),
    ("--config.eval.strategies=greedy:1,bogus:3", lambda t: _override("eval.strategies", "greedy:1,bogus:3"),
     "bogus"),
    ("--config.eval.strategies=mcts:0", lambda t: _override("eval.strategies", "mcts:0"), "mcts:0"),
    ("evaluate.py --model=hf:DIR --strategies=got:2 (no value model)",
     lambda t: evaluation.parse_strategies("got:2", value_model=False), "value model"),
    ("--config.eval.temperature=-1", lambda t: _override("eval.temperature", -1.0), "eval.temperature=-1.0"),
    ("--config.mesh.data=3 on 1 device", lambda t: cli.run_config(_mesh_config(data=3)), "mesh"),
    # --- config files
    ("--config=configs/nope.py (missing)", lambda t: config_utils.load_config(t / "configs/nope.py"), "nope.py"),
    ("a config file without get_config()", lambda t: config_utils.load_config(_write(t, "configs/empty.py", "x = 1\n")),
     "get_config"),
    ("a config file with a syntax error", lambda t: config_utils.load_config(_write(t, "configs/bad.py", "def get_config(:\n")),
     "bad.py"),
    # --- workdir files
    ("corrupt progress.json", lambda t: workdir.done_phases(_run_dir(t, progress_text='{"phases": {"sft": ')),
     "progress.json"),
    ('progress.json with "phases": []', lambda t: workdir.done_phases(_run_dir(t, progress_text='{"phases": []}')),
     "progress.json"),
    ("corrupt config.json", lambda t: workdir.read_config(_run_dir(t, config_text="{")), "config.json"),
    ("config.json with an unknown field", lambda t: workdir.read_config(_run_dir(t, config_text='{"sedd": 1}')),
     "sedd"),
    ("evaluate.py / solve.py on a folder with no config.json", lambda t: cli.workdir_config(None, _run_dir(t)),
     "config.json"),
    ("a rerun with --config.sft.steps=200 on a finished run",
     lambda t: workdir.check_resumable(_finished_run(t), _override("sft.steps", 200)), "sft.steps: 100"),
    # --- problem files (evaluate.py --data, the data phase)
    ("--data=missing.json", lambda t: task_io.load_records(t / "missing.json"), "missing.json"),
    ("--data= a truncated .json", lambda t: task_io.load_records(_write(t, "cut.json", '{"version": 1, "data": [{"ty')),
     "cut.json"),
    ("--data= a truncated .json.bz2",
     lambda t: task_io.load_records(_write(t, "cut.json.bz2", bz2.compress(b'{"version": 1, "data": []}' * 50)[:40])),
     "cut.json.bz2"),
    ("--data= a JSON list, not x1's object", lambda t: task_io.load_records(_x1(t, "list.json", [_record()])),
     "list.json"),
    ("--data= a file of version 2", lambda t: task_io.load_records(_x1(t, "v2.json", {"version": 2, "data": []})),
     "version 2"),
    ("--data= a file with no problems", lambda t: task_io.load_records(_x1(t, "none.json", {"version": 1, "data": []})),
     "none.json"),
    ("--data= a record without 'problem'",
     lambda t: task_io.load_records(_x1(t, "r.json", {"version": 1, "data": [{**_record(), "problem": None} | {}]})),
     "record 0"),
    ("--data= a record at level 11", lambda t: task_io.load_records(_x1(t, "l.json", {"version": 1, "data": [_record(level=11)]})),
     "'level'"),
    ("a JSONL line that is not JSON", lambda t: get_task("jsonl_math", path=str(_write(t, "bad.jsonl", '{"question": "1+1?"\n'))),
     "bad.jsonl:1"),
    # --- problems (solve.py --problem, problem files)
    ("countdown: Devanagari digits", lambda t: _countdown("Numbers: ३ 7 12 Target: 26"), "'३'"),
    ("countdown: Arabic-Indic digits", lambda t: _countdown("Numbers: 3 7 12 Target: ٢٦"), "'٢٦'"),
    ("countdown: trailing junk", lambda t: _countdown("Numbers: 3 7 12 Target: 26 please"), "after the target"),
    ("countdown: a negative number", lambda t: _countdown("Numbers: 3 -7 12 Target: 26"), "negative"),
    ("countdown3: four numbers", lambda t: _countdown("Numbers: 3 7 12 5 Target: 26"), "expected 3"),
    ("countdown: no target", lambda t: _countdown("Numbers: 3 7 12 5", "countdown"), "not a countdown problem"),
    ("game24: a fraction as a number", lambda t: _countdown("Numbers: 1/2 3 4 5 Target: 24", "game24"), "'1/2'"),
    ("knapsack: free text", lambda t: _problem("knapsack", "pack my bag"), "knapsack"),
    ("prontoqa: no query", lambda t: _problem("prontoqa", "Every cat is a mammal."), "query"),
    ("sat: no clauses", lambda t: _problem("sat", "solve this formula"), "SAT"),
    ("arithmetic: a letter", lambda t: _problem("arithmetic", "3 + x * 2"), "'x'"),
    # --- make_dataset.py
    ("make_dataset --levels=1-20", lambda t: task_io.parse_levels("1-20"), "1..10"),
    ("make_dataset --levels=5-2", lambda t: task_io.parse_levels("5-2"), "2-5"),
]


def _mesh_config(**mesh):
    c = config_utils.load_config(TINY)
    c.mesh.update(mesh)
    return c


def _message(exc: BaseException, tmp: Path) -> str:
    return str(exc).replace(str(tmp), TMP)


def table(tmp: Path) -> tuple[str, list[tuple[str, BaseException | None, str]]]:
    """The markdown table of every case, and (input, exception or None, message) per case."""
    rows, out = [], []
    for i, (label, call, _) in enumerate(CASES):
        case_dir = tmp / f"case{i}"
        case_dir.mkdir()
        try:
            call(case_dir)
            exc = None
        except Exception as e:  # noqa: BLE001 -- the test below judges which exceptions are clear
            exc = e
        msg = "(accepted)" if exc is None else _message(exc, case_dir)
        out.append((label, exc, msg))
        first = msg.splitlines()[0] if msg else ""
        cell = first.replace("|", "\\|")
        rows.append(f"| `{label}` | {type(exc).__name__ if exc else '-'}: {cell} |")
    text = "\n".join(["# Bad inputs and what they get", "",
                      "Generated by `tests/test_bad_inputs.py` (which fails when this file is stale; refresh with",
                      "`RLM_UPDATE_BAD_INPUTS=1 python -m pytest -n 0 -q tests/test_bad_inputs.py`). Each input is",
                      "refused at start with one line naming the field or file, the value and the fix; train.py and",
                      "solve.py print it as one `FATAL ...` line and exit 1 (`rlm_jax/cli.py`).",
                      "", f"{len(CASES)} inputs.", "", "| input | message |", "|---|---|", *rows, ""])
    return text, out


def test_every_bad_input_gets_one_clear_line(tmp_path):
    text, results = table(tmp_path)
    assert len(CASES) >= 40
    assert len({label for label, _, _ in results}) == len(CASES), "inputs must be distinct"
    problems = []
    for (label, exc, msg), (_, _, must_name) in zip(results, CASES):
        if exc is None:
            problems.append(f"{label}: accepted")
        elif not isinstance(exc, CLEAR):
            problems.append(f"{label}: {type(exc).__name__}: {msg[:300]}")
        elif must_name not in msg or "Traceback" in msg or len(msg.splitlines()[0]) > 600:
            problems.append(f"{label}: message does not name {must_name!r} in one line: {msg[:300]}")
        elif "\n" in msg and label != "a JSONL line that is not JSON":  # JSONLError lists rows below its line
            problems.append(f"{label}: message spans lines: {msg[:300]}")
    assert not problems, "\n".join(problems)
    if os.environ.get("RLM_UPDATE_BAD_INPUTS"):
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, (
        f"{DOC} is stale; refresh it: RLM_UPDATE_BAD_INPUTS=1 python -m pytest -n 0 -q tests/test_bad_inputs.py")


def test_train_cli_refuses_an_unknown_field_in_one_line(tmp_path):
    """The CLI wiring (the one subprocess): absl parses the override, train.py exits 1 with one line."""
    r = subprocess.run([sys.executable, str(ROOT / "experiments/train.py"), f"--config={TINY}",
                        f"--workdir={tmp_path / 'run'}", "--config.sft.stepz=5"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "stepz" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) <= 3, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything is written
