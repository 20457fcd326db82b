"""Generative logit steering over a batch of logit rows: ``logit_steer`` (one fused op per sampling step).

The math has one home, ``value_steer.core.logit_steer`` (the generator ``v(h) = W_up W_down (h + pos)``, its gate
``strength(h) = max_strength * sigmoid(w2 . tanh(W1 h + b1) + b2)``). Each logit row ``b`` reads its request's
row of a persistent per-row table (row 0 = off)::

    s = row_strength[row_idx[b]]
    untouched (row 0, or s == 0):  logits'[b] = logits[b] bitwise, gate_strength[b] = 0
    otherwise:                     logits'[b, :V] = logits[b, :V] + s * strength(h_b) * v(h_b)  (fp32, cast back),
                                   logits'[b, V:] = logits[b, V:] bitwise (padded columns),
                                   gate_strength[b] = strength(h_b)

``V`` (the rows of ``w_up``) may be smaller than the logits' width ``V'`` (vLLM's config vocabulary may exceed the
generator's; see the core module). ``-inf`` logits (grammar masks, bad words) stay ``-inf``.

Implementations (agree to fp32 rounding on steered rows; untouched rows are bitwise copies in all of them):

- torch reference (``logit_steer_reference``): the core's ``logit_steer_rows`` after the row-table lookup.
- C++ CPU (``value_steer._C``, ``csrc/logit_steer.cpp``): phase 1 per row (skipping untouched rows) computes
  ``c z`` (``c = s * strength``, ``z = W_down (h + pos)``) and the gate; phase 2, parallel over
  ``(row, 4096-column chunk)`` tiles, adds ``W_up (c z)`` eight columns at a time from ``W_up`` read as
  ``[R, V]`` (free when ``w_up`` is stored column-major, as :func:`prepare_logit_steer_weights` does) and
  ``memcpy``\\ s untouched rows and padded columns.
- Triton: the same two phases: ``_prep`` (grid ``(B,)``, BLOCK_H chunks over H) writes ``c z [B, BLOCK_R]`` and the
  gate strengths; ``_apply`` (grid ``(B, cdiv(V', BLOCK_V))``) adds ``W_up[block] (c z)`` and stores. ``W_up`` is
  ``V R`` floats (1.6 MB for SmolLM2 at R = 8), read once per row from L2.

Inputs are persistent device buffers and nothing syncs with the host (CUDA-graph safe); ``row_idx`` is
``[B_max >= B]`` and only its first ``B = logits.shape[0]`` entries are read; they must lie in ``[0, N)`` (the C++ op
checks, the Triton kernels do not).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from value_steer import _ext
from value_steer.core.logit_steer import logit_steer_rows
from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton

__all__ = [
    "check_logit_steer_args",
    "logit_steer",
    "logit_steer_reference",
    "logit_steer_triton",
    "prepare_logit_steer_weights",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepare_logit_steer_weights(gen: torch.nn.Module | Sequence[torch.Tensor], device: torch.device | str = "cpu"
                                ) -> tuple[torch.Tensor, ...]:
    """The generator's tensors for the op, once: ``(w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2)``.

    Args:
        gen: a ``LogitSteerGenerator`` (anything with ``.weights()``) or the tuple in that order.
        device: where they live.
    Returns:
        fp32 tensors, detached; every one contiguous except ``w_up [V, R]``, stored column-major (``w_up.t()`` is
        a contiguous ``[R, V]``): the C++ op reads it as ``[R, V]`` rows without a copy and the Triton kernel's
        ``[BLOCK_V, R]`` tiles are contiguous along V.
    """
    return low_rank_op_weights(gen, ("w_down", "pos", "w_up", "gate_w1", "gate_b1", "gate_w2", "gate_b2"), device)


def low_rank_op_weights(module: torch.nn.Module | Sequence[torch.Tensor], names: Sequence[str],
                        device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The tensors of a low-rank vocabulary op (the logit-steering generator, the Q-head of ``token_filter``), once:
    ``module.weights()`` (or the tuple) in the order ``names``, fp32, detached, on ``device``; ``w_up [V, R]`` stored
    column-major, the other matrices (``w_down``, ``gate_w1``) contiguous, every other tensor flattened to 1-D."""
    weights = tuple(module.weights()) if hasattr(module, "weights") else tuple(module)
    if len(weights) != len(names):
        raise ValueError(f"expected ({', '.join(names)}), got {len(weights)} tensors")
    out = []
    for name, w in zip(names, weights):
        w = w.detach().to(device=device, dtype=torch.float32)
        if name == "w_up":
            out.append(w.t().contiguous().t())
        elif name in ("w_down", "gate_w1"):
            out.append(w.contiguous())
        else:
            out.append(w.reshape(-1).contiguous())
    return tuple(out)


def check_logit_steer_args(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_strength: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    max_strength: float,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes/dtypes/devices shared by every implementation; returns ``(B, H, V', V, R, G)``."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be [B, V'] fp32/bf16/fp16, got {list(logits.shape)} {logits.dtype}")
    b, vp = logits.shape
    if hidden.dim() != 2 or hidden.dtype not in _DTYPES or hidden.shape[0] != b:
        raise ValueError(f"hidden must be [B={b}, H] fp32/bf16/fp16, got {list(hidden.shape)} {hidden.dtype}")
    h = hidden.shape[1]
    if row_idx.dim() != 1 or row_idx.dtype != torch.int32:
        raise ValueError(f"row_idx must be a 1-D int32 tensor, got {list(row_idx.shape)} {row_idx.dtype}")
    n = row_idx.shape[0]
    if isinstance(n, torch.SymInt) or isinstance(b, torch.SymInt):
        torch._check(n >= b, lambda: f"row_idx must hold at least B={b} entries, got {n}")
    elif n < b:
        raise ValueError(f"row_idx must hold at least B={b} entries, got {n}")
    if row_strength.dim() != 1 or row_strength.dtype != torch.float32:
        raise ValueError(f"row_strength must be [N] fp32, got {list(row_strength.shape)} {row_strength.dtype}")
    if w_down.dim() != 2 or w_down.shape[1] != h:
        raise ValueError(f"w_down must be [R, H={h}], got {list(w_down.shape)}")
    r = w_down.shape[0]
    if w_up.dim() != 2 or w_up.shape[1] != r:
        raise ValueError(f"w_up must be [V, R={r}], got {list(w_up.shape)}")
    v = w_up.shape[0]
    if isinstance(v, int) and isinstance(vp, int) and v > vp:
        raise ValueError(f"w_up covers V={v} columns but logits have only V'={vp}")
    if gate_w1.dim() != 2 or gate_w1.shape[1] != h:
        raise ValueError(f"gate_w1 must be [G, H={h}], got {list(gate_w1.shape)}")
    g = gate_w1.shape[0]
    for name, t, shape in (("pos", pos, (h,)), ("gate_b1", gate_b1, (g,)), ("gate_w2", gate_w2, (g,)),
                           ("gate_b2", gate_b2, (1,))):  # fmt: skip
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    for name, t in (("w_down", w_down), ("pos", pos), ("w_up", w_up), ("gate_w1", gate_w1), ("gate_b1", gate_b1),
                    ("gate_w2", gate_w2), ("gate_b2", gate_b2)):  # fmt: skip
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32, got {t.dtype}")
    for name, t in (("hidden", hidden), ("row_idx", row_idx), ("row_strength", row_strength), ("w_down", w_down),
                    ("pos", pos), ("w_up", w_up), ("gate_w1", gate_w1), ("gate_b1", gate_b1), ("gate_w2", gate_w2),
                    ("gate_b2", gate_b2)):  # fmt: skip
        if t.device != logits.device:
            raise ValueError(f"{name} must be on {logits.device}, got {t.device}")
    if not isinstance(max_strength, (int, float)) or isinstance(max_strength, bool):
        raise ValueError(f"max_strength must be a number, got {max_strength!r}")
    return b, h, vp, v, r, g


# --------------------------------------------------------------------------------------------------
# Torch reference (vectorised over rows; no host synchronisation)


def logit_steer_reference(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_strength: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    max_strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-table lookup, then ``value_steer.core.logit_steer.logit_steer_rows``. Same contract as
    :func:`logit_steer`."""
    b, *_ = check_logit_steer_args(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1,
                                   gate_w2, gate_b2, max_strength)
    rows = row_idx[:b].long()
    s = torch.where(rows != 0, row_strength[rows], torch.zeros((), device=rows.device))
    out, gs = logit_steer_rows(hidden, logits, s, w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2,
                               float(max_strength))
    return out.contiguous(), gs


# --------------------------------------------------------------------------------------------------
# Triton kernels: _prep (grid (B,)) then _apply (grid (B, cdiv(V', BLOCK_V)))

if HAS_TRITON:

    @triton.jit
    def _logit_steer_prep_kernel(
        hidden_ptr, row_ptr, strength_ptr, w_down_ptr, pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, zc_ptr, gs_ptr,
        H, R, G, max_strength,
        stride_hb, stride_hh, stride_s, stride_dr, stride_dh, stride_p, stride_1g, stride_1h, stride_b1, stride_w2,
        BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        row = tl.load(row_ptr + b).to(tl.int64)
        s = tl.load(strength_ptr + row * stride_s)
        active = (row != 0) & (s != 0.0)
        # The flag enters the masks as a bound (0 when inactive): the interpreter rejects scalar-bool masks.
        h_end = tl.where(active, H, 0)
        rr = tl.arange(0, BLOCK_R)
        gg = tl.arange(0, BLOCK_G)
        in_r = rr < tl.where(active, R, 0)
        in_g = gg < tl.where(active, G, 0)
        accz = tl.zeros([BLOCK_R], dtype=tl.float32)
        acca = tl.zeros([BLOCK_G], dtype=tl.float32)
        # Untouched rows read nothing but their row index (every load below is masked by `active`).
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            hm = hh < h_end
            x = tl.load(hidden_ptr + b * stride_hb + hh * stride_hh, mask=hm, other=0.0).to(tl.float32)
            y = x + tl.load(pos_ptr + hh * stride_p, mask=hm, other=0.0)
            wd = tl.load(w_down_ptr + rr[:, None] * stride_dr + hh[None, :] * stride_dh,
                         mask=in_r[:, None] & hm[None, :], other=0.0)  # fmt: skip
            accz += tl.sum(wd * y[None, :], axis=1)
            w1 = tl.load(w1_ptr + gg[:, None] * stride_1g + hh[None, :] * stride_1h,
                         mask=in_g[:, None] & hm[None, :], other=0.0)  # fmt: skip
            acca += tl.sum(w1 * x[None, :], axis=1)
        a = acca + tl.load(b1_ptr + gg * stride_b1, mask=in_g, other=0.0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # tanh(a), saturating to +-1 without NaN
        gate = tl.sum(tl.where(in_g, tl.load(w2_ptr + gg * stride_w2, mask=in_g, other=0.0) * t, 0.0), axis=0)
        gate += tl.load(b2_ptr)
        strength = max_strength / (1.0 + tl.exp(-gate))
        coef = tl.where(active, s * strength, 0.0)
        tl.store(zc_ptr + b * BLOCK_R + rr, accz * coef)
        tl.store(gs_ptr + b, tl.where(active, strength, 0.0))

    @triton.jit
    def _logit_steer_apply_kernel(
        logits_ptr, out_ptr, row_ptr, strength_ptr, w_up_ptr, zc_ptr,
        VP, V, R,
        stride_lb, stride_lv, stride_ob, stride_ov, stride_s, stride_uv, stride_ur,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        vb = tl.program_id(1).to(tl.int64)
        row = tl.load(row_ptr + b).to(tl.int64)
        s = tl.load(strength_ptr + row * stride_s)
        active = (row != 0) & (s != 0.0)
        vv = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        in_vp = vv < VP
        edit = vv < tl.where(active, V, 0)
        rr = tl.arange(0, BLOCK_R)
        x = tl.load(logits_ptr + b * stride_lb + vv * stride_lv, mask=in_vp)  # native dtype: copied as is
        zc = tl.load(zc_ptr + b * BLOCK_R + rr)
        w = tl.load(w_up_ptr + vv[:, None] * stride_uv + rr[None, :] * stride_ur,
                    mask=edit[:, None] & (rr < R)[None, :], other=0.0)  # fmt: skip
        y = (x.to(tl.float32) + tl.sum(w * zc[None, :], axis=1)).to(x.dtype)
        tl.store(out_ptr + b * stride_ob + vv * stride_ov, tl.where(edit, y, x), mask=in_vp)


def logit_steer_triton(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_strength: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    max_strength: float,
    *,
    block_h: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher (two launches); same contract as :func:`logit_steer`. ``block_h`` / ``block_v`` override
    the chunk widths (rounded up to powers of two; tests use them to force several ragged chunks)."""
    require_triton()
    b, h, vp, v, r, g = check_logit_steer_args(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1,
                                               gate_b1, gate_w2, gate_b2, max_strength)
    out = torch.empty((b, vp), dtype=logits.dtype, device=logits.device)
    gs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b == 0 or vp == 0:
        gs.zero_()
        return out, gs
    block_r, block_g = max(2, next_power_of_2(r)), max(2, next_power_of_2(g))
    # The [max(BLOCK_R, BLOCK_G), BLOCK_H] weight tiles and the [BLOCK_V, BLOCK_R] W_up tile stay at <= 4096 fp32.
    bh = next_power_of_2(block_h) if block_h else min(next_power_of_2(h), max(64, 4096 // max(block_r, block_g)))
    bv = next_power_of_2(block_v) if block_v else min(next_power_of_2(vp), max(64, 4096 // block_r))
    zc = torch.empty((b, block_r), dtype=torch.float32, device=logits.device)
    _logit_steer_prep_kernel[(b,)](
        hidden, row_idx, row_strength, w_down, pos, gate_w1, gate_b1, gate_w2, gate_b2, zc, gs,
        h, r, g, float(max_strength),
        hidden.stride(0), hidden.stride(1), row_strength.stride(0), w_down.stride(0), w_down.stride(1),
        pos.stride(0), gate_w1.stride(0), gate_w1.stride(1), gate_b1.stride(0), gate_w2.stride(0),
        BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_H=bh, num_warps=4,
    )  # fmt: skip
    _logit_steer_apply_kernel[(b, triton.cdiv(vp, bv))](
        logits, out, row_idx, row_strength, w_up, zc,
        vp, v, r,
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), row_strength.stride(0),
        w_up.stride(0), w_up.stride(1),
        BLOCK_R=block_r, BLOCK_V=bv, num_warps=4,
    )  # fmt: skip
    return out, gs


# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes


@torch.library.custom_op("value_steer::logit_steer", mutates_args=())
def _logit_steer_op(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_strength: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    max_strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2)
    ext = _ext.extension()
    if ext is not None and hasattr(ext, "logit_steer"):
        check_logit_steer_args(*args, max_strength)
        return ext.logit_steer(*args, float(max_strength))
    return logit_steer_reference(*args, max_strength)


@_logit_steer_op.register_fake
def _(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2, max_strength):
    b, _, vp, _, _, _ = check_logit_steer_args(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1,
                                               gate_b1, gate_w2, gate_b2, max_strength)
    return logits.new_empty((b, vp)), logits.new_empty((b,), dtype=torch.float32)


@_logit_steer_op.register_kernel("cuda")
def _(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2, max_strength):
    return logit_steer_triton(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1, gate_b1, gate_w2,
                              gate_b2, max_strength)


def logit_steer(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    row_idx: torch.Tensor,
    row_strength: torch.Tensor,
    w_down: torch.Tensor,
    pos: torch.Tensor,
    w_up: torch.Tensor,
    gate_w1: torch.Tensor,
    gate_b1: torch.Tensor,
    gate_w2: torch.Tensor,
    gate_b2: torch.Tensor,
    max_strength: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steer each logit row by its request's generator strength (``torch.ops.value_steer.logit_steer``).

    Args:
        hidden: ``[B, H]`` fp32/bf16/fp16, the final post-norm hidden state that produced each row's logits.
        logits: ``[B, V']`` fp32/bf16/fp16 (any strides).
        row_idx: ``[B_max >= B]`` int32, the logit-steering row of each logit row (0 = off); ``[:B]`` is read.
        row_strength: ``[N]`` fp32, the request multiplier ``s`` per row (0 = off; row 0 is never read as on).
        w_down: ``[R, H]``; pos: ``[H]``; w_up: ``[V, R]`` with ``V <= V'`` (any strides; column-major is free for
            the C++ op); gate_w1: ``[G, H]``; gate_b1: ``[G]``; gate_w2: ``[G]``; gate_b2: ``[1]``. All fp32.
        max_strength: the gate's bound (the checkpoint sidecar's).
    Returns:
        ``(logits' [B, V']`` contiguous, ``logits``' dtype; ``gate_strength [B]`` fp32``)``: untouched rows (row 0
        or ``s == 0``) are ``logits`` bitwise with gate strength 0; the others get ``logits + s * strength(h) *
        v(h)`` on their first ``V`` columns (fp32, cast back), the rest bitwise, and gate strength ``strength(h)``.
    """
    return torch.ops.value_steer.logit_steer(hidden, logits, row_idx, row_strength, w_down, pos, w_up, gate_w1,
                                             gate_b1, gate_w2, gate_b2, float(max_strength))
