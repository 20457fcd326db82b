"""Tasks: what counts as an undesirable output, and the prompts to measure it on.

A task module exposes ``judge_negative(texts) -> np.ndarray[bool]`` (True = undesirable),
``load_prompts(split) -> list[Prompt]`` / ``sample_prompts(split, n, seed)`` for ``split`` in
:data:`SPLITS`, and ``Prompt``. The one task is :mod:`value_steer.offline.tasks.sentiment` (negative
sentiment by VADER); the pipeline and the evaluation import it directly.
"""

from __future__ import annotations

SPLITS = ("train", "calibration", "test")

__all__ = ["SPLITS"]
