"""VFD and abstention selection rules as torch references: one home each.

These functions define the semantics. The fused ``score_and_select`` kernels in ``value_steer.kernels``
and the C++ CPU op are tested against them; the vLLM worker only ever calls the ops.

Conventions shared with the row table (``value_steer.core.row_table``):
- ``sign`` is +1 for ``direction="above"`` (values above the threshold are undesirable; the value
  is P(undesirable)) and -1 for ``direction="below"``.
- A value ``v`` is *safe* for threshold ``t`` iff ``sign * (v - t) < 0`` (strictly under the
  threshold for "above"); it *crosses* iff it is finite and not safe. A value exactly equal to the
  threshold crosses. NaN is never safe and never crosses: it is never selected while any finite
  candidate exists and never forces EOS.
"""

from __future__ import annotations

import math

import torch


def _signed(values: torch.Tensor, threshold: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``sign * (value - threshold)``: negative means safe."""
    return sign.float() * (values.float() - threshold.float())


def vfd_select(
    values: torch.Tensor,
    threshold: torch.Tensor,
    sign: torch.Tensor,
    num_candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value-filtered decoding selection rule.

    Column 0 holds the natural sample. The winner of a row is its first valid candidate that is safe;
    if none is safe, the safest valid one (argmin of ``sign * value``, lowest column on ties); if no
    candidate has a finite value, column 0.

    Args:
        values: ``[R, K]`` fp32 candidate values (NaN allowed).
        threshold: ``[R]`` fp32 per-row thresholds.
        sign: ``[R]`` +1 ("above" is undesirable) or -1 ("below").
        num_candidates: ``[R]`` int, valid columns per row (``1 <= n <= K``); default all ``K``.
    Returns:
        ``winner [R] int64`` (column index), ``intervened [R] bool`` (``winner != 0``).
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [R, K], got {list(values.shape)}")
    r, k = values.shape
    if k < 1:
        raise ValueError(f"num_candidates (K) must be >= 1, got {k}")
    if num_candidates is None:
        num_candidates = torch.full((r,), k, dtype=torch.int64, device=values.device)
    n = num_candidates.to(torch.int64)
    if r and (int(n.min()) < 1 or int(n.max()) > k):
        raise ValueError(f"num_candidates must be in [1, {k}], got {n.tolist()}")
    cols = torch.arange(k, device=values.device)
    signed = _signed(values, threshold.unsqueeze(-1), sign.unsqueeze(-1))
    valid = (cols.unsqueeze(0) < n.unsqueeze(-1)) & torch.isfinite(signed)
    safe = valid & (signed < 0)
    # First safe column: argmax over a bool picks the lowest index among the maxima.
    any_safe = safe.any(dim=-1)
    first_safe = torch.argmax(safe.to(torch.int8), dim=-1)
    # Safest valid column; invalid entries pushed to +inf (torch.argmin returns the first minimum).
    masked = torch.where(valid, signed, torch.full_like(signed, math.inf))
    safest = torch.argmin(masked, dim=-1)
    any_valid = valid.any(dim=-1)
    winner = torch.where(any_safe, first_safe, torch.where(any_valid, safest, torch.zeros_like(safest)))
    return winner, winner != 0


def force_eos(
    values: torch.Tensor, threshold: torch.Tensor, sign: torch.Tensor, enabled: torch.Tensor | None = None
) -> torch.Tensor:
    """Dynamic-abstention rule: which rows cross their threshold (and so get EOS forced).

    Args:
        values: ``[R]`` fp32 values of the sampled rows.
        threshold, sign: ``[R]`` per-row threshold and direction sign (+1/-1).
        enabled: ``[R]`` bool, rows where abstention is on (default all).
    Returns:
        ``[R]`` bool: finite value with ``sign * (value - threshold) >= 0``, and enabled.
    """
    signed = _signed(values, threshold, sign)
    out = torch.isfinite(signed) & (signed >= 0)
    if enabled is not None:
        out = out & enabled.to(torch.bool)
    return out
