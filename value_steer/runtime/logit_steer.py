"""Generative logit steering in the worker: the generator on the device, per-row strengths, per-row telemetry.

No vLLM. :class:`LogitSteerTables` owns what the ``logit_steer`` op reads (``docs/logit-steering.md``) and keeps it
current with admissions and removals, like :class:`~value_steer.core.row_table.RowTable`:

- the generator's tensors (``prepare_logit_steer_weights``: fp32, ``W_up`` column-major) and its ``max_strength``;
- ``row_strength [N]`` fp32 (``N = max_num_seqs + 1``; row 0 is off): a request's multiplier, staged in a host
  mirror at admission / removal and published by :meth:`flush` (nothing on a steady step); rows come from an own
  free list, independent of the value head's and activation steering's rows;
- ``slot_row`` (batch slot -> row, host numpy + device buffer), republished by :meth:`update_batch` only when the
  runner's batch composition changed;
- ``stats [N, 3]`` fp64 on the device: per row the number of steered sampling distributions, the sum and the max
  of their gate strengths, accumulated by :meth:`record` through the row index (row 0 a sink); the request's stats
  carry a view (live) or a snapshot (finished) and read it only when asked (``DeviceStats.read``).

Per steady step: :meth:`step_rows` hands the op the device slot table as it stands (no copy) unless a row of the
batch samples nothing this step (a partial prefill chunk: its row index is zeroed, one non-blocking copy); nothing
is read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from value_steer.core.logit_steer import LogitSteerCheckpoint
from value_steer.runtime.staging import HostDeviceBuffer

# Columns of the per-row telemetry table.
STEPS, SUM, MAX = range(3)


class LogitSteerTables:
    """The generators and the per-row tables of one runner.

    Args:
        ckpt: the loaded generator, or every generator of the server in config order (sizes already checked against
            the model); a request's row belongs to one of them (``add_request(..., generator=i)``).
        num_rows: ``N`` (``max_num_seqs + 1``; row 0 is off).
        slots: the runner's batch capacity (the slot table's length).
        device: where everything lives.
        names: the generators' names (stats and logs).
    """

    def __init__(self, ckpt: LogitSteerCheckpoint | Sequence[LogitSteerCheckpoint], num_rows: int, slots: int,
                 device: torch.device | str, names: Sequence[str] | None = None) -> None:
        from value_steer.kernels.logit_steer import prepare_logit_steer_weights

        if num_rows < 2:
            raise ValueError("num_rows must be >= 2 (row 0 is off)")
        ckpts = [ckpt] if isinstance(ckpt, LogitSteerCheckpoint) else list(ckpt)
        if not ckpts:
            raise ValueError("at least one generator is needed")
        self.device = torch.device(device)
        self.checkpoints = tuple(ckpts)
        self.checkpoint = ckpts[0]
        self.names = tuple(names) if names is not None else tuple(f"generator{i}" for i in range(len(ckpts)))
        self.max_strengths = tuple(float(c.max_strength) for c in ckpts)
        self.max_strength = self.max_strengths[0]
        self.generator_weights = tuple(prepare_logit_steer_weights(c.generator, self.device) for c in ckpts)
        self.weights = self.generator_weights[0]
        self.num_rows = num_rows
        g = len(ckpts)
        # host_strength[row]: the request's multiplier; per generator, the op reads a [N] strength column that is
        # the multiplier on its own rows and 0 elsewhere (so each generator's pass leaves the others' rows bitwise).
        host = torch.zeros((g + 1, num_rows), dtype=torch.float32)
        self._host = host.pin_memory() if self.device.type == "cuda" else host
        self.host_strength = self._host[0].numpy()
        self._host_gen_strength = self._host[1:].numpy()
        self.host_generator = np.zeros(num_rows, dtype=np.int64)
        self._strengths = torch.zeros((g + 1, num_rows), dtype=torch.float32, device=self.device)
        self.row_strength = self._strengths[0]
        self.generator_strength = self._strengths[1:] if g > 1 else self._strengths[:1]
        self._dirty = False
        self._free = list(range(num_rows - 1, 0, -1))
        self.live = 0
        self.stats = torch.zeros((num_rows, 3), dtype=torch.float64, device=self.device)
        self._reset = np.zeros(num_rows, dtype=bool)
        self.empty_stats = self.stats[0].clone()
        self.slot_row = HostDeviceBuffer(slots, torch.int32, self.device)
        self._step = HostDeviceBuffer(slots, torch.int32, self.device)
        self.batch_active = False  # some request of the current batch is logit-steered
        self.batch_generators: tuple[int, ...] = ()  # the generators of the current batch's steered requests

    # ---- lifecycle (host mirrors; published by flush / update_batch) -----------------------------------------
    def add_request(self, strength: float, generator: int = 0) -> int:
        """A row for a request steered at ``strength`` (> 0) by generator ``generator``; its telemetry starts
        empty."""
        if not strength > 0.0 or not math.isfinite(strength):
            raise ValueError(f"strength must be finite and > 0, got {strength!r}")
        if not 0 <= generator < len(self.checkpoints):
            raise ValueError(f"generator must be in [0, {len(self.checkpoints)}), got {generator!r}")
        if not self._free:
            raise RuntimeError("value_steer: logit-steering row table exhausted (more live requests than max_num_seqs)")
        row = self._free.pop()
        self.host_strength[row] = float(strength)
        self.host_generator[row] = generator
        self._host_gen_strength[:, row] = 0.0
        self._host_gen_strength[generator, row] = float(strength)
        self._reset[row] = True
        self._dirty = True
        self.live += 1
        return row

    def remove_request(self, row: int) -> None:
        """Free ``row`` (its strength back to 0, so a stale slot index is inert)."""
        if not 1 <= row < self.num_rows or row in self._free:
            raise ValueError(f"row {row} is not a live logit-steering row")
        self.host_strength[row] = 0.0
        self._host_gen_strength[:, row] = 0.0
        self._dirty = True
        self._free.append(row)
        self.live -= 1

    def flush(self) -> None:
        """Publish this step's staged admissions and removals (no-op on a steady step)."""
        if self._dirty:
            if self._strengths.data_ptr() != self._host.data_ptr():
                self._strengths.copy_(self._host, non_blocking=True)
            self._dirty = False
        if self._reset.any():
            idx = torch.from_numpy(np.flatnonzero(self._reset)).to(self.device, non_blocking=True)
            self.stats.index_copy_(0, idx, self.empty_stats.expand(idx.shape[0], 3))
            self._reset[:] = False

    def update_batch(self, rows: np.ndarray) -> None:
        """The batch changed: ``rows[i]`` is the row of the request at batch slot ``i`` (0: not logit-steered)."""
        n = rows.shape[0]
        self.slot_row.np[:n] = rows
        self.slot_row.copy_to_device(n)
        self.batch_active = bool(rows.any())
        self.batch_generators = tuple(np.unique(self.host_generator[rows[rows > 0]]).tolist())

    # ---- the step ----------------------------------------------------------------------------------------
    def step_rows(self, n: int, skip: np.ndarray | None = None) -> torch.Tensor:
        """``[n]`` int32 device row index of this step's logit rows (batch order).

        ``skip[i]``: batch row ``i`` samples nothing this step (a partial prefill chunk): it is left unsteered and
        uncounted. Without any, this is the published slot table itself (no copy).
        """
        if skip is None or not skip.any():
            return self.slot_row.device[:n]
        self._step.np[:n] = np.where(skip, 0, self.slot_row.np[:n])
        return self._step.copy_to_device(n)

    def apply(self, hidden: torch.Tensor, logits: torch.Tensor, row_idx: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused op over the rows: ``(logits' [B, V'], gate_strength [B] fp32)`` (``kernels.logit_steer``).

        Args:
            hidden: ``[B, H]`` the final post-norm hidden state that produced each row's logits.
            logits: ``[B, V']``.
            row_idx: ``[B]`` int32 (from :meth:`step_rows`, or a gather of it).
        """
        from value_steer.kernels.logit_steer import logit_steer

        if len(self.checkpoints) == 1:
            return logit_steer(hidden, logits, row_idx, self.row_strength, *self.weights, self.max_strength)
        # Several generators: one pass per generator the batch uses (a loop over generators, not requests); each
        # pass steers only its own rows and copies the others bitwise, and a row's gate comes from its own pass.
        gate = None
        for g in self.batch_generators or (0,):
            logits, gs = logit_steer(hidden, logits, row_idx, self.generator_strength[g], *self.generator_weights[g],
                                     self.max_strengths[g])
            gate = gs if gate is None else gate + gs
        assert gate is not None
        return logits, gate

    def record(self, row_idx: torch.Tensor, gate_strength: torch.Tensor) -> None:
        """Accumulate one step's gate strengths per row on the device (no host synchronisation).

        Entries whose row is 0, or whose request's strength is 0, go to the sink row 0 / count nothing.
        """
        idx = row_idx.long()
        on = ((idx > 0) & (self.row_strength.index_select(0, idx) > 0)).to(torch.float64)
        idx = torch.where(on > 0, idx, torch.zeros_like(idx))
        g = gate_strength.to(torch.float64) * on
        self.stats[:, :2].index_add_(0, idx, torch.stack([on, g], dim=1))
        self.stats[:, MAX].scatter_reduce_(0, idx, g, reduce="amax")

    # ---- telemetry -------------------------------------------------------------------------------------------
    def snapshot(self, row: int) -> torch.Tensor:
        """A device copy of ``row``'s telemetry (taken at finish, before the row is reused)."""
        return self.stats[row].clone()

    def live_stats(self, row: int) -> torch.Tensor:
        """``row``'s telemetry as it accumulates (a view; the stats route reads it)."""
        return self.stats[row]
