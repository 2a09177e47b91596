"""Math word problems from GSM8K/MATH-style JSONL files, graded by final-answer equivalence.

Input: one JSON object per line. GSM8K: `{"question": "...", "answer": "... #### 72"}`; MATH:
`{"problem": "...", "solution": "... \\boxed{72}", "level": "Level 3"}`; other layouts name their fields
(`question_field`, `answer_field`, `level_field`; `question_field=None` detects GSM8K or MATH from the first
row). The level field is optional (int, or text like "Level 3"; default 1) and the answer field may be None
for question-only files; `answer_format="final"` reads a field that holds only the final answer (MATH-500's
"answer": `\\frac{14}{3}`) instead of a worked solution. Blank lines are skipped; a missing file is a
FileNotFoundError and a file with no rows a ValueError naming it; every other malformed line (bad JSON, not
an object, a missing or non-text field, an answer text with no final answer to extract, a level outside
1..10) is reported with the file name and line number: `JSONLError` when `strict`, else a warning that lists
the line numbers (the errors stay in `JSONLMathTask.errors`).

Records: x1 format, type "JSONLMath", problem = the question, solution = the answer text,
meta = {"answer": the extracted final answer (None only without an answer field), "line": line number}.
The prompt is the question; steps follow it as free text lines.

Answers (`tasks/math_answers.py`, re-exported here): read from text by `extract_answer` (the last
`\\boxed{...}`, else the last `#### x`, else the last "The answer is x", else the last number) and compared
by `answers_match`: exact numbers (ints, decimals, `a/b`, `\\frac{a}{b}`, `1,000`, with `$` and `%`
stripped), then whitespace-insensitive text, then math-verify's symbolic equivalence.
"""
from __future__ import annotations

import json
import re
import warnings
from typing import Sequence

from rlm_jax.tasks.base import AnswerTask, Problem, Score, as_record, split_steps
from rlm_jax.tasks.io import open_text
from rlm_jax.tasks.math_answers import answers_match, extract_answer, to_number  # noqa: F401 (re-exported)

TYPE = "JSONLMath"
FORMATS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}  # (question field, answer field)
ANSWER_FORMATS = ("solution", "final")
_ANNOTATION = re.compile(r"<<([^<>=]*)=[^<>]*?(?:>>|$)")  # GSM8K's `<<expr=result>>`, the result optional


class JSONLError(ValueError):
    """Malformed rows of a JSONL file: `errors` is a list of (line number, problem)."""

    def __init__(self, path: str, errors: list[tuple[int, str]]):
        self.path, self.errors = path, errors
        shown = "\n".join(f"  {path}:{line}: {why}" for line, why in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} malformed row(s) in {path} (fix the rows or pass "
                         f"strict=False to skip them with a warning):\n{shown}{more}")


def _level(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"level must be an int or text like 'Level 3', got {value!r}")
    digits = re.findall(r"[0-9]+", str(value))
    if len(digits) != 1 or not 1 <= int(digits[0]) <= 10:
        raise ValueError(f"level must be one number in 1..10, got {value!r}")
    return int(digits[0])


def _row_to_record(row, question_field: str, answer_field: str | None, level_field: str | None,
                   line: int, answer_format: str = "solution") -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    fields = [question_field] + ([answer_field] if answer_field else [])
    for field in fields:
        if field not in row:
            raise ValueError(f"missing field {field!r} (has {sorted(row)})")
        if not isinstance(row[field], (str, int, float)) or isinstance(row[field], bool):
            raise ValueError(f"field {field!r} must be text or a number, got {type(row[field]).__name__}")
    question = str(row[question_field])
    if not question.strip():
        raise ValueError(f"field {question_field!r} is empty")
    solution = str(row[answer_field]) if answer_field else None
    level = _level(row[level_field]) if level_field and level_field in row else 1
    if solution is not None and answer_format == "final":  # the field holds the bare answer ("\\frac{14}{3}")
        answer = extract_answer(solution, last_number=False) or solution.strip() or None
        if answer is None:
            raise ValueError(f"field {answer_field!r} is empty: it should hold the final answer")
    else:
        answer = extract_answer(solution) if solution is not None else None
    if solution is not None and answer is None:
        raise ValueError(f"field {answer_field!r} has no final answer to grade against ({solution[:60]!r}): "
                         "write it as \\boxed{...}, '#### x', 'The answer is x' or a number (or, if the field "
                         "holds only the final answer, load it with answer_format='final')")
    return as_record(TYPE, level, question, True, solution, meta={"answer": answer, "line": line})


def _first_row(path: str) -> dict | None:
    """The first non-blank row when it is a JSON object; None otherwise (`load_jsonl` names the problem)."""
    try:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError):
        return None
    return None


def detect_fields(path: str) -> tuple[str, str]:
    """(question field, answer field) of a file by its first row: GSM8K's ("question", "answer") or MATH's
    ("problem", "solution"); GSM8K's when the first row is neither (its errors then name the fields)."""
    row = _first_row(path) or {}
    for question, answer in FORMATS.values():
        if question in row:
            return question, answer
    return FORMATS["gsm8k"]


def load_jsonl(path: str, question_field: str | None = "question", answer_field: str | None = "answer",
               level_field: str | None = "level", strict: bool = True, answer_format: str = "solution",
               ) -> tuple[list[Problem], list[tuple[int, str]]]:
    """Reads a JSONL file (.bz2 too) into x1 records; returns (records, errors). Raises
    `JSONLError` listing every malformed line when `strict`, else warns with their line numbers.

    question_field=None: detect the layout from the first row (`detect_fields`: GSM8K or MATH; then
    `answer_field` is the detected one too). answer_format: "solution" (a worked solution whose final
    answer is extracted: `extract_answer`) or "final" (the field is the final answer itself, as
    MATH-500's "answer"). A missing file is FileNotFoundError; a file without any row is a ValueError."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    try:
        if question_field is None:
            question_field, detected_answer = detect_fields(path)
            answer_field = detected_answer if answer_field is not None else None
        records, errors, rows = [], [], 0
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append((line_no, f"invalid JSON ({e.msg} at column {e.colno})"))
                    continue
                try:
                    records.append(_row_to_record(row, question_field, answer_field, level_field, line_no,
                                                  answer_format))
                except ValueError as e:
                    errors.append((line_no, str(e)))
    except FileNotFoundError:
        raise FileNotFoundError(f"no problem file at {path}: pass a JSONL file with one problem per line "
                                '(e.g. {"question": "...", "answer": "... #### 42"})') from None
    except (UnicodeDecodeError, OSError, EOFError) as e:  # OSError: bad bz2 data
        raise ValueError(f"{path}: not a readable UTF-8 JSONL file ({e})") from None
    if rows == 0:
        raise ValueError(f"{path} is empty: it holds no problem rows (one JSON object per line)")
    if errors and strict:
        raise JSONLError(str(path), errors)
    if errors:
        lines = ", ".join(str(line) for line, _ in errors)
        warnings.warn(f"{path}: skipped {len(errors)} malformed row(s) at line(s) {lines}", stacklevel=2)
    return records, errors


class JSONLMathTask(AnswerTask):
    """A file-backed math domain: `problems` holds the file's records (empty without a path).
    No capabilities: free-form steps have no exact value label (`can_succeed` is None)."""

    name = TYPE

    def __init__(self, path: str | None = None, question_field: str | None = "question",
                 answer_field: str | None = "answer", level_field: str | None = "level",
                 strict: bool = True, answer_format: str = "solution"):
        self.path = path
        self.problems, self.errors = ([], []) if path is None else load_jsonl(
            path, question_field, answer_field, level_field, strict, answer_format)

    generates = False

    def read_problems(self, path: str) -> list[Problem]:
        """A GSM8K- or MATH-format JSONL file (detected from its first row); a malformed row is an error."""
        return load_jsonl(path, question_field=None)[0]

    def has_trace(self, problem: Problem) -> bool:
        """A worked solution, not only its final answer ("#### 72", or a bare answer field as MATH-500's)."""
        text = problem.get("solution")
        if text is None:
            return False
        rest = re.sub(r"####.*", "", str(text)).replace(str((problem.get("meta") or {}).get("answer") or ""), "", 1)
        return bool(re.search(r"\w", rest))

    def generate(self, seed: int, difficulty: float) -> Problem:
        raise NotImplementedError(
            "JSONLMath reads its problems from a file and cannot generate new ones: use "
            "JSONLMathTask(path).problems (or load_jsonl(path)) instead of generate()")

    def reference_answer(self, problem: Problem) -> str:
        meta = problem.get("meta") or {}
        answer = meta.get("answer")
        if answer is None and problem.get("solution") is not None:
            answer = extract_answer(str(problem["solution"]))
        if answer is None:
            raise ValueError(f"record has no reference answer (problem {problem['problem'][:60]!r}); "
                             "load the file with its answer field to verify outputs")
        return answer

    def solve(self, problem: Problem) -> list[str]:
        if problem.get("solution") is None:
            raise ValueError("record has no reference solution: the file was loaded without an answer field")
        return split_steps(str(problem["solution"]))

    def read_answer(self, output: str) -> str | None:
        return extract_answer(output)

    def same_answer(self, answer: str, reference: str) -> bool:
        return answers_match(answer, reference)

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        # Free-form steps cannot be checked; only an explicitly marked answer is graded.
        answer = extract_answer("\n".join(steps), last_number=False)
        if answer is None:
            return Score.PARTIAL
        return Score.SOLVED if answers_match(answer, self.reference_answer(problem)) else Score.INCORRECT

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> None:
        return None  # No exact value label for free-form text.

    tools = ("calculator annotations",)

    def call_tools(self, step: str) -> str:
        """GSM8K's calculator annotations: `<<48/2=...>>` (or an unfinished `<<48/2=`) -> `<<48/2=24>>`, the
        expression evaluated by the sandboxed `tools.evaluate_expression`; an expression it refuses stays
        as written."""
        from rlm_jax import tools  # tools reads steps through formatting, which imports the tasks

        def run(m: re.Match) -> str:
            try:
                value = tools.format_value(tools.evaluate_expression(m.group(1)))
            except tools.ToolError:
                return m.group(0)
            return f"<<{m.group(1)}={value}>>"

        return _ANNOTATION.sub(run, step)
