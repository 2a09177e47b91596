"""Multi-step integer arithmetic: reduce an expression one operation at a time.

Problem text: the expression followed by `=`, e.g. `(3+4)*5-6=` (the answer is not in it).
The prompt is the problem text; as in every task, steps follow it one per line.

Steps, one per line: the expression with exactly one operation (two integer operands) replaced by
its value, written with the fewest parentheses: `(3+4)*5-6` -> `7*5-6` -> `35-6` -> `29`. Any
operation whose operands are both numbers may be reduced (not only the leftmost); redundant
parentheses such as `(7)*5-6` and spaces are accepted. The last line, a lone integer, is the answer
(`verify` also reads it written `Answer: 29` or `=29`, or restated so after the last step).

Expressions: integers, binary `+ - *`, parentheses; `*` binds tighter, operators are
left-associative; a minus sign directly before a number makes it negative (`-5`, `3*-2`, `3-(-2)`).
Generated problems keep every sub-expression non-negative, so no step needs a minus sign, but
hand-written problems may go negative (`3-8=` has the answer `-5`). Level sets the size (`LEVELS`):
operations 1 -> 6, operands up to 9 (levels 1-5) or 99.

Scores: every step must be a correct one-operation reduction of the previous line (INVALID if a
line is not an expression, INCORRECT if it is not such a reduction; SOLVED once the expression is a
single integer, else PARTIAL). `check_partial` and `verify` apply the same rule, so a made-up
intermediate line fails the whole output, and an answer that skips steps is INCORRECT (a lone
answer only solves a one-operation problem).
"""
from __future__ import annotations

import random
import re
from typing import Sequence, Union

from rlm_jax.tasks.base import Capabilities, Problem, Score, StepTask, as_record, difficulty_to_level, split_steps

# An expression tree: an int, or (op, left, right).
Expr = Union[int, tuple]

# level -> (number of operations, largest operand)
LEVELS = {1: (1, 9), 2: (2, 9), 3: (2, 9), 4: (3, 9), 5: (3, 9),
          6: (4, 99), 7: (4, 99), 8: (5, 99), 9: (5, 99), 10: (6, 99)}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|(.))")
_ANSWER_RE = re.compile(r"^(answer\s*:|=)\s*", re.IGNORECASE)


def parse(text: str) -> Expr:
    """Parses `(3+4)*5-6` into a tree (recursive descent; never eval). ValueError on bad syntax."""
    tokens = []
    for m in _TOKEN_RE.finditer(text.strip()):
        if m.group(1) is not None:
            tokens.append(int(m.group(1)))
        elif m.group(2) in "+-*()":
            tokens.append(m.group(2))
        else:
            raise ValueError(f"unexpected character {m.group(2)!r} in {text!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        tok = peek()
        pos += 1
        return tok

    def binary(level: int) -> Expr:  # level 1: + -, level 2: *, level 3: atoms
        if level == 3:
            return atom()
        node = binary(level + 1)
        while isinstance(peek(), str) and _PRECEDENCE.get(peek()) == level:
            op = take()
            node = (op, node, binary(level + 1))
        return node

    def atom() -> Expr:
        at = pos
        tok = take()
        if isinstance(tok, int):
            return tok
        if tok == "-" and isinstance(peek(), int):  # A negative number.
            return -take()
        if tok == "(":
            node = binary(1)
            if take() != ")":
                raise ValueError(f"missing ')' in {text!r}")
            return node
        raise ValueError(f"expected a number or '(' at token {at} of {text!r}")

    tree = binary(1)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} at token {pos} of {text!r}")
    return tree


def evaluate(tree: Expr) -> int:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


def render(tree: Expr) -> str:
    """The tree with the fewest parentheses that parse back to it."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    prec = _PRECEDENCE[op]
    l, r = render(left), render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < prec:
        l = f"({l})"
    # Right operands of equal precedence need parentheses: left-associativity. A negative right
    # operand gets them too, for readability (`3-(-2)`, not `3--2`).
    if (right < 0) if isinstance(right, int) else (_PRECEDENCE[right[0]] <= prec):
        r = f"({r})"
    return f"{l}{op}{r}"


def reductions(tree: Expr) -> list[Expr]:
    """Every tree obtained by replacing one operation on two integers by its value."""
    if isinstance(tree, int):
        return []
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return [evaluate(tree)]
    return ([(op, l, right) for l in reductions(left)] +
            [(op, left, r) for r in reductions(right)])


def reduce_once(tree: Expr) -> Expr:
    """The conventional next step: the first operation in evaluation order (left to right)."""
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return evaluate(tree)
    if not isinstance(left, int):
        return (op, reduce_once(left), right)
    return (op, left, reduce_once(right))


def random_expression(rng: random.Random, n_ops: int, max_operand: int) -> Expr:
    """A random tree with `n_ops` operations and operands in 1..max_operand whose sub-expressions
    are all non-negative; products above 100 * max_operand become sums so numbers stay short."""
    if n_ops == 0:
        return rng.randint(1, max_operand)
    n_left = rng.randrange(n_ops)
    left = random_expression(rng, n_left, max_operand)
    right = random_expression(rng, n_ops - 1 - n_left, max_operand)
    a, b = evaluate(left), evaluate(right)
    op = rng.choice("+-*")
    if op == "*" and a * b > 100 * max_operand:
        op = "+"
    if op == "-" and a < b:
        left, right = right, left  # keep the difference non-negative
    return (op, left, right)


class ArithmeticTask(StepTask):
    name = "Arithmetic"
    # Every correct reduction keeps the value, so any valid prefix can be finished: `can_succeed` is exact.
    capabilities = Capabilities(exact_labels=True)

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        n_ops, max_operand = LEVELS[level]
        tree = random_expression(random.Random(seed), n_ops, max_operand)
        steps = _trace(tree)
        return as_record(self.name, level, render(tree) + "=", True, "\n".join(steps),
                         meta={"answer": evaluate(tree)})

    def solve(self, problem: Problem) -> list[str]:
        return _trace(problem_tree(problem))

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        """Each step must reduce the previous line by one operation (see the module docstring)."""
        tree = problem_tree(problem)
        for step in steps:
            try:
                nxt = parse(step)
            except ValueError:
                return Score.INVALID
            if nxt not in reductions(tree):
                return Score.INCORRECT
            tree = nxt
        return Score.SOLVED if isinstance(tree, int) else Score.PARTIAL

    def output_steps(self, output: str) -> list[str]:
        """`verify` grades every line as `check_partial` does; the last may be written `Answer: 29` or
        `=29`, and may restate the line before it."""
        steps = split_steps(output)
        if steps:
            steps[-1] = _ANSWER_RE.sub("", steps[-1])
            if len(steps) > 1 and steps[-1] == steps[-2]:
                steps.pop()  # "29" then "Answer: 29": the answer restated.
        return steps


def problem_tree(problem: Problem) -> Expr:
    """The expression of a record's text `(3+4)*5-6=`."""
    return parse(problem["problem"].strip().removesuffix("="))


def _trace(tree: Expr) -> list[str]:
    steps = []
    while not isinstance(tree, int):
        tree = reduce_once(tree)
        steps.append(render(tree))
    return steps
