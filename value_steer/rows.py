"""Row-table encoding shared by the kernels and the vLLM worker.

Per-request steering state lives in persistent device buffers indexed by a *row*; row 0 is "off".
Each step the worker writes one row index per request (or per token) and the fused ops read the
per-row threshold / direction sign / mode / K from these buffers, so the step has no host branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODE_OFF = 0
MODE_ABSTAIN = 1
MODE_VFD = 2
MODES = {"off": MODE_OFF, "abstain": MODE_ABSTAIN, "vfd": MODE_VFD}

DIRECTION_SIGN = {"above": 1.0, "below": -1.0}


@dataclass
class RowTable:
    """Persistent per-row buffers (length ``num_rows``; row 0 is reserved and always off).

    threshold: ``[num_rows]`` fp32; sign: ``[num_rows]`` fp32 (+1 above / -1 below);
    mode: ``[num_rows]`` int32 (``MODE_*``); num_candidates: ``[num_rows]`` int32 (>= 1).
    """

    threshold: torch.Tensor
    sign: torch.Tensor
    mode: torch.Tensor
    num_candidates: torch.Tensor

    @classmethod
    def empty(cls, num_rows: int, device: torch.device | str = "cpu") -> RowTable:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 (row 0 is off), got {num_rows}")
        return cls(
            threshold=torch.zeros(num_rows, dtype=torch.float32, device=device),
            sign=torch.ones(num_rows, dtype=torch.float32, device=device),
            mode=torch.zeros(num_rows, dtype=torch.int32, device=device),
            num_candidates=torch.ones(num_rows, dtype=torch.int32, device=device),
        )

    @property
    def num_rows(self) -> int:
        return int(self.threshold.shape[0])

    def set_row(self, row: int, *, mode: int, threshold: float, sign: float, num_candidates: int) -> None:
        """Write one row (host -> device copies; never row 0)."""
        self._check_row(row)
        if isinstance(mode, bool) or mode not in (MODE_OFF, MODE_ABSTAIN, MODE_VFD):
            raise ValueError(f"mode must be one of {sorted(MODES.values())}, got {mode!r}")
        if isinstance(sign, bool) or sign not in (1.0, -1.0):
            raise ValueError(f"sign must be +1.0 or -1.0, got {sign!r}")
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        self.threshold[row] = float(threshold)
        self.sign[row] = float(sign)
        self.mode[row] = int(mode)
        self.num_candidates[row] = int(num_candidates)

    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, int) or not 1 <= row < self.num_rows:
            raise ValueError(f"row must be an int in [1, {self.num_rows}), got {row!r}")

    def clear_row(self, row: int) -> None:
        self._check_row(row)
        self.mode[row] = MODE_OFF
        self.num_candidates[row] = 1
