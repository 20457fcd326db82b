"""What the VFD runner mixins share: the step plan built in ``_prepare_inputs`` and read in ``_sample``, and the
debug switches. See ``vfd_runner`` for the map of the hooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from value_steer.runtime.vfd_state import SteadyLayout

logger = logging.getLogger("value_steer")

DEBUG_ENV = "VALUE_STEER_DEBUG"
DEBUG_MAX_STEPS = 4096
DEBUG_MAX_REQUESTS = 1024
SAMPLING_EPS = 1e-5


@dataclass
class StepPlan:
    """One step's VFD work, built in ``_prepare_inputs`` and consumed in ``_sample``.

    Steady rows (``S``) continue their pipeline; first-token rows (``F``) draw and forward their candidates
    in ``_sample``. ``*_batch`` are batch indices, ``*_rows`` steering rows, ``*_pos`` the position of the
    token committed this step.
    """

    num_scheduled_tokens: int
    num_reqs: int
    steady_batch: np.ndarray
    steady_rows: np.ndarray
    steady_pos: np.ndarray
    first_batch: np.ndarray
    first_rows: np.ndarray
    first_pos: np.ndarray
    layout: SteadyLayout | None = None
    cand_index: torch.Tensor | None = None  # [S * k_max] token indices of the steady candidates (device)
    steady_hidden: torch.Tensor | None = None  # [S * k_max, H]
    extra_tokens: int = 0
    extra_reqs: int = 0
    extra_positions: torch.Tensor | None = None
    forward_active: bool = False
    two_phase: bool = False  # steady rows forward candidate 0 only; alternatives in a second forward
