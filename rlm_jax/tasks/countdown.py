"""Countdown and Game of 24: combine the given numbers with + - * / to reach a target.

Problem text (= the prompt): `Numbers: 3 7 12 Target: 26` (numbers sorted ascending, so a
problem's identity is its multiset). As in every task, steps follow the prompt one per line.

Steps, one per line: `a op b=c`, e.g. `7*4=28`, `12-2=10`, `8/3*9=24`. Each step takes two numbers
from the remaining multiset and puts `c` back; whitespace is free, `x`/`×` read as `*`, `÷` as `/`.
Fractions (Game of 24 only) are written `8/3` (optionally `(8/3)`), negatives `-2`.
The problem is solved when one number is left and it equals the target, so a solution has exactly
n - 1 steps. The verifier reads the numbers and the target from the problem text alone, strictly
(`parse_problem`): non-negative integers in ASCII digits, exactly the task's `n_numbers` numbers, and
nothing after the target; anything else is a ValueError naming the problem and what is expected.

Rules per preset (`CountdownTask` subclasses):
- "countdown" (Stream of Search): 4 numbers in 1..99, target 10..100, integers only, subtraction
  larger minus smaller, division only when exact.
- "countdown3" (CPU-sized): 3 numbers in 1..20, target 10..50, same integer rules.
- "game24" (Tree of Thoughts): 4 numbers in 1..13, target 24, exact fractions and negative
  intermediates allowed.

Difficulty: `generate` draws `pool` solvable candidate problems from the seed (numbers uniform,
target uniform, unsolvable draws rejected, as Stream of Search does) and ranks them by their number
of distinct solutions (step sequences, counting a+b and b+a once); level 1 takes the candidate with
the most solutions, level 10 the one with the fewest.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import random
import re
from fractions import Fraction
from typing import Sequence

from rlm_jax.tasks.base import Capabilities, Problem, Score, StepTask, as_record, difficulty_to_level

Number = int | Fraction

_PROBLEM_RE = re.compile(r"\s*Numbers:(?P<numbers>.*?)Target:(?P<target>.*)", re.DOTALL)
_PROBLEM_NUMBER_RE = re.compile(r"[0-9]+")  # A problem's numbers and target: non-negative integers.
_NUMBER_RE = re.compile(r"(-?[0-9]+(?:\s*/\s*[0-9]+)?)|\(\s*(-?[0-9]+\s*/\s*[0-9]+)\s*\)")
_OP_ALIASES = str.maketrans({"x": "*", "X": "*", "×": "*", "÷": "/", "−": "-"})


def parse_number(text: str) -> Number:
    """`12`, `-3`, `8/3` or `(8/3)` -> int or Fraction (ints whenever integral). ValueError otherwise."""
    m = _NUMBER_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a number: {text!r}")
    try:
        return _normalise(Fraction((m.group(1) or m.group(2)).replace(" ", "")))
    except ZeroDivisionError:  # `5/0`, as a policy may write it: not a number, so not a step
        raise ValueError(f"not a number (zero denominator): {text!r}") from None


def format_number(value: Number) -> str:
    """The step-text form of a number: `28`, `-2`, `8/3`."""
    return str(_normalise(Fraction(value)))


def _normalise(value: Number) -> Number:
    # ints stay ints (fast arithmetic, stable hashing); Fractions only where needed.
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return value


def parse_problem(text: str, n_numbers: int | None = None) -> tuple[list[int], int]:
    """`Numbers: 3 7 12 Target: 26` -> ([3, 7, 12], 26), strictly: the numbers and the target are
    non-negative integers in ASCII digits, nothing follows the target, and there are `n_numbers`
    numbers when given (at least 2 otherwise). ValueError naming the problem and what is expected."""
    expected = "expected 'Numbers: a b c Target: t' with non-negative integers (digits 0-9)"
    m = _PROBLEM_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a countdown problem ({expected}): {text!r}")
    numbers, target = m.group("numbers").split(), m.group("target").split()
    if len(target) != 1:
        raise ValueError(f"countdown problem {text!r}: {'no target' if not target else 'text after the target'}"
                         f" ({expected}, nothing after t)")
    for token in numbers + target:
        if not _PROBLEM_NUMBER_RE.fullmatch(token):
            negative = _PROBLEM_NUMBER_RE.fullmatch(token.removeprefix("-"))
            what = "a negative number" if negative else "not a non-negative integer"
            raise ValueError(f"countdown problem {text!r}: {token!r} is {what} ({expected})")
    if len(numbers) != (n_numbers or max(len(numbers), 2)):
        raise ValueError(f"countdown problem {text!r} has {len(numbers)} numbers; expected "
                         f"{n_numbers or 'at least 2'}")
    return [int(t) for t in numbers], int(target[0])


def format_problem(numbers: Sequence[Number], target: Number) -> str:
    return f"Numbers: {' '.join(format_number(n) for n in sorted(numbers))} Target: {format_number(target)}"


@dataclasses.dataclass(frozen=True)
class Rules:
    """Which operations are legal. `fractions`: exact rationals allowed (else exact integer division
    only); `non_negative`: subtraction must be larger minus smaller."""

    fractions: bool
    non_negative: bool

    def apply(self, a: Number, op: str, b: Number) -> Number | str:
        """The result of `a op b`, or a string saying which rule it breaks."""
        if op == "+":
            return a + b
        if op == "*":
            return a * b
        if op == "-":
            if self.non_negative and a < b:
                return "subtraction must be larger minus smaller"
            return a - b
        if op == "/":
            if b == 0:
                return "division by zero"
            if isinstance(a, int) and isinstance(b, int) and a % b == 0:
                return a // b
            if not self.fractions:
                return "division must be exact"
            return _normalise(Fraction(a) / Fraction(b))
        raise ValueError(f"unknown operation {op!r}")

    def pair_steps(self, small: Number, large: Number) -> list[tuple[Number, str, Number, Number]]:
        """The distinct legal steps (a, op, b, result) on two numbers, small <= large.
        Commutative operations appear once, larger operand first."""
        ops = [(large, "+", small), (large, "*", small), (large, "-", small), (large, "/", small)]
        if small != large:  # else b-a and b/a repeat a-b and a/b
            ops += [(small, "-", large), (small, "/", large)]
        out = []
        for a, op, b in ops:
            c = self.apply(a, op, b)
            if not isinstance(c, str):
                out.append((a, op, b, c))
        return out

    def moves(self, state: tuple[Number, ...]) -> list[tuple[Number, str, Number, Number, tuple[Number, ...]]]:
        """All distinct legal steps from a sorted multiset: (a, op, b, result, next sorted state)."""
        out, seen = [], set()
        for i in range(len(state)):
            for j in range(i + 1, len(state)):
                if (state[i], state[j]) in seen:  # equal values elsewhere give the same steps
                    continue
                seen.add((state[i], state[j]))
                rest = state[:i] + state[i + 1:j] + state[j + 1:]
                out += [(a, op, b, c, tuple(sorted(rest + (c,))))
                        for a, op, b, c in self.pair_steps(state[i], state[j])]
        return out


def final_values(state: tuple[Number, ...], rules: Rules) -> dict[Number, int]:
    """Every value reachable by using all numbers of the sorted multiset `state`, with the number
    of distinct step sequences reaching it. Do not mutate the result (it may be cached)."""
    if len(state) == 1:
        return {state[0]: 1}
    if len(state) == 2:  # cheap, and most states: computed, not cached, to keep the cache small
        return collections.Counter(c for _, _, _, c in rules.pair_steps(*state))
    return _cached_final_values(state, rules)


@functools.lru_cache(maxsize=1 << 12)
def _cached_final_values(state: tuple[Number, ...], rules: Rules) -> dict[Number, int]:
    # Memoised: the same states recur across step orders, problems, and check/can_succeed calls.
    counts: collections.Counter = collections.Counter()
    for *_, nxt in rules.moves(state):
        counts.update(final_values(nxt, rules))
    return dict(counts)


def parse_step(text: str) -> list[tuple[Number, str, Number, Number]]:
    """`7 * 4 = 28` -> [(7, '*', 4, 28)]. Several readings when fractions make it ambiguous
    (`8/3/4=2/3`); [] if the text is not a step."""
    left, eq, right = text.translate(_OP_ALIASES).partition("=")
    if not eq:
        return []
    try:
        c = parse_number(right)
    except ValueError:
        return []
    left = left.strip()
    readings = []
    for k, ch in enumerate(left):
        if ch in "+-*/" and k > 0:  # k > 0: a leading '-' is a sign, not an operation
            try:
                readings.append((parse_number(left[:k]), ch, parse_number(left[k + 1:]), c))
            except ValueError:
                continue
    return readings


def format_step(a: Number, op: str, b: Number, c: Number) -> str:
    return f"{format_number(a)}{op}{format_number(b)}={format_number(c)}"


class CountdownTask(StepTask):
    """Countdown with configurable rules; the presets below are the registered tasks."""

    name = "Countdown"
    capabilities = Capabilities(random_steps=True, solutions=True, replay=True, exact_labels=True)
    n_numbers = 4
    number_range = (1, 99)
    target_range = (10, 100)
    fractions = False
    non_negative = True
    pool = 10  # candidates ranked by solution count per generated problem (one per level)

    def __init__(self, n_numbers: int | None = None, number_range: tuple[int, int] | None = None,
                 target_range: tuple[int, int] | None = None, pool: int | None = None):
        self.n_numbers = n_numbers or self.n_numbers
        self.number_range = tuple(number_range or self.number_range)
        self.target_range = tuple(target_range or self.target_range)
        self.pool = pool or self.pool
        if self.n_numbers < 2:
            raise ValueError(f"n_numbers must be >= 2, got {self.n_numbers}")
        for label, (lo, hi) in (("number_range", self.number_range), ("target_range", self.target_range)):
            if lo > hi:
                raise ValueError(f"{label} must be (low, high) with low <= high, got {(lo, hi)}")
        self.rules = Rules(self.fractions, self.non_negative)

    # -- generation --------------------------------------------------------------------------
    def _candidate(self, rng: random.Random) -> tuple[tuple[int, ...], int, int]:
        """A random solvable (numbers, target, solution count); unsolvable draws are redrawn."""
        for _ in range(10_000):
            numbers = tuple(sorted(rng.randint(*self.number_range) for _ in range(self.n_numbers)))
            target = rng.randint(*self.target_range)
            count = final_values(numbers, self.rules).get(target, 0)
            if count:
                return numbers, target, count
        raise RuntimeError(f"{self.name}: no solvable problem in 10000 draws; widen number_range "
                           f"{self.number_range} or target_range {self.target_range}")

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        rng = random.Random(seed)
        candidates = [self._candidate(rng) for _ in range(self.pool)]
        # Most solutions first; stable sort keeps draw order among ties (deterministic).
        candidates.sort(key=lambda c: -c[2])
        numbers, target, count = candidates[round((level - 1) * (self.pool - 1) / 9)]
        text = format_problem(numbers, target)
        steps = self._solve(numbers, target)
        return as_record(self.name, level, text, count == 1, "\n".join(steps),
                         meta={"numbers": list(numbers), "target": target, "n_solutions": count})

    def random_steps(self, rng: random.Random, n: int) -> list[str]:
        """`n` legal steps of random playouts (uniform moves) from random number sets of this task's size and
        range, with no target: the arithmetic a base model knows (the pipeline's pretrain phase)."""
        out: list[str] = []
        while len(out) < n:
            state = tuple(sorted(rng.randint(*self.number_range) for _ in range(self.n_numbers)))
            while len(state) > 1 and len(out) < n:
                a, op, b, c, state = rng.choice(self.rules.moves(state))
                out.append(format_step(a, op, b, c))
        return out

    # -- protocol ----------------------------------------------------------------------------
    def parse_problem(self, problem: Problem) -> tuple[list[int], int]:
        """The record's numbers and target; ValueError unless it has this task's `n_numbers` numbers."""
        try:
            return parse_problem(problem["problem"], self.n_numbers)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def solve(self, problem: Problem) -> list[str]:
        return self._solve(*self.parse_problem(problem))

    def _solve(self, numbers: Sequence[Number], target: Number) -> list[str]:
        if target not in final_values(tuple(sorted(numbers)), self.rules):
            raise ValueError(f"{format_problem(numbers, target)} has no solution under {self.name}'s rules")
        return next(self._solution_paths(tuple(sorted(numbers)), target))

    def solutions(self, problem: Problem) -> list[list[str]]:
        """Every distinct solution (step sequences, a+b and b+a once: the problem's `n_solutions`), in the
        order of `solve`'s search (the first is `solve`'s)."""
        numbers, target = self.parse_problem(problem)
        return list(self._solution_paths(tuple(sorted(numbers)), target))

    def _solution_paths(self, state: tuple[Number, ...], target: Number):
        """Yields the step lists from sorted `state` to `target`, depth first in `rules.moves` order, entering
        only moves whose resulting state can still reach the target."""
        if len(state) == 1:
            if state[0] == target:
                yield []
            return
        for a, op, b, c, nxt in self.rules.moves(state):
            if target in final_values(nxt, self.rules):
                for rest in self._solution_paths(nxt, target):
                    yield [format_step(a, op, b, c)] + rest

    def replay(self, problem: Problem, steps: Sequence[str]) -> tuple[Score, list[Number], Number, str]:
        """Replays `steps`: (score, numbers left, target, reason the score is not PARTIAL/SOLVED)."""
        numbers, target = self.parse_problem(problem)
        left = list(numbers)
        for i, step in enumerate(steps):
            readings = parse_step(step)
            if not readings:
                return Score.INVALID, left, target, f"step {i + 1} {step!r} is not 'a op b=c'"
            if len(left) < 2:
                return Score.INCORRECT, left, target, f"step {i + 1}: no numbers left to combine"
            reason = ""
            for a, op, b, c in readings:
                rest = list(left)
                try:
                    rest.remove(a)
                    rest.remove(b)
                except ValueError:
                    reason = f"step {i + 1} {step!r}: operands not among the numbers left {left}"
                    continue
                result = self.rules.apply(a, op, b)
                if isinstance(result, str):
                    reason = f"step {i + 1} {step!r}: {result}"
                elif result != c:
                    reason = f"step {i + 1} {step!r}: {format_step(a, op, b, result)}"
                else:
                    left = rest + [c]
                    break
            else:
                return Score.INCORRECT, left, target, reason
        if len(left) == 1:
            if left[0] == target:
                return Score.SOLVED, left, target, ""
            return Score.INCORRECT, left, target, f"final number {format_number(left[0])} is not the target"
        return Score.PARTIAL, left, target, ""

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        return self.replay(problem, steps)[0]

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> bool:
        score, left, target, _ = self.replay(problem, steps)
        return score.valid and target in final_values(tuple(sorted(left)), self.rules)


class Countdown3Task(CountdownTask):
    """3 small numbers and a small target: short prompts and steps for a tiny model on a CPU."""

    name = "Countdown3"
    n_numbers = 3
    number_range = (1, 20)
    target_range = (10, 50)


class Game24Task(CountdownTask):
    """Game of 24: 4 numbers in 1..13, target 24, fractions and negative intermediates allowed."""

    name = "Game24"
    number_range = (1, 13)
    target_range = (24, 24)
    fractions = True
    non_negative = False
