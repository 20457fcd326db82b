"""Row-table encoding shared by the kernels and the worker: persistent per-request buffers, staged writes.

Per-request steering state lives in persistent buffers indexed by a *row*; row 0 is "off". Each step
the worker writes one row index per request (or per token) and the fused ops read the per-row
threshold / direction sign / mode / K from these buffers, so the step has no host branches.

Writes follow vLLM's ``InputBatch`` / Model Runner V2 ``apply_staged_writes`` pattern: :meth:`RowTable.stage_row`
and :meth:`RowTable.clear_row` write a host (numpy) mirror and mark the table dirty; :meth:`RowTable.flush`
copies the mirror to the device once (pinned, non-blocking on CUDA) before the step that reads it. A steady
step (no request added or removed) flushes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from value_steer.core.modes import MODE_ABSTAIN, MODE_OFF, MODE_TOKEN, MODE_VFD, MODES


@dataclass
class RowTable:
    """Persistent per-row buffers (length ``num_rows``; row 0 is reserved and always off).

    threshold: ``[num_rows]`` fp32; sign: ``[num_rows]`` fp32 (+1 above / -1 below);
    mode: ``[num_rows]`` int32 (``MODE_*``); num_candidates: ``[num_rows]`` int32 (>= 1);
    head: ``[num_rows]`` int32, the index of the value head that scores the row (servers with several heads).
    Each has a host mirror in ``host`` (numpy views of pinned CPU tensors on CUDA).
    """

    threshold: torch.Tensor
    sign: torch.Tensor
    mode: torch.Tensor
    num_candidates: torch.Tensor
    head: torch.Tensor
    host: dict[str, np.ndarray] = field(default_factory=dict)
    _host_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dirty: bool = False

    COLUMNS = ("threshold", "sign", "mode", "num_candidates", "head")

    @classmethod
    def empty(cls, num_rows: int, device: torch.device | str = "cpu") -> RowTable:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 (row 0 is off), got {num_rows}")
        device = torch.device(device)
        init = {
            "threshold": torch.zeros(num_rows, dtype=torch.float32),
            "sign": torch.ones(num_rows, dtype=torch.float32),
            "mode": torch.zeros(num_rows, dtype=torch.int32),
            "num_candidates": torch.ones(num_rows, dtype=torch.int32),
            "head": torch.zeros(num_rows, dtype=torch.int32),
        }
        pin = device.type == "cuda"
        host_t = {k: (v.pin_memory() if pin else v) for k, v in init.items()}
        table = cls(**{k: v.to(device) for k, v in init.items()})
        table._host_tensors = host_t
        table.host = {k: v.numpy() for k, v in host_t.items()}
        return table

    @property
    def num_rows(self) -> int:
        return int(self.threshold.shape[0])

    def stage_row(self, row: int, *, mode: int, threshold: float, sign: float, num_candidates: int,
                  head: int = 0) -> None:
        """Write one row into the host mirror (never row 0); :meth:`flush` publishes it."""
        self._check_row(row)
        if isinstance(mode, bool) or mode not in (MODE_OFF, MODE_ABSTAIN, MODE_VFD, MODE_TOKEN):
            raise ValueError(f"mode must be one of {sorted(MODES.values())}, got {mode!r}")
        if isinstance(sign, bool) or sign not in (1.0, -1.0):
            raise ValueError(f"sign must be +1.0 or -1.0, got {sign!r}")
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head < 0:
            raise ValueError(f"head must be an int >= 0, got {head!r}")
        h = self.host
        h["threshold"][row] = float(threshold)
        h["sign"][row] = float(sign)
        h["mode"][row] = int(mode)
        h["num_candidates"][row] = int(num_candidates)
        h["head"][row] = int(head)
        self.dirty = True

    def set_row(self, row: int, *, mode: int, threshold: float, sign: float, num_candidates: int,
                head: int = 0) -> None:
        """Stage one row and flush at once (tests and one-off writes; the worker stages and flushes per step)."""
        self.stage_row(row, mode=mode, threshold=threshold, sign=sign, num_candidates=num_candidates, head=head)
        self.flush()

    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 1 <= row < self.num_rows:
            raise ValueError(f"row must be an int in [1, {self.num_rows}), got {row!r}")

    def clear_row(self, row: int) -> None:
        """Stage row ``row`` back to off."""
        self._check_row(row)
        self.host["mode"][row] = MODE_OFF
        self.host["num_candidates"][row] = 1
        self.dirty = True

    def flush(self) -> bool:
        """Copy the host mirror to the device if anything was staged (one copy per column). Returns
        whether it copied."""
        if not self.dirty:
            return False
        for name in self.COLUMNS:
            dst: torch.Tensor = getattr(self, name)
            src = self._host_tensors[name]
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)
        self.dirty = False
        return True
