"""Final answers of math solutions: read them from text, compare them as math (GSM8K, MATH and the like).

    extract_answer("... so she has 18 dollars.\\n#### 18")      # "18"
    extract_answer("... which gives $\\\\boxed{\\\\frac{1}{2}}$.")    # "\\\\frac{1}{2}"
    answers_match("0.5", "\\\\frac{1}{2}")                        # True

Extraction (`extract_answer`), in this order: the last `\\boxed{...}` / `\\fbox{...}` (nested braces), else the
last `#### x` (GSM8K), else the last "the answer is x", else the last number (`last_number=False` drops that
fallback). A marker followed by words ("#### 18 dollars") keeps its first number.

Comparison (`answers_match`): two plain numbers (ints, decimals, `a/b`, `\\frac{a}{b}`, `1,000`, with `$`, `%`,
`\\text{}` stripped) compare exactly as fractions; otherwise equal text (spaces, `\\left`/`\\right`, `\\dfrac`
ignored) matches; otherwise `math-verify` decides (sympy-backed: `\\frac{\\sqrt{3}}{2}` = `\\sqrt{3}/2`,
`x = 3` = `3`, intervals, sets, matrices). math-verify's own timeouts use SIGALRM, which only the main thread
may set: elsewhere they are off.
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Sequence

_NUMBER = r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?|-?\.[0-9]+"
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$|^(-?)\\[dt]?frac([0-9])([0-9])$")
MATH_VERIFY_TIMEOUT_S = 5  # per parse / verify call, main thread only


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
            return answer.strip("$ ") or answer  # "$8$" -> "8"
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


def _timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def math_verify_equal(predicted: str, reference: str) -> bool:
    """math-verify's verdict on two answer texts (LaTeX or plain expressions, without `$`): True when it
    parses both and finds them equal; False when it cannot parse either, or times out."""
    from math_verify import parse, verify

    t = _timeout()
    try:
        gold = parse(f"${reference.strip().strip('$')}$", parsing_timeout=t)
        pred = parse(f"${predicted.strip().strip('$')}$", parsing_timeout=t)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - math-verify raises many kinds (sympy, timeouts); no verdict = no match
        return False


def _text_key(text: str) -> str:
    return _clean(text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers agree (module docstring: numbers, text, then math-verify)."""
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b
    if _text_key(predicted) == _text_key(reference):
        return True
    return math_verify_equal(predicted, reference)


def cut_at(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to the first of `stop_texts` (end-of-turn / end-of-text markers a model may write)."""
    cut = len(text)
    for s in stop_texts:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


class AnswerGroups:
    """Votes by equivalent answers: `key(row, answer)` -> the index of the first answer of `row` that
    `answers_match` says it equals (a new index for a new one; None for no answer). Self-consistency
    then counts "0.5", "1/2" and "\\frac{1}{2}" as one answer."""

    def __init__(self):
        self._seen: dict[int, list[str]] = {}

    def key(self, row: int, answer: str | None) -> int | None:
        if answer is None:
            return None
        seen = self._seen.setdefault(row, [])
        for i, other in enumerate(seen):
            if answers_match(answer, other):
                return i
        seen.append(answer)
        return len(seen) - 1
