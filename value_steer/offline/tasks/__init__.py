"""Tasks: what counts as an undesirable output, and the prompts to measure it on.

A task module exposes ``judge_negative(texts) -> np.ndarray[bool]`` (True = undesirable),
``load_prompts(split) -> list[Prompt]`` for ``split`` in :data:`SPLITS`, and ``Prompt``.
The default task is :mod:`value_steer.offline.tasks.sentiment` (negative sentiment by VADER).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SPLITS = ("train", "calibration", "test")
DEFAULT_TASK = "sentiment"
TASKS = {"sentiment": "value_steer.offline.tasks.sentiment"}


def get_task(name: str = DEFAULT_TASK) -> ModuleType:
    """The task module called ``name`` (ValueError naming the known tasks otherwise)."""
    try:
        return importlib.import_module(TASKS[name])
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


__all__ = ["DEFAULT_TASK", "SPLITS", "TASKS", "get_task"]
