"""Decision 0/1 knapsack in x1's wording (x1: synthetic_generation/knapsack.py).

Problem text (x1's exact wording; items are tab-separated, one per line):

    Imagine you're packing for a trip. ... don't want its weight to exceed {W+1}kg. The backpack
    itself weighs 1kg. ... can only pack one of each:

    pen\tweight: 5\tvalue: 19
    map\tweight: 3\tvalue: 9

    True or False: There is a list of items whose value sum is higher than {V} and weight sum is lower than {W}.

Semantics (x1's labels, checked against all 1000 records of x1's file): the answer is True iff some
subset has weight sum <= W and value sum >= V, despite the words "higher"/"lower". W excludes the
backpack's own 1kg. Record: type "Knapsack", unique_solution True, solution a bool.

Reference trace (our format; one step per line): the items of one optimal subset, in problem order,
with running sums; then the optimum and the answer:

    Take pen (weight 5, value 19): total weight 5, total value 19
    Take book (weight 4, value 16): total weight 9, total value 35
    Best value: 35 < 50, so the answer is False

`verify` scores only the final answer, as x1 does: the last "true"/"false" in the output, except
that the question's "True or False" phrase is not an answer (`base.last_bool`), so echoing the
question scores INVALID, not a free "False"; no answer -> INVALID. `check_partial` audits the trace: take lines (any order) must name unused items with
their true weight/value and correct running sums within W; the "Best value" line must equal the
running value and the true optimum; the answer (on that line or later) must be correct. A step of
any other shape is INVALID. `can_succeed` is exact: the taken items extend to an optimal subset.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Sequence

from rlm_jax.tasks.base import AnswerTask, Capabilities, Problem, Score, as_record, difficulty_to_level, last_bool, task_rng

NAME = "Knapsack"
# x1's item names in x1's order; x1 lists "snack" twice (so its problems with >= 27 items silently
# lose one item); we use "cup" in that slot so every name is distinct.
OBJECTS = ("pen", "map", "book", "flask", "snack", "rope", "brush", "towel", "knife", "band", "mask",
           "soap", "torch", "screw", "coin", "key", "lock", "lens", "card", "note", "cable", "tape",
           "flash", "cloth", "case", "file", "cup", "cap", "clip", "tag")
WEIGHT_BOUND = 20
VALUE_BOUND = 20
BACKPACK_WEIGHT = 1
INTRO = ("Imagine you're packing for a trip. You are going to carry your backpack for a long time, so you "
         "don't want its weight to exceed {capacity}kg. The backpack itself weighs {backpack}kg. Each item "
         "you are considering to pack has a weight and a value. You want the items in your backpack to "
         "amount to the highest possible value while maintaining the weight of the backpack below the "
         "aforementioned threshold. You are considering the following items and can only pack one of "
         "each:\n\n")
QUESTION = ("\nTrue or False: There is a list of items whose value sum is higher than {value} and weight "
            "sum is lower than {weight}.")

_ITEM = re.compile(r"^[ \t]*(?P<name>[A-Za-z][\w' -]*?)[ \t]+weight:[ \t]*(?P<w>[0-9]+)"
                   r"[ \t]+value:[ \t]*(?P<v>[0-9]+)[ \t]*$", re.MULTILINE)
_THRESHOLDS = re.compile(r"value sum is higher than (-?[0-9]+) and weight sum is lower than (-?[0-9]+)")
_TAKE = re.compile(
    r"^\W*take\s+(?P<name>[A-Za-z][\w' -]*?)\s*"
    r"\(\s*weight\s*:?\s*(?P<w>-?[0-9]+)\s*,\s*value\s*:?\s*(?P<v>-?[0-9]+)\s*\)\s*[:,;-]?\s*"
    r"total weight\s*:?\s*(?P<tw>-?[0-9]+)\s*,\s*total value\s*:?\s*(?P<tv>-?[0-9]+)\W*$", re.IGNORECASE)
_BEST = re.compile(r"\bbest value\s*(?:is|:|=)?\s*(?P<best>-?[0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Instance:
    """Items as (name, weight, value); weight_limit W and value_target V of the question."""
    items: tuple[tuple[str, int, int], ...]
    weight_limit: int
    value_target: int


def format_problem(inst: Instance) -> str:
    text = INTRO.format(capacity=inst.weight_limit + BACKPACK_WEIGHT, backpack=BACKPACK_WEIGHT)
    text += "".join(f"{name}\tweight: {w}\tvalue: {v}\n" for name, w, v in inst.items)
    return text + QUESTION.format(value=inst.value_target, weight=inst.weight_limit)


@functools.lru_cache(maxsize=4096)  # Pure; search re-parses the same problem for every step.
def parse_problem(text: str) -> Instance:
    """Parses items and thresholds from x1's (or our) problem text. Raises ValueError."""
    items = tuple((m["name"].strip(), int(m["w"]), int(m["v"])) for m in _ITEM.finditer(text))
    m = _THRESHOLDS.search(text)
    if not items or m is None:
        raise ValueError("not a knapsack problem text (items or thresholds missing)")
    names = [name.lower() for name, _, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("knapsack item names must be distinct")
    return Instance(items, weight_limit=int(m.group(2)), value_target=int(m.group(1)))


def _add_item(best: list[int], w: int, v: int) -> list[int]:
    """One 0/1-knapsack DP row update: best[c] = max value within capacity c."""
    if w >= len(best):
        return best
    return best[:w] + [max(keep, take + v) for keep, take in zip(best[w:], best)]


def best_value(items: Sequence[tuple[str, int, int]], capacity: int) -> int:
    """Maximum value sum of a subset with weight sum <= capacity (0/1 knapsack DP); -1 if capacity < 0."""
    if capacity < 0:
        return -1
    best = [0] * (capacity + 1)
    for _, w, v in items:
        best = _add_item(best, w, v)
    return best[capacity]


def optimal_subset(items: Sequence[tuple[str, int, int]], capacity: int) -> list[int]:
    """Indices (ascending) of one optimal subset, read back from the DP table."""
    rows = [[0] * (capacity + 1)]  # rows[k]: best over the last k items.
    for _, w, v in reversed(items):
        rows.append(_add_item(rows[-1], w, v))
    rows.reverse()  # rows[i]: best over items[i:].
    chosen, c = [], capacity
    for i in range(len(items)):
        if rows[i][c] != rows[i + 1][c]:  # Item i is needed to reach the optimum from here.
            chosen.append(i)
            c -= items[i][1]
    return chosen


@functools.lru_cache(maxsize=4096)  # Verifiers and step checkers ask again for every output.
def optimum(inst: Instance) -> int:
    """The best value sum within the weight limit W."""
    return best_value(inst.items, inst.weight_limit)


def answer_of(inst: Instance) -> bool:
    """x1's label: the optimum within W reaches V."""
    return optimum(inst) >= inst.value_target


def random_instance(rng: random.Random, difficulty: float) -> Instance:
    """x1's distribution: more items and a target closer to the optimum as difficulty grows."""
    n = 3 + int(difficulty * (len(OBJECTS) - 3))
    items = tuple((OBJECTS[i], rng.randint(1, WEIGHT_BOUND), rng.randint(1, VALUE_BOUND)) for i in range(n))
    weight_limit = rng.randint(int(n * WEIGHT_BOUND / 4), int(3 * n * WEIGHT_BOUND / 4))
    opt = best_value(items, weight_limit)
    spread = (1 - difficulty + 0.1) * VALUE_BOUND
    value_target = rng.randint(int(opt - spread), int(opt + spread))
    return Instance(items, weight_limit, value_target)


def format_take(name: str, w: int, v: int, total_w: int, total_v: int) -> str:
    return f"Take {name} (weight {w}, value {v}): total weight {total_w}, total value {total_v}"


def format_best(best: int, target: int) -> str:
    relation = ">=" if best >= target else "<"
    return f"Best value: {best} {relation} {target}, so the answer is {best >= target}"


@dataclass
class _Audit:
    score: Score
    taken: frozenset[int] = frozenset()
    total_weight: int = 0
    stated_best: bool = False


def audit(inst: Instance, steps: Sequence[str]) -> _Audit:
    """Checks a (partial) trace step by step; see the module docstring for the rules."""
    index = {name.lower(): i for i, (name, _, _) in enumerate(inst.items)}
    opt = optimum(inst)
    truth = opt >= inst.value_target
    taken: set[int] = set()
    tw = tv = 0
    stated_best = answered = False
    for step in steps:
        take, best, answer = _TAKE.match(step), _BEST.search(step), last_bool(step)
        if take and not stated_best:
            i = index.get(take["name"].strip().lower())
            if i is None or i in taken:
                return _Audit(Score.INCORRECT)
            _, w, v = inst.items[i]
            tw, tv = tw + w, tv + v
            if (int(take["w"]), int(take["v"]), int(take["tw"]), int(take["tv"])) != (w, v, tw, tv) \
                    or tw > inst.weight_limit:
                return _Audit(Score.INCORRECT)
            taken.add(i)
        elif best and not stated_best:
            if int(best["best"]) != tv or tv != opt:
                return _Audit(Score.INCORRECT)
            stated_best = True
            if answer is not None:
                answered = True
                if answer != truth:
                    return _Audit(Score.INCORRECT)
        elif answer is not None and stated_best and not take and not best:
            answered = True
            if answer != truth:
                return _Audit(Score.INCORRECT)
        else:
            return _Audit(Score.INVALID)
    score = Score.SOLVED if answered else Score.PARTIAL
    return _Audit(score, frozenset(taken), tw, stated_best)


class KnapsackTask(AnswerTask):
    """Decision knapsack; see the module docstring for text, answer and trace formats."""

    name = NAME
    capabilities = Capabilities(exact_labels=True)

    def generate(self, seed: int, difficulty: float) -> Problem:
        level = difficulty_to_level(difficulty)
        rng = task_rng(NAME, seed, difficulty)
        inst = random_instance(rng, difficulty)
        return as_record(NAME, level, format_problem(inst), True, answer_of(inst),
                         meta={"items": [list(it) for it in inst.items], "weight_limit": inst.weight_limit,
                               "value_target": inst.value_target})

    def read_answer(self, output: str) -> bool | None:
        return last_bool(output)

    def reference_answer(self, problem: Problem) -> bool:
        return answer_of(parse_problem(problem["problem"]))

    def solve(self, problem: Problem) -> list[str]:
        inst = parse_problem(problem["problem"])
        steps, tw, tv = [], 0, 0
        for i in optimal_subset(inst.items, inst.weight_limit):
            name, w, v = inst.items[i]
            tw, tv = tw + w, tv + v
            steps.append(format_take(name, w, v, tw, tv))
        return steps + [format_best(tv, inst.value_target)]

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        return audit(parse_problem(problem["problem"]), steps).score

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> bool | None:
        inst = parse_problem(problem["problem"])
        result = audit(inst, steps)
        if not result.score.valid:
            return False
        if result.score == Score.SOLVED or result.stated_best:
            return True  # A correct best-value line is already on the way to the correct answer.
        # Exact: the taken items plus the best of the rest must reach the optimum.
        rest = [it for i, it in enumerate(inst.items) if i not in result.taken]
        taken_value = sum(inst.items[i][2] for i in result.taken)
        return taken_value + best_value(rest, inst.weight_limit - result.total_weight) \
            == optimum(inst)
