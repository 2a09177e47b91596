"""The task protocol: every reasoning domain (countdown, SAT, ...) implements `Task`.

Search, training and evaluation read tasks only through this protocol.

Scores follow x1's verifier scale (`Score`): -1 invalid (unparseable), 0 incorrect,
1 satisfies the constraints so far but does not solve the problem, 2 solved.

A problem record is x1's dataset format:
`{"type": str, "level": int 1..10, "problem": str, "unique_solution": bool, "solution": Any}`.
Domains may add structured fields under `"meta"` (ignored by x1's readers) so verifiers need not
re-parse the text; verifiers must still work from the text alone, since x1's own files have no meta.

Tasks derive from `StepTask` (graded step by step: Countdown, arithmetic) or `AnswerTask` (graded by a
final answer: Knapsack, Einstein, ProntoQA, JSONLMath), both `TaskBase`s (SAT's x1 grading is its own).
What a task can do beyond the protocol it declares in its `capabilities` (`Capabilities`), which
callers read instead of probing for methods: `task.capabilities.random_steps`, `.solutions`, `.replay`,
`.exact_labels`.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import random
import re
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

STEP_DELIMITER = "\n"  # One reasoning step = one line of the solution.
LEVEL_SPAN = 0.0999  # Difficulties (level - 1) / 10 + [0, LEVEL_SPAN] all map to `level`.


class Score(enum.IntEnum):
    INVALID = -1
    INCORRECT = 0
    PARTIAL = 1
    SOLVED = 2

    @property
    def valid(self) -> bool:
        """No step is malformed or wrong (PARTIAL or SOLVED)."""
        return self >= Score.PARTIAL


Problem = dict  # x1 record: {"type", "level", "problem", "unique_solution", "solution", ["meta"]}


def difficulty_to_level(difficulty: float) -> int:
    """x1's mapping of difficulty in [0, 1] to a level 1..10 (`int(10 d) + 1`, capped at 10)."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    return min(int(10 * difficulty) + 1, 10)


def level_to_difficulty(level: int) -> float:
    """Inverse of `difficulty_to_level`: the lowest difficulty that maps to `level`."""
    if not 1 <= level <= 10:
        raise ValueError(f"level must be in 1..10, got {level}")
    return (level - 1) / 10


def difficulty_for(level: int, seed: int) -> float:
    """A difficulty spread over the whole of `level`, deterministic in `seed`:
    `(level - 1) / 10 + u * LEVEL_SPAN` with u in [0, 1) from a hash of the seed (independent of the
    random streams generators draw from `seed`). x1's data covers whole levels, so sizes that change
    inside a level (Einstein attribute types, knapsack items, SAT clauses) all occur."""
    digest = hashlib.sha256(f"difficulty/{seed}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    return level_to_difficulty(level) + u * LEVEL_SPAN


def last_bool(text: str) -> bool | None:
    """x1's True/False answer extraction (the last "true"/"false", any case), except that the
    question's own "True or False" phrase is no answer: an output that only echoes the question
    has no answer (None; verifiers score it INVALID) instead of answering "False"."""
    found = _BOOL.findall(_TRUE_OR_FALSE.sub(" ", text))
    return None if not found else found[-1].lower() == "true"


_BOOL = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_TRUE_OR_FALSE = re.compile(r"\b(?:true\s*(?:or|/)\s*false|false\s*(?:or|/)\s*true)\b", re.IGNORECASE)


def task_rng(name: str, seed: int, difficulty: float) -> random.Random:
    """A generator's random stream, seeded by (task, seed, difficulty) so nearby difficulties do not
    repeat problems."""
    return random.Random(f"{name}/{seed}/{difficulty!r}")


def split_steps(solution_text: str, delimiter: str = STEP_DELIMITER) -> list[str]:
    """Splits a solution into its non-empty steps (stripped)."""
    return [s.strip() for s in solution_text.split(delimiter) if s.strip()]


def problem_hash(problem: Problem) -> str:
    """Stable identity of a problem: sha256 of its type and text (independent of seed and level)."""
    key = f"{problem['type']}\x00{problem['problem']}".encode()
    return hashlib.sha256(key).hexdigest()


def split_of(problem: Problem, eval_fraction: float = 0.1) -> str:
    """'train' or 'eval', decided by the problem's hash: disjoint by construction."""
    bucket = int(problem_hash(problem)[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < eval_fraction else "train"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a task offers beyond the `Task` protocol (each False unless the task declares it)."""

    random_steps: bool = False  # `random_steps(rng, n) -> list[str]`: legal steps of no problem (pretraining).
    solutions: bool = False  # `solutions(problem) -> list[list[str]]`: every distinct solution, `solve`'s first.
    replay: bool = False  # `replay(problem, steps)`: a tuple whose first item is the score, last the reason
    #                       (text) the score is not PARTIAL/SOLVED.
    exact_labels: bool = False  # `can_succeed` always answers True/False (never None).
    search_traces: bool = False  # `search_trace(problem, max_steps) -> list[str] | None`: a linearised search
    #                              with backtracking steps, ending in a solution (Stream of Search's data).


@runtime_checkable
class Task(Protocol):
    """A verifiable reasoning domain."""

    name: str  # The record's "type", e.g. "Countdown", "SAT".
    capabilities: Capabilities  # The optional methods it has (see `Capabilities`).

    def generate(self, seed: int, difficulty: float) -> Problem:
        """A new problem, deterministic in (seed, difficulty), guaranteed solvable."""

    def prompt(self, problem: Problem) -> str:
        """The text the policy sees before its first step."""

    def verify(self, problem: Problem, output: str) -> Score:
        """Scores a full model output (all steps) on x1's scale."""

    def solve(self, problem: Problem) -> list[str]:
        """A reference step-by-step solution (one string per step) that `verify` scores SOLVED."""

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        """Scores a partial solution: INVALID/INCORRECT if a step is malformed or wrong, PARTIAL if
        every step is valid so far, SOLVED if the steps already solve the problem."""

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> bool | None:
        """Exact value label: can the partial solution `steps` still be completed to a solution?
        None where the domain cannot tell (then learned values cannot be checked against it)."""


class TaskBase:
    """The logic every task shares: the prompt is the problem text, no optional capability, and
    `can_succeed` = no step is wrong so far. That label is exact only where every valid prefix extends
    to a solution (a unique solution and steps that state only true facts); other domains override it."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def prompt(self, problem: Problem) -> str:
        return problem["problem"]

    def check_problem(self, problem: Problem) -> None:
        """Raises a ValueError saying what is wrong when the problem's text is not in this task's format
        (e.g. a `--problem` typed by hand): every task's step checker parses the problem first."""
        self.check_partial(problem, [])

    generates: ClassVar[bool] = True  # False: problems come only from a file (`read_problems`, task.data)

    def read_problems(self, path: str) -> list[Problem]:
        """The problems of a file (the run's `task.data`): x1's format (.json / .json.bz2)."""
        from rlm_jax.tasks import io as task_io  # io builds on this module

        return task_io.load_records(path)

    def has_trace(self, problem: Problem) -> bool:
        """Whether SFT can train on `solve(problem)`: a generated task's solver always writes one."""
        return True

    def problem_space(self, levels: Sequence[int]) -> int | None:
        """An upper bound on the distinct problems `generate` makes at `levels` (None: too many to matter), so
        a run asking for more is refused at start instead of running out of problems hours in."""
        return None

    def check_partial(self, problem: Problem, steps: Sequence[str]) -> Score:
        raise NotImplementedError

    def can_succeed(self, problem: Problem, steps: Sequence[str]) -> bool | None:
        return self.check_partial(problem, steps).valid

    tools: ClassVar[tuple[str, ...]] = ()  # the tools `call_tools` runs (their names; none by default)

    def call_tools(self, step: str) -> str:
        """Tool steps (`rlm_jax/tools.py`): the step's text with every tool call in it executed, the
        result written into it; unchanged where it calls none. No tools by default."""
        return step


class StepTask(TaskBase):
    """A task whose output is graded as a whole by its step checker: `verify` = `check_partial` on the
    output's steps (`output_steps`; none -> INVALID)."""

    def output_steps(self, output: str) -> list[str]:
        """The steps of a full output, as `verify` grades them."""
        return split_steps(output)

    def verify(self, problem: Problem, output: str) -> Score:
        steps = self.output_steps(output)
        return self.check_partial(problem, steps) if steps else Score.INVALID


class AnswerTask(TaskBase):
    """A task whose output is graded by its final answer, as x1 does: `verify` reads it (`read_answer`;
    None -> INVALID) and compares it with the problem's (`reference_answer`, by `same_answer`)."""

    def read_answer(self, output: str) -> Any | None:
        """The final answer written in `output`, None if there is none."""
        raise NotImplementedError

    def reference_answer(self, problem: Problem) -> Any:
        raise NotImplementedError

    def same_answer(self, answer: Any, reference: Any) -> bool:
        return answer == reference

    def verify(self, problem: Problem, output: str) -> Score:
        answer = self.read_answer(output)
        if answer is None:
            return Score.INVALID
        return Score.SOLVED if self.same_answer(answer, self.reference_answer(problem)) else Score.INCORRECT


def as_record(type_: str, level: int, problem: str, unique_solution: bool, solution: Any,
              meta: dict | None = None) -> Problem:
    rec = {"type": type_, "level": level, "problem": problem,
           "unique_solution": unique_solution, "solution": solution}
    if meta is not None:
        rec["meta"] = meta
    return rec
