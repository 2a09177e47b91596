"""Einstein's (zebra) riddle in x1's wording (x1: synthetic_generation/einstein.py).

Problem text (x1's wording, including its "a a" typo):

    There are 3 houses in a row (numbered 1 to 3).

    Each house is occupied by a a different person and each house/person has an unique attribute from the following sets:
    Name: Alice, Bob, Carol
    Drink: Coffee, Milk, Tea

    You are given the following information:
    1. Bob (Name) is directly to the left of Tea (Drink)
    2. Coffee (Drink) is equal to 1 (Position)
    ...

    Which house is associated with Carol (Name)? Format your answer as \\boxed{x} where x is the number of the house.

Clue relations: "is equal to", "is not equal to", "is directly to the left of" (A's house + 1 == B's),
"is directly to the right of", "is adjacent to"; "k (Position)" names house k. Every riddle has exactly
one solution (checked by `count_solutions`, constraint propagation plus backtracking). Record: type
"Einstein", unique_solution True, solution the house number as a string (as x1).

Size from difficulty d (x1's map, houses capped at 7): houses = 3 + int(5d), attribute types including
Position = 3 + int(frac(5d) * 5), i.e. 3..7 houses and 2..6 non-position attribute types.

Reference trace: facts in the order constraint propagation derives them (a guess is made only where
propagation stalls, and then it is the true value), up to the asked attribute, then the answer:

    Coffee (Drink) is in house 1
    Bob (Name) is in house 2
    Carol (Name) is in house 3
    The answer is \\boxed{3}.

`verify` scores the last \\boxed{n} as x1 does (none -> INVALID). `check_partial`: every step must
state facts `V (Type) is in house k` (also "lives in", "is equal to k (Position)") and/or \\boxed{k};
a fact or answer contradicting the unique solution -> INCORRECT, anything else -> INVALID; SOLVED once
the correct answer is given. Since the solution is unique, `can_succeed` (no wrong fact) is exact.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Sequence

from rlm_jax.tasks.base import AnswerTask, Capabilities, Problem, Score, as_record, difficulty_to_level, task_rng

NAME = "Einstein"
POSITION = "Position"
MIN_HOUSES, MAX_HOUSES = 3, 7
MIN_TYPES, MAX_TYPES = 3, 7  # Attribute types including Position.
CLUE_BATCH = 20  # x1 adds random clues in batches of 20 until the riddle is unique.
MAX_CLUES = 2000  # Far above need (about 60 at 7x7); only a solver bug gets here.

# Our own word lists; values are distinct across types so a value names one attribute.
VALUES: dict[str, tuple[str, ...]] = {
    "Name": ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James"),
    "Nationality": ("Brazilian", "Canadian", "Danish", "Egyptian", "French", "German", "Indian",
                    "Japanese", "Kenyan", "Mexican"),
    "House Color": ("Red", "Green", "Blue", "Yellow", "White", "Black", "Purple", "Pink", "Gray", "Cyan"),
    "Drink": ("Coffee", "Tea", "Milk", "Water", "Juice", "Beer", "Wine", "Lemonade", "Cocoa", "Smoothie"),
    "Food": ("Pizza", "Pasta", "Salad", "Sushi", "Tacos", "Curry", "Soup", "Burger", "Sandwich", "Lasagna"),
    "Pet": ("Dog", "Cat", "Parrot", "Goldfish", "Horse", "Rabbit", "Hamster", "Turtle", "Snake", "Ferret"),
    "Job": ("Doctor", "Teacher", "Engineer", "Lawyer", "Nurse", "Chef", "Pilot", "Artist", "Farmer", "Writer"),
    "Car": ("Toyota", "Ford", "BMW", "Honda", "Tesla", "Audi", "Volvo", "Fiat", "Mazda", "Subaru"),
}
EQ, NE, LEFT, RIGHT, NEXT = ("equal to", "not equal to", "directly to the left of",
                             "directly to the right of", "adjacent to")
RELATIONS = (EQ, NE, LEFT, RIGHT, NEXT)

Attr = tuple[str, str]  # (type, value); Position values are "1".."n".

_CLUE = re.compile(r"^\s*[0-9]+\.\s*(?P<a>.+?) \((?P<at>[^()]+)\) is (?P<rel>equal to|not equal to|directly to the "
                   r"left of|directly to the right of|adjacent to) (?P<b>.+?) \((?P<bt>[^()]+)\)\s*$")
_TARGET = re.compile(r"Which house is associated with (?P<v>.+?) \((?P<t>[^()]+)\)\?")
_FACT = re.compile(r"(?P<v>[^()\n]+?)\s*\((?P<t>[^()\n]+)\)\s*(?:is in|lives in|is equal to|is at|=|:|->)"
                   r"\s*(?:house\s*)?#?(?P<k>[0-9]+)", re.IGNORECASE)
_BOXED = re.compile(r"\\?boxed\{\s*([0-9]+)\s*\}")


@dataclass(frozen=True)
class Clue:
    rel: str
    a: Attr
    b: Attr

    def text(self) -> str:
        return f"{self.a[1]} ({self.a[0]}) is {self.rel} {self.b[1]} ({self.b[0]})"

    def holds(self, ha: int, hb: int) -> bool:
        """Whether houses ha (of a) and hb (of b) satisfy the clue."""
        return {EQ: ha == hb, NE: ha != hb, LEFT: ha + 1 == hb, RIGHT: ha == hb + 1,
                NEXT: abs(ha - hb) == 1}[self.rel]


@dataclass(frozen=True)
class Riddle:
    """n houses; `types` non-position attribute types in text order; `values[t]` in text order."""
    n: int
    types: tuple[str, ...]
    values: dict
    clues: tuple[Clue, ...]
    target: Attr

    def attributes(self) -> list[Attr]:
        return [(t, v) for t in self.types for v in self.values[t]]


# ---------------------------------------------------------------------------------------------
# Solver: each attribute's domain is a bitmask of houses (bit k-1 = house k).

def _domains(riddle: Riddle) -> tuple[list[Attr], list[int], list[list[int]], list[tuple[str, int, int]]]:
    """Variables (non-position attributes, then Position constants), initial domains, all-different
    groups, and clues as (relation, var_a, var_b)."""
    full = (1 << riddle.n) - 1
    attrs = riddle.attributes() + [(POSITION, str(k)) for k in range(1, riddle.n + 1)]
    var = {a: i for i, a in enumerate(attrs)}
    doms = [full] * len(riddle.attributes()) + [1 << k for k in range(riddle.n)]
    groups = [[var[(t, v)] for v in riddle.values[t]] for t in riddle.types]
    cons = []
    for c in riddle.clues:
        if c.a not in var or c.b not in var:
            raise ValueError(f"clue mentions an unknown attribute: {c.text()}")
        cons.append((c.rel, var[c.a], var[c.b]))
    return attrs, doms, groups, cons


def _single(d: int) -> bool:
    return d & (d - 1) == 0


def _propagate_pass(doms: list[int], groups, cons, full: int) -> tuple[bool, bool]:
    """One pass of clue and all-different propagation. Returns (consistent, changed)."""
    changed = False
    for rel, a, b in cons:
        da, db = doms[a], doms[b]
        if rel == EQ:
            na = nb = da & db
        elif rel == NE:
            na = da & ~db if _single(db) else da
            nb = db & ~da if _single(da) else db
        elif rel == LEFT:  # house(a) + 1 == house(b)
            na, nb = da & (db >> 1), db & (da << 1) & full
        elif rel == RIGHT:
            na, nb = da & (db << 1) & full, db & (da >> 1)
        else:  # NEXT
            na, nb = da & ((db << 1) | (db >> 1)) & full, db & ((da << 1) | (da >> 1)) & full
        if na != da or nb != db:
            if not na or not nb:
                return False, changed
            doms[a], doms[b], changed = na, nb, True
    for group in groups:
        fixed = 0
        for v in group:
            d = doms[v]
            if _single(d):
                if d & fixed:
                    return False, changed
                fixed |= d
        for v in group:
            d = doms[v]
            if not _single(d) and d & fixed:
                doms[v], changed = d & ~fixed, True
                if not doms[v]:
                    return False, changed
        bit = 1
        while bit <= full:  # Hidden single: a house only one value of this type can take.
            holders = [v for v in group if doms[v] & bit]
            if not holders:
                return False, changed
            if len(holders) == 1 and doms[holders[0]] != bit:
                doms[holders[0]], changed = bit, True
            bit <<= 1
    return True, changed


def _propagate(doms, groups, cons, full) -> bool:
    while True:
        ok, changed = _propagate_pass(doms, groups, cons, full)
        if not ok or not changed:
            return ok


def _count(doms, groups, cons, full, limit: int, found: list) -> int:
    if not _propagate(doms, groups, cons, full):
        return 0
    open_vars = [v for v, d in enumerate(doms) if not _single(d)]
    if not open_vars:
        found.append(list(doms))
        return 1
    v = min(open_vars, key=lambda u: doms[u].bit_count())
    total, d = 0, doms[v]
    while d and total < limit:
        bit = d & -d
        d &= d - 1
        child = list(doms)
        child[v] = bit
        total += _count(child, groups, cons, full, limit - total, found)
    return total


def count_solutions(riddle: Riddle, limit: int = 2) -> tuple[int, list[dict[Attr, int]]]:
    """Number of solutions (stops at `limit`) and the solutions found, as attribute -> house (1-based)."""
    attrs, doms, groups, cons = _domains(riddle)
    found: list = []
    count = _count(doms, groups, cons, (1 << riddle.n) - 1, limit, found)
    return count, [{a: d.bit_length() for a, d in zip(attrs, sol)} for sol in found]


def deduction_trace(riddle: Riddle, solution: dict[Attr, int]) -> list[tuple[Attr, int]]:
    """Facts in the order propagation fixes them, until the target is fixed. Where propagation
    stalls, the most constrained attribute is set to its (known) true house and propagation goes on."""
    attrs, doms, groups, cons = _domains(riddle)
    full, n_attr = (1 << riddle.n) - 1, len(riddle.attributes())
    target = attrs.index(riddle.target)
    facts: list[tuple[Attr, int]] = []
    known: set[int] = set()

    def record() -> None:
        for v in range(n_attr):
            if v not in known and _single(doms[v]):
                known.add(v)
                facts.append((attrs[v], doms[v].bit_length()))

    while target not in known:
        ok, changed = _propagate_pass(doms, groups, cons, full)
        if not ok:
            raise ValueError("riddle is inconsistent")
        record()
        if not changed and target not in known:
            v = min((u for u in range(n_attr) if not _single(doms[u])), key=lambda u: (doms[u].bit_count(), u))
            doms[v] = 1 << (solution[attrs[v]] - 1)
            record()
    return facts[:facts.index((riddle.target, solution[riddle.target])) + 1]


# ---------------------------------------------------------------------------------------------
# Text.

def format_problem(riddle: Riddle) -> str:
    attributes = "\n".join(f"{t}: {', '.join(riddle.values[t])}" for t in riddle.types)
    clues = "\n".join(f"{i + 1}. {c.text()}" for i, c in enumerate(riddle.clues))
    t, v = riddle.target
    return (f"There are {riddle.n} houses in a row (numbered 1 to {riddle.n}).\n\n"
            "Each house is occupied by a a different person and each house/person has an unique attribute "
            f"from the following sets:\n{attributes}\n\n"
            f"You are given the following information:\n{clues}\n\n"
            f"Which house is associated with {v} ({t})? Format your answer as \\boxed{{x}} where x is the "
            "number of the house.")


def parse_problem(text: str) -> Riddle:
    """Parses x1's (or our) riddle text. Raises ValueError."""
    m = re.search(r"There are ([0-9]+) houses", text)
    sets = re.search(r"following sets:\s*\n(.*?)\n\s*\n", text, re.S)
    info = re.search(r"following information:\s*\n(.*?)\n\s*\n", text, re.S)
    target = _TARGET.search(text)
    if not (m and sets and info and target):
        raise ValueError("not an Einstein riddle text")
    n = int(m.group(1))
    types, values = [], {}
    for line in sets.group(1).splitlines():
        line = line.strip().rstrip("\\").strip()  # x1's README renders line breaks as "\".
        if not line:
            continue
        t, _, vals = line.partition(":")
        types.append(t.strip())
        values[t.strip()] = tuple(v.strip() for v in vals.split(","))
        if len(values[t.strip()]) != n:
            raise ValueError(f"attribute {t!r} needs {n} values: {line!r}")
    clues = []
    for line in info.group(1).splitlines():
        if not line.strip():
            continue
        c = _CLUE.match(line)
        if c is None:
            raise ValueError(f"cannot parse clue {line!r}")
        clues.append(Clue(c["rel"], (c["at"], c["a"]), (c["bt"], c["b"])))
    riddle = Riddle(n, tuple(types), values, tuple(clues), (target["t"], target["v"]))
    if riddle.target not in riddle.attributes():
        raise ValueError(f"unknown target attribute {riddle.target}")
    return riddle


@functools.lru_cache(maxsize=1024)  # Pure; search verifies many steps of the same problem.
def solve_text(text: str) -> tuple[Riddle, dict[Attr, int]]:
    """The riddle and its unique solution. Raises ValueError if it has none or several."""
    riddle = parse_problem(text)
    count, sols = count_solutions(riddle, limit=2)
    if count != 1:
        raise ValueError(f"riddle has {'no' if count == 0 else 'several'} solutions")
    return riddle, sols[0]


def format_fact(attr: Attr, house: int) -> str:
    return f"{attr[1]} ({attr[0]}) is in house {house}"


def format_answer(house: int) -> str:
    return f"The answer is \\boxed{{{house}}}."


def parse_facts(riddle: Riddle, step: str) -> list[tuple[Attr, int]] | None:
    """Facts stated in a step; None if one names no attribute of the riddle."""
    out = []
    for m in _FACT.finditer(step):
        t = m["t"].strip()
        if t.lower() == POSITION.lower():
            continue  # "3 (Position) ..." restates a house, not a fact.
        t = next((u for u in riddle.types if u.lower() == t.lower()), None)
        said = m["v"].strip().lower()
        # The value is the longest known value the captured text ends with ("So Bob" -> "Bob").
        v = None if t is None else next(
            (u for u in sorted(riddle.values[t], key=len, reverse=True)
             if said == u.lower() or said.endswith(" " + u.lower())), None)
        if v is None:
            return None
        out.append(((t, v), int(m["k"])))
    return out


def last_boxed(text: str) -> int | None:
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------
# Generation.

def size_for(difficulty: float) -> tuple[int, int]:
    """(houses, attribute types including Position), x1's map with houses capped at 7."""
    steps = MAX_HOUSES + 1 - MIN_HOUSES
    houses = MIN_HOUSES + min(int(difficulty * steps), MAX_HOUSES - MIN_HOUSES)
    frac = (difficulty * steps) % 1
    return houses, MIN_TYPES + int(frac * (MAX_TYPES + 1 - MIN_TYPES))


def random_clue(rng: random.Random, n: int, types: Sequence[str], solution: dict[str, list[str]]) -> Clue:
    """x1's distribution: a uniform relation, houses chosen so it holds, source not Position. We skip
    same-type equal/not-equal clues, which are vacuous (x1's minimisation removes them anyway)."""
    rel = rng.choice(RELATIONS)
    idx = list(range(n))
    if rel == EQ:
        i = j = rng.choice(idx)
    elif rel == NE:
        i, j = rng.sample(idx, 2)
    elif rel == LEFT:
        i = rng.choice(idx[:-1])
        j = i + 1
    elif rel == RIGHT:
        i = rng.choice(idx[1:])
        j = i - 1
    else:
        i = rng.choice(idx[:-1])
        i, j = (i, i + 1) if rng.random() < 0.5 else (i + 1, i)
    ta = rng.choice(types)
    tb = rng.choice([POSITION, *types])
    while rel in (EQ, NE) and tb == ta:
        tb = rng.choice([POSITION, *types])
    def value(t: str, house_index: int) -> str:
        return str(house_index + 1) if t == POSITION else solution[t][house_index]
    return Clue(rel, (ta, value(ta, i)), (tb, value(tb, j)))


def _unique(n, types, values, clues) -> bool:
    probe = Riddle(n, types, values, tuple(clues), (types[0], values[types[0]][0]))
    count = count_solutions(probe, limit=2)[0]
    if count == 0:  # The planted solution satisfies every clue, so this is a solver bug.
        raise AssertionError("Einstein solver lost the planted solution")
    return count == 1


def random_riddle(rng: random.Random, difficulty: float) -> Riddle:
    """x1's construction: add random true clues until unique, drop every clue not needed for
    uniqueness (in order), then ask for an attribute no clue mentions where possible."""
    n, n_types = size_for(difficulty)
    types = tuple(rng.sample(list(VALUES), n_types - 1))
    solution = {t: rng.sample(VALUES[t], n) for t in types}  # solution[t][house - 1]
    values = {t: tuple(sorted(solution[t])) for t in types}
    clues: list[Clue] = []
    while not clues or not _unique(n, types, values, clues):
        if len(clues) >= MAX_CLUES:
            raise RuntimeError(f"no unique riddle after {MAX_CLUES} clues")
        clues += [random_clue(rng, n, types, solution) for _ in range(CLUE_BATCH)]
    keep = list(clues)
    for c in clues:
        trial = [d for d in keep if d is not c]
        if _unique(n, types, values, trial):
            keep = trial
    used = {a for c in keep for a in (c.a, c.b)}
    attrs = [(t, v) for t in types for v in values[t]]
    candidates = [a for a in attrs if a not in used] or \
        [a for c in keep if POSITION not in (c.a[0], c.b[0]) for a in (c.a, c.b)] or attrs
    target = rng.choice(sorted(set(candidates)))
    return Riddle(n, types, values, tuple(keep), target)


class EinsteinTask(AnswerTask):
    """Einstein's riddle; see the module docstring for text, answer and trace formats."""

    name = NAME
    # The solution is unique, so a prefix extends to a solution iff it contradicts nothing: the base
    # `can_succeed` (no wrong step so far) is exact.
    capabilities = Capabilities(exact_labels=True)

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        rng = task_rng(NAME, seed, difficulty)
        riddle = random_riddle(rng, difficulty)
        text = format_problem(riddle)
        _, solution = solve_text(text)  # Re-solves from the text: proves it is parseable and unique.
        house = solution[riddle.target]
        return as_record(NAME, level, text, True, str(house),
                         meta={"houses": riddle.n, "types": list(riddle.types), "target": list(riddle.target),
                               "clues": len(riddle.clues)})

    def read_answer(self, output: str) -> int | None:
        return last_boxed(output)

    def reference_answer(self, problem: Problem) -> int:
        riddle, solution = solve_text(problem["problem"])
        return solution[riddle.target]

    def solve(self, problem: Problem) -> list[str]:
        riddle, solution = solve_text(problem["problem"])
        facts = deduction_trace(riddle, solution)
        return [format_fact(a, h) for a, h in facts] + [format_answer(solution[riddle.target])]

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        riddle, solution = solve_text(problem["problem"])
        answered = False
        for step in steps:
            facts, answer = parse_facts(riddle, step), last_boxed(step)
            if facts is None or (not facts and answer is None):
                return Score.INVALID
            if any(not 1 <= h <= riddle.n or solution[a] != h for a, h in facts):
                return Score.INCORRECT
            if answer is not None:
                if answer != solution[riddle.target]:
                    return Score.INCORRECT
                answered = True
        return Score.SOLVED if answered else Score.PARTIAL
