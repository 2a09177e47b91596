"""Countdown / Countdown3 / Game of 24: generation, verification, step checks against an
independent brute force (plain recursion over ordered pairs with Fractions, no memo, no shared code)."""
import itertools
import random
import re
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st

from rlm_jax.tasks import get_task
from rlm_jax.tasks.base import Score, difficulty_for, level_to_difficulty, split_steps
from rlm_jax.tasks.countdown import Countdown3Task, CountdownTask, Game24Task, format_problem, parse_step
from rlm_jax.tasks.io import generate_dataset
from rlm_jax.training.sft import reference_traces

TASKS = {"countdown": CountdownTask(), "countdown3": Countdown3Task(), "game24": Game24Task()}
FAST = settings(max_examples=12, deadline=None)


def _brute_results(a, b, fractions, non_negative):
    """Independent rules: every (text, value) of one step on the ordered pair (a, b)."""
    out = [("+", a + b), ("*", a * b)]
    if a >= b or not non_negative:
        out.append(("-", a - b))
    if b != 0 and (fractions or Fraction(a) / b == int(Fraction(a) / b)):
        out.append(("/", Fraction(a) / b))
    return out


def brute_solvable(numbers, target, fractions, non_negative):
    if len(numbers) == 1:
        return numbers[0] == target
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [numbers[k] for k in range(len(numbers)) if k not in (i, j)]
        for _, value in _brute_results(numbers[i], numbers[j], fractions, non_negative):
            if brute_solvable(rest + [value], target, fractions, non_negative):
                return True
    return False


def brute_solutions(numbers, target, fractions, non_negative):
    """Distinct step sequences reaching the target, each step as `a op b` (commutative steps written larger
    first)."""
    def fmt(x):
        return str(Fraction(x)) if Fraction(x).denominator != 1 else str(int(x))

    def walk(nums, prefix, found):
        if len(nums) == 1:
            if nums[0] == target:
                found.add(prefix)
            return
        for i, j in itertools.permutations(range(len(nums)), 2):
            rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
            for op, value in _brute_results(nums[i], nums[j], fractions, non_negative):
                if op in "+*" and nums[i] < nums[j]:
                    continue  # written larger-first only: a+b and b+a are one step
                walk(rest + [value], prefix + (f"{fmt(nums[i])}{op}{fmt(nums[j])}",), found)

    found = set()
    walk([Fraction(n) for n in numbers], (), found)
    return found


def _fmt(x):
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def random_walk(task, numbers, rng, n_steps):
    """`n_steps` random legal steps (independent rules): (step texts, numbers left)."""
    nums, steps = [Fraction(n) for n in numbers], []
    for _ in range(n_steps):
        i, j = rng.sample(range(len(nums)), 2)
        op, value = rng.choice(_brute_results(nums[i], nums[j], task.fractions, task.non_negative))
        steps.append(f"{_fmt(nums[i])}{op}{_fmt(nums[j])}={_fmt(value)}")
        nums = [nums[k] for k in range(len(nums)) if k not in (i, j)] + [value]
    return steps, nums


def rules(task):
    return task.fractions, task.non_negative


@pytest.mark.parametrize("level", range(1, 11))
@pytest.mark.parametrize("name", sorted(TASKS))
@given(seed=st.integers(0, 2**32))
@settings(max_examples=1, deadline=None)  # one seed per preset and level: generation ranks 10 candidates
def test_generated_problems_are_solvable_and_solutions_verify(name, level, seed):
    task = TASKS[name]
    problem = task.generate(seed, difficulty_for(level, seed))
    numbers, target = problem["meta"]["numbers"], problem["meta"]["target"]
    assert problem["type"] == task.name and problem["level"] == level
    assert problem["problem"] == format_problem(numbers, target)
    assert len(numbers) == task.n_numbers
    assert all(task.number_range[0] <= n <= task.number_range[1] for n in numbers)
    assert task.target_range[0] <= target <= task.target_range[1]
    assert brute_solvable([Fraction(n) for n in numbers], target, *rules(task))
    assert task.verify(problem, problem["solution"]) == Score.SOLVED
    steps = task.solve(problem)
    assert len(steps) == task.n_numbers - 1
    assert task.check_partial(problem, steps) == Score.SOLVED
    for k in range(len(steps)):  # every prefix of the reference is valid and can still reach the target
        assert task.check_partial(problem, steps[:k]) == Score.PARTIAL
        assert task.can_succeed(problem, steps[:k]) is True
    # Verification reads the text alone: x1 files carry no meta.
    bare = {k: v for k, v in problem.items() if k != "meta"}
    assert task.verify(bare, "\n".join(steps)) == Score.SOLVED
    assert task.generate(seed, difficulty_for(level, seed)) == problem


@given(name=st.sampled_from(["countdown3", "game24"]), seed=st.integers(0, 2**32),
       level=st.integers(1, 10))
@settings(max_examples=6, deadline=None)
def test_solution_count_and_solutions_match_brute_force(name, seed, level):
    task = TASKS[name]
    problem = task.generate(seed, level_to_difficulty(level))
    meta = problem["meta"]
    expected = brute_solutions(meta["numbers"], meta["target"], *rules(task))
    assert meta["n_solutions"] == len(expected)
    assert problem["unique_solution"] == (meta["n_solutions"] == 1)
    solutions = task.solutions(problem)
    assert solutions[0] == task.solve(problem)
    assert all(task.verify(problem, "\n".join(s)) == Score.SOLVED for s in solutions)
    written = [tuple(step.split("=")[0] for step in s) for s in solutions]
    assert len(set(written)) == len(written) and set(written) == expected


@given(name=st.sampled_from(sorted(TASKS)), seed=st.integers(0, 2**32))
@settings(max_examples=8, deadline=None)
def test_lower_levels_have_at_least_as_many_solutions(name, seed):
    task = TASKS[name]
    counts = [task.generate(seed, level_to_difficulty(level))["meta"]["n_solutions"] for level in (1, 5, 10)]
    assert counts == sorted(counts, reverse=True)


@given(name=st.sampled_from(sorted(TASKS)), seed=st.integers(0, 2**32), data=st.data())
@settings(max_examples=40, deadline=None)
def test_step_checker_agrees_with_brute_force(name, seed, data):
    """Random problems (solvable or not) and random legal partial solutions: check_partial's
    score and can_succeed match the brute force on the numbers left."""
    task = TASKS[name]
    rng = random.Random(seed)
    numbers = [rng.randint(*task.number_range) for _ in range(task.n_numbers)]
    target = rng.randint(*task.target_range)
    problem = {"type": task.name, "problem": format_problem(numbers, target)}
    n_steps = data.draw(st.integers(0, task.n_numbers - 1))
    steps, left = random_walk(task, numbers, rng, n_steps)
    expected = brute_solvable(left, target, *rules(task))
    assert task.can_succeed(problem, steps) == expected
    score = task.check_partial(problem, steps)
    if len(left) > 1:
        assert score == Score.PARTIAL
    else:
        assert score == (Score.SOLVED if expected else Score.INCORRECT)


@given(name=st.sampled_from(sorted(TASKS)), seed=st.integers(0, 2**32), level=st.integers(1, 10),
       data=st.data())
@FAST
def test_corrupted_solutions_fail(name, seed, level, data):
    task = TASKS[name]
    problem = task.generate(seed, level_to_difficulty(level))
    steps = split_steps(problem["solution"])
    k = data.draw(st.integers(0, len(steps) - 1))
    left, _, result = steps[k].partition("=")
    delta = data.draw(st.integers(1, 50))
    wrong_result = steps[:k] + [f"{left}={_fmt(Fraction(result) + delta)}"] + steps[k + 1:]
    assert task.verify(problem, "\n".join(wrong_result)) == Score.INCORRECT
    assert not task.can_succeed(problem, wrong_result[:k + 1])
    garbage = steps[:k] + [data.draw(st.sampled_from(["7*", "=5", "the answer", "3 4 = 7"]))]
    assert task.verify(problem, "\n".join(garbage)) == Score.INVALID
    # A number that is not available: one more than the largest number present.
    missing = max(problem["meta"]["numbers"]) * 1000 + 1
    stolen = steps[:k] + [f"{missing}+1={missing + 1}"]
    assert task.check_partial(problem, stolen) == Score.INCORRECT
    assert task.verify(problem, "\n".join(steps[:-1])) == Score.PARTIAL
    assert task.verify(problem, "\n".join(steps + steps[-1:])) == Score.INCORRECT  # an extra step


@given(seed=st.integers(0, 2**32))
@settings(max_examples=20, deadline=None)
def test_rules_differ_between_presets(seed):
    rng = random.Random(seed)
    a, b = sorted(rng.sample(range(2, 13), 2))  # a < b
    c, d = rng.randint(1, 13), rng.randint(1, 13)
    problem = {"problem": format_problem([a, b, c, d], 24)}
    negative = [f"{a}-{b}={a - b}"]
    assert TASKS["countdown"].check_partial(problem, negative) == Score.INCORRECT
    assert TASKS["game24"].check_partial(problem, negative) == Score.PARTIAL
    q = Fraction(a, b)
    inexact = [f"{a}/{b}={_fmt(q)}"] if q.denominator != 1 else []
    if inexact:
        assert TASKS["countdown"].check_partial(problem, inexact) == Score.INCORRECT
        assert TASKS["game24"].check_partial(problem, inexact) == Score.PARTIAL
        # The fraction is now a number that later steps can use, parenthesised or not.
        for written in (_fmt(q), f"({_fmt(q)})"):
            nxt = inexact + [f"{written}*{c}={_fmt(q * c)}"]
            assert TASKS["game24"].check_partial(problem, nxt) == Score.PARTIAL


@given(seed=st.integers(0, 2**32), spaces=st.lists(st.sampled_from(["", " ", "  ", "\t"]), min_size=4, max_size=4))
@settings(max_examples=20, deadline=None)
def test_whitespace_and_operator_spellings_are_accepted(seed, spaces):
    task = TASKS["countdown3"]
    problem = task.generate(seed, 0.0)
    steps = split_steps(problem["solution"])
    loose = []
    for step in steps:
        left, _, result = step.partition("=")
        op = next(ch for ch in left[1:] if ch in "+-*/")
        a, b = left.split(op, 1)
        op = {"*": "×"}.get(op, op)
        loose.append(f"{spaces[0]}{a}{spaces[1]}{op}{spaces[2]}{b}{spaces[3]}={spaces[0]}{result}")
    assert task.verify(problem, "\n".join(loose)) == Score.SOLVED


@given(name=st.sampled_from(["countdown", "countdown3", "game24"]), seed=st.integers(0, 2**32),
       where=st.sampled_from(["result", "operand"]), numerator=st.integers(-999999, 999999))
@settings(max_examples=30, deadline=None)
def test_a_zero_denominator_is_a_failed_step_not_a_crash(name, seed, where, numerator):
    # A policy can write `911222/0`: the verifier must score it, as for any other malformed step.
    task = TASKS[name]
    problem = task.generate(seed, 0.0)
    steps = split_steps(problem["solution"])
    left, _, result = steps[0].partition("=")
    zero = f"{numerator}/0"
    steps[0] = f"{left}={zero}" if where == "result" else f"{zero}+{result}={result}"
    assert task.verify(problem, "\n".join(steps)) in (Score.INVALID, Score.INCORRECT)


def test_parse_errors_name_the_format():
    with pytest.raises(ValueError, match="Numbers:"):
        TASKS["countdown"].check_partial({"problem": "what is 3 + 4"}, [])
    with pytest.raises(ValueError, match="range"):
        CountdownTask(number_range=(9, 1))


@given(seed=st.integers(0, 2**32), per_problem=st.integers(1, 4))
@settings(max_examples=5, deadline=None)
def test_sft_reference_traces_take_distinct_solutions_per_problem(seed, per_problem):
    task = TASKS["countdown3"]
    problems = [task.generate(seed + i, difficulty_for(1 + i % 10, seed + i)) for i in range(12)]
    rows, traces = reference_traces(task, problems, per_problem)
    for p in problems:
        mine = [tuple(t) for r, t in zip(rows, traces) if r is p]
        assert len(mine) == min(per_problem, p["meta"]["n_solutions"]) and len(set(mine)) == len(mine)
        assert list(mine[0]) == task.solve(p)
        assert all(task.verify(p, "\n".join(t)) == Score.SOLVED for t in mine)


def test_sft_reference_traces_need_a_task_that_enumerates_solutions():
    task = get_task("prontoqa")
    problems = [task.generate(s, 0.0) for s in range(2)]
    assert reference_traces(task, problems, 1)[1] == [task.solve(p) for p in problems]
    with pytest.raises(ValueError, match="traces_per_problem=1"):
        reference_traces(task, problems, 2)


@pytest.mark.parametrize("name", sorted(TASKS))
@given(seed=st.integers(0, 2**32))
@example(seed=3260)  # game24 plays 13/21 then 13/21/1=13/21, which also reads as 13 / (21/1)
@settings(max_examples=5, deadline=None)
def test_random_steps_are_legal_playouts_from_the_number_range(name, seed):
    """Pretraining's documents: every step obeys the rules (checked with the independent brute-force
    rules), and each operand is a drawn number or an earlier result of the same playout, used once."""
    task = TASKS[name]
    per_playout = task.n_numbers - 1
    steps = task.random_steps(random.Random(seed), 40 * per_playout)
    assert len(steps) == 40 * per_playout
    assert steps == task.random_steps(random.Random(seed), 40 * per_playout)
    lo, hi = task.number_range
    for k in range(0, len(steps), per_playout):
        results = []
        for step in steps[k:k + per_playout]:
            readings = [(a, op, b, c) for a, op, b, c in parse_step(step)
                        if (op, c) in _brute_results(Fraction(a), Fraction(b), *rules(task))]
            assert readings, f"illegal step {step!r} under {name}'s rules"
            for a, _, b, c in readings:  # fractions make some steps ambiguous (`13/21/1=13/21`)
                left = list(results)
                for operand in (a, b):
                    if operand in left:
                        left.remove(operand)  # an earlier result, used once
                    elif not lo <= operand <= hi:
                        break
                else:
                    results = left + [c]
                    break
            else:
                raise AssertionError(f"no reading of {step!r} takes drawn numbers or earlier results: "
                                     f"{steps[k:k + per_playout]}")
    assert {op for s in steps for op in "+-*/" if op in s.lstrip("-")} >= set("+-*")
    assert task.random_steps(random.Random(seed + 1), 40) != steps[:40]


@pytest.mark.parametrize("text,why", [
    ("Numbers: 3 7 12 Target: 26 and more", "text after the target"),
    ("Numbers: 3 7 12 Target: 26 5", "text after the target"),
    ("Numbers: 3 7 12 Target:", "no target"),
    ("Numbers: 3 -7 12 Target: 26", "'-7' is a negative number"),
    ("Numbers: 3 7 12 Target: -26", "'-26' is a negative number"),
    ("Numbers: \u0969 7 12 Target: 26", "is not a non-negative integer"),  # Devanagari 3
    ("Numbers: 3 7 12 Target: \u0662\u0666", "is not a non-negative integer"),  # Arabic-Indic 26
    ("Numbers: 3 7/2 12 Target: 26", "'7/2' is not a non-negative integer"),
    ("Numbers: 3 7 Target: 26", "has 2 numbers; expected 3"),
    ("Numbers: 3 7 12 13 Target: 26", "has 4 numbers; expected 3"),
    ("Solve Numbers: 3 7 12 Target: 26", "not a countdown problem"),
])
def test_malformed_problems_are_refused_with_the_reason(text, why):
    task = TASKS["countdown3"]
    for call in (task.solve, task.solutions, lambda p: task.verify(p, "3+7=10"),
                 lambda p: task.check_partial(p, []), lambda p: task.can_succeed(p, [])):
        with pytest.raises(ValueError, match=re.escape(why)) as err:
            call({"problem": text})
        assert "Countdown3" in str(err.value) and repr(text) in str(err.value)


@pytest.mark.parametrize("name,count", [("countdown", 4), ("game24", 4), ("countdown3", 3)])
def test_each_preset_needs_its_count_of_numbers(name, count):
    task = TASKS[name]
    for n in (count - 1, count + 1):
        text = f"Numbers: {' '.join(['2'] * n)} Target: 24"
        with pytest.raises(ValueError, match=f"has {n} numbers; expected {count}"):
            task.solve({"problem": text})
    assert task.check_partial({"problem": f" Numbers:{' 2' * count}  Target:24 \n"}, []) == Score.PARTIAL


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generated_problems_parse_strictly(name):
    task = TASKS[name]
    for problem in generate_dataset(task, list(range(1, 11)), 20, seed=11, progress=False):
        numbers, target = task.parse_problem(problem)
        assert (numbers, target) == (problem["meta"]["numbers"], problem["meta"]["target"])
        assert task.verify(problem, problem["solution"]) == Score.SOLVED


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batched_solution_counts_equal_the_one_by_one_counts(name):
    """generate counts its draws in numpy (`solution_counts`); every count, over random draws with repeated
    numbers and zeros (0 makes divisions illegal), equals `final_values`'."""
    from rlm_jax.tasks.countdown import final_values, solution_counts
    task, rng = TASKS[name], random.Random(name)
    lo, hi = task.number_range
    states = [tuple(sorted(rng.choice([rng.randint(lo, hi), rng.randint(0, 3)]) for _ in range(task.n_numbers)))
              for _ in range(150)]
    targets = [rng.choice([rng.randint(*task.target_range), rng.randint(-5, 30)]) for _ in states]
    assert list(solution_counts(states, targets, task.rules)) == \
        [final_values(s, task.rules).get(t, 0) for s, t in zip(states, targets)]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_equals_drawing_one_candidate_at_a_time(name):
    """Batched drawing picks the problem that drawing, counting and rejecting one draw at a time picks."""
    from rlm_jax.tasks.countdown import final_values
    task = TASKS[name]
    for seed in range(4):
        level = 1 + 3 * seed
        rng, pool = random.Random(seed), []
        while len(pool) < task.pool:
            numbers = tuple(sorted(rng.randint(*task.number_range) for _ in range(task.n_numbers)))
            target = rng.randint(*task.target_range)
            if final_values(numbers, task.rules).get(target, 0):
                pool.append((numbers, target, final_values(numbers, task.rules)[target]))
        numbers, target, count = sorted(pool, key=lambda c: -c[2])[round((level - 1) * (task.pool - 1) / 9)]
        meta = task.generate(seed, level_to_difficulty(level))["meta"]
        assert (tuple(meta["numbers"]), meta["target"], meta["n_solutions"]) == (numbers, target, count)


# ------------------------------------------------------------------------- search traces (Stream of Search)
def _brute_solvable(numbers, target, fractions, non_negative):
    """Independent: can the multiset `numbers` reach `target` using every number (plain recursion)?"""
    if len(numbers) == 1:
        return numbers[0] == target
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for _, value in _brute_results(numbers[i], numbers[j], fractions, non_negative):
            if _brute_solvable(rest + [value], target, fractions, non_negative):
                return True
    return False


@pytest.mark.parametrize("name", ["countdown3", "game24"])
def test_search_traces_are_a_depth_first_search_that_ends_solved(name):
    """Fresh random problems: each trace verifies SOLVED (the task resolves its `back` steps); it tries
    first steps closest-to-the-target first and backtracks from exactly those after which the brute force
    finds no solution (a 2-number state is settled in one look: solved in one step, else `back` at once);
    the path left after undoing is a solution on its own; `max_steps` bounds it."""
    task = TASKS[name]
    rules = task.rules
    rng = random.Random()
    checked = backtracked = 0
    for _ in range(12 if name == "game24" else 40):
        p = task.generate(rng.randrange(2**32), rng.random())
        trace = task.search_trace(p, 100_000)  # generated problems are solvable: the search ends solved
        assert trace is not None and task.verify(p, "\n".join(trace)) == Score.SOLVED, trace
        numbers, target = task.parse_problem(p)
        if len(numbers) == 3:  # the first level's order and dead ends, against the brute force
            tried = [s for k, s in enumerate(trace) if s != "back" and (k == 0 or trace[k - 1] == "back")]
            assert trace.count("back") == len(tried) - 1
            for step, last in zip(tried, [False] * (len(tried) - 1) + [True]):
                a, _, b, c = parse_step(step)[0]
                rest = list(numbers)
                rest.remove(a)
                rest.remove(b)
                assert _brute_solvable(rest + [c], target, rules.fractions, rules.non_negative) == last, step
            gaps = [abs(parse_step(s)[0][3] - target) for s in tried]
            assert gaps == sorted(gaps)
        path = []
        for step in trace:  # `back` undoes the step before it: the path left is a solution on its own
            path = path[:-1] if step == "back" else path + [step]
        assert task.verify(p, "\n".join(path)) == Score.SOLVED and len(path) == len(numbers) - 1
        shorter = task.search_trace(p, len(trace) - 1)
        assert shorter is None
        checked += 1
        backtracked += "back" in trace
    assert checked and backtracked >= 3


def test_backtracking_steps_replay_as_undo():
    task = TASKS["countdown3"]
    p = {"problem": "Numbers: 5 9 12 Target: 48", "type": "Countdown3", "level": 1}
    assert task.verify(p, "12+9=21\nback\n9-5=4\n12*4=48") == Score.SOLVED
    assert task.verify(p, "12+9=21\n21+5=26\nback\nback\n9-5=4\n12*4=48") == Score.SOLVED
    assert task.check_partial(p, ["12+9=21", "back"]) == Score.PARTIAL
    assert task.verify(p, "back\n9-5=4\n12*4=48") == Score.INVALID  # nothing to undo
    assert task.verify(p, "12+9=21\n21+5=26") == Score.INCORRECT


def test_sft_reference_traces_of_searches_leave_out_problems_beyond_the_step_limit():
    task = TASKS["countdown3"]
    problems = [task.generate(s, difficulty_for(1 + s % 10, s)) for s in range(60)]
    rows, traces = reference_traces(task, problems, 1, kind="search", max_steps=4)
    assert 0 < len(rows) < len(problems) and all(len(t) <= 4 for t in traces)
    assert all(task.verify(p, "\n".join(t)) == Score.SOLVED for p, t in zip(rows, traces))
    assert any("back" in t for t in traces)
