"""Fused value-head MLP: ``x [M, H] -> p [M]`` for ``Linear -> tanh -> Linear -> relu -> Linear -> sigmoid``.

Launch plan (three launches, no atomics, no host sync):

1. ``_vh_layer1_kernel``: ``h1 = tanh(x W0^T + b0)`` into an ``[M, H]`` fp32 scratch. Grid
   ``(cdiv(M, BLOCK_M), cdiv(H, BLOCK_N))`` with the M tile index fastest, so the programs sharing a W0
   slice run together and re-read it from L2.
2. ``_vh_layer2_dot_kernel``: per ``(row tile, W2 row tile)`` program, ``relu(h1 W2[tile]^T + b2[tile])``
   is dotted with ``w4[tile]`` in registers and only the ``[BLOCK_M]`` partial sums are written to
   ``partials [M, n_tiles]``; the second hidden activation never reaches memory.
3. ``_vh_finish_kernel``: one program per row sums its ``n_tiles`` partials in a fixed order, adds
   ``b4``, applies ``sigmoid``.

Batch invariance: every tile size is a compile-time constant that does not depend on ``M`` (BLOCK_M is
fixed at 16, the K loop always walks ``0..H`` in BLOCK_K steps, ``n_tiles`` depends on ``H`` only), so a
row's arithmetic is identical whether it is computed alone or in a batch of 512: the results are
bitwise equal (tested with ``torch.equal``). Do not make any block size a function of ``M``.

Precision: fp32 weights use fp32 FMA dots (``input_precision="ieee"``; never TF32), matching
``value_steer.core.value_head.value_head_reference`` within ~1e-5. bf16/fp16 weights (pre-cast once by
``prepare_value_head_weights``) use tensor-core dots with ``x``/``h1`` rounded to the weight dtype and
fp32 accumulation; the tolerance against the fp32 reference is looser (~1e-2 on ``p``).

Under ``TRITON_INTERPRET=1`` the dots are emulated by an elementwise product and a k-ordered sum
(``_mm_acc``): the interpreter's ``tl.dot`` is a numpy/BLAS sgemm whose rounding can depend on a row's
position in the tile, and its bf16 ``tl.dot`` returns garbage (Triton 3.9). Same tiling, same loop.

Cost model (H100 SXM, H = 4096): fp32 weights are 134 MB, ~40 us at 3.35 TB/s; the fp32 FMA work is
``4 * M * H^2`` FLOP, ~16 us at M = 16 but ~65 us at M = 64 (67 TFLOP/s), so with fp32 weights M = 64
is compute bound; the bf16-weight mode (67 MB, tensor cores) is the one that can reach the bandwidth
goal there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from value_steer import _ext
from value_steer.core.value_head import value_head_reference
from value_steer.kernels._triton_utils import HAS_TRITON, is_interpreted, next_power_of_2, require_triton, tl, triton

__all__ = [
    "BLOCK_K",
    "BLOCK_M",
    "BLOCK_N",
    "check_value_head_args",
    "prepare_value_head_weights",
    "value_head",
    "value_head_reference",
    "value_head_triton",
]

# Fixed tile sizes: part of the numerical contract (batch invariance), not tuning knobs per call. They
# may be retuned per GPU, but must never become functions of M. BLOCK_N = 32 gives H / 32 programs per
# 16-row tile (128 at H = 4096), about one per SM on an H100, for the memory-bound small-M case.
BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 64
NUM_WARPS = 4

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepare_value_head_weights(
    head: torch.nn.Module | Sequence[torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    """Pre-cast a value head's weights once for the kernels.

    Args:
        head: a ``value_steer.core.value_head.ValueHead`` (anything with ``.weights()``) or the tuple
            ``(w0, b0, w2, b2, w4, b4)``.
        dtype: storage dtype of the two ``[H, H]`` matrices: ``torch.float32`` (exact mode) or
            ``torch.bfloat16`` / ``torch.float16`` (half the weight bytes, looser tolerance).
    Returns:
        ``(w0, b0, w2, b2, w4, b4)``: ``w0``/``w2`` ``[H, H]`` contiguous in ``dtype``; ``b0``/``b2``
        ``[H]``, ``w4`` ``[H]`` and ``b4`` ``[1]`` contiguous fp32 (they are tiny; keeping them fp32
        costs nothing and keeps the last layer exact). Detached from autograd.
    """
    if dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight dtype must be one of {_WEIGHT_DTYPES}, got {dtype}")
    weights = tuple(head.weights()) if hasattr(head, "weights") else tuple(head)
    if len(weights) != 6:
        raise ValueError(f"expected (w0, b0, w2, b2, w4, b4), got {len(weights)} tensors")
    w0, b0, w2, b2, w4, b4 = (w.detach() for w in weights)
    return (
        w0.to(dtype).contiguous(),
        b0.float().reshape(-1).contiguous(),
        w2.to(dtype).contiguous(),
        b2.float().reshape(-1).contiguous(),
        w4.float().reshape(-1).contiguous(),
        b4.float().reshape(-1).contiguous(),
    )


def check_value_head_args(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> tuple[int, int]:
    """Validate shapes/dtypes shared by every implementation; returns ``(M, H)``."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, H], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    m, h = x.shape
    for name, w in (("w0", w0), ("w2", w2)):
        if tuple(w.shape) != (h, h):
            raise ValueError(f"{name} must be [{h}, {h}], got {list(w.shape)}")
        if w.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"{name} dtype must be one of {_WEIGHT_DTYPES}, got {w.dtype}")
    if w0.dtype != w2.dtype:
        raise ValueError(f"w0 and w2 must share a dtype, got {w0.dtype} and {w2.dtype}")
    for name, v, n in (("b0", b0, h), ("b2", b2, h), ("w4", w4, h), ("b4", b4, 1)):
        if v.numel() != n or not v.is_floating_point():
            raise ValueError(f"{name} must be a float tensor with {n} elements, got {list(v.shape)} {v.dtype}")
    return int(m), int(h)


if HAS_TRITON:

    @triton.jit
    def _tanh(z):
        # tanh(z) = 2 / (1 + exp(-2z)) - 1: saturates cleanly to +-1, abs error ~1 ulp of 1.
        return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0

    @triton.jit
    def _mm_acc(a, w, acc, W_FP32: tl.constexpr, INTERPRET: tl.constexpr):
        """``acc + a @ w`` for an activation tile ``a [BM, BK]`` and a weight tile ``w [BK, BN]``."""
        if INTERPRET:
            # Interpreter (numpy) only: tl.dot maps to a BLAS sgemm whose rounding can depend on a row's
            # position inside the tile (and its bf16 dot is broken), so emulate the dot with an
            # elementwise product and a k-ordered sum: same tiling, position-independent arithmetic.
            af = a.to(w.dtype).to(tl.float32)
            return acc + tl.sum(af[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        elif W_FP32:
            return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")  # fp32 FMA, never TF32
        else:
            return tl.dot(a.to(w.dtype), w, acc)  # bf16/fp16 tensor cores, fp32 accumulation

    @triton.jit
    def _linear_tile(
        a_ptr,
        stride_am,
        stride_ak,
        w_ptr,
        b_ptr,
        stride_wn,
        stride_wk,
        rm,
        rn,
        m_mask,
        n_mask,
        H,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_FP32: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """``a[rm, :] @ W[rn, :]^T + b[rn]`` as a ``[BLOCK_M, BLOCK_N]`` fp32 tile (k in a fixed order)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < H
            a = tl.load(
                a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            # [BLOCK_K, BLOCK_N] tile of W^T.
            w = tl.load(
                w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = _mm_acc(a, w, acc, W_FP32, INTERPRET)
        b = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        return acc + b[None, :]

    @triton.jit
    def _vh_layer1_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        h_ptr,
        M,
        H,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_FP32: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid_n = tl.program_id(1)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < H
        z = _linear_tile(
            x_ptr,
            stride_xm,
            stride_xk,
            w_ptr,
            b_ptr,
            stride_wn,
            stride_wk,
            rm,
            rn,
            m_mask,
            n_mask,
            H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            W_FP32,
            INTERPRET,
        )
        h = _tanh(z)
        tl.store(
            h_ptr + rm[:, None].to(tl.int64) * stride_hm + rn[None, :],
            h,
            mask=m_mask[:, None] & n_mask[None, :],
        )

    @triton.jit
    def _vh_layer2_dot_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        w4_ptr,
        part_ptr,
        M,
        H,
        stride_hm,
        stride_wn,
        stride_wk,
        stride_w4,
        stride_pm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_FP32: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid_n = tl.program_id(1)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = rm < M
        n_mask = rn < H
        z = _linear_tile(
            h_ptr,
            stride_hm,
            1,
            w_ptr,
            b_ptr,
            stride_wn,
            stride_wk,
            rm,
            rn,
            m_mask,
            n_mask,
            H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            W_FP32,
            INTERPRET,
        )
        w4 = tl.load(w4_ptr + rn * stride_w4, mask=n_mask, other=0.0).to(tl.float32)
        h2 = tl.maximum(z, 0.0)
        part = tl.sum(h2 * w4[None, :], axis=1)
        tl.store(part_ptr + rm.to(tl.int64) * stride_pm + pid_n, part, mask=m_mask)

    @triton.jit
    def _vh_finish_kernel(part_ptr, b4_ptr, out_ptr, N_TILES, stride_pm, BLOCK_T: tl.constexpr):
        row = tl.program_id(0)
        t = tl.arange(0, BLOCK_T)
        part = tl.load(part_ptr + row.to(tl.int64) * stride_pm + t, mask=t < N_TILES, other=0.0)
        logit = tl.sum(part, axis=0) + tl.load(b4_ptr).to(tl.float32)
        tl.store(out_ptr + row, 1.0 / (1.0 + tl.exp(-logit)))


def value_head_triton(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher: value ``p = sigmoid(w4 · relu(W2 tanh(W0 x + b0) + b2) + b4)`` per row.

    Args:
        x: ``[M, H]`` fp32/bf16/fp16, any strides.
        w0, w2: ``[H, H]`` fp32 (exact mode) or bf16/fp16 (see ``prepare_value_head_weights``), same
            dtype, any strides (contiguous is fastest).
        b0, b2: ``[H]``; w4: ``[1, H]`` or ``[H]``; b4: ``[1]`` (any float dtype, read as fp32).
    Returns:
        ``[M]`` fp32 values in (0, 1). Three launches, no host synchronisation (CUDA-graph safe).
    """
    require_triton()
    m, h = check_value_head_args(x, w0, b0, w2, b2, w4, b4)
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    b0 = b0.reshape(-1)
    b2 = b2.reshape(-1)
    w4 = w4.reshape(-1)
    b4 = b4.reshape(-1)
    n_tiles = triton.cdiv(h, BLOCK_N)
    h1 = torch.empty((m, h), dtype=torch.float32, device=x.device)
    partials = torch.empty((m, n_tiles), dtype=torch.float32, device=x.device)
    w_fp32 = w0.dtype == torch.float32
    interpret = is_interpreted(_vh_layer1_kernel)
    grid = (triton.cdiv(m, BLOCK_M), n_tiles)
    _vh_layer1_kernel[grid](
        x, w0, b0, h1, m, h,
        x.stride(0), x.stride(1), w0.stride(0), w0.stride(1), h1.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_FP32=w_fp32, INTERPRET=interpret,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    _vh_layer2_dot_kernel[grid](
        h1, w2, b2, w4, partials, m, h,
        h1.stride(0), w2.stride(0), w2.stride(1), w4.stride(0), partials.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_FP32=w_fp32, INTERPRET=interpret,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    _vh_finish_kernel[(m,)](
        partials, b4, out, n_tiles, partials.stride(0), BLOCK_T=next_power_of_2(n_tiles), num_warps=1
    )
    return out

# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("value_steer::value_head", mutates_args=())
def _value_head_op(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    ext = _ext.extension()
    if ext is not None:
        return ext.value_head(x, w0, b0, w2, b2, w4, b4)
    check_value_head_args(x, w0, b0, w2, b2, w4, b4)
    return value_head_reference(x, w0, b0, w2, b2, w4, b4)


@_value_head_op.register_fake
def _(x, w0, b0, w2, b2, w4, b4):
    m, _ = check_value_head_args(x, w0, b0, w2, b2, w4, b4)
    return x.new_empty((m,), dtype=torch.float32)


@_value_head_op.register_kernel("cuda")
def _(x, w0, b0, w2, b2, w4, b4):
    return value_head_triton(x, w0, b0, w2, b2, w4, b4)


def value_head(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Fused value head ``p = sigmoid(w4 · relu(W2 tanh(W0 x + b0) + b2) + b4)`` (``torch.ops.value_steer.value_head``).

    Args:
        x: ``[M, H]`` fp32/bf16/fp16 hidden states.
        w0, w2: ``[H, H]`` fp32, or bf16/fp16 pre-cast by ``prepare_value_head_weights`` (looser tolerance).
        b0, b2: ``[H]``; w4: ``[1, H]`` or ``[H]``; b4: ``[1]``.
    Returns:
        ``[M]`` fp32. Batch invariant: a row's value is bitwise identical whatever ``M`` is.
    """
    return torch.ops.value_steer.value_head(
        x, w0.detach(), b0.detach(), w2.detach(), b2.detach(), w4.detach(), b4.detach()
    )
