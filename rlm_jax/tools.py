"""Tool steps: a step may call a tool; the search runs it on the host between steps and writes the result
into the step before anything reads it (the next step's context, the value model, the verifier).

A task declares its tools by overriding `Task.call_tools(step) -> step` (the step's text with every tool
call in it executed; unchanged where it calls none):
- countdown and Game of 24 (`tasks/countdown.py`): the calculator. A step `a op b=...` gets the exact
  value of `a op b` after its `=`, whatever the model wrote there.
- JSONL math (`tasks/jsonl_math.py`): GSM8K's calculator annotations. In `<<48/2=...>>` (or an
  unfinished `<<48/2=`) the expression before `=` is evaluated by `evaluate_expression` (arithmetic only,
  with size and time limits) and the result is written after it: `<<48/2=24>>`.

`runner(tok, task, step_len)` is the batched host function a search calls (`LMSpec.tool`): proposals in
tokens -> the same proposals with their tools run. The model's own tokens are what it sampled and what
the counts of generated tokens count; the tool's result is context.
"""
from __future__ import annotations

import ast
import math
import operator
import time
from fractions import Fraction
from typing import Callable

import numpy as np

from rlm_jax import formatting

ToolRunner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10 ** 30
TIME_LIMIT_S = 0.05

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class ToolError(ValueError):
    """An expression the evaluator refuses or cannot finish: the step is left as the model wrote it."""


def evaluate_expression(text: str, time_limit_s: float = TIME_LIMIT_S) -> Fraction:
    """A sandboxed Python arithmetic expression -> its exact value (a Fraction).

    Only numbers (ints, decimals, `1,000`-style thousands), + - * / // % **, unary signs and parentheses
    are read: the expression is parsed with `ast` and walked here, never passed to `eval`, so names,
    calls, attributes and every other construct are refused. Limits: at most MAX_EXPRESSION_CHARS
    characters, exponents of at most MAX_EXPONENT, intermediate values of at most MAX_MAGNITUDE, and
    `time_limit_s` seconds of walking. Anything else raises ToolError."""
    text = text.strip().replace(",", "").replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression empty or longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {text!r}") from e
    deadline = time.monotonic() + time_limit_s

    def walk(node) -> Fraction:
        if time.monotonic() > deadline:
            raise ToolError(f"time limit ({time_limit_s} s) exceeded: {text!r}")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ToolError("not a finite number")
            value = Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            value = _UNARY[type(node.op)](walk(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                    raise ToolError(f"exponents must be integers of at most {MAX_EXPONENT}")
                if left == 0 and right < 0:
                    raise ToolError("division by zero")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            if isinstance(node.op, ast.FloorDiv):
                value = Fraction(value)
        else:
            raise ToolError(f"only numbers and + - * / // % ** are allowed: {text!r}")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError(f"a value exceeds {MAX_MAGNITUDE:.0e}")
        return value

    return walk(tree.body)


def format_value(value: Fraction) -> str:
    """An exact value as a calculator prints it: `24`, `-3`, `2.5`, `0.333333` (6 decimals, trailing zeros cut)."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def runner(tok, task, step_len: int) -> ToolRunner:
    """The host function of `LMSpec.tool`: proposals tokens [n, L] int32, mask [n, L] bool -> (tokens,
    mask) with each finished step's tools run (`task.call_tools`). A step keeps its terminator (step
    delimiter or EOS); a step whose rewritten form would exceed L tokens, or that did not end within L
    (truncated), is left as it was."""
    ends = {tok.step_id, tok.eos_id}

    def run(tokens: np.ndarray, mask: np.ndarray):
        tokens, mask = np.array(tokens), np.array(mask)
        for r in range(tokens.shape[0]):
            ids = tokens[r][mask[r]].tolist()
            if not ids or ids[-1] not in ends:
                continue
            text = formatting.step_text(tok, ids)
            new = task.call_tools(text)
            if new == text:
                continue
            new_ids = formatting.step_ids(tok, new, final=ids[-1] == tok.eos_id)
            if len(new_ids) > step_len:
                continue
            tokens[r] = tok.pad_id
            tokens[r, :len(new_ids)] = new_ids
            mask[r] = np.arange(step_len) < len(new_ids)
        return tokens, mask

    return run
