"""Tool steps (rlm_jax/tools.py): the sandboxed expression evaluator against Python's own arithmetic, the
countdown calculator against brute force, GSM8K's calculator annotations, the batched host runner on a real
tokenizer, and a countdown search whose steps go through the calculator."""
import ast
import random
from fractions import Fraction

import numpy as np
import pytest

from rlm_jax import formatting, tools
from rlm_jax import tokenizer as tk
from rlm_jax.tasks.countdown import CountdownTask, calculate, parse_step
from rlm_jax.tasks.jsonl_math import JSONLMathTask


def _expression(rng: random.Random, depth: int) -> str:
    """A random expression whose every intermediate value stays within the evaluator's limits: leaves of
    at most 61 and exponents of at most 2, so each level at most squares the magnitude (a quotient's too:
    a divisor is no smaller than the reciprocal of the values below it): 4 levels stay under 61 ** 16 =
    4e28 < MAX_MAGNITUDE (20,000 draws checked when this was written)."""
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 60)) if rng.random() < 0.8 else f"{rng.randint(1, 60)}.{rng.randint(1, 9)}"
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    left, right = _expression(rng, depth - 1), _expression(rng, depth - 1)
    if op == "**":
        right = str(rng.randint(0, 2))
    text = f"{left} {op} {right}"
    return f"({text})" if rng.random() < 0.5 else text


class _AllFractions(ast.NodeTransformer):
    """Wraps every literal and every operation's result in Fraction: `a // b` of two Fractions is an int,
    and Python's int / int is a float, so wrapping the literals alone would not keep the reference exact."""

    def visit_Constant(self, node):
        return ast.Call(ast.Name("Fraction", ast.Load()), [ast.Constant(repr(node.value))], [])

    def visit_BinOp(self, node):
        return ast.Call(ast.Name("Fraction", ast.Load()), [self.generic_visit(node)], [])


def _exact_python(text: str) -> Fraction:
    """Python's own parse and evaluation of `text` in exact rational arithmetic: the independent reference."""
    tree = ast.fix_missing_locations(_AllFractions().visit(ast.parse(text, mode="eval")))
    return eval(compile(tree, "<expression>", "eval"), {"__builtins__": {}, "Fraction": Fraction})


def test_the_evaluator_computes_what_python_computes():
    """Fresh random expressions (+ - * / // % ** on ints and decimals, nested): the value equals Python's
    own evaluation of the same text with every literal and every intermediate an exact Fraction (Python
    parses and orders the operations), and division by zero is refused where Python raises."""
    rng = random.Random()
    checked = 0
    for _ in range(400):
        text = _expression(rng, 4)
        try:
            want = _exact_python(text)
        except ZeroDivisionError:
            with pytest.raises(tools.ToolError):
                tools.evaluate_expression(text)
            continue
        assert tools.evaluate_expression(text) == want, text
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "x + 1", "open('f')", "(1).real",
                                  "[1, 2]", "lambda: 1", "2 ** 100", "9 ** 9 ** 9", "1e999", "'a' * 3",
                                  "1 +", "1" * 201, ""])
def test_the_evaluator_refuses_everything_but_bounded_arithmetic(text):
    with pytest.raises(tools.ToolError):
        tools.evaluate_expression(text)


def test_the_evaluator_has_a_time_limit():
    with pytest.raises(tools.ToolError, match="time limit"):
        tools.evaluate_expression("+".join(["1"] * 60), time_limit_s=0.0)
    assert tools.evaluate_expression("+".join(["1"] * 60)) == 60


def test_the_countdown_calculator_writes_the_true_value():
    """Random `a op b=c` with a wrong or missing c: the calculator's step has the true value, which the
    task's own step parser reads back; a step that is not one operation stays as written."""
    rng = random.Random()
    for _ in range(300):
        a, b, op = rng.randint(0, 99), rng.randint(1, 99), rng.choice("+-*/x")
        wrong = rng.choice(["", str(rng.randint(-50, 500)), "?"])
        step = calculate(f"{a}{op}{b}={wrong}")
        want = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "/": Fraction(a, b)}[op]
        ((ra, rop, rb, rc),) = parse_step(step)
        assert (ra, rb, rc) == (a, b, want), step
    for text in ("5/0=1", "no step", "3+4", "1+2+3=6"):
        assert calculate(text) == text


def test_gsm8k_annotations_are_evaluated_in_place():
    task = JSONLMathTask()
    assert task.call_tools("She sold <<48/2=23>>23 clips") == "She sold <<48/2=24>>23 clips"
    assert task.call_tools("so <<48/2=") == "so <<48/2=24>>"
    assert task.call_tools("<<1/4=>> and <<3*4=12>>") == "<<1/4=0.25>> and <<3*4=12>>"
    assert task.call_tools("<<2**100=1>> <<x=2>>") == "<<2**100=1>> <<x=2>>"  # refused: left as written
    assert task.call_tools("no annotation 48/2=23") == "no annotation 48/2=23"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    task = CountdownTask(n_numbers=3)
    rng = random.Random(0)
    texts = [task.prompt(task.generate(seed=s, difficulty=0.5)) + "\n" + "\n".join(task.random_steps(rng, 3))
             for s in range(200)]
    return tk.SentencePieceTokenizer.train(texts, vocab_size=300, out=tmp_path_factory.mktemp("tok"))


def test_the_runner_rewrites_finished_steps_in_tokens(tok):
    """Proposals in tokens: finished steps (STEP or EOS) get the calculator's value and keep their
    terminator; a truncated step and a step that calls nothing are left alone; a result that would not
    fit in L tokens leaves the step as it was."""
    task, length = CountdownTask(n_numbers=3), 12
    steps = [("7*4=29", False), ("12-5=", True), ("3+4", False), ("9*9=1", False)]
    rows = [formatting.step_ids(tok, s, final=f) for s, f in steps] + [tok.encode("1+1=5")[:length]]
    tokens = np.full((len(rows), length), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, True
    out, out_mask = tools.runner(tok, task, length)(tokens, mask)
    text = lambda r: formatting.step_text(tok, out[r][out_mask[r]])
    assert [text(r) for r in range(4)] == ["7*4=28", "12-5=7", "3+4", "9*9=81"]
    assert out[0][out_mask[0]][-1] == tok.step_id and out[1][out_mask[1]][-1] == tok.eos_id
    np.testing.assert_array_equal(out[4], tokens[4])  # truncated: no terminator, not a finished step
    tight, tight_mask = tools.runner(tok, task, len(rows[3]))(tokens[3:4, :len(rows[3])], mask[3:4, :len(rows[3])])
    np.testing.assert_array_equal(tight, tokens[3:4, :len(rows[3])])  # `9*9=81` is one token too long
