"""Token-level value filtering in the worker (``"vfd": {"mode": "token"}``): the Q-head on the device, per-row tilt
strengths, per-row telemetry. No vLLM.

A request in token mode has a value-steering row (``RowTable``: ``mode = MODE_TOKEN``, its threshold and sign) like
abstention and exact VFD. Per step, :meth:`TokenFilterTables.filter` edits the logits of the batch rows whose row is
in token mode with the fused ``token_filter`` op (``value_steer.kernels.token_filter``; the semantics are
:func:`value_steer.core.qhead.token_filter_rows`): rows of other modes and row 0 come back bitwise.
Everything stays on the device; nothing is read back, and the step has no Python loop over requests.

Tables (``N = max_num_seqs + 1``, row 0 off):

- ``row_beta [N]`` fp32: 0 masks, > 0 tilts; ``row_k [N]`` int32: >= 1 the K-candidate rule; both staged in host
  mirrors at admission and published by :meth:`flush`;
- ``mass [N]`` fp64: per row the summed probability the edits took from the row's distributions (the request's
  ``mass_removed``; its step count and changed-step count are the value-steering stats' ``num_scored`` and
  ``num_interventions``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from value_steer.core.qhead import QHeadCheckpoint


class TokenFilterTables:
    """The Q-heads and the per-row tables of one runner.

    Args:
        ckpt: the loaded Q-head, or every named Q-head of the server in config order (sizes already checked against
            the model); a row is filtered by its request's head (the row table's ``head`` column).
        num_rows: ``N`` (``max_num_seqs + 1``; row 0 is off).
        device: where everything lives.
    """

    def __init__(self, ckpt: QHeadCheckpoint | Sequence[QHeadCheckpoint], num_rows: int,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        ckpts = [ckpt] if isinstance(ckpt, QHeadCheckpoint) else list(ckpt)
        self.checkpoints = tuple(ckpts)
        self.checkpoint = ckpts[0]
        from value_steer.kernels.token_filter import prepare_token_filter_weights

        self.head_weights = tuple(prepare_token_filter_weights(c.head, self.device) for c in ckpts)
        self.weights = self.head_weights[0]
        self.vocab_size = ckpts[0].head.vocab_size
        # The head of each live row (host): the heads the step's q must be computed for.
        self.host_head = np.full(num_rows, -1, dtype=np.int64)
        # The last filter's z per Q-head it ran ([(head, z [B, R])]) and the rows' heads (None: one head).
        self._step: tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None] = ([], None)
        host = torch.zeros(num_rows, dtype=torch.float32)
        self._host = host.pin_memory() if self.device.type == "cuda" else host
        self.host_beta = self._host.numpy()
        self.row_beta = torch.zeros(num_rows, dtype=torch.float32, device=self.device)
        # K of the K-candidate rule per row (0: the mask); staged beside beta.
        hk = torch.zeros(num_rows, dtype=torch.int32)
        self._host_k = hk.pin_memory() if self.device.type == "cuda" else hk
        self.host_k = self._host_k.numpy()
        self.row_k = torch.zeros(num_rows, dtype=torch.int32, device=self.device)
        self.mass = torch.zeros(num_rows, dtype=torch.float64, device=self.device)
        self._dirty = False
        self._reset = np.zeros(num_rows, dtype=bool)

    def stage_row(self, row: int, beta: float, k: int = 0, head: int = 0) -> None:
        """A token-mode request took ``row`` (its mass telemetry starts at 0); ``k`` >= 1: the K-candidate rule;
        ``head``: the index of its Q-head."""
        if not 0 <= head < len(self.checkpoints):
            raise ValueError(f"head must be in [0, {len(self.checkpoints)}), got {head!r}")
        self.host_head[row] = head
        self.host_beta[row] = float(beta)
        self.host_k[row] = int(k)
        self._reset[row] = True
        self._dirty = True

    def clear_row(self, row: int) -> None:
        """A token-mode request left ``row``: its beta and K go back to 0, so the live rows alone choose the form."""
        self.host_beta[row] = 0.0
        self.host_k[row] = 0
        self.host_head[row] = -1
        self._dirty = True

    def flush(self) -> None:
        """Publish this step's staged admissions (no-op on a steady step)."""
        if self._dirty:
            if self.row_beta.data_ptr() != self._host.data_ptr():
                self.row_beta.copy_(self._host, non_blocking=True)
                self.row_k.copy_(self._host_k, non_blocking=True)
            self._dirty = False
        if self._reset.any():
            idx = torch.from_numpy(np.flatnonzero(self._reset)).to(self.device, non_blocking=True)
            self.mass.index_fill_(0, idx, 0.0)
            self._reset[:] = False

    def _live_heads(self) -> list[int]:
        """The Q-heads some live request uses (host facts; at least one)."""
        if len(self.head_weights) == 1:
            return [0]
        return np.unique(self.host_head[self.host_head >= 0]).tolist() or [0]

    def filter(self, hidden: torch.Tensor, logits: torch.Tensor, row_idx: torch.Tensor, threshold: torch.Tensor,
               sign: torch.Tensor, mode: torch.Tensor, head: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Filter one step's logits: one fused ``token_filter`` op per Q-head a live request uses (a loop over heads,
        not requests); each pass filters its own head's rows and leaves every other row bitwise.

        Args:
            hidden: ``[B, H]`` the states that produced ``logits``.
            logits: ``[B, V']`` the step's logits.
            row_idx: ``[B]`` int32 value-steering row per batch row (0: not steered this step).
            threshold, sign, mode, head: the row table's device columns ``[N]`` (``head``: needed with several
                Q-heads).
        Returns:
            ``(logits' [B, V'], changed [B] bool)``; the mass telemetry is accumulated here, and
            :meth:`sampled_values` reads the predicted value of the tokens then sampled.
        """
        from value_steer.kernels.token_filter import token_filter

        live = self._live_heads()
        changed = None
        mass = None
        z_of = []
        for g in live:
            # With several Q-heads, rows of the other heads read as another mode, so this pass leaves them bitwise.
            mode_g = mode if len(self.head_weights) == 1 else torch.where(head == g, mode, torch.zeros_like(mode))
            logits, z, ch, m = token_filter(hidden, logits, row_idx, threshold, sign, mode_g, self.row_beta,
                                            self.row_k, *self.head_weights[g])
            changed = ch if changed is None else changed | ch
            mass = m if mass is None else mass + m
            z_of.append((g, z))
        assert changed is not None and mass is not None
        idx = row_idx[:logits.shape[0]].long()
        self.mass.index_add_(0, idx, mass.to(torch.float64))  # row 0 is a sink
        self._step = (z_of, None if head is None or len(z_of) == 1 else head.index_select(0, idx))
        return logits, changed

    def sampled_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]`` fp32 the predicted value (logit scale) of ``tokens [B]`` (the tokens sampled from the last
        :meth:`filter`'s logits), from each row's own Q-head: ``w_up[tok] . z + bias[tok]``."""
        z_of, row_head = self._step
        out = None
        for g, z in z_of:
            _, _, w_up, bias = self.head_weights[g]
            tok = tokens.clamp(0, w_up.shape[0] - 1)
            q = (w_up.index_select(0, tok) * z).sum(-1) + bias.index_select(0, tok)
            out = q if out is None else torch.where(row_head == g, q, out)
        assert out is not None
        return out

