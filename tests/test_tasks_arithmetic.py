"""Multi-step arithmetic: the parser, generation, and the step checker against an independent oracle
built on Python's own `ast` module (used here only as a reference parser; nothing is eval'd)."""
import ast
import operator
import random

from hypothesis import given, settings, strategies as st

from rlm_jax.tasks.arithmetic import LEVELS, ArithmeticTask, evaluate, parse, random_expression, render
from rlm_jax.tasks.base import Score, level_to_difficulty, split_steps

TASK = ArithmeticTask()
_PY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def py_value(text):
    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        return _PY_OPS[type(node.op)](value(node.left), value(node.right))
    return value(ast.parse(text, mode="eval").body)


def _reducible(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.BinOp)
            and isinstance(n.left, ast.Constant) and isinstance(n.right, ast.Constant)]


def py_reductions(text):
    """Python-ast texts of every one-operation reduction of `text`."""
    out = []
    for index in range(len(_reducible(ast.parse(text, mode="eval")))):
        tree = ast.parse(text, mode="eval")
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
        step_dump = ast.dump(ast.parse(step, mode="eval").body)
    except SyntaxError:
        return False
    return step_dump in {ast.dump(ast.parse(r, mode="eval").body) for r in py_reductions(prev)}


@given(seed=st.integers(0, 2**32), n_ops=st.integers(0, 8), max_operand=st.sampled_from([9, 99, 999]))
@settings(max_examples=60, deadline=None)
def test_render_parse_round_trip_and_value(seed, n_ops, max_operand):
    tree = random_expression(random.Random(seed), n_ops, max_operand)
    text = render(tree)
    assert parse(text) == tree
    assert parse(ast.unparse(ast.parse(text, mode="eval"))) == tree  # Python's spacing/parens
    assert evaluate(tree) == py_value(text)
    assert text.count("+") + text.count("-") + text.count("*") == n_ops


@given(seed=st.integers(0, 2**32), level=st.integers(1, 10))
@settings(max_examples=40, deadline=None)
def test_generated_problems_solve_and_verify(seed, level):
    problem = TASK.generate(seed, level_to_difficulty(level))
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
    assert TASK.generate(seed, level_to_difficulty(level)) == problem


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


@given(seed=st.integers(0, 2**32), level=st.integers(1, 10), delta=st.integers(1, 1000))
@settings(max_examples=30, deadline=None)
def test_verify_grades_the_final_answer(seed, level, delta):
    problem = TASK.generate(seed, level_to_difficulty(level))
    steps = split_steps(problem["solution"])
    answer = int(steps[-1])
    assert TASK.verify(problem, "\n".join(steps[:-1] + [str(answer + delta)])) == Score.INCORRECT
    assert TASK.check_partial(problem, steps[:-1] + [str(answer + delta)]) == Score.INCORRECT
    assert TASK.verify(problem, f"Answer: {answer}") == Score.SOLVED  # no steps: answer-only grading
    assert TASK.verify(problem, "\n".join(steps[:-1] + [f"{answer}?"])) == Score.INVALID
    assert TASK.verify(problem, "") == Score.INVALID
    if len(steps) > 1:
        assert TASK.verify(problem, steps[0]) == Score.PARTIAL  # unreduced but equal in value
        assert TASK.check_partial(problem, [str(answer)]) == Score.INCORRECT  # skipped steps
        assert not TASK.can_succeed(problem, [str(answer)])
