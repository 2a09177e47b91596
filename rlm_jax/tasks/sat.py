"""3-SAT over 5 variables, in x1's wording and answer format (x1: synthetic_generation/sat.py).

Problem text (x1's exact wording; the formula ends in one space, as x1 writes it):

    Consider the following propositional logic formula

    (NOT x_2 OR x_1 OR NOT x_5) AND (x_4 OR x_2 OR x_5) 

    Provide a value for each variable (x_i = True / False), such that the formula is satisfied.

Record: type "SAT", unique_solution False, solution = the formula text (as x1: a formula has many
models, so verifiers re-check the formula, which they parse from the problem text).

Answer / steps: one assignment per line, `x_1 = True` ... `x_5 = False`. Parsing also accepts
`x1: true`, `x_3 is False`, `x_2 = 0`, ...
Scores: no assignment -> INVALID, a variable outside x_1..x_n -> INVALID, a clause falsified ->
INCORRECT, every clause satisfied -> SOLVED (as x1, even if some variables are left unassigned),
otherwise PARTIAL. A variable assigned twice: `verify` grades a final answer as x1's verifier does
(the last value wins), but the step checker (`check_partial`, `can_succeed`) scores a step that
gives an assigned variable a different value INCORRECT, so a later step cannot "repair" a clause an
earlier step falsified (restating the same value is fine).
"""
from __future__ import annotations

import functools
import itertools
import random
import re
from typing import Iterable, Sequence

from rlm_jax.tasks.base import Capabilities, Problem, Score, TaskBase, as_record, difficulty_to_level, task_rng

NAME = "SAT"
NUM_VARS = 5
CLAUSE_WIDTH = 3
MAX_TRIES_PER_SIZE = 10  # x1: after 10 unsatisfiable draws, drop one clause.
HEADER = "Consider the following propositional logic formula\n\n"
FOOTER = "\n\nProvide a value for each variable (x_i = True / False), such that the formula is satisfied."

Clause = tuple[int, ...]  # DIMACS-style literals: +i is x_i, -i is NOT x_i.
Formula = tuple[Clause, ...]
Assignment = dict[int, bool]

_CLAUSE = re.compile(r"\(([^()]*)\)")
_LITERAL = re.compile(r"^(NOT\s+)?x_?([0-9]+)$", re.IGNORECASE)
# `x_3 = True`, `x3: false`, `x_3 is set to True`; the gap may not contain another variable.
_ASSIGN = re.compile(
    r"\bx_?([0-9]+)\b(?P<gap>(?:(?!\bx_?[0-9])[^.;,()\n]){0,24}?)\b(?P<val>true|false|1|0)\b", re.IGNORECASE)


def num_clauses_for(difficulty: float) -> int:
    """x1's clause count: ratio clauses/variables grows linearly from 1 to 4.4."""
    return int(NUM_VARS * (1 + 3.4 * difficulty))


def format_formula(formula: Formula) -> str:
    """x1's rendering: `(x_1 OR NOT x_2 OR x_3) AND (...) ` (note the trailing space)."""
    def lit(x: int) -> str:
        return f"x_{x}" if x > 0 else f"NOT x_{-x}"
    return " AND ".join("(" + " OR ".join(lit(x) for x in c) + ")" for c in formula) + " "


def parse_formula(text: str) -> Formula:
    """Parses the formula from a problem text or a bare formula string. Raises ValueError."""
    region = text.split("Provide a value", 1)[0]  # The instruction itself has "(x_i = ...)".
    clauses = []
    for body in _CLAUSE.findall(region):
        lits = []
        for token in re.split(r"\s+OR\s+", body.strip()):
            m = _LITERAL.match(token.strip())
            if m is None or int(m.group(2)) < 1:
                raise ValueError(f"bad literal {token!r} in SAT clause ({body})")
            lits.append(-int(m.group(2)) if m.group(1) else int(m.group(2)))
        clauses.append(tuple(lits))
    if not clauses:
        raise ValueError("no SAT clauses found in problem text")
    return tuple(clauses)


def num_vars_of(formula: Formula) -> int:
    """Variables are x_1..x_n with n = max(5, largest index used)."""
    return max(NUM_VARS, max(abs(x) for c in formula for x in c))


def parse_assignments(text: str) -> list[tuple[int, bool]]:
    """Every `x_i = value` assignment in `text` as (i, value), in text order."""
    out = []
    for m in _ASSIGN.finditer(text):
        val = m.group("val").lower()
        if val in ("0", "1") and not re.search(r"[=:]", m.group("gap")):
            continue  # A bare digit only counts after '=' or ':' (not e.g. "x_1 has 1 ...").
        out.append((int(m.group(1)), val in ("true", "1")))
    return out


def parse_assignment(text: str) -> Assignment:
    """All `x_i = value` assignments in `text`, later ones overriding earlier ones (x1's rule)."""
    return dict(parse_assignments(text))


def literal_value(lit: int, assignment: Assignment) -> bool | None:
    """True/False under `assignment`, None if its variable is unassigned."""
    v = assignment.get(abs(lit))
    return None if v is None else (v if lit > 0 else not v)


def evaluate(formula: Formula, assignment: Assignment) -> Score:
    """INCORRECT if some clause is falsified, SOLVED if all are satisfied, else PARTIAL."""
    all_sat = True
    for clause in formula:
        values = [literal_value(x, assignment) for x in clause]
        if any(v is True for v in values):
            continue
        if all(v is False for v in values):
            return Score.INCORRECT
        all_sat = False
    return Score.SOLVED if all_sat else Score.PARTIAL


def completions(formula: Formula, assignment: Assignment) -> Iterable[Assignment]:
    """Every total assignment extending `assignment` (brute force; 2^5 at most here)."""
    n = num_vars_of(formula)
    free = [i for i in range(1, n + 1) if i not in assignment]
    for values in itertools.product((True, False), repeat=len(free)):
        yield {**assignment, **dict(zip(free, values))}


def satisfying_assignment(formula: Formula, partial: Assignment | None = None) -> Assignment | None:
    """The first model (True before False, x_1 first) extending `partial`, or None."""
    for full in completions(formula, partial or {}):
        if evaluate(formula, full) == Score.SOLVED:
            return full
    return None


def random_formula(rng: random.Random, num_clauses: int) -> Formula:
    """x1's distribution: each clause has 3 distinct variables, each negated with p = 1/2."""
    clauses = []
    for _ in range(num_clauses):
        vars_ = rng.sample(range(1, NUM_VARS + 1), CLAUSE_WIDTH)
        clauses.append(tuple(-v if rng.random() < 0.5 else v for v in vars_))
    return tuple(clauses)


class SATTask(TaskBase):
    """3-SAT with 5 variables; see the module docstring for text and answer formats."""

    name = NAME
    capabilities = Capabilities(exact_labels=True)

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        rng = task_rng(NAME, seed, difficulty)
        num_clauses, tries = num_clauses_for(difficulty), 0
        while True:
            if tries >= MAX_TRIES_PER_SIZE:  # x1's fallback: fewer clauses are likelier satisfiable.
                num_clauses, tries = num_clauses - 1, 0
            formula = random_formula(rng, num_clauses)
            tries += 1
            if satisfying_assignment(formula) is not None:
                break
        text = format_formula(formula)
        return as_record(NAME, level, HEADER + text + FOOTER, False, text,
                         meta={"clauses": [list(c) for c in formula], "num_vars": NUM_VARS})

    def _formula(self, problem: Problem) -> Formula:
        return _parse_formula_cached(problem["problem"])

    def _score(self, formula: Formula, assignment: Assignment) -> Score:
        n = num_vars_of(formula)
        if not assignment or any(not 1 <= i <= n for i in assignment):
            return Score.INVALID
        return evaluate(formula, assignment)

    def verify(self, problem: Problem, output: str) -> Score:
        return self._score(self._formula(problem), parse_assignment(output))

    def solve(self, problem: Problem) -> list[str]:
        model = satisfying_assignment(self._formula(problem))
        if model is None:
            raise ValueError("SAT problem is unsatisfiable")
        return [f"x_{i} = {model[i]}" for i in sorted(model)]

    def _partial(self, formula: Formula, steps: Sequence[str]) -> tuple[Score, Assignment]:
        assignment: Assignment = {}
        for step in steps:
            parsed = parse_assignments(step)
            if not parsed:
                return Score.INVALID, assignment
            for var, value in parsed:
                if assignment.setdefault(var, value) != value:
                    return Score.INCORRECT, assignment  # Reassigned: no repairing earlier steps.
        if not steps:
            return Score.PARTIAL, assignment  # The empty prefix falsifies nothing.
        return self._score(formula, assignment), assignment

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        return self._partial(self._formula(problem), steps)[0]

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> bool | None:
        formula = self._formula(problem)
        score, assignment = self._partial(formula, steps)
        return score.valid and satisfying_assignment(formula, assignment) is not None


# Search calls check_partial many times per problem; parsing is pure, so memoise it.
_parse_formula_cached = functools.lru_cache(maxsize=4096)(parse_formula)
