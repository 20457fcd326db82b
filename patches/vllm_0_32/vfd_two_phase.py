"""Two-phase VFD: score every steady row's natural sample first; forward the alternatives only for the rows
whose natural sample is unsafe, in a second forward at the same position."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from value_steer.patches.vllm_0_32.vfd_common import StepPlan
from value_steer.runtime.vfd_step import Winners


class VFDTwoPhaseMixin:
    """The second phase of a two-phase step."""

    _vs_state: Any

    # ---- two-phase VFD: alternatives only for the rows whose natural sample is unsafe ---------------------
    def _vfd_second_phase(self, plan: StepPlan, rows_t: torch.Tensor, tokens: torch.Tensor, nvalid: torch.Tensor,
                          hidden: torch.Tensor, k_r: torch.Tensor
                          ) -> tuple[Winners | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every steady row's natural sample (candidate 0, forwarded in the main forward); forward the
        alternatives ``1..k-1`` of the unsafe rows in a second forward at the same position (their scratch
        blocks mirror the real block, as in eager VFD).

        Returns ``(winners, num_valid [S], hidden [S * k_max, H], values [S, k_max])``: only the forwarded
        candidates are scored (values NaN elsewhere). ``winners`` is set when every natural
        sample is safe (candidate 0 wins everywhere: no second forward, no second device read; the caller
        records the stats); otherwise
        the alternatives' states are placed into ``hidden`` and rows without alternatives keep one valid
        candidate, so the common selection commits exactly what eager VFD would.
        """
        st = self._vs_state
        pipes = self._vfd_pipelines()
        kmax = self._vfd_k
        s = int(rows_t.shape[0])
        h0 = hidden.view(s, kmax, -1)[:, 0]
        v0 = st.values(h0, rows_t)
        values = torch.full((s, kmax), float("nan"), dtype=v0.dtype, device=v0.device)
        values[:, 0] = v0
        rt = st.rows
        signed = rt.sign.index_select(0, rows_t) * (v0 - rt.threshold.index_select(0, rows_t))
        unsafe = ~(signed < 0) & (k_r > 1)  # NaN is never safe; a row with K=1 has no alternative
        flags_h, tok0_h = torch.stack([unsafe.long(), tokens[:, 0]]).cpu().numpy()
        alt = np.flatnonzero(flags_h)
        self._vfd_schedule.observe(s, int(alt.size))
        if not alt.size:
            zeros = torch.zeros(s, dtype=torch.bool, device=v0.device)
            won = Winners(np.zeros(s, dtype=np.int64), tok0_h, tokens[:, 0], v0, zeros, h0)
            return won, torch.ones_like(nvalid), hidden, values
        bt = self.input_batch.block_table[0]  # type: ignore[attr-defined]
        bs = int(bt.block_size)
        srows = plan.steady_rows[alt]
        n_alt = pipes.k[srows] - 1
        parent = np.repeat(alt, n_alt)
        cols = np.arange(int(n_alt.sum())) - np.repeat(np.cumsum(n_alt) - n_alt, n_alt) + 1
        q = plan.steady_pos[parent]
        scratch = pipes.scratch[plan.steady_rows[parent], cols]
        block_rows = bt.block_table.np[plan.steady_batch[parent]].astype(np.int64)
        block_rows[np.arange(parent.size), q // bs] = scratch
        row_d, col_d, dest_d = self._vfd_stage([plan.steady_rows[parent], cols, parent * kmax + cols])
        ids = pipes.pending_tokens[row_d, col_d]
        t_start = time.perf_counter()
        hidden_alt = self._vfd_forward(ids, q, block_rows, scratch * bs + q % bs, plan.steady_batch[parent])
        if self._vfd_schedule.timed:
            self._vfd_schedule.observe_forward(int(parent.size), (time.perf_counter() - t_start) * 1e3, second=True)
        self._vfd_schedule.counters["second_forwards"] += 1
        self._vfd_schedule.counters["second_forward_rows"] += int(parent.size)
        hidden = hidden.index_copy(0, dest_d, hidden_alt.to(hidden.dtype))
        alt_rows = rows_t.repeat_interleave(kmax).index_select(0, dest_d)  # each alternative's request row
        values.view(-1).index_copy_(0, dest_d, st.values(hidden_alt, alt_rows))
        return None, torch.where(unsafe, nvalid, torch.ones_like(nvalid)), hidden, values
