"""Multi-step arithmetic: the parser, generation, and the step checker against an independent oracle
built on Python's own `ast` module (used here only as a reference parser; nothing is eval'd)."""
import ast
import operator
import random

import pytest
from hypothesis import given, settings, strategies as st

from rlm_jax.tasks.arithmetic import LEVELS, ArithmeticTask, evaluate, parse, random_expression, render
from rlm_jax.tasks.base import Score, difficulty_for, level_to_difficulty, split_steps

TASK = ArithmeticTask()
_PY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def py_value(text):
    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        return _PY_OPS[type(node.op)](value(node.left), value(node.right))
    return value(ast.parse(text, mode="eval").body)


class _FoldNegatives(ast.NodeTransformer):
    """Python reads `-5` as minus applied to 5; our grammar reads a negative number: fold it."""

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return ast.Constant(-node.operand.value)
        return node


def py_parse(text):
    return _FoldNegatives().visit(ast.parse(text, mode="eval"))


def _reducible(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.BinOp)
            and isinstance(n.left, ast.Constant) and isinstance(n.right, ast.Constant)]


def py_reductions(text):
    """Python-ast texts of every one-operation reduction of `text`."""
    out = []
    for index in range(len(_reducible(py_parse(text)))):
        tree = py_parse(text)
        target = _reducible(tree)[index]

        class Replace(ast.NodeTransformer):
            def visit_BinOp(self, node):
                if node is target:
                    return ast.Constant(_PY_OPS[type(node.op)](node.left.value, node.right.value))
                return self.generic_visit(node)

        out.append(ast.unparse(Replace().visit(tree)))
    return out


def py_is_reduction(prev, step):
    try:
        step_dump = ast.dump(py_parse(step).body)
    except SyntaxError:
        return False
    return step_dump in {ast.dump(py_parse(r).body) for r in py_reductions(prev)}


@given(seed=st.integers(0, 2**32), n_ops=st.integers(0, 8), max_operand=st.sampled_from([9, 99, 999]))
@settings(max_examples=60, deadline=None)
def test_render_parse_round_trip_and_value(seed, n_ops, max_operand):
    tree = random_expression(random.Random(seed), n_ops, max_operand)
    text = render(tree)
    assert parse(text) == tree
    assert parse(ast.unparse(ast.parse(text, mode="eval"))) == tree  # Python's spacing/parens
    assert evaluate(tree) == py_value(text)
    assert text.count("+") + text.count("-") + text.count("*") == n_ops


@pytest.mark.parametrize("level", range(1, 11))
@given(seed=st.integers(0, 2**32))
@settings(max_examples=4, deadline=None)
def test_generated_problems_solve_and_verify(level, seed):
    problem = TASK.generate(seed, difficulty_for(level, seed))
    n_ops, max_operand = LEVELS[level]
    text = problem["problem"]
    assert problem["level"] == level and text.endswith("=")
    expression = text[:-1]
    assert sum(expression.count(op) for op in "+-*") == n_ops
    numbers = [int(t) for t in expression.replace("(", " ").replace(")", " ")
               .replace("+", " ").replace("-", " ").replace("*", " ").split()]
    assert all(1 <= x <= max_operand for x in numbers)
    steps = TASK.solve(problem)
    assert len(steps) == n_ops
    assert int(steps[-1]) == py_value(expression) == problem["meta"]["answer"]
    assert TASK.verify(problem, "\n".join(steps)) == Score.SOLVED
    assert TASK.check_partial(problem, steps) == Score.SOLVED
    previous = expression
    for k, step in enumerate(steps):
        assert py_is_reduction(previous, step)
        assert py_value(step) >= 0 and not step.startswith("-")  # no step ever needs a minus sign
        assert TASK.check_partial(problem, steps[:k + 1]) == (Score.SOLVED if k == n_ops - 1 else Score.PARTIAL)
        previous = step
    assert TASK.generate(seed, difficulty_for(level, seed)) == problem


def _mutations(rng, prev):
    """Candidate next steps: correct reductions (Python-ast spelling), and near-misses."""
    good = py_reductions(prev)
    step = rng.choice(good)
    candidates = [step, prev]
    digits = [i for i, ch in enumerate(step) if ch.isdigit()]
    i = rng.choice(digits)
    candidates.append(step[:i] + str((int(step[i]) + rng.randint(1, 9)) % 10) + step[i + 1:])
    ops = [i for i, ch in enumerate(step) if ch in "+-*"]
    if ops:
        i = rng.choice(ops)
        candidates.append(step[:i] + rng.choice([o for o in "+-*" if o != step[i]]) + step[i + 1:])
        further = py_reductions(step)
        candidates.append(rng.choice(further))  # two operations in one step
    candidates.append(step.replace("(", "", 1).replace(")", "", 1))  # dropped parentheses
    return candidates


@given(seed=st.integers(0, 2**32), level=st.integers(2, 10))
@settings(max_examples=40, deadline=None)
def test_step_checker_agrees_with_ast_oracle(seed, level):
    rng = random.Random(seed)
    problem = TASK.generate(seed, level_to_difficulty(level))
    prev = problem["problem"][:-1]
    prefix = []
    while True:
        for candidate in _mutations(rng, prev):
            try:
                ast.parse(candidate, mode="eval")
            except SyntaxError:
                continue  # e.g. a leading zero: the oracle cannot read it
            valid = TASK.check_partial(problem, prefix + [candidate]) in (Score.PARTIAL, Score.SOLVED)
            assert valid == py_is_reduction(prev, candidate), (prev, candidate)
            assert TASK.can_succeed(problem, prefix + [candidate]) == valid
        step = rng.choice(py_reductions(prev))  # any order of reductions is allowed
        prefix.append(step)
        prev = step
        if isinstance(ast.parse(step, mode="eval").body, ast.Constant):
            break
    assert TASK.check_partial(problem, prefix) == Score.SOLVED


@given(seed=st.integers(0, 2**32), level=st.integers(1, 10), delta=st.integers(1, 1000), data=st.data())
@settings(max_examples=30, deadline=None)
def test_verify_grades_every_step(seed, level, delta, data):
    problem = TASK.generate(seed, level_to_difficulty(level))
    steps = split_steps(problem["solution"])
    answer = int(steps[-1])
    for output in (steps, steps + [f"Answer: {answer}"], steps[:-1] + [f"= {answer}"]):
        assert TASK.verify(problem, "\n".join(output)) == Score.SOLVED
    assert TASK.verify(problem, "\n".join(steps[:-1] + [str(answer + delta)])) == Score.INCORRECT
    assert TASK.check_partial(problem, steps[:-1] + [str(answer + delta)]) == Score.INCORRECT
    assert TASK.verify(problem, "\n".join(steps + [f"Answer: {answer + delta}"])) == Score.INCORRECT
    assert TASK.verify(problem, "\n".join(steps[:-1] + [f"{answer}?"])) == Score.INVALID
    assert TASK.verify(problem, "") == Score.INVALID
    # A lone answer solves a one-operation problem only; more operations need their steps.
    lone = Score.SOLVED if len(steps) == 1 else Score.INCORRECT
    assert TASK.verify(problem, f"Answer: {answer}") == lone == TASK.check_partial(problem, [str(answer)])
    if len(steps) > 1:
        assert TASK.verify(problem, steps[0]) == Score.PARTIAL  # unreduced but equal in value
        assert not TASK.can_succeed(problem, [str(answer)])
        # A made-up intermediate line fails the output even though the final answer is right.
        k = data.draw(st.integers(0, len(steps) - 2))
        made_up = steps[:k] + [str(evaluate(parse(steps[k])) + delta)] + steps[k + 1:]
        assert TASK.verify(problem, "\n".join(made_up)) == Score.INCORRECT
        assert TASK.verify(problem, "\n".join(steps[:k] + ["Let me think."] + steps[k:])) == Score.INVALID


def _flat_expression(numbers, ops):
    return "".join(f"{n}{op}" for n, op in zip(numbers, ops)) + str(numbers[-1])


@given(numbers=st.lists(st.integers(0, 20), min_size=2, max_size=5), data=st.data())
@settings(max_examples=30, deadline=None)
def test_negative_values_parse_and_verify(numbers, data):
    """Hand-written problems may go negative (`3-8=` -> `-5`); the generator never does."""
    ops = data.draw(st.lists(st.sampled_from("+-*"), min_size=len(numbers) - 1, max_size=len(numbers) - 1))
    text = _flat_expression(numbers, ops)
    problem = {"problem": text + "="}
    value = py_value(text)
    steps = TASK.solve(problem)
    assert int(steps[-1]) == value and TASK.verify(problem, "\n".join(steps)) == Score.SOLVED
    previous = text
    for step in steps:  # every step a reduction, and the value kept, by Python's reading of the text
        assert py_value(step) == value and py_is_reduction(previous, step), (previous, step)
        previous = step
    lone = Score.SOLVED if len(ops) == 1 else Score.INCORRECT
    assert TASK.verify(problem, f"Answer: {value}") == lone
    assert TASK.verify(problem, "\n".join(steps[:-1] + [str(value - 1)])) == Score.INCORRECT
    assert parse(f"{value}") == value and parse(f"3*{value}") == ("*", 3, value)
    assert parse(render(("-", 3, value))) == ("-", 3, value)
