"""Token-level value filtering in the worker (``"vfd": {"mode": "token"}``): the Q-head on the device, per-row tilt
strengths, per-row telemetry. No vLLM.

A request in token mode has a value-steering row (``RowTable``: ``mode = MODE_TOKEN``, its threshold and sign) like
abstention and exact VFD. Per step, :meth:`TokenFilterTables.filter` edits the logits of the batch rows whose row is
in token mode (:func:`value_steer.core.qhead.token_filter_rows`): rows of other modes and row 0 come back bitwise.
Everything stays on the device; nothing is read back, and the step has no Python loop over requests.

Tables (``N = max_num_seqs + 1``, row 0 off):

- ``row_beta [N]`` fp32: 0 masks, > 0 tilts; staged in a host mirror at admission and published by :meth:`flush`;
- ``mass [N]`` fp64: per row the summed probability the edits took from the row's distributions (the request's
  ``mass_removed``; its step count and changed-step count are the value-steering stats' ``num_scored`` and
  ``num_interventions``).
"""

from __future__ import annotations

import numpy as np
import torch

from value_steer.core.modes import MODE_TOKEN
from value_steer.core.qhead import QHeadCheckpoint, token_filter_rows


class TokenFilterTables:
    """The Q-head and the per-row tables of one runner.

    Args:
        ckpt: the loaded Q-head (sizes already checked against the model).
        num_rows: ``N`` (``max_num_seqs + 1``; row 0 is off).
        device: where everything lives.
    """

    def __init__(self, ckpt: QHeadCheckpoint, num_rows: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.checkpoint = ckpt
        self.weights = tuple(w.detach().to(self.device, torch.float32).contiguous() for w in ckpt.head.weights())
        self.vocab_size = ckpt.head.vocab_size
        host = torch.zeros(num_rows, dtype=torch.float32)
        self._host = host.pin_memory() if self.device.type == "cuda" else host
        self.host_beta = self._host.numpy()
        self.row_beta = torch.zeros(num_rows, dtype=torch.float32, device=self.device)
        self.mass = torch.zeros(num_rows, dtype=torch.float64, device=self.device)
        self._dirty = False
        self._reset = np.zeros(num_rows, dtype=bool)

    def stage_row(self, row: int, beta: float) -> None:
        """A token-mode request took ``row`` (its mass telemetry starts at 0)."""
        self.host_beta[row] = float(beta)
        self._reset[row] = True
        self._dirty = True

    def flush(self) -> None:
        """Publish this step's staged admissions (no-op on a steady step)."""
        if self._dirty:
            if self.row_beta.data_ptr() != self._host.data_ptr():
                self.row_beta.copy_(self._host, non_blocking=True)
            self._dirty = False
        if self._reset.any():
            idx = torch.from_numpy(np.flatnonzero(self._reset)).to(self.device, non_blocking=True)
            self.mass.index_fill_(0, idx, 0.0)
            self._reset[:] = False

    def filter(self, hidden: torch.Tensor, logits: torch.Tensor, row_idx: torch.Tensor, threshold: torch.Tensor,
               sign: torch.Tensor, mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filter one step's logits.

        Args:
            hidden: ``[B, H]`` the states that produced ``logits``.
            logits: ``[B, V']`` the step's logits.
            row_idx: ``[B]`` int32 value-steering row per batch row (0: not steered this step).
            threshold, sign, mode: the row table's device columns ``[N]``.
        Returns:
            ``(logits' [B, V'], q [B, V] fp32, changed [B] bool)``; the mass telemetry is accumulated here.
        """
        from value_steer.core.qhead import qhead_rows

        idx = row_idx.long()
        on = (idx > 0) & (mode.index_select(0, idx) == MODE_TOKEN)
        q = qhead_rows(hidden, *self.weights)
        out, changed, mass = token_filter_rows(logits, q, threshold.index_select(0, idx), sign.index_select(0, idx),
                                               self.row_beta.index_select(0, idx), on)
        self.mass.index_add_(0, idx, mass.to(torch.float64))  # row 0 is a sink
        return out, q, changed
