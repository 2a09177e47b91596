"""The shared task base (rlm_jax.tasks.base): declared capabilities match what each task offers, and the
shared logic (prompt, final-answer and step verification, can_succeed) behaves as documented."""
import dataclasses
import random

import pytest

from rlm_jax.tasks import TASK_NAMES, get_task
from rlm_jax.tasks.base import AnswerTask, Capabilities, Score, StepTask, Task, TaskBase, task_rng
from rlm_jax.tasks.io import generate_dataset

OPTIONAL_METHODS = ("random_steps", "solutions", "replay")
GENERATED = [n for n in TASK_NAMES if n != "jsonl_math"]  # jsonl_math reads files, it cannot generate


@pytest.mark.parametrize("name", TASK_NAMES)
def test_capabilities_are_declared_and_truthful(name):
    task = get_task(name)
    assert isinstance(task, TaskBase) and isinstance(task, Task)
    assert isinstance(task.capabilities, Capabilities)
    for method in OPTIONAL_METHODS:  # a declared capability has its method, an undeclared one has none
        assert getattr(task.capabilities, method) == callable(getattr(task, method, None)), method


def test_capabilities_are_frozen_and_default_to_none():
    caps = Capabilities()
    assert not any(dataclasses.astuple(caps))
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.random_steps = True
    assert TaskBase.capabilities == caps


@pytest.mark.parametrize("name", GENERATED)
def test_exact_labels_answer_true_or_false_on_reference_prefixes(name):
    task = get_task(name)
    assert task.capabilities.exact_labels
    for problem in generate_dataset(task, [1, 5], 4, seed=3, progress=False):
        assert task.prompt(problem) == problem["problem"]
        steps = task.solve(problem)
        labels = [task.can_succeed(problem, steps[:k]) for k in range(len(steps) + 1)]
        assert labels == [True] * len(labels)
        assert task.can_succeed(problem, ["no step of this task"]) is False


def test_jsonl_math_has_no_exact_labels():
    assert not get_task("jsonl_math").capabilities.exact_labels


@pytest.mark.parametrize("name,base", [("countdown", StepTask), ("arithmetic", StepTask),
                                       ("knapsack", AnswerTask), ("einstein", AnswerTask),
                                       ("prontoqa", AnswerTask), ("jsonl_math", AnswerTask)])
def test_tasks_derive_from_the_base_that_grades_them(name, base):
    assert isinstance(get_task(name), base)


class Parity(AnswerTask):
    """A toy final-answer task: is the number in the problem even?"""
    name = "Parity"

    def read_answer(self, output):
        words = [w for w in output.split() if w in ("even", "odd")]
        return words[-1] if words else None

    def reference_answer(self, problem):
        return "even" if int(problem["problem"]) % 2 == 0 else "odd"

    def check_partial(self, problem, steps):
        return Score.PARTIAL


def test_answer_task_verifies_the_final_answer():
    task, problem = Parity(), {"problem": "4"}
    assert task.verify(problem, "odd, no: even") == Score.SOLVED
    assert task.verify(problem, "odd") == Score.INCORRECT
    assert task.verify(problem, "no idea") == Score.INVALID
    assert task.can_succeed(problem, ["anything"]) is True


class Steps(StepTask):
    name = "Steps"

    def check_partial(self, problem, steps):
        return Score.SOLVED if list(steps) == ["a", "b"] else Score.INCORRECT


def test_step_task_grades_the_output_steps():
    task = Steps()
    assert task.verify({}, " a \n\n b\n") == Score.SOLVED
    assert task.verify({}, "a") == Score.INCORRECT
    assert task.verify({}, " \n ") == Score.INVALID
    assert task.can_succeed({}, ["a"]) is False


def test_score_valid():
    assert [s.valid for s in Score] == [False, False, True, True]


def test_task_rng_is_seeded_by_task_seed_and_difficulty():
    draw = task_rng("SAT", 5, 0.25).random()
    assert draw == random.Random("SAT/5/0.25").random() == task_rng("SAT", 5, 0.25).random()
    assert len({draw, task_rng("SAT", 5, 0.2500001).random(), task_rng("SAT", 6, 0.25).random(),
                task_rng("Knapsack", 5, 0.25).random()}) == 4
