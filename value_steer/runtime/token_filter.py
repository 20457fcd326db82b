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

from collections.abc import Sequence

import numpy as np
import torch

from value_steer.core.modes import MODE_TOKEN
from value_steer.core.qhead import MIN_SAFE_MASS, QHeadCheckpoint, k_emulation_factors, token_filter_rows


def mask_rows(logits: torch.Tensor, q: torch.Tensor, threshold: torch.Tensor, sign: torch.Tensor, on: torch.Tensor,
              min_safe_mass: float = MIN_SAFE_MASS, k: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~value_steer.core.qhead.token_filter_rows` without tilt (every ``beta`` 0; the mask, or the K-candidate
    rule where ``k >= 1``), with fewer passes over the ``[B, V]`` rows: ``sigmoid(q) > t`` is compared as
    ``q > logit(t)``, and the masses come from one ``exp(logits - max)`` (no softmax division, no sigmoid). Same
    arguments and results as the reference, up to tokens whose prediction sits on the threshold within float
    rounding."""
    v = q.shape[1]
    lf = logits[:, :v].float()
    t = threshold.float()
    cut = (torch.log(t) - torch.log1p(-t)).unsqueeze(1)  # logit(t); +-inf at t = 1 / 0
    s = sign.float().unsqueeze(1)
    unsafe = torch.where(s > 0, q > cut, q < cut)
    e = (lf - lf.max(dim=-1, keepdim=True).values).exp_()
    total = e.sum(dim=-1)
    unsafe_mass = (e * unsafe).sum(dim=-1) / total
    fallback = (1.0 - unsafe_mass) < min_safe_mass
    # The fallback without a host read: every row's safest column, used where the row falls back.
    safest = (s * q).argmin(dim=-1, keepdim=True)
    keep = torch.arange(v, device=q.device).unsqueeze(0) == safest
    removed = torch.where(fallback.unsqueeze(1), ~keep, unsafe)
    safest_mass = e.gather(1, safest).squeeze(1) / total
    mass = torch.where(fallback, 1.0 - safest_mass, unsafe_mass)
    out = logits.clone()
    if k is None:
        removed = removed & on.unsqueeze(1)
        out[:, :v].masked_fill_(removed, float("-inf"))
        return out, removed.any(dim=-1), torch.where(on, mass, torch.zeros_like(mass))
    use_k = k >= 1
    log_safe, log_unsafe = k_emulation_factors(unsafe_mass, k.clamp_min(1))
    edit = torch.where(unsafe, log_unsafe.unsqueeze(1), log_safe.unsqueeze(1))
    new = torch.where(use_k.unsqueeze(1), lf + edit, lf.masked_fill(removed, float("-inf")))
    out[:, :v] = torch.where(on.unsqueeze(1), new.to(logits.dtype), logits[:, :v])
    mass_k = unsafe_mass - unsafe_mass * torch.exp(log_unsafe)
    mass = torch.where(use_k, mass_k, mass)
    changed = on & torch.where(use_k, mass_k > 0, removed.any(dim=-1))
    return out, changed, torch.where(on, mass, torch.zeros_like(mass))


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
        self.head_weights = tuple(tuple(w.detach().to(self.device, torch.float32).contiguous()
                                        for w in c.head.weights()) for c in ckpts)
        self.weights = self.head_weights[0]
        self.vocab_size = ckpts[0].head.vocab_size
        # The head of each live row (host): the heads the step's q must be computed for.
        self.host_head = np.full(num_rows, -1, dtype=np.int64)
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

    def q(self, hidden: torch.Tensor, idx: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
        """``[B, V]`` fp32 predicted values of every row from its own Q-head: one product per Q-head a live request
        uses (a loop over heads, not requests; no device read)."""
        from value_steer.core.qhead import qhead_rows

        if len(self.head_weights) == 1 or head is None:
            return qhead_rows(hidden, *self.weights)
        live = np.unique(self.host_head[self.host_head >= 0]).tolist() or [0]
        row_head = head.index_select(0, idx)
        q = qhead_rows(hidden, *self.head_weights[live[0]])
        for g in live[1:]:
            q = torch.where((row_head == g).unsqueeze(1), qhead_rows(hidden, *self.head_weights[g]), q)
        return q

    def filter(self, hidden: torch.Tensor, logits: torch.Tensor, row_idx: torch.Tensor, threshold: torch.Tensor,
               sign: torch.Tensor, mode: torch.Tensor, head: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filter one step's logits.

        Args:
            hidden: ``[B, H]`` the states that produced ``logits``.
            logits: ``[B, V']`` the step's logits.
            row_idx: ``[B]`` int32 value-steering row per batch row (0: not steered this step).
            threshold, sign, mode, head: the row table's device columns ``[N]`` (``head``: needed with several
                Q-heads).
        Returns:
            ``(logits' [B, V'], q [B, V] fp32, changed [B] bool)``; the mass telemetry is accumulated here.
        """
        idx = row_idx.long()
        on = (idx > 0) & (mode.index_select(0, idx) == MODE_TOKEN)
        q = self.q(hidden, idx, head)
        beta = self.row_beta.index_select(0, idx)
        args = (logits, q, threshold.index_select(0, idx), sign.index_select(0, idx), beta, on)
        # Host facts of the live requests choose the cheapest form that covers them (no device read).
        k = self.row_k.index_select(0, idx) if bool(self.host_k.any()) else None
        if bool(self.host_beta.any()):  # some live request tilts: the reference handles every form
            out, changed, mass = token_filter_rows(*args, k=k)
        else:
            out, changed, mass = mask_rows(*args[:4], on, k=k)
        self.mass.index_add_(0, idx, mass.to(torch.float64))  # row 0 is a sink
        return out, q, changed
