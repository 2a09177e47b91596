"""x1's four synthetic domains: SAT, Knapsack, Einstein, PrOntoQA.

Checked against x1's own data files (/work/shared/data/x1/*.json.bz2, skipped where absent), against
x1's problem templates, and against brute force on random inputs.
"""
from __future__ import annotations

import bz2
import itertools
import json
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rlm_jax.tasks import einstein as ein
from rlm_jax.tasks import knapsack as ks
from rlm_jax.tasks import prontoqa as pq
from rlm_jax.tasks import sat
from rlm_jax.tasks.base import Score, Task, difficulty_for, difficulty_to_level
from rlm_jax.tasks.einstein import EinsteinTask
from rlm_jax.tasks.knapsack import KnapsackTask
from rlm_jax.tasks.prontoqa import ProntoQATask
from rlm_jax.tasks.sat import SATTask
from limits import hang_limit

X1_DATA = Path("/work/shared/data/x1")
TASKS = [SATTask(), KnapsackTask(), EinsteinTask(), ProntoQATask()]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generation property tests run at every level, a few seeds each; the difficulty is drawn inside
# the level from the seed, as dataset generation does.
LEVELS = range(1, 11)
PER_LEVEL = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)


def at_every_level(test):
    """Runs `test(..., level, seed)` at each level 1..10 for a few hypothesis-drawn seeds."""
    return pytest.mark.parametrize("level", LEVELS)(given(seed=seeds)(PER_LEVEL(test)))


@st.composite
def level_difficulty(draw, max_level: int = 10):
    """A level 1..max_level and a difficulty drawn anywhere inside it (x1's data covers whole levels)."""
    level = draw(st.integers(1, max_level))
    offset = draw(st.floats(0.0, 0.0999, allow_nan=False))
    return level, (level - 1) / 10 + offset


def load_x1(name: str) -> list[dict]:
    path = X1_DATA / name
    if not path.exists():
        pytest.skip(f"x1 data {path} not available")
    with bz2.open(path, "rt") as f:
        blob = json.load(f)
    assert blob["version"] == 1 and len(blob["data"]) == 1000
    return blob["data"]


# --- Templates: x1's wording, as regexes. Our generated text and x1's records must both match. ---
_LIT = r"(?:NOT )?x_\d+"
_CLAUSE = rf"\({_LIT} OR {_LIT} OR {_LIT}\)"
SAT_TEMPLATE = re.compile(
    rf"Consider the following propositional logic formula\n\n{_CLAUSE}(?: AND {_CLAUSE})* \n\n"
    r"Provide a value for each variable \(x_i = True / False\), such that the formula is satisfied\.")
KNAPSACK_TEMPLATE = re.compile(
    r"Imagine you're packing for a trip\. You are going to carry your backpack for a long time, so you don't "
    r"want its weight to exceed (\d+)kg\. The backpack itself weighs 1kg\. Each item you are considering to "
    r"pack has a weight and a value\. You want the items in your backpack to amount to the highest possible "
    r"value while maintaining the weight of the backpack below the aforementioned threshold\. You are "
    r"considering the following items and can only pack one of each:\n\n(?:[a-z]+\tweight: \d+\tvalue: \d+\n)+"
    r"\nTrue or False: There is a list of items whose value sum is higher than -?\d+ and weight sum is lower "
    r"than (\d+)\.")
EINSTEIN_TEMPLATE = re.compile(
    r"There are (\d) houses in a row \(numbered 1 to \1\)\.\n\nEach house is occupied by a a different person "
    r"and each house/person has an unique attribute from the following sets:\n(?:[A-Z][A-Za-z ]*: [^\n]+\n)+"
    r"\nYou are given the following information:\n(?:\d+\. [^\n]+ \([A-Za-z ]+\) is [a-z ]+ [^\n]+ "
    r"\([A-Za-z ]+\)\n)+\nWhich house is associated with [^\n]+ \([A-Za-z ]+\)\? Format your answer as "
    r"\\boxed\{x\} where x is the number of the house\.")
PRONTOQA_TEMPLATE = re.compile(r"Q: (?:[A-Z][a-z]*(?: [a-z]+)+\. )+[A-Z][a-z]+ is(?: not)?(?: an?)? [a-z]+\.\n"
                               r"True or false: [A-Z][a-z]+ is(?: not)?(?: an?)? [a-z]+\.\n\nA: ")

# x1's README examples for the two domains whose data files we do not have, laid out as x1's code
# writes them (the README's markdown line breaks removed).
X1_EINSTEIN_EXAMPLE = """There are 5 houses in a row (numbered 1 to 5).

Each house is occupied by a a different person and each house/person has an unique attribute from the following sets:
Name: Amanda, Brian, Robert, Stephanie, William
Food: Lasagna, Nachos, Pasta, Salad, Sandwich
Drink: Beer, Bloody Mary, Margarita, Milkshake, Smoothie
House Color: Black, Cyan, Green, Magenta, Red

You are given the following information:
1. Nachos (Food) is equal to Red (House Color)
2. Stephanie (Name) is directly to the left of Bloody Mary (Drink)
3. Margarita (Drink) is adjacent to Amanda (Name)
4. William (Name) is equal to Margarita (Drink)
5. Robert (Name) is equal to Salad (Food)
6. Bloody Mary (Drink) is equal to 4 (Position)
7. Black (House Color) is directly to the right of 2 (Position)
8. Smoothie (Drink) is adjacent to Lasagna (Food)
9. Lasagna (Food) is adjacent to Stephanie (Name)
10. Pasta (Food) is equal to Brian (Name)
11. Green (House Color) is directly to the right of 3 (Position)
12. Milkshake (Drink) is directly to the left of Salad (Food)
13. Brian (Name) is equal to 1 (Position)
14. Beer (Drink) is directly to the left of Black (House Color)
15. Cyan (House Color) is adjacent to 1 (Position)

Which house is associated with Sandwich (Food)? Format your answer as \\boxed{x} where x is the number of the house."""
X1_PRONTOQA_EXAMPLE = ("Q: Lorpuses are not sweet. Shumpuses are not bright. Lorpuses are jompuses. Each impus is "
                       "bright. Lempuses are not feisty. Every shumpus is a lempus. Each shumpus is a zumpus. Max "
                       "is a lorpus. Max is a shumpus.\nTrue or false: Max is not bright.\n\nA: ")


# --------------------------------------------------------------------------------------------------
# Protocol and record format.

@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_protocol_and_names(task):
    assert isinstance(task, Task)
    assert task.name in {"SAT", "Knapsack", "Einstein", "ProntoQA"}  # x1's "type" strings.


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
@at_every_level
def test_generated_problems_are_solved_by_reference_trace(task, level, seed):
    d = difficulty_for(level, seed)
    problem = task.generate(seed, d)
    assert problem == task.generate(seed, d)  # Deterministic in (seed, difficulty).
    assert set(problem) >= {"type", "level", "problem", "unique_solution", "solution"}
    assert problem["type"] == task.name and problem["level"] == level == difficulty_to_level(d)
    assert task.prompt(problem) == problem["problem"]
    steps = task.solve(problem)
    assert steps and all("\n" not in s for s in steps)
    assert task.verify(problem, "\n".join(steps)) == Score.SOLVED
    assert task.check_partial(problem, steps) == Score.SOLVED
    for k in range(len(steps)):  # Every prefix of the reference is valid and still completable.
        assert task.check_partial(problem, steps[:k]) in (Score.PARTIAL, Score.SOLVED)
        assert task.can_succeed(problem, steps[:k]) is True
    assert task.verify(problem, "I am not sure.") == Score.INVALID
    assert task.verify(problem, task.prompt(problem)) == Score.INVALID  # Echoing the question earns nothing.
    assert task.check_partial(problem, ["I am not sure."]) == Score.INVALID
    assert task.can_succeed(problem, ["I am not sure."]) is False


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_extreme_difficulties(task):
    for d in (0.0, 1.0):
        p = task.generate(random.randrange(10**6), d)
        assert p["level"] == difficulty_to_level(d)
        assert task.verify(p, "\n".join(task.solve(p))) == Score.SOLVED


def test_einstein_hardest_level_is_fast():
    for seed in random.sample(range(10**6), 3):
        start = time.perf_counter()
        p = EinsteinTask().generate(seed, 0.99)
        assert time.perf_counter() - start < hang_limit(5.0)  # seconds, not the minutes a naive search takes
        assert ein.size_for(0.99) == (7, 7) and len(ein.parse_problem(p["problem"]).types) == 6


def test_seed_and_difficulty_change_the_problem():
    for task in TASKS:
        texts = {task.generate(s, d)["problem"] for s in range(4) for d in (0.3, 0.35)}
        assert len(texts) == 8, task.name


# --------------------------------------------------------------------------------------------------
# SAT.

def brute_models(formula, n=5):
    return [dict(enumerate(vals, 1)) for vals in itertools.product((False, True), repeat=n)
            if all(any(vals[abs(x) - 1] == (x > 0) for x in c) for c in formula)]


def falsify(clause) -> dict[int, bool]:
    return {abs(x): x < 0 for x in clause}


def assignment_text(assignment: dict[int, bool]) -> str:
    return "\n".join(f"x_{i} = {v}" for i, v in sorted(assignment.items()))


def test_sat_x1_records():
    task = SATTask()
    rng = random.Random(0)
    for rec in load_x1("SAT.json.bz2"):
        assert rec["type"] == "SAT" and rec["unique_solution"] is False
        assert SAT_TEMPLATE.fullmatch(rec["problem"])
        formula = sat.parse_formula(rec["problem"])
        assert formula == sat.parse_formula(rec["solution"])  # x1's "solution" is the formula.
        assert sat.format_formula(formula) == rec["solution"]  # We render formulas exactly as x1.
        steps = task.solve(rec)
        assert task.verify(rec, "\n".join(steps)) == Score.SOLVED
        model = sat.parse_assignment("\n".join(steps))
        broken = {**model, **falsify(rng.choice(formula))}  # Flip values so one clause fails.
        assert task.verify(rec, assignment_text(broken)) == Score.INCORRECT
        flipped = {**model, (i := rng.randint(1, 5)): not model[i]}
        expected = Score.SOLVED if flipped in brute_models(formula) else Score.INCORRECT
        assert task.verify(rec, assignment_text(flipped)) == expected


@at_every_level
def test_sat_generated_matches_x1_format_and_is_satisfiable(level, seed):
    d = difficulty_for(level, seed)
    p = SATTask().generate(seed, d)
    assert SAT_TEMPLATE.fullmatch(p["problem"])
    assert p["unique_solution"] is False and p["solution"] == sat.format_formula(sat.parse_formula(p["problem"]))
    formula = sat.parse_formula(p["problem"])
    assert brute_models(formula)
    assert [list(c) for c in formula] == p["meta"]["clauses"]
    # x1's clause count (it drops one clause after 10 unsatisfiable draws).
    assert sat.num_clauses_for(d) - 2 <= len(formula) <= sat.num_clauses_for(d)


def test_sat_clause_counts_per_level_match_x1():
    counts: dict[int, set[int]] = {}
    for rec in load_x1("SAT.json.bz2"):
        counts.setdefault(rec["level"], set()).add(len(sat.parse_formula(rec["problem"])))
    rng = random.Random(1)
    for level, seen in counts.items():
        for _ in range(20):
            d = (level - 1) / 10 + rng.uniform(0, 0.0999)
            assert sat.num_clauses_for(d) in seen or sat.num_clauses_for(d) - 1 in seen


@given(seed=seeds, ld=level_difficulty(), data=st.data())
@FAST
def test_sat_step_checker_agrees_with_brute_force(seed, ld, data):
    task = SATTask()
    p = task.generate(seed, ld[1])
    formula = sat.parse_formula(p["problem"])
    # Steps in any order; a variable may come again, with the same or the other value.
    pairs = data.draw(st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=7))
    steps = [f"x_{v} = {value}" for v, value in pairs]
    reassigned = len(set(pairs)) > len(dict(pairs))  # some variable got both values
    last_wins = dict(pairs)
    extendable = any(all(m[v] == val for v, val in last_wins.items()) for m in brute_models(formula))
    # The step checker rejects a reassignment: a later step may not repair a falsified clause.
    expected = Score.PARTIAL if not steps else Score.INCORRECT if reassigned else brute_score(formula, last_wins)
    assert task.check_partial(p, steps) == expected
    assert task.can_succeed(p, steps) is (extendable and not reassigned)
    if steps:  # A final answer is graded as x1 grades it: the last value of each variable counts.
        assert task.verify(p, "\n".join(steps)) == brute_score(formula, last_wins)


def brute_score(formula, assignment) -> Score:
    falsified = any(all(abs(x) in assignment and assignment[abs(x)] != (x > 0) for x in c) for c in formula)
    satisfied = all(any(abs(x) in assignment and assignment[abs(x)] == (x > 0) for x in c) for c in formula)
    return Score.INCORRECT if falsified else Score.SOLVED if satisfied else Score.PARTIAL


def test_sat_answer_parsing_variants():
    task = SATTask()
    p = {"problem": sat.HEADER + "(x_1 OR NOT x_2 OR x_3) AND (NOT x_1 OR x_4 OR x_5) " + sat.FOOTER}
    assert task.verify(p, "x1: true, x2 = False; x_3 is False, x_4=1 and x_5 = 0") == Score.SOLVED
    assert task.verify(p, "**x_1** = True\nx_4 = False\nx_5 = False") == Score.INCORRECT
    assert task.verify(p, "x_1 = False") == Score.PARTIAL
    assert task.verify(p, "x_1 = True\nx_1 = False\nx_2 = False") == Score.SOLVED  # Last value wins (x1).
    # Steps: x_1 = True with x_4 = x_5 = False falsifies the second clause; flipping x_1 later is no repair.
    repaired = ["x_1 = True", "x_4 = False", "x_5 = False", "x_1 = False", "x_2 = False"]
    assert task.check_partial(p, repaired[:3]) == Score.INCORRECT
    assert task.check_partial(p, repaired) == Score.INCORRECT and task.can_succeed(p, repaired) is False
    assert task.verify(p, "\n".join(repaired)) == Score.SOLVED  # x1's final-answer rule.
    assert task.check_partial(p, ["x_1 = False", "x_1 = True"]) == Score.INCORRECT
    assert task.check_partial(p, ["x_1 = True, x_1 = False"]) == Score.INCORRECT  # Within one step too.
    assert task.check_partial(p, ["x_1 = True", "x_1 = True"]) == Score.PARTIAL  # Restating is fine.
    assert task.verify(p, "x_7 = True") == Score.INVALID
    assert task.verify(p, "") == Score.INVALID
    with pytest.raises(ValueError):
        task.verify({"problem": "no formula here"}, "x_1 = True")


# --------------------------------------------------------------------------------------------------
# Knapsack.

def test_knapsack_x1_records():
    task = KnapsackTask()
    for rec in load_x1("knapsack.json.bz2"):
        assert rec["type"] == "Knapsack" and rec["unique_solution"] is True
        m = KNAPSACK_TEMPLATE.fullmatch(rec["problem"])
        inst = ks.parse_problem(rec["problem"])
        assert m and int(m.group(1)) == inst.weight_limit + 1 == int(m.group(2)) + 1
        assert ks.answer_of(inst) is rec["solution"]
        steps = task.solve(rec)
        assert task.verify(rec, "\n".join(steps)) == Score.SOLVED
        assert task.check_partial(rec, steps) == Score.SOLVED
        assert task.verify(rec, str(rec["solution"])) == Score.SOLVED  # x1's own answer.
        # Echoing the question ("True or False: ...") is no answer, whatever the label.
        assert task.verify(rec, rec["problem"]) == Score.INVALID
        assert task.verify(rec, f"{rec['problem']}\nAnswer: {rec['solution']}") == Score.SOLVED
        flipped = steps[:-1] + [steps[-1].replace(str(rec["solution"]), str(not rec["solution"]))]
        assert task.verify(rec, "\n".join(flipped)) == Score.INCORRECT
        assert task.check_partial(rec, flipped) == Score.INCORRECT


def test_knapsack_item_counts_per_level_match_x1():
    counts: dict[int, set[int]] = {}
    for rec in load_x1("knapsack.json.bz2"):
        counts.setdefault(rec["level"], set()).add(len(ks.parse_problem(rec["problem"]).items))
    task = KnapsackTask()
    for level, seen in counts.items():
        for seed in range(10):
            n = len(task.generate(seed, (level - 1) / 10 + seed / 101)["meta"]["items"])
            # x1 lists "snack" twice, which drops an item from its problems with >= 27 items.
            assert min(seen) <= n <= max(seen) + 1, (level, n, seen)


@at_every_level
def test_knapsack_generated_matches_x1_format(level, seed):
    p = KnapsackTask().generate(seed, difficulty_for(level, seed))
    assert KNAPSACK_TEMPLATE.fullmatch(p["problem"])
    inst = ks.parse_problem(p["problem"])
    assert p["meta"]["items"] == [list(i) for i in inst.items] and p["solution"] is ks.answer_of(inst)


def brute_knapsack(items, cap):
    """All subsets (as index sets) within capacity, and the optimum value."""
    fits = [set(s) for r in range(len(items) + 1) for s in itertools.combinations(range(len(items)), r)
            if sum(items[i][1] for i in s) <= cap]
    return fits, max(sum(items[i][2] for i in s) for s in fits)


@given(seed=seeds, ld=level_difficulty(max_level=3), data=st.data())
@FAST
def test_knapsack_step_checker_agrees_with_brute_force(seed, ld, data):
    task = KnapsackTask()
    p = task.generate(seed, ld[1])
    inst = ks.parse_problem(p["problem"])
    fits, opt = brute_knapsack(inst.items, inst.weight_limit)
    assert ks.best_value(inst.items, inst.weight_limit) == opt and p["solution"] is (opt >= inst.value_target)
    chosen = data.draw(st.sampled_from(fits))
    order = data.draw(st.permutations(sorted(chosen)))  # Take lines may come in any order.
    steps, tw, tv = [], 0, 0
    for i in order:
        name, w, v = inst.items[i]
        tw, tv = tw + w, tv + v
        steps.append(ks.format_take(name, w, v, tw, tv))
    assert task.check_partial(p, steps) == Score.PARTIAL
    completable = any(chosen <= s and sum(inst.items[i][2] for i in s) == opt for s in fits)
    assert task.can_succeed(p, steps) is completable
    final = steps + [ks.format_best(tv, inst.value_target)]
    assert task.check_partial(p, final) == (Score.SOLVED if tv == opt else Score.INCORRECT)
    if steps:  # A wrong running total is caught.
        bad = steps[:-1] + [ks.format_take(*inst.items[order[-1]], tw, tv + 1)]
        assert task.check_partial(p, bad) == Score.INCORRECT
        assert task.check_partial(p, steps + [steps[0]]) == Score.INCORRECT  # Item taken twice.


def test_knapsack_parsing_variants():
    task = KnapsackTask()
    rec = {"problem": ks.format_problem(ks.Instance((("pen", 5, 19), ("map", 3, 9), ("book", 4, 16)), 8, 30))}
    # Within weight 8: pen + map (8, 28) beats map + book (7, 25); 28 < 30.
    assert task.solve(rec) == ["Take pen (weight 5, value 19): total weight 5, total value 19",
                               "Take map (weight 3, value 9): total weight 8, total value 28",
                               "Best value: 28 < 30, so the answer is False"]
    assert task.verify(rec, "**Answer: FALSE**") == task.verify(rec, "true or false? false") == Score.SOLVED
    assert task.verify(rec, "True.") == Score.INCORRECT
    assert task.verify(rec, "no idea") == Score.INVALID
    assert task.check_partial(rec, ["take PEN (weight: 5, value: 19) total weight: 5, total value: 19"]) \
        == Score.PARTIAL
    assert task.check_partial(rec, ["False"]) == Score.INVALID  # Our trace states the optimum first.


# --------------------------------------------------------------------------------------------------
# Einstein.

def brute_einstein(riddle: ein.Riddle, limit: int = 200_000) -> list[dict]:
    """All solutions by enumerating one permutation per attribute type (small riddles only)."""
    perms = list(itertools.permutations(range(1, riddle.n + 1)))
    assert len(perms) ** len(riddle.types) <= limit
    out = []
    for combo in itertools.product(perms, repeat=len(riddle.types)):
        house = {(t, v): h for t, hs in zip(riddle.types, combo) for v, h in zip(riddle.values[t], hs)}
        house.update({(ein.POSITION, str(k)): k for k in range(1, riddle.n + 1)})
        if all(c.holds(house[c.a], house[c.b]) for c in riddle.clues):
            out.append(house)
    return out


def test_einstein_x1_example():
    task = EinsteinTask()
    rec = {"type": "Einstein", "problem": X1_EINSTEIN_EXAMPLE, "solution": "3"}
    assert EINSTEIN_TEMPLATE.fullmatch(X1_EINSTEIN_EXAMPLE)
    riddle, solution = ein.solve_text(X1_EINSTEIN_EXAMPLE)
    assert str(solution[riddle.target]) == rec["solution"]  # The README's table has Sandwich in house 3.
    steps = task.solve(rec)
    assert task.verify(rec, "\n".join(steps)) == Score.SOLVED == task.check_partial(rec, steps)
    assert task.verify(rec, "so \\boxed{2}") == Score.INCORRECT
    assert task.verify(rec, "house 3") == Score.INVALID
    assert task.check_partial(rec, ["Brian (Name) lives in house 1", "So Pasta (Food) is equal to 1 (Position)"]) \
        == Score.PARTIAL
    assert task.check_partial(rec, ["Brian (Name) is in house 2"]) == Score.INCORRECT
    assert task.check_partial(rec, ["Bob (Name) is in house 1"]) == Score.INVALID


@at_every_level
def test_einstein_generated_matches_x1_format(level, seed):
    d = difficulty_for(level, seed)
    p = EinsteinTask().generate(seed, d)
    assert EINSTEIN_TEMPLATE.fullmatch(p["problem"])
    riddle = ein.parse_problem(p["problem"])
    houses, n_types = ein.size_for(d)
    assert (riddle.n, len(riddle.types) + 1) == (houses, n_types) and 3 <= houses <= 7 and 3 <= n_types <= 7
    assert p["solution"] == str(ein.solve_text(p["problem"])[1][riddle.target])


@given(seed=seeds, ld=level_difficulty(max_level=2), data=st.data())
@FAST
def test_einstein_unique_and_step_checker_agree_with_brute_force(seed, ld, data):
    task = EinsteinTask()
    p = task.generate(seed, ld[1])
    riddle = ein.parse_problem(p["problem"])
    solutions = brute_einstein(riddle)
    assert len(solutions) == 1 and str(solutions[0][riddle.target]) == p["solution"]
    attrs = riddle.attributes()
    facts = data.draw(st.lists(st.tuples(st.sampled_from(attrs), st.integers(1, riddle.n)), max_size=4))
    steps = [ein.format_fact(a, h) for a, h in facts]
    consistent = any(all(s[a] == h for a, h in facts) for s in solutions)
    assert task.can_succeed(p, steps) is consistent
    assert task.check_partial(p, steps) == (Score.PARTIAL if consistent else Score.INCORRECT)
    # Removing a clue of a minimal riddle must break uniqueness (x1's minimisation).
    if riddle.clues:
        i = data.draw(st.integers(0, len(riddle.clues) - 1))
        fewer = ein.Riddle(riddle.n, riddle.types, riddle.values, riddle.clues[:i] + riddle.clues[i + 1:],
                           riddle.target)
        assert len(brute_einstein(fewer)) > 1
        assert ein.count_solutions(fewer)[0] == 2


# --------------------------------------------------------------------------------------------------
# PrOntoQA.

def closure(theory: pq.Theory) -> set:
    """Independent fixpoint of modus ponens over the theory."""
    facts = set(theory.premises)
    while True:
        new = {(e, cons) for e, (p, pos) in facts if pos for ante, cons in theory.rules if ante == p} - facts
        if not new:
            return facts
        facts |= new


def test_prontoqa_x1_example():
    task = ProntoQATask()
    rec = {"type": "ProntoQA", "problem": X1_PRONTOQA_EXAMPLE, "solution": "True"}
    assert PRONTOQA_TEMPLATE.fullmatch(X1_PRONTOQA_EXAMPLE)
    theory = pq.parse_problem(X1_PRONTOQA_EXAMPLE)
    assert len(theory.rules) == 7 and len(theory.premises) == 2 and theory.query == ("Max", ("bright", False))
    steps = task.solve(rec)
    assert steps == ["Max is a shumpus.", "Shumpuses are not bright. So Max is not bright.", "The answer is True."]
    assert task.verify(rec, "\n".join(steps)) == Score.SOLVED == task.check_partial(rec, steps)
    assert task.verify(rec, "Max is not bright, so: false") == Score.INCORRECT
    assert task.verify(rec, X1_PRONTOQA_EXAMPLE) == Score.INVALID  # The echoed question is no answer.
    assert task.verify(rec, "True or false: Max is not bright. True") == Score.SOLVED
    assert task.check_partial(rec, ["Max is a lempus."]) == Score.PARTIAL  # One hop from an axiom.
    assert task.check_partial(rec, ["Max is feisty."]) == Score.INCORRECT
    assert task.check_partial(rec, ["Every shumpus is a jompus."]) == Score.INCORRECT  # Not an axiom.
    assert task.check_partial(rec, ["The answer is True."]) == Score.INCORRECT  # Unproved.


@at_every_level
def test_prontoqa_generated_matches_x1_format(level, seed):
    task = ProntoQATask()
    d = difficulty_for(level, seed)
    p = task.generate(seed, d)
    assert PRONTOQA_TEMPLATE.fullmatch(p["problem"])
    theory = pq.parse_problem(p["problem"])
    n = 2 + int(5 * d)
    assert p["meta"]["num_deduction_steps"] == n and len(task.solve(p)) == n + 1  # Proof lines + answer.
    facts = closure(theory)
    entity, (pred, positive) = theory.query
    assert ((entity, (pred, positive)) in facts) is (p["solution"] == "True")
    assert ((entity, (pred, not positive)) in facts) is (p["solution"] == "False")
    flipped = task.solve(p)[:-1] + [f"The answer is {p['solution'] != 'True'}."]
    assert task.check_partial(p, flipped) == Score.INCORRECT and task.verify(p, "\n".join(flipped)) == 0


@given(seed=seeds, ld=level_difficulty(), data=st.data())
@FAST
def test_prontoqa_step_checker_is_sound_and_complete_for_one_hop(seed, ld, data):
    task = ProntoQATask()
    p = task.generate(seed, ld[1])
    theory = pq.parse_problem(p["problem"])
    entity = theory.query[0]
    preds = sorted({r[0] for r in theory.rules} | {r[1][0] for r in theory.rules})
    fact = (entity, (data.draw(st.sampled_from(preds)), data.draw(st.booleans())))
    proof = task.solve(p)[:-1]
    k = data.draw(st.integers(0, len(proof)))
    score = task.check_partial(p, proof[:k] + [pq.render_fact(fact)])
    true_facts = closure(theory)
    if score == Score.PARTIAL:
        assert fact in true_facts  # Sound: only true facts are accepted.
    else:
        assert score == Score.INCORRECT
    one_hop = fact in theory.premises or any(
        cons == fact[1] and (entity, (ante, True)) in theory.premises for ante, cons in theory.rules)
    if one_hop:
        assert score == Score.PARTIAL
    if fact not in true_facts:
        assert task.can_succeed(p, proof[:k] + [pq.render_fact(fact)]) is False
