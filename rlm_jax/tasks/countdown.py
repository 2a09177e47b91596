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
import math
import operator
import random
import re
from fractions import Fraction
from typing import Sequence

import numpy as np

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


# -- batched solution counts (generation) ------------------------------------------------------------------
# `generate` rejects unsolvable draws (countdown: ~88% of them) and ranks the rest by their solution count, so it
# counts ~80 draws a problem; counting a batch of them in numpy is ~10x faster than `final_values` one by one and
# gives the same numbers (tests/test_tasks_countdown.py compares them).

def solution_counts(states: Sequence[Sequence[int]], targets: Sequence[int], rules: Rules) -> np.ndarray:
    """`final_values(state, rules).get(target, 0)` for a batch: `states` [B, k] sorted ints, `targets` [B] ints.
    Enumerates the step sequences `Rules.moves` does: a pair of the same values as an earlier pair once, then
    each legal step of the pair (`Rules.pair_steps`); numbers are integers, or with `rules.fractions` exact
    rationals (numerator, denominator)."""
    n = np.asarray(states, np.int64).reshape(len(targets), -1)
    d = np.ones_like(n)
    row = np.arange(len(n))
    results = _rational_steps if rules.fractions else _int_steps
    while n.shape[1] > 2:
        k = n.shape[1]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        ns, ds, rows = [], [], []
        for p, (i, j) in enumerate(pairs):
            dup = np.zeros(len(n), bool)
            for i2, j2 in pairs[:p]:
                dup |= (n[:, i2] == n[:, i]) & (d[:, i2] == d[:, i]) & (n[:, j2] == n[:, j]) & (d[:, j2] == d[:, j])
            keep = [c for c in range(k) if c not in (i, j)]
            for cn, cd, legal in results(n[:, i], d[:, i], n[:, j], d[:, j], rules):
                m = legal & ~dup
                sn = np.concatenate([n[m][:, keep], cn[m, None]], 1)
                if rules.fractions:  # the next state sorted by value, as `moves` sorts it
                    sd = np.concatenate([d[m][:, keep], cd[m, None]], 1)
                    order = np.argsort(sn / sd, axis=1)
                    ns.append(np.take_along_axis(sn, order, 1))
                    ds.append(np.take_along_axis(sd, order, 1))
                else:  # integers: denominators stay 1
                    ns.append(np.sort(sn, axis=1))
                    ds.append(np.ones_like(sn))
                rows.append(row[m])
        n, d, row = np.concatenate(ns), np.concatenate(ds), np.concatenate(rows)
    t = np.asarray(targets, np.int64)[row]
    hits = sum((legal & (cn == t * cd)).astype(np.int64)
               for cn, cd, legal in results(n[:, 0], d[:, 0], n[:, 1], d[:, 1], rules))
    return np.bincount(row, weights=hits, minlength=len(targets)).astype(np.int64)


def _int_steps(an, ad, bn, bd, rules: Rules):
    """(value, 1, legal) of `pair_steps(a, b)`'s steps b+a, b*a, b-a, b/a, a-b, a/b on integers a <= b."""
    a, b, one = an, bn, ad
    differ = a != b
    sa, sb = np.where(a == 0, 1, a), np.where(b == 0, 1, b)
    yes = np.ones_like(differ)
    return [(b + a, one, yes), (b * a, one, yes), (b - a, one, yes), (b // sa, one, (a != 0) & (b % sa == 0)),
            (a - b, one, differ & (not rules.non_negative)), (a // sb, one, differ & (b != 0) & (a % sb == 0))]


def _rational_steps(an, ad, bn, bd, rules: Rules):
    """The same on exact rationals a <= b (numerator, denominator > 0), results in lowest terms."""
    differ = (an != bn) | (ad != bd)
    yes = np.ones_like(differ)
    out = []
    for n, d, legal in [(bn * ad + an * bd, ad * bd, yes), (an * bn, ad * bd, yes), (bn * ad - an * bd, ad * bd, yes),
                        (bn * ad, bd * an, an != 0), (an * bd - bn * ad, ad * bd, differ & (not rules.non_negative)),
                        (an * bd, ad * bn, differ & (bn != 0))]:
        d = np.where(d == 0, 1, d)
        n, d = np.where(d < 0, -n, n), np.abs(d)
        g = np.gcd(n, d)
        out.append((n // g, d // g, legal))
    return out


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


BACKTRACK = "back"  # a search trace's step that returns to the state before the previous step (`search_trace`)
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def calculate(text: str) -> str:
    """The countdown calculator (a tool step): `7*4=...` -> `7*4=28`, whatever followed `=`: the exact
    value of the operation before it (fractions as `8/3`, whether or not the task's rules allow them:
    the verifier still judges the step). Unchanged if the text before `=` is not one operation on two
    numbers, reads several ways with different values, or divides by zero."""
    left, eq, _ = text.partition("=")
    if not eq:
        return text
    expr = left.translate(_OP_ALIASES).strip()
    values = set()
    for k, ch in enumerate(expr):
        if ch in "+-*/" and k > 0:
            try:
                a, b = Fraction(parse_number(expr[:k])), Fraction(parse_number(expr[k + 1:]))
            except ValueError:
                continue
            if ch == "/" and b == 0:
                continue
            values.add(_ARITHMETIC[ch](a, b))
    if len(values) != 1:
        return text
    return f"{left}={format_number(values.pop())}"


def format_step(a: Number, op: str, b: Number, c: Number) -> str:
    return f"{format_number(a)}{op}{format_number(b)}={format_number(c)}"


class CountdownTask(StepTask):
    """Countdown with configurable rules; the presets below are the registered tasks."""

    name = "Countdown"
    capabilities = Capabilities(random_steps=True, solutions=True, replay=True, exact_labels=True, search_traces=True)
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
    def _candidates(self, rng: random.Random, k: int) -> list[tuple[tuple[int, ...], int, int]]:
        """The first `k` solvable draws of `rng` (numbers uniform, target uniform; unsolvable ones rejected), as
        (numbers, target, solution count). Draws are counted in batches (`solution_counts`) sized from the
        solvable share so far; the draws past the k-th are discarded, so the result is that of drawing one by one."""
        found, drawn, misses = [], 0, 0
        while len(found) < k:
            batch = math.ceil((k - len(found)) * (drawn + 2) / (len(found) + 1) * 1.2)
            draws = [(tuple(sorted(rng.randint(*self.number_range) for _ in range(self.n_numbers))),
                      rng.randint(*self.target_range)) for _ in range(batch)]
            drawn += batch
            for (numbers, target), count in zip(draws, self._counts(draws)):
                if count:
                    found.append((numbers, target, int(count)))
                    misses = 0
                    if len(found) == k:
                        break
                else:
                    misses += 1
                    if misses >= 10_000:
                        raise RuntimeError(f"{self.name}: no solvable problem in 10000 draws; widen number_range "
                                           f"{self.number_range} or target_range {self.target_range}")
        return found

    def _counts(self, draws: Sequence[tuple[tuple[int, ...], int]]) -> list[int]:
        """Solution counts of (numbers, target) draws, remembered (small spaces such as game24's 1,820 number sets
        recur across problems); new ones batched in numpy while its int64 arithmetic is exact (every intermediate
        below 2**62; rationals cross-multiply, hence the square), else one by one."""
        cache = self.__dict__.setdefault("_count_cache", {})
        if len(cache) > 1 << 16:
            cache.clear()
        new = list({d for d in draws if d not in cache})
        largest = max(abs(self.number_range[0]), abs(self.number_range[1]), 2) ** self.n_numbers
        if new and (largest ** 2 if self.fractions else largest) * max(map(abs, self.target_range)) < 2 ** 62:
            cache.update(zip(new, solution_counts([n for n, _ in new], [t for _, t in new], self.rules).tolist()))
        else:
            cache.update((d, final_values(d[0], self.rules).get(d[1], 0)) for d in new)
        return [cache[d] for d in draws]

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        rng = random.Random(seed)
        candidates = self._candidates(rng, self.pool)
        # Most solutions first; stable sort keeps draw order among ties (deterministic).
        candidates.sort(key=lambda c: -c[2])
        numbers, target, count = candidates[round((level - 1) * (self.pool - 1) / 9)]
        text = format_problem(numbers, target)
        steps = self._solve(numbers, target)
        return as_record(self.name, level, text, count == 1, "\n".join(steps),
                         meta={"numbers": list(numbers), "target": target, "n_solutions": count})

    def problem_space(self, levels: Sequence[int]) -> int:
        """Multisets of n_numbers numbers times targets: every level draws from the same space."""
        lo, hi = self.number_range
        return math.comb(hi - lo + self.n_numbers, self.n_numbers) * (self.target_range[1] - self.target_range[0] + 1)

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

    def search_trace(self, problem: Problem, max_steps: int) -> list[str] | None:
        """Stream of Search's data: the linearised trace of a heuristic depth-first search, every step it
        tries in order, `back` (BACKTRACK) where it returns from a dead end to the state before the
        last step, ending with the first solution it finds. Children are tried closest result to the
        target first (SoS's heuristic DFS). A state of two numbers is settled in one look (its children
        are final numbers, checked as SoS checks a generated node for the goal): the trace writes the
        step that reaches the target, or backtracks at once. None if the trace would take more than
        `max_steps` steps."""
        numbers, target = self.parse_problem(problem)
        trace: list[str] = []

        def dfs(state: tuple[Number, ...]) -> bool:
            if len(state) == 2:
                last = [m for m in self.rules.moves(state) if m[3] == target]
                if last:
                    trace.append(format_step(*last[0][:4]))
                return bool(last)
            for a, op, b, c, nxt in sorted(self.rules.moves(state), key=lambda m: (abs(m[3] - target), m[:3])):
                trace.append(format_step(a, op, b, c))
                if len(trace) > max_steps or dfs(nxt):
                    return True
                trace.append(BACKTRACK)
            return False

        found = dfs(tuple(sorted(numbers)))
        return trace if found and len(trace) <= max_steps else None

    def _solve(self, numbers: Sequence[Number], target: Number) -> list[str]:
        # The first solution of the depth-first search; unpruned, since checking a subtree costs what searching it
        # does (the pruned search of `solutions` yields the same solutions in the same order).
        first = next(self._solution_paths(tuple(sorted(numbers)), target, prune=False), None)
        if first is None:
            raise ValueError(f"{format_problem(numbers, target)} has no solution under {self.name}'s rules")
        return first

    def solutions(self, problem: Problem) -> list[list[str]]:
        """Every distinct solution (step sequences, a+b and b+a once: the problem's `n_solutions`), in the
        order of `solve`'s search (the first is `solve`'s)."""
        numbers, target = self.parse_problem(problem)
        return list(self._solution_paths(tuple(sorted(numbers)), target))

    def _solution_paths(self, state: tuple[Number, ...], target: Number, prune: bool = True):
        """Yields the step lists from sorted `state` to `target`, depth first in `rules.moves` order, entering
        (with `prune`) only moves whose resulting state can still reach the target."""
        if len(state) == 1:
            if state[0] == target:
                yield []
            return
        for a, op, b, c, nxt in self.rules.moves(state):
            if not prune or target in final_values(nxt, self.rules):
                for rest in self._solution_paths(nxt, target, prune):
                    yield [format_step(a, op, b, c)] + rest

    def replay(self, problem: Problem, steps: Sequence[str]) -> tuple[Score, list[Number], Number, str]:
        """Replays `steps`: (score, numbers left, target, reason the score is not PARTIAL/SOLVED)."""
        numbers, target = self.parse_problem(problem)
        left, undo = list(numbers), []
        for i, step in enumerate(steps):
            if step.strip().lower() == BACKTRACK:  # a search trace's return to the state before the last step
                if not undo:
                    return Score.INVALID, left, target, f"step {i + 1} {step!r}: no step to undo"
                left = undo.pop()
                continue
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
                    undo.append(left)
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

    tools = ("calculator",)

    def call_tools(self, step: str) -> str:
        return calculate(step)

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
