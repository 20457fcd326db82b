"""Fused per-row steering decision: VFD selection / abstention / off, plus the winner gathers.

One launch, one program per row ``r`` (grid ``(R,)``), no host synchronisation:

- read the row's table entry ``row = row_idx[r]``: ``mode``, ``threshold``, ``sign``, ``num_candidates``
  (clamped to ``[1, K]``);
- ``signed = sign * (values[r, :] - threshold)`` (same fp32 arithmetic as
  ``value_steer.core.selection._signed``); ``valid = col < n & finite(signed)``; ``safe = valid & signed < 0``;
- ``MODE_VFD``: winner = first safe column, else the safest valid one (lowest column on ties), else 0;
  ``intervened = winner != 0``; no EOS forced;
- ``MODE_ABSTAIN``: winner 0, ``force_eos = finite(signed[0]) & signed[0] >= 0``;
- ``MODE_OFF`` (row 0 and any other mode value): winner 0, nothing flagged;
- gather ``cand_tokens``/``values``/``cand_logprobs`` at the winner and, when ``cand_hidden`` is given,
  copy its row ``r * K + winner`` into ``winner_hidden[r]`` in BLOCK_H chunks (same launch).

The reference (``score_and_select_reference``) composes ``value_steer.core.selection.vfd_select`` and
``value_steer.core.selection.force_eos``; the selection math lives only there.
"""

from __future__ import annotations

import torch

from value_steer import _ext
from value_steer.core.modes import MODE_ABSTAIN, MODE_VFD
from value_steer.core.selection import force_eos, vfd_select
from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton

__all__ = [
    "ScoreOutputs",
    "check_score_and_select_args",
    "empty_score_and_select_outputs",
    "score_and_select",
    "score_and_select_reference",
    "score_and_select_triton",
]

ScoreOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def check_score_and_select_args(
    values: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_num_candidates: torch.Tensor,
    cand_hidden: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate shapes/dtypes shared by every implementation; returns ``(R, K, H)`` (H = 0 without hidden)."""
    if values.dim() != 2 or values.dtype != torch.float32:
        raise ValueError(f"values must be [R, K] fp32, got {list(values.shape)} {values.dtype}")
    r, k = values.shape
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    if tuple(cand_tokens.shape) != (r, k) or cand_tokens.dtype != torch.int64:
        raise ValueError(f"cand_tokens must be [{r}, {k}] int64, got {list(cand_tokens.shape)} {cand_tokens.dtype}")
    if tuple(cand_logprobs.shape) != (r, k) or cand_logprobs.dtype != torch.float32:
        raise ValueError(
            f"cand_logprobs must be [{r}, {k}] fp32, got {list(cand_logprobs.shape)} {cand_logprobs.dtype}"
        )
    if tuple(row_idx.shape) != (r,) or row_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_idx must be [{r}] int32/int64, got {list(row_idx.shape)} {row_idx.dtype}")
    n_rows = row_threshold.shape[0] if row_threshold.dim() == 1 else -1
    for name, t, dt in (
        ("row_threshold", row_threshold, torch.float32),
        ("row_sign", row_sign, torch.float32),
        ("row_mode", row_mode, torch.int32),
        ("row_num_candidates", row_num_candidates, torch.int32),
    ):
        if t.dim() != 1 or t.shape[0] != n_rows or t.dtype != dt:
            raise ValueError(f"{name} must be [num_rows] {dt} (a RowTable buffer), got {list(t.shape)} {t.dtype}")
    h = 0
    if cand_hidden is not None:
        if cand_hidden.dim() != 2 or cand_hidden.shape[0] != r * k:
            raise ValueError(f"cand_hidden must be [R*K={r * k}, H], got {list(cand_hidden.shape)}")
        h = int(cand_hidden.shape[1])
    return int(r), int(k), h


def empty_score_and_select_outputs(
    r: int, h: int, device: torch.device, hidden_dtype: torch.dtype | None
) -> ScoreOutputs:
    """Allocate the seven outputs (``winner_hidden`` is ``[R, 0]`` fp32 without ``cand_hidden``)."""
    return (
        torch.empty(r, dtype=torch.int64, device=device),
        torch.empty(r, dtype=torch.int64, device=device),
        torch.empty(r, dtype=torch.float32, device=device),
        torch.empty(r, dtype=torch.float32, device=device),
        torch.empty(r, dtype=torch.bool, device=device),
        torch.empty(r, dtype=torch.bool, device=device),
        torch.empty((r, h), dtype=hidden_dtype or torch.float32, device=device),
    )


def score_and_select_reference(
    values: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_num_candidates: torch.Tensor,
    cand_hidden: torch.Tensor | None = None,
) -> ScoreOutputs:
    """Torch composite of ``vfd_select`` / ``force_eos`` over the row table (the semantics).

    Args:
        values: ``[R, K]`` fp32 candidate values (column 0 = the natural sample; NaN allowed).
        cand_tokens: ``[R, K]`` int64; cand_logprobs: ``[R, K]`` fp32.
        row_idx: ``[R]`` int32/int64 indices into the row table (0 = off).
        row_threshold, row_sign: ``[num_rows]`` fp32; row_mode, row_num_candidates: ``[num_rows]`` int32
            (the ``value_steer.core.modes.RowTable`` buffers). ``num_candidates`` is clamped to ``[1, K]``.
        cand_hidden: optional ``[R*K, H]`` (row ``r``'s candidates at rows ``r*K .. r*K+K-1``).
    Returns:
        ``winner_col [R] int64, winner_token [R] int64, winner_value [R] fp32, winner_logprob [R] fp32,
        intervened [R] bool, force_eos [R] bool, winner_hidden [R, H]`` (``cand_hidden.dtype``; ``[R, 0]``
        fp32 when ``cand_hidden`` is None).
    """
    r, k, h = check_score_and_select_args(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip
    idx = row_idx.long()
    thr = row_threshold[idx]
    sign = row_sign[idx]
    mode = row_mode[idx]
    n = row_num_candidates[idx].long().clamp(1, k)
    is_vfd = mode == MODE_VFD
    winner, intervened = vfd_select(values, thr, sign, n)
    winner = torch.where(is_vfd, winner, torch.zeros_like(winner))
    intervened = intervened & is_vfd
    eos = force_eos(values[:, 0], thr, sign, enabled=mode == MODE_ABSTAIN)
    col = winner.unsqueeze(-1)
    win_token = cand_tokens.gather(1, col).squeeze(-1)
    win_value = values.gather(1, col).squeeze(-1)
    win_logprob = cand_logprobs.gather(1, col).squeeze(-1)
    if cand_hidden is None:
        win_hidden = torch.empty((r, 0), dtype=torch.float32, device=values.device)
    else:
        rows = torch.arange(r, device=values.device) * k + winner
        win_hidden = cand_hidden.index_select(0, rows) if r else cand_hidden.new_empty((0, h))
    return winner, win_token, win_value, win_logprob, intervened, eos, win_hidden


if HAS_TRITON:

    @triton.jit
    def _score_and_select_kernel(
        values_ptr,
        tokens_ptr,
        logprobs_ptr,
        row_idx_ptr,
        thr_ptr,
        sign_ptr,
        mode_ptr,
        ncand_ptr,
        hidden_ptr,
        out_col_ptr,
        out_token_ptr,
        out_value_ptr,
        out_logprob_ptr,
        out_interv_ptr,
        out_eos_ptr,
        out_hidden_ptr,
        K,
        H,
        stride_vr,
        stride_vk,
        stride_tr,
        stride_tk,
        stride_lr,
        stride_lk,
        stride_hr,
        stride_hh,
        stride_ohr,
        stride_ohh,
        BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_HIDDEN: tl.constexpr,
        MODE_ABSTAIN_: tl.constexpr,
        MODE_VFD_: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        row = tl.load(row_idx_ptr + r).to(tl.int64)
        thr = tl.load(thr_ptr + row)
        sign = tl.load(sign_ptr + row)
        mode = tl.load(mode_ptr + row)
        n = tl.minimum(tl.maximum(tl.load(ncand_ptr + row), 1), K)

        cols = tl.arange(0, BLOCK_K)
        in_k = cols < K
        v = tl.load(values_ptr + r * stride_vr + cols * stride_vk, mask=in_k, other=0.0)
        signed = sign * (v - thr)
        finite = tl.abs(signed) <= 3.4028234663852886e38  # false for NaN and +-inf
        valid = (cols < n) & finite
        safe = valid & (signed < 0.0)
        first_safe = tl.min(tl.where(safe, cols, BLOCK_K), axis=0)
        masked = tl.where(valid, signed, float("inf"))
        best = tl.min(masked, axis=0)
        safest = tl.min(tl.where(valid & (masked == best), cols, BLOCK_K), axis=0)
        any_valid = safest < BLOCK_K
        vfd_winner = tl.where(first_safe < BLOCK_K, first_safe, tl.where(any_valid, safest, 0))

        is_vfd = mode == MODE_VFD_
        winner = tl.where(is_vfd, vfd_winner, 0).to(tl.int64)
        signed0 = sign * (tl.load(values_ptr + r * stride_vr) - thr)
        finite0 = tl.abs(signed0) <= 3.4028234663852886e38
        eos = (mode == MODE_ABSTAIN_) & finite0 & (signed0 >= 0.0)

        tl.store(out_col_ptr + r, winner)
        tl.store(out_token_ptr + r, tl.load(tokens_ptr + r * stride_tr + winner * stride_tk))
        tl.store(out_value_ptr + r, tl.load(values_ptr + r * stride_vr + winner * stride_vk))
        tl.store(out_logprob_ptr + r, tl.load(logprobs_ptr + r * stride_lr + winner * stride_lk))
        tl.store(out_interv_ptr + r, (is_vfd & (winner != 0)).to(tl.int8))
        tl.store(out_eos_ptr + r, eos.to(tl.int8))

        if HAS_HIDDEN:
            src = hidden_ptr + (r * K + winner) * stride_hr
            dst = out_hidden_ptr + r * stride_ohr
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                hm = hh < H
                tl.store(dst + hh * stride_ohh, tl.load(src + hh * stride_hh, mask=hm), mask=hm)


def score_and_select_triton(
    values: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_num_candidates: torch.Tensor,
    cand_hidden: torch.Tensor | None = None,
) -> ScoreOutputs:
    """Triton launcher (one launch, grid ``(R,)``); same contract as ``score_and_select_reference``."""
    require_triton()
    r, k, h = check_score_and_select_args(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip
    outs = empty_score_and_select_outputs(r, h, values.device, None if cand_hidden is None else cand_hidden.dtype)
    if r == 0:
        return outs
    col, tok, val, lp, interv, eos, hid = outs
    hidden = cand_hidden if cand_hidden is not None else hid  # dummy pointer when absent
    _score_and_select_kernel[(r,)](
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        hidden, col, tok, val, lp, interv.view(torch.int8), eos.view(torch.int8), hid,
        k, h,
        values.stride(0), values.stride(1), cand_tokens.stride(0), cand_tokens.stride(1),
        cand_logprobs.stride(0), cand_logprobs.stride(1), hidden.stride(0), hidden.stride(1),
        hid.stride(0), hid.stride(1),
        BLOCK_K=next_power_of_2(k), BLOCK_H=min(1024, next_power_of_2(max(h, 1))), HAS_HIDDEN=cand_hidden is not None,
        MODE_ABSTAIN_=MODE_ABSTAIN, MODE_VFD_=MODE_VFD,
        num_warps=4,
    )  # fmt: skip
    return outs

# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("value_steer::score_and_select", mutates_args=())
def _score_and_select_op(
    values: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_num_candidates: torch.Tensor,
    cand_hidden: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates)
    ext = _ext.extension()
    if ext is not None:
        check_score_and_select_args(*args, cand_hidden)
        return tuple(ext.score_and_select(*args, cand_hidden))
    return score_and_select_reference(*args, cand_hidden)


@_score_and_select_op.register_fake
def _(values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates, cand_hidden):
    r, _, h = check_score_and_select_args(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip
    return empty_score_and_select_outputs(r, h, values.device, None if cand_hidden is None else cand_hidden.dtype)


@_score_and_select_op.register_kernel("cuda")
def _(values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates, cand_hidden):
    return score_and_select_triton(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip


def score_and_select(
    values: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_logprobs: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_num_candidates: torch.Tensor,
    cand_hidden: torch.Tensor | None = None,
) -> ScoreOutputs:
    """Per-row steering decision over the row table (``torch.ops.value_steer.score_and_select``).

    Args:
        values: ``[R, K]`` fp32 candidate values (column 0 = natural sample; NaN allowed).
        cand_tokens: ``[R, K]`` int64; cand_logprobs: ``[R, K]`` fp32.
        row_idx: ``[R]`` int32/int64 row-table index per row (0 = off).
        row_threshold, row_sign, row_mode, row_num_candidates: the ``RowTable`` buffers
            (``[num_rows]`` fp32, fp32 ±1, int32 ``MODE_*``, int32).
        cand_hidden: optional ``[R*K, H]`` hidden states (row ``r``'s candidates at ``r*K .. r*K+K-1``).
    Returns:
        ``(winner_col [R] int64, winner_token [R] int64, winner_value [R] fp32, winner_logprob [R] fp32,
        intervened [R] bool, force_eos [R] bool, winner_hidden [R, H])``; ``winner_hidden`` has
        ``cand_hidden``'s dtype, or is ``[R, 0]`` fp32 without ``cand_hidden``. Semantics: MODE_VFD rows
        apply ``value_steer.core.selection.vfd_select`` over their first ``num_candidates`` (clamped to
        ``[1, K]``) columns; MODE_ABSTAIN rows keep column 0 and flag ``force_eos`` per
        ``value_steer.core.selection.force_eos`` on ``values[:, 0]``; MODE_OFF rows (row 0) keep column 0.
    """
    return torch.ops.value_steer.score_and_select(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip
