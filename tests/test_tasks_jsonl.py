"""JSONL math files: answer extraction, numeric equivalence, malformed-row reporting, grading."""
import bz2
import json
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from rlm_jax.tasks.base import Score
from rlm_jax.tasks.jsonl_math import JSONLError, JSONLMathTask, answers_match, extract_answer, load_jsonl, to_number

TASK = JSONLMathTask()
fractions = st.builds(Fraction, st.integers(-10**6, 10**6), st.integers(1, 1000))


def spellings(value: Fraction, rng: random.Random) -> list[str]:
    """Ways a solution may write `value`."""
    out = [f"{value.numerator}/{value.denominator}"]
    sign = "-" if value < 0 else ""
    out.append(f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}")
    out.append(f"{sign}\\dfrac{{{abs(value.numerator)}}}{{{value.denominator}}}")
    if value.denominator == 1:
        n = value.numerator
        out += [str(n), f"{n:,}", f"${n:,}", f"{n}%", f"\\${n}", f"{n}.0", f"{n}.{'0' * rng.randint(1, 3)}"]
    if 10**6 % value.denominator == 0:  # a terminating decimal
        out.append(f"{float(value):.6f}")
    return out


@given(value=fractions, seed=st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_numbers_written_differently_are_equal(value, seed):
    for text in spellings(value, random.Random(seed)):
        assert to_number(text) == value, text
        assert answers_match(text, f"{value.numerator}/{value.denominator}")
        assert not answers_match(text, f"{value.numerator + value.denominator}/{value.denominator}")


@given(value=fractions, seed=st.integers(0, 2**32), noise=st.integers(0, 10**4))
@settings(max_examples=80, deadline=None)
def test_extraction_follows_marker_priority(value, seed, noise):
    rng = random.Random(seed)
    written = rng.choice(spellings(value, rng))
    # Nested braces inside \boxed, a distracting number after it.
    boxed = f"We get {noise} apples, so \\boxed{{\\frac{{{value.numerator}}}{{{value.denominator}}}}} then {noise + 1}."
    assert to_number(extract_answer(boxed)) == value
    assert to_number(extract_answer(f"\\boxed{{{noise + 1}}} was a guess; \\boxed{{{written}}} is final")) == value
    assert to_number(extract_answer(f"{noise} and {noise + 1}\n#### {written}\nbye {noise}")) == value
    assert to_number(extract_answer(f"so {noise}... The answer is {written}.\nThanks {noise}")) == value
    assert to_number(extract_answer(f"The answer is: {written} dollars")) == value
    assert extract_answer(f"first {noise} then {value.numerator} left") == str(value.numerator)
    assert extract_answer(f"first {noise} then {value.numerator}", last_number=False) is None
    assert extract_answer("no digits at all") is None


def test_non_numeric_answers_compare_as_text():
    assert answers_match("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}")
    assert answers_match("(1, 2)", "(1,2)")
    assert not answers_match("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}")


def _write_rows(path, rows):
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")


def _good_row(rng, i):
    answer = rng.randint(-1000, 10**6)
    row = {"question": f"Question {i}: what is {answer - 7} + 7?",
           "answer": f"{answer - 7} + 7 = {answer}\n#### {answer:,}"}
    if rng.random() < 0.5:
        row["level"] = rng.choice([rng.randint(1, 10), f"Level {rng.randint(1, 5)}"])
    return json.dumps(row)


BAD_ROWS = ['{"question": "no answer field"}', '{"question": "broken json", ', '["a", "list"]',
            '{"answer": "no question"}', '{"question": "q", "answer": "1", "level": 11}',
            '{"question": "q", "answer": {"nested": 1}}', '{"question": "", "answer": "1"}',
            '{"question": "q", "answer": "no final answer in words"}']


@given(seed=st.integers(0, 2**32), n_good=st.integers(1, 30), bad=st.lists(st.sampled_from(BAD_ROWS), max_size=5),
       compressed=st.booleans())
@settings(max_examples=25, deadline=None)
def test_malformed_rows_are_reported_with_line_numbers(tmp_path_factory, seed, n_good, bad, compressed):
    rng = random.Random(seed)
    rows = [_good_row(rng, i) for i in range(n_good)]
    for row in bad:
        rows.insert(rng.randint(0, len(rows)), row)
    bad_lines = sorted(i + 1 for i, row in enumerate(rows) if row in BAD_ROWS)
    path = tmp_path_factory.mktemp("jsonl") / ("data.jsonl.bz2" if compressed else "data.jsonl")
    _write_rows(path, rows)
    if bad_lines:
        with pytest.raises(JSONLError) as info:
            load_jsonl(str(path))
        assert [line for line, _ in info.value.errors] == bad_lines
        for line in bad_lines:
            assert f"{path}:{line}:" in str(info.value)
        with pytest.warns(UserWarning, match=", ".join(map(str, bad_lines))):
            task = JSONLMathTask(str(path), strict=False)
        assert [line for line, _ in task.errors] == bad_lines
    else:
        task = JSONLMathTask(str(path))
    assert len(task.problems) == n_good
    good_lines = [i + 1 for i, row in enumerate(rows) if row not in BAD_ROWS]
    assert [p["meta"]["line"] for p in task.problems] == good_lines
    for problem in task.problems:
        answer = int(problem["meta"]["answer"].replace(",", ""))
        assert 1 <= problem["level"] <= 10 and problem["type"] == "JSONLMath"
        assert task.verify(problem, "\n".join(task.solve(problem))) == Score.SOLVED
        assert task.verify(problem, f"I think \\boxed{{{answer}}}") == Score.SOLVED
        assert task.verify(problem, f"The answer is {answer + rng.randint(1, 99)}.") == Score.INCORRECT
        assert task.verify(problem, "I do not know.") == Score.INVALID
        assert task.check_partial(problem, ["Let me add the numbers."]) == Score.PARTIAL
        assert task.check_partial(problem, ["Adding:", f"#### {answer}"]) == Score.SOLVED
        assert task.check_partial(problem, [f"#### {answer + 1}"]) == Score.INCORRECT
        assert task.can_succeed(problem, []) is None


def test_custom_fields_and_missing_answers(tmp_path):
    path = tmp_path / "math.jsonl"
    _write_rows(path, [json.dumps({"problem": "Compute 1/2 + 1/4.", "solution": "$\\boxed{\\frac{3}{4}}$",
                                   "difficulty": "Level 4"})])
    task = JSONLMathTask(str(path), question_field="problem", answer_field="solution", level_field="difficulty")
    (problem,) = task.problems
    assert problem["level"] == 4 and problem["meta"]["answer"] == "\\frac{3}{4}"
    assert task.verify(problem, "It is 0.75") == Score.SOLVED
    with pytest.raises(JSONLError, match="missing field 'question'"):
        load_jsonl(str(path))
    _write_rows(path, [json.dumps({"question": "What is 2+2?", "answer": "four"})])
    with pytest.raises(JSONLError, match=r"math.jsonl:1: field 'answer' has no final answer .*'four'.*boxed"):
        load_jsonl(str(path))
    _write_rows(path, [json.dumps({"problem": "Compute 1/2 + 1/4.", "solution": "no answer"})])
    questions_only = JSONLMathTask(str(path), question_field="problem", answer_field=None)
    with pytest.raises(ValueError, match="no reference"):
        questions_only.solve(questions_only.problems[0])
    with pytest.raises(NotImplementedError, match="reads its problems from a file"):
        TASK.generate(0, 0.5)
