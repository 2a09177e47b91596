"""Task registry: `get_task("countdown")`, `task_for_record(record)`.

Modules are imported on first use, so the registry works before every domain module exists and
importing `rlm_jax.tasks` stays cheap.
"""
from __future__ import annotations

import importlib

from rlm_jax.tasks.base import Problem, Score, Task

# name -> (module, class); each class is constructible with no arguments.
_REGISTRY = {
    "countdown": ("rlm_jax.tasks.countdown", "CountdownTask"),
    "countdown3": ("rlm_jax.tasks.countdown", "Countdown3Task"),
    "game24": ("rlm_jax.tasks.countdown", "Game24Task"),
    "arithmetic": ("rlm_jax.tasks.arithmetic", "ArithmeticTask"),
    "jsonl_math": ("rlm_jax.tasks.jsonl_math", "JSONLMathTask"),
    "sat": ("rlm_jax.tasks.sat", "SATTask"),
    "knapsack": ("rlm_jax.tasks.knapsack", "KnapsackTask"),
    "einstein": ("rlm_jax.tasks.einstein", "EinsteinTask"),
    "prontoqa": ("rlm_jax.tasks.prontoqa", "ProntoQATask"),
}
TASK_NAMES = tuple(_REGISTRY)

# A record's "type" (lower-cased) -> registry name. x1 writes "SAT", "Knapsack", "Einstein", "ProntoQA".
_TYPES = {"countdown": "countdown", "countdown3": "countdown3", "game24": "game24",
          "arithmetic": "arithmetic", "jsonlmath": "jsonl_math", "sat": "sat", "knapsack": "knapsack",
          "einstein": "einstein", "prontoqa": "prontoqa"}


def get_task(name: str, **kwargs) -> Task:
    """A task instance by registry name (case-insensitive); kwargs go to its constructor."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
    module_name, class_name = _REGISTRY[key]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # A missing dependency inside the module: show the real error.
        raise ImportError(f"task {key!r} is registered but {module_name} does not exist yet") from e
    return getattr(module, class_name)(**kwargs)


def name_for_type(type_: str) -> str:
    """The registry name of a record "type" (case-insensitive), e.g. "SAT" -> "sat"."""
    key = type_.strip().lower()
    if key not in _TYPES:
        raise ValueError(f"no task for record type {type_!r}; known types: "
                         f"{', '.join(sorted(_TYPES))} (case-insensitive)")
    return _TYPES[key]


def task_for_record(record: Problem, **kwargs) -> Task:
    """The task that verifies `record`, found from its "type"."""
    return get_task(name_for_type(record["type"]), **kwargs)


__all__ = ["TASK_NAMES", "Problem", "Score", "Task", "get_task", "name_for_type", "task_for_record"]
