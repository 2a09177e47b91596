"""Math word problems from GSM8K/MATH-style JSONL files, graded by final-answer equivalence.

Input: one JSON object per line, e.g. `{"question": "...", "answer": "... #### 72", "level": 3}`.
Field names are configurable; the level field is optional (int, or text like "Level 3"; default 1)
and the answer field may be None for question-only files. Blank lines are skipped; every other
malformed line (bad JSON, not an object, a missing or non-text field, an answer text with no final
answer to extract, a level outside 1..10) is reported with the file name and line number:
`JSONLError` when `strict`, else a warning that lists the line numbers (the errors stay in
`JSONLMathTask.errors`).

Records: x1 format, type "JSONLMath", problem = the question, solution = the answer text,
meta = {"answer": the extracted final answer (None only without an answer field), "line": line number}.
The prompt is the question; steps follow it as free text lines.

Answers are read from text (`extract_answer`): the last `\\boxed{...}` (nested braces), else the last
`#### x`, else the last "The answer is x", else the last number. `answers_match` compares them as
exact numbers (ints, decimals, `a/b`, `\\frac{a}{b}`, `1,000`, with `$` and `%` stripped), falling
back to whitespace-insensitive text equality for non-numeric answers.
"""
from __future__ import annotations

import json
import re
import warnings
from fractions import Fraction
from typing import Sequence

from rlm_jax.tasks.base import AnswerTask, Problem, Score, as_record, split_steps
from rlm_jax.tasks.io import open_text

TYPE = "JSONLMath"
_NUMBER = r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?|-?\.[0-9]+"
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$|^(-?)\\[dt]?frac([0-9])([0-9])$")


class JSONLError(ValueError):
    """Malformed rows of a JSONL file: `errors` is a list of (line number, problem)."""

    def __init__(self, path: str, errors: list[tuple[int, str]]):
        self.path, self.errors = path, errors
        shown = "\n".join(f"  {path}:{line}: {why}" for line, why in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} malformed row(s) in {path} (fix the rows or pass "
                         f"strict=False to skip them with a warning):\n{shown}{more}")


def _last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` / `\\fbox{...}`, braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """The final answer written in `text` (see the module docstring for the order), or None.
    `last_number=False` keeps only explicit markers (boxed, ####, "the answer is")."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip().rstrip(".").strip()
            if to_number(answer) is None:  # "18 dollars", "$\\frac{1}{2}$ cup": keep the number
                numbers = [t for t in answer.split() if to_number(t) is not None] or re.findall(_NUMBER, answer)
                answer = numbers[0] if numbers else answer
            return answer
    if last_number:
        numbers = re.findall(_NUMBER, text)
        return numbers[-1] if numbers else None
    return None


def _clean(text: str) -> str:
    text = text.strip().rstrip(".")
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\left", "\\right", " "):
        text = text.replace(junk, "")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return text.replace("{,}", ",")


def to_number(text: str) -> Fraction | None:
    """`1,000` `-3.5` `3/4` `\\frac{3}{4}` `$5` `50%` -> exact Fraction; None if not a number."""
    text = re.sub(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))", "", _clean(text))
    m = _FRAC_RE.match(text)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else m.group(4, 5, 6)
        a, b = to_number(num), to_number(den)
        if a is None or not b:
            return None
        return -a / b if sign else a / b
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b
    return _clean(predicted).replace("\\dfrac", "\\frac") == _clean(reference).replace("\\dfrac", "\\frac")


def _level(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"level must be an int or text like 'Level 3', got {value!r}")
    digits = re.findall(r"[0-9]+", str(value))
    if len(digits) != 1 or not 1 <= int(digits[0]) <= 10:
        raise ValueError(f"level must be one number in 1..10, got {value!r}")
    return int(digits[0])


def _row_to_record(row, question_field: str, answer_field: str | None, level_field: str | None,
                   line: int) -> Problem:
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
    answer = extract_answer(solution) if solution is not None else None
    if solution is not None and answer is None:
        raise ValueError(f"field {answer_field!r} has no final answer to grade against ({solution[:60]!r}): "
                         "write it as \\boxed{...}, '#### x', 'The answer is x' or a number")
    return as_record(TYPE, level, question, True, solution, meta={"answer": answer, "line": line})


def load_jsonl(path: str, question_field: str = "question", answer_field: str | None = "answer",
               level_field: str | None = "level", strict: bool = True
               ) -> tuple[list[Problem], list[tuple[int, str]]]:
    """Reads a JSONL file (.bz2 too) into x1 records; returns (records, errors). Raises
    `JSONLError` listing every malformed line when `strict`, else warns with their line numbers."""
    records, errors = [], []
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append((line_no, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            try:
                records.append(_row_to_record(row, question_field, answer_field, level_field, line_no))
            except ValueError as e:
                errors.append((line_no, str(e)))
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

    def __init__(self, path: str | None = None, question_field: str = "question",
                 answer_field: str | None = "answer", level_field: str | None = "level",
                 strict: bool = True):
        self.path = path
        self.problems, self.errors = ([], []) if path is None else load_jsonl(
            path, question_field, answer_field, level_field, strict)

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
