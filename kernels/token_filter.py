"""Token-mode VFD's logit filter over a batch of logit rows: ``token_filter`` (one fused op per sampling step).

The semantics have one home, ``value_steer.core.qhead.token_filter_rows``: a low-rank Q-head predicts every token's
value from the state that produced the step's logits, ``q = W_up z + bias`` with ``z = W_down (h + pos)`` (logit
scale), and each logit row ``b`` reads its request's row of the persistent row table (row 0 = off)::

    row = row_idx[b]
    on when row > 0 and row_mode[row] == token_mode; then t, s, beta, k = row_threshold/sign/beta/k[row] and
      beta > 0:  tilt          logits' = logits - beta * s * q;          mass = TV(softmax(logits'), softmax(logits))
      k >= 1:    K-candidate   logits' = logits + log factor (safe/unsafe by q vs logit(t)); mass = moved mass
      else:      mask          unsafe tokens (s * (sigmoid(q) - t) > 0) to -inf; when the safe tokens hold less than
                               min_safe_mass, only the safest token (argmin s * q) is kept; mass = removed mass
    off: logits'[b] = logits[b] bitwise, changed False, mass 0.  Columns V..V' are bitwise in every row.

``V`` (the rows of ``w_up``) may be smaller than the logits' width ``V'``. ``-inf`` logits (grammar masks) stay
``-inf`` and produce no NaN. The op also returns ``z [B, R]`` for every row: the runner reads the value at the
sampled token as ``w_up[tok] . z + bias[tok]`` instead of keeping the ``[B, V]`` q.

Implementations (on rows agree to fp32 rounding except tokens whose q sits on the threshold within float rounding,
where the unsafe test ``sign * (q - logit(t)) > 0`` of the fast paths and the reference's
``sign * (sigmoid(q) - t) > 0`` may disagree; off rows and padded columns are bitwise copies in all of them):

- torch reference (``token_filter_reference``): the row-table lookups, ``z`` and ``q`` with torch, then
  ``token_filter_rows``.
- C++ CPU (``value_steer._C``, ``csrc/token_filter.cpp``): never materialises a ``[B, V]`` q. Pass 1, parallel over
  512-column tiles, computes q for groups of up to 8 on-rows at once from ``W_up`` read as ``[R, V]`` (free when
  ``w_up`` is stored column-major, as :func:`prepare_token_filter_weights` does) and per (row, tile) the max logit,
  the safe / unsafe ``exp`` sums, the first argmin of ``s q``; mask rows write their output there and then. A
  per-row reduction (tiles in order) decides fallback, the K factors, mass and changed; pass 2 writes what is left
  (fallback rows, K rows from a bit per column, tilt rows with q recomputed and the TV sum). Fixed summation order:
  results do not depend on the thread count.
- Triton, four launches, no host sync: ``_z`` (grid ``(B,)``) writes ``z``; ``_stats`` (grid ``(B, chunks)``) the
  per-chunk statistics of on rows (online max / exp sums over ``BLOCK_V`` sub-blocks); ``_apply`` (same grid)
  reduces its row's chunk statistics, recomputes q and writes its chunk (and the tilt TV partial sums); ``_finish``
  (grid ``(B,)``) writes ``changed`` and ``mass``.

Inputs are persistent device buffers and nothing syncs with the host (CUDA-graph safe); ``row_idx`` is
``[B_max >= B]`` and only its first ``B = logits.shape[0]`` entries are read; they must lie in ``[0, N)`` (the C++ op
checks, the Triton kernels do not).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from value_steer import _ext
from value_steer.core.modes import MODE_TOKEN
from value_steer.core.qhead import MIN_SAFE_MASS, token_filter_rows
from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from value_steer.kernels.logit_steer import low_rank_op_weights

__all__ = [
    "check_token_filter_args",
    "prepare_token_filter_weights",
    "token_filter",
    "token_filter_reference",
    "token_filter_triton",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepare_token_filter_weights(head: torch.nn.Module | Sequence[torch.Tensor], device: torch.device | str = "cpu"
                                 ) -> tuple[torch.Tensor, ...]:
    """The Q-head's tensors for the op, once: ``(w_down, pos, w_up, bias)``.

    Args:
        head: a ``QHead`` (anything with ``.weights()``) or the tuple in that order.
        device: where they live.
    Returns:
        fp32 tensors, detached; every one contiguous except ``w_up [V, R]``, stored column-major (``w_up.t()`` is a
        contiguous ``[R, V]``): the C++ op reads it as ``[R, V]`` rows (eight columns per vector load) without a
        copy, and the Triton kernels' ``[BLOCK_V, R]`` tiles are contiguous along V.
    """
    return low_rank_op_weights(head, ("w_down", "pos", "w_up", "bias"), device)


def _is_int(x: object) -> bool:
    return isinstance(x, torch.SymInt) or (isinstance(x, int) and not isinstance(x, bool))


def check_token_filter_args(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_beta: torch.Tensor,
    row_k: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor,
    token_mode: int,
    min_safe_mass: float,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes/dtypes/devices shared by every implementation; returns ``(B, H, V', V, R, N)``. Errors
    name the argument."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be [B, V'] fp32/bf16/fp16, got {list(logits.shape)} {logits.dtype}")
    b, vp = logits.shape
    if hidden.dim() != 2 or hidden.dtype not in _DTYPES or hidden.shape[0] != b:
        raise ValueError(f"hidden must be [B={b}, H] fp32/bf16/fp16, got {list(hidden.shape)} {hidden.dtype}")
    h = hidden.shape[1]
    if row_idx.dim() != 1 or row_idx.dtype != torch.int32:
        raise ValueError(f"row_idx must be a 1-D int32 tensor, got {list(row_idx.shape)} {row_idx.dtype}")
    n_idx = row_idx.shape[0]
    if isinstance(n_idx, torch.SymInt) or isinstance(b, torch.SymInt):
        torch._check(n_idx >= b, lambda: f"row_idx must hold at least B={b} entries, got {n_idx}")
    elif n_idx < b:
        raise ValueError(f"row_idx must hold at least B={b} entries, got {n_idx}")
    if row_threshold.dim() != 1 or row_threshold.dtype != torch.float32:
        raise ValueError(f"row_threshold must be [N] fp32, got {list(row_threshold.shape)} {row_threshold.dtype}")
    n = row_threshold.shape[0]
    for name, t, dtype in (("row_sign", row_sign, torch.float32), ("row_mode", row_mode, torch.int32),
                           ("row_beta", row_beta, torch.float32), ("row_k", row_k, torch.int32)):  # fmt: skip
        if t.dim() != 1 or t.dtype != dtype or t.shape[0] != n:
            raise ValueError(f"{name} must be [N={n}] {dtype}, got {list(t.shape)} {t.dtype}")
    if w_down.dim() != 2 or w_down.shape[1] != h:
        raise ValueError(f"w_down must be [R, H={h}], got {list(w_down.shape)}")
    r = w_down.shape[0]
    if w_up.dim() != 2 or w_up.shape[1] != r:
        raise ValueError(f"w_up must be [V, R={r}], got {list(w_up.shape)}")
    v = w_up.shape[0]
    if isinstance(v, int) and isinstance(vp, int) and not 1 <= v <= vp:
        raise ValueError(f"w_up must cover 1 <= V <= V'={vp} columns, got V={v}")
    for name, t, shape in (("pos", pos, (h,)), ("bias", bias, (v,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    for name, t in (("w_down", w_down), ("pos", pos), ("w_up", w_up), ("bias", bias)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {t.dtype}")
    for name, t in (("hidden", hidden), ("row_idx", row_idx), ("row_threshold", row_threshold),
                    ("row_sign", row_sign), ("row_mode", row_mode), ("row_beta", row_beta), ("row_k", row_k),
                    ("w_down", w_down), ("pos", pos), ("w_up", w_up), ("bias", bias)):  # fmt: skip
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device}, got {t.device}")
    if not _is_int(token_mode):
        raise ValueError(f"token_mode must be an int, got {token_mode!r}")
    if not isinstance(min_safe_mass, (int, float, torch.SymFloat)) or isinstance(min_safe_mass, bool):
        raise ValueError(f"min_safe_mass must be a number, got {min_safe_mass!r}")
    return b, h, vp, v, r, n


# --------------------------------------------------------------------------------------------------
# Torch reference (vectorised over rows; no host synchronisation)


def token_filter_reference(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_beta: torch.Tensor,
    row_k: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor,
    token_mode: int = MODE_TOKEN,
    min_safe_mass: float = MIN_SAFE_MASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row-table lookups, ``z`` and ``q = W_up z + bias`` (``qhead_rows``' ops), then
    ``value_steer.core.qhead.token_filter_rows``. Same contract as :func:`token_filter`."""
    b, *_ = check_token_filter_args(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta, row_k,
                                    w_down, pos, w_up, bias, token_mode, min_safe_mass)
    rows = row_idx[:b].long()
    on = (rows > 0) & (row_mode.index_select(0, rows) == token_mode)
    z = torch.nn.functional.linear(hidden.float() + pos, w_down)
    q = torch.nn.functional.linear(z, w_up, bias)
    out, changed, mass = token_filter_rows(logits, q, row_threshold.index_select(0, rows),
                                           row_sign.index_select(0, rows), row_beta.index_select(0, rows), on,
                                           float(min_safe_mass), k=row_k.index_select(0, rows))  # fmt: skip
    return out.contiguous(), z, changed, mass


# --------------------------------------------------------------------------------------------------
# Triton kernels: _z (grid (B,)), _stats and _apply (grid (B, chunks)), _finish (grid (B,))

# Per (row, chunk) statistics written by _stats, in this order (fp32): the max logit m, the exp(l - m) sums over
# safe and unsafe columns, the unsafe count, min of s q, the logit at its first argmin, tilt's max of
# t = l - beta s q and sum of exp(t - max), and (written by _apply) the tilt TV partial sum.
_NSTAT = 9

if HAS_TRITON:

    @triton.jit
    def _tf_row(row_ptr, mode_ptr, thr_ptr, sign_ptr, beta_ptr, k_ptr, b, token_mode, stride_t, stride_s, stride_m,
                stride_be, stride_k):  # fmt: skip
        """The row's table entries: (on, cut = logit(t), sign, coef = beta * sign, kind, k); kind 0: the mask,
        1: the K-candidate rule, 2: tilt."""
        row = tl.load(row_ptr + b).to(tl.int64)
        mode = tl.load(mode_ptr + row * stride_m)
        on = (row > 0) & (mode == token_mode)
        t = tl.load(thr_ptr + row * stride_t)
        s = tl.load(sign_ptr + row * stride_s)
        beta = tl.load(beta_ptr + row * stride_be)
        k = tl.load(k_ptr + row * stride_k)
        cut = tl.log(t) - tl.log(1.0 - t)
        kind = tl.where(beta > 0.0, 2, tl.where(k >= 1, 1, 0))
        return on, cut, s, beta * s, kind, k

    @triton.jit
    def _tf_q(w_up_ptr, bias_ptr, z, vv, rr, valid, R, stride_uv, stride_ur, stride_bias):
        """q for the columns vv (0 where not valid): [BLOCK_V] fp32, the same arithmetic in _stats and _apply."""
        w = tl.load(w_up_ptr + vv[:, None] * stride_uv + rr[None, :] * stride_ur,
                    mask=valid[:, None] & (rr < R)[None, :], other=0.0)  # fmt: skip
        return tl.sum(w * z[None, :], axis=1) + tl.load(bias_ptr + vv * stride_bias, mask=valid, other=0.0)

    @triton.jit
    def _tf_row_stats(ws_ptr, idx_ptr, b, NC, BLOCK_NC: tl.constexpr, NSTAT: tl.constexpr):
        """The row's statistics over all chunks (chunks in order): (m, total, safe, unsafe, count, safest, lsafest,
        tm, ts)."""
        cc = tl.arange(0, BLOCK_NC)
        cm = cc < NC
        base = ws_ptr + (b * NC + cc) * NSTAT
        m_c = tl.load(base + 0, mask=cm, other=float("-inf"))
        m = tl.max(m_c, axis=0)
        scale = tl.where(m_c > float("-inf"), tl.exp(m_c - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        safe = tl.sum(tl.load(base + 1, mask=cm, other=0.0) * scale, axis=0)
        unsafe = tl.sum(tl.load(base + 2, mask=cm, other=0.0) * scale, axis=0)
        count = tl.sum(tl.load(base + 3, mask=cm, other=0.0), axis=0)
        minv_c = tl.load(base + 4, mask=cm, other=float("inf"))
        minv = tl.min(minv_c, axis=0)
        first = tl.min(tl.where(minv_c == minv, cc, BLOCK_NC), axis=0)  # the first chunk holding the minimum
        safest = tl.sum(tl.where(cc == first, tl.load(idx_ptr + b * NC + cc, mask=cm, other=0), 0), axis=0)
        lsafest = tl.max(tl.where(cc == first, tl.load(base + 5, mask=cm, other=float("-inf")), float("-inf")),
                         axis=0)  # fmt: skip
        tm_c = tl.load(base + 6, mask=cm, other=float("-inf"))
        tm = tl.max(tm_c, axis=0)
        tscale = tl.where(tm_c > float("-inf"), tl.exp(tm_c - tl.where(tm > float("-inf"), tm, 0.0)), 0.0)
        ts = tl.sum(tl.load(base + 7, mask=cm, other=0.0) * tscale, axis=0)
        # Off rows (nothing summed) divide by 1, not 0.
        total = safe + unsafe
        total = tl.where(total > 0.0, total, 1.0)
        ts = tl.where(ts > 0.0, ts, 1.0)
        return m, total, safe, unsafe, count, safest, lsafest, tm, ts

    @triton.jit
    def _tf_z_kernel(
        hidden_ptr, w_down_ptr, pos_ptr, z_ptr,
        H, R,
        stride_hb, stride_hh, stride_dr, stride_dh, stride_p,
        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        in_r = rr < R
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < H
            x = tl.load(hidden_ptr + b * stride_hb + hh * stride_hh, mask=hm, other=0.0).to(tl.float32)
            y = x + tl.load(pos_ptr + hh * stride_p, mask=hm, other=0.0)
            wd = tl.load(w_down_ptr + rr[:, None] * stride_dr + hh[None, :] * stride_dh,
                         mask=in_r[:, None] & hm[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(wd * y[None, :], axis=1)
        tl.store(z_ptr + b * R + rr, acc, mask=in_r)

    @triton.jit
    def _tf_stats_kernel(
        logits_ptr, row_ptr, thr_ptr, sign_ptr, mode_ptr, beta_ptr, k_ptr, w_up_ptr, bias_ptr, z_ptr, ws_ptr, idx_ptr,
        V, R, NC, CHUNK, token_mode,
        stride_lb, stride_lv, stride_t, stride_s, stride_m, stride_be, stride_k, stride_uv, stride_ur, stride_bias,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, NSTAT: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        on, cut, s, coef, kind, _ = _tf_row(row_ptr, mode_ptr, thr_ptr, sign_ptr, beta_ptr, k_ptr, b, token_mode,
                                            stride_t, stride_s, stride_m, stride_be, stride_k)  # fmt: skip
        # Off rows read nothing but their table entries (the flag enters the masks as a bound: the interpreter
        # rejects scalar-bool masks).
        v_end = tl.where(on, V, 0)
        rr = tl.arange(0, BLOCK_R)
        z = tl.load(z_ptr + b * R + rr, mask=rr < tl.where(on, R, 0), other=0.0)
        m = float("-inf")
        safe = 0.0
        unsafe = 0.0
        count = 0.0
        minv = float("inf")
        mini = c * 0  # int64
        lmin = float("-inf")
        tm = float("-inf")
        ts = 0.0
        for i in range(0, CHUNK, BLOCK_V):
            v0 = c * CHUNK + i
            vv = v0 + tl.arange(0, BLOCK_V)
            valid = vv < v_end
            q = _tf_q(w_up_ptr, bias_ptr, z, vv, rr, valid, R, stride_uv, stride_ur, stride_bias)
            lv = tl.load(logits_ptr + b * stride_lb + vv * stride_lv, mask=valid, other=float("-inf")).to(tl.float32)
            um = (s * (q - cut) > 0.0) & valid
            m_new = tl.maximum(m, tl.max(lv, axis=0))
            base = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m - base)  # m = -inf: 0
            e = tl.where(lv > float("-inf"), tl.exp(lv - base), 0.0)
            safe = safe * alpha + tl.sum(tl.where(um, 0.0, e), axis=0)
            unsafe = unsafe * alpha + tl.sum(tl.where(um, e, 0.0), axis=0)
            m = m_new
            count += tl.sum(um.to(tl.float32), axis=0)
            sq = tl.where(valid, s * q, float("inf"))
            bmin = tl.min(sq, axis=0)
            bidx = tl.min(tl.where(sq == bmin, vv, v0 + BLOCK_V), axis=0)  # the block's first minimum
            better = bmin < minv
            lb = tl.max(tl.where(vv == bidx, lv, float("-inf")), axis=0)
            mini = tl.where(better, bidx, mini)
            lmin = tl.where(better, lb, lmin)
            minv = tl.where(better, bmin, minv)
            t = tl.where(valid & (kind == 2), lv - coef * q, float("-inf"))
            tm_new = tl.maximum(tm, tl.max(t, axis=0))
            tbase = tl.where(tm_new > float("-inf"), tm_new, 0.0)
            ts = ts * tl.exp(tm - tbase) + tl.sum(tl.where(t > float("-inf"), tl.exp(t - tbase), 0.0), axis=0)
            tm = tm_new
        out = ws_ptr + (b * NC + c) * NSTAT
        tl.store(out + 0, m)
        tl.store(out + 1, safe)
        tl.store(out + 2, unsafe)
        tl.store(out + 3, count)
        tl.store(out + 4, minv)
        tl.store(out + 5, lmin)
        tl.store(out + 6, tm)
        tl.store(out + 7, ts)
        tl.store(idx_ptr + b * NC + c, mini.to(tl.int32))

    @triton.jit
    def _tf_apply_kernel(
        logits_ptr, out_ptr, row_ptr, thr_ptr, sign_ptr, mode_ptr, beta_ptr, k_ptr, w_up_ptr, bias_ptr, z_ptr, ws_ptr,
        idx_ptr,
        VP, V, R, NC, CHUNK, token_mode, min_safe_mass,
        stride_lb, stride_lv, stride_ob, stride_ov, stride_t, stride_s, stride_m, stride_be, stride_k, stride_uv,
        stride_ur, stride_bias,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_NC: tl.constexpr, NSTAT: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        on, cut, s, coef, kind, k = _tf_row(row_ptr, mode_ptr, thr_ptr, sign_ptr, beta_ptr, k_ptr, b, token_mode,
                                            stride_t, stride_s, stride_m, stride_be, stride_k)  # fmt: skip
        m, total, safe, unsafe, _, safest, _, tm, ts = _tf_row_stats(ws_ptr, idx_ptr, b, NC, BLOCK_NC, NSTAT)
        fallback = safe / total < min_safe_mass
        # The K-candidate rule's log factors (value_steer.core.qhead.k_emulation_factors).
        u = tl.minimum(tl.maximum(unsafe / total, 0.0), 1.0)
        kf = tl.maximum(k, 1).to(tl.float32)
        near_one = u > 1.0 - 1e-6
        series = tl.where(near_one, kf, (1.0 - tl.exp(kf * tl.log(tl.maximum(u, 1e-30)))) / tl.maximum(1.0 - u, 1e-12))
        log_safe = tl.log(tl.maximum(series, 1.0))
        log_unsafe = tl.where((u > 0.0) & (~near_one), (kf - 1.0) * tl.log(tl.maximum(u, 1e-30)), 0.0)
        mbase = tl.where(m > float("-inf"), m, 0.0)
        tbase = tl.where(tm > float("-inf"), tm, 0.0)
        v_end = tl.where(on, V, 0)
        rr = tl.arange(0, BLOCK_R)
        z = tl.load(z_ptr + b * R + rr, mask=rr < tl.where(on, R, 0), other=0.0)
        tv = 0.0
        for i in range(0, CHUNK, BLOCK_V):
            v0 = c * CHUNK + i
            vv = v0 + tl.arange(0, BLOCK_V)
            in_vp = vv < VP
            edit = vv < v_end
            x = tl.load(logits_ptr + b * stride_lb + vv * stride_lv, mask=in_vp)  # native dtype: copied as is
            lv = tl.where(edit, x.to(tl.float32), float("-inf"))
            q = _tf_q(w_up_ptr, bias_ptr, z, vv, rr, edit, R, stride_uv, stride_ur, stride_bias)
            um = s * (q - cut) > 0.0
            removed = tl.where(fallback, vv != safest, um)
            t = lv - coef * q
            y = tl.where(kind == 2, t, tl.where(kind == 1, lv + tl.where(um, log_unsafe, log_safe),
                                                tl.where(removed, float("-inf"), lv)))  # fmt: skip
            keep = (kind == 0) & ~removed  # mask rows' kept logits: the input's bits
            y_out = tl.where(keep, x, y.to(x.dtype))
            tl.store(out_ptr + b * stride_ob + vv * stride_ov, tl.where(edit, y_out, x), mask=in_vp)
            pt = tl.where(t > float("-inf"), tl.exp(t - tbase), 0.0) / ts
            p = tl.where(lv > float("-inf"), tl.exp(lv - mbase), 0.0) / total
            tv += tl.sum(tl.where(edit & (kind == 2), tl.abs(pt - p), 0.0), axis=0)
        tl.store(ws_ptr + (b * NC + c) * NSTAT + 8, tv)

    @triton.jit
    def _tf_finish_kernel(
        row_ptr, thr_ptr, sign_ptr, mode_ptr, beta_ptr, k_ptr, ws_ptr, idx_ptr, changed_ptr, mass_ptr,
        V, NC, token_mode, min_safe_mass,
        stride_t, stride_s, stride_m, stride_be, stride_k,
        BLOCK_NC: tl.constexpr, NSTAT: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        on, _, _, _, kind, k = _tf_row(row_ptr, mode_ptr, thr_ptr, sign_ptr, beta_ptr, k_ptr, b, token_mode,
                                       stride_t, stride_s, stride_m, stride_be, stride_k)  # fmt: skip
        m, total, safe, unsafe, count, _, lsafest, _, _ = _tf_row_stats(ws_ptr, idx_ptr, b, NC, BLOCK_NC, NSTAT)
        cc = tl.arange(0, BLOCK_NC)
        tv = tl.sum(tl.load(ws_ptr + (b * NC + cc) * NSTAT + 8, mask=cc < NC, other=0.0), axis=0)
        fallback = safe / total < min_safe_mass
        u = tl.minimum(tl.maximum(unsafe / total, 0.0), 1.0)
        kf = tl.maximum(k, 1).to(tl.float32)
        near_one = u > 1.0 - 1e-6
        log_unsafe = tl.where((u > 0.0) & (~near_one), (kf - 1.0) * tl.log(tl.maximum(u, 1e-30)), 0.0)
        mbase = tl.where(m > float("-inf"), m, 0.0)
        p_safest = tl.where(lsafest > float("-inf"), tl.exp(lsafest - mbase), 0.0) / total
        mass_mask = tl.where(fallback, 1.0 - p_safest, unsafe / total)
        changed_mask = tl.where(fallback, V > 1, count > 0.0)
        mass_k = u - u * tl.exp(log_unsafe)
        mass_tilt = 0.5 * tv
        mass = tl.where(kind == 2, mass_tilt, tl.where(kind == 1, mass_k, mass_mask))
        changed = tl.where(kind == 2, mass_tilt > 0.0, tl.where(kind == 1, mass_k > 0.0, changed_mask))
        tl.store(mass_ptr + b, tl.where(on, mass, 0.0))
        tl.store(changed_ptr + b, (on & changed).to(tl.uint8))


def token_filter_triton(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_beta: torch.Tensor,
    row_k: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor,
    token_mode: int = MODE_TOKEN,
    min_safe_mass: float = MIN_SAFE_MASS,
    *,
    block_h: int | None = None,
    block_v: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher (four launches); same contract as :func:`token_filter`. ``block_h`` / ``block_v`` override
    the H and V block widths (rounded up to powers of two), ``chunk`` the columns per program (rounded up to a
    multiple of the V block); tests use them to force several ragged chunks."""
    require_triton()
    b, h, vp, v, r, _ = check_token_filter_args(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta,
                                                row_k, w_down, pos, w_up, bias, token_mode, min_safe_mass)
    dev = logits.device
    out = torch.empty((b, vp), dtype=logits.dtype, device=dev)
    z = torch.empty((b, r), dtype=torch.float32, device=dev)
    changed = torch.empty(b, dtype=torch.bool, device=dev)
    mass = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0:
        return out, z, changed, mass
    block_r = max(2, next_power_of_2(r))
    # [BLOCK_R, BLOCK_H] and [BLOCK_V, BLOCK_R] weight tiles of <= 4096 fp32.
    bh = next_power_of_2(block_h) if block_h else min(next_power_of_2(h), max(64, 4096 // block_r))
    bv = next_power_of_2(block_v) if block_v else min(next_power_of_2(vp), max(64, 4096 // block_r))
    # Columns per program: a few thousand, so a row's chunk statistics are a short vector for _apply to reduce.
    ck = chunk if chunk else max(bv, 2048)
    ck = -(-ck // bv) * bv
    nc = triton.cdiv(vp, ck)
    block_nc = max(2, next_power_of_2(nc))
    ws = torch.empty((b, nc, _NSTAT), dtype=torch.float32, device=dev)
    idx = torch.empty((b, nc), dtype=torch.int32, device=dev)
    tables = (row_threshold, row_sign, row_mode, row_beta, row_k)
    strides = tuple(t.stride(0) for t in tables)
    _tf_z_kernel[(b,)](
        hidden, w_down, pos, z,
        h, r,
        hidden.stride(0), hidden.stride(1), w_down.stride(0), w_down.stride(1), pos.stride(0),
        BLOCK_R=block_r, BLOCK_H=bh, num_warps=4,
    )  # fmt: skip
    _tf_stats_kernel[(b, nc)](
        logits, row_idx, *tables[:2], row_mode, row_beta, row_k, w_up, bias, z, ws, idx,
        v, r, nc, ck, int(token_mode),
        logits.stride(0), logits.stride(1), *strides, w_up.stride(0), w_up.stride(1), bias.stride(0),
        BLOCK_R=block_r, BLOCK_V=bv, NSTAT=_NSTAT, num_warps=4,
    )  # fmt: skip
    _tf_apply_kernel[(b, nc)](
        logits, out, row_idx, *tables[:2], row_mode, row_beta, row_k, w_up, bias, z, ws, idx,
        vp, v, r, nc, ck, int(token_mode), float(min_safe_mass),
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), *strides, w_up.stride(0), w_up.stride(1),
        bias.stride(0),
        BLOCK_R=block_r, BLOCK_V=bv, BLOCK_NC=block_nc, NSTAT=_NSTAT, num_warps=4,
    )  # fmt: skip
    _tf_finish_kernel[(b,)](
        row_idx, *tables[:2], row_mode, row_beta, row_k, ws, idx, changed.view(torch.uint8), mass,
        v, nc, int(token_mode), float(min_safe_mass),
        *strides,
        BLOCK_NC=block_nc, NSTAT=_NSTAT, num_warps=1,
    )  # fmt: skip
    return out, z, changed, mass


# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes


@torch.library.custom_op("value_steer::token_filter", mutates_args=())
def _token_filter_op(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_beta: torch.Tensor,
    row_k: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor,
    token_mode: int,
    min_safe_mass: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta, row_k, w_down, pos, w_up, bias)
    ext = _ext.extension()
    if ext is not None and hasattr(ext, "token_filter"):
        check_token_filter_args(*args, token_mode, min_safe_mass)
        return ext.token_filter(*args, int(token_mode), float(min_safe_mass))
    return token_filter_reference(*args, token_mode, min_safe_mass)


@_token_filter_op.register_fake
def _(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta, row_k, w_down, pos, w_up, bias,
      token_mode, min_safe_mass):  # fmt: skip
    b, _, vp, _, r, _ = check_token_filter_args(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta,
                                                row_k, w_down, pos, w_up, bias, token_mode, min_safe_mass)
    return (logits.new_empty((b, vp)), logits.new_empty((b, r), dtype=torch.float32),
            logits.new_empty((b,), dtype=torch.bool), logits.new_empty((b,), dtype=torch.float32))


@_token_filter_op.register_kernel("cuda")
def _(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta, row_k, w_down, pos, w_up, bias,
      token_mode, min_safe_mass):  # fmt: skip
    return token_filter_triton(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta, row_k, w_down,
                               pos, w_up, bias, token_mode, min_safe_mass)


def token_filter(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_threshold: torch.Tensor,
    row_sign: torch.Tensor,
    row_mode: torch.Tensor,
    row_beta: torch.Tensor,
    row_k: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor,
    token_mode: int = MODE_TOKEN,
    min_safe_mass: float = MIN_SAFE_MASS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Filter each logit row by its request's Q-head token values (``torch.ops.value_steer.token_filter``).

    Args:
        hidden: ``[B, H]`` fp32/bf16/fp16, the final post-norm hidden state that produced each row's logits.
        logits: ``[B, V']`` fp32/bf16/fp16 (any strides).
        row_idx: ``[B_max >= B]`` int32, the value-steering row of each logit row (0 = off); ``[:B]`` is read.
        row_threshold, row_sign: ``[N]`` fp32, the row table's value threshold in (0, 1) and direction sign (+1:
            values above the threshold are undesirable, -1: below).
        row_mode: ``[N]`` int32, the row table's mode; a row is filtered when it equals ``token_mode``.
        row_beta: ``[N]`` fp32, > 0: tilt by ``beta``; row_k: ``[N]`` int32, >= 1 (with beta 0): the K-candidate
            rule; both 0: the mask.
        w_down: ``[R, H]``; pos: ``[H]``; w_up: ``[V, R]`` with ``1 <= V <= V'`` (any strides; column-major, as
            :func:`prepare_token_filter_weights` stores it, is free for the C++ op); bias: ``[V]``. All fp32.
        token_mode: the mode id of token-level filtering (``value_steer.core.modes.MODE_TOKEN``).
        min_safe_mass: the mask's fallback point (``value_steer.core.qhead.MIN_SAFE_MASS``).
    Returns:
        ``(logits' [B, V']`` contiguous, ``logits``' dtype; ``z [B, R]`` fp32 ``= W_down (h + pos)`` of every row
        (``q`` at a token ``v`` is ``w_up[v] . z + bias[v]``); ``changed [B]`` bool; ``mass [B]`` fp32``)``, as
        ``token_filter_rows`` on the looked-up rows: off rows (row 0, or another mode) are ``logits`` bitwise
        with changed False and mass 0; columns ``V..`` are bitwise in every row.
    """
    return torch.ops.value_steer.token_filter(hidden, logits, row_idx, row_threshold, row_sign, row_mode, row_beta,
                                              row_k, w_down, pos, w_up, bias, int(token_mode), float(min_safe_mass))
