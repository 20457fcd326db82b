"""Grouped (multi-head) fused value head: ``p[m] = value_head_{head_idx[m]}(x[m])`` for a batch mixing heads.

A server loads several value heads (one per concept) and one batch mixes requests using different heads.
This op evaluates all of them in one call, the punica / LoRA grouped-GEMM pattern: the heads' weights are
stacked (``prepare_value_head_grouped_weights``: ``w0``/``w2`` ``[NH, H, H]``, ``b0``/``b2``/``w4``
``[NH, H]``, ``b4`` ``[NH]``) and ``head_idx [M_max >= M]`` int32 names each row's head. The math per row
is the single-head op's (``value_steer.kernels.value_head``).

Launch plan (Triton; no host sync, CUDA-graph safe, static shapes throughout):

0. ``_tile_table`` (torch ops on the device): a stable sort of the rows by head, each head's segment of
   the sorted order (``searchsorted``), and a table of row tiles: tile ``t`` covers sorted positions
   ``[row0[t], row1[t])`` of head ``tile_head[t]`` (``-1``: an unused slot). The table has a fixed length
   ``T = k + (M - k) // BLOCK_M`` with ``k = min(NH, M)``, the most tiles ``M`` rows can need over any
   split into heads, so the grid depends on ``M`` and ``NH`` only, never on the data, and unused heads
   cost nothing.
1. ``_vhg_layer1_kernel``: grid ``(T, cdiv(H, BLOCK_N))``; a program gathers its tile's rows of ``x``
   (through the sort permutation), computes ``tanh(x W0[g]^T + b0[g])`` for its head ``g`` and writes it
   to an fp32 scratch in sorted order. Unused slots exit at once.
2. ``_vhg_layer2_dot_kernel``: the same grid; ``relu(h1 W2[g]^T + b2[g]) · w4[g]`` per W2 row tile,
   written as partial sums at the rows' original positions.
3. ``_vhg_finish_kernel``: one program per row sums its partials in a fixed order, adds its head's
   ``b4`` and applies ``sigmoid``; a row whose head is outside ``[0, NH)`` gets NaN (the device path
   cannot raise without a host sync; the C++ op raises naming ``head_idx``).

Each head's weights are read once per 16-row tile of its rows, as in the single-head op. The tile loop,
``_linear_tile`` and ``_tanh`` are the single-head kernel's own (imported from ``value_head``), so the
tile sizes and the k order are the same.

Batch invariance (the single-head contract, kept): every block size is a constant independent of ``M``
and of the head split, so a row's arithmetic is the same whichever tile and tile position it lands in:
its value does not depend on ``M`` or on the other rows (tested with ``torch.equal``), and matches the
single-head Triton launcher on that row with its head's weights.

CPU: the C++ op (``csrc/value_head_grouped.cpp``) sorts the rows by head on the host (it may read
``head_idx``: it runs on CPU tensors) and runs the single-head C++ evaluation with one row segment per
head; row ``m`` is bitwise equal to ``value_head(x[m:m+1], <head head_idx[m]'s weights>)``. Without the
extension, the custom op falls back to ``value_head_grouped_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from value_steer import _ext
from value_steer.kernels._triton_utils import HAS_TRITON, is_interpreted, next_power_of_2, require_triton, tl, triton
from value_steer.kernels.value_head import (
    _WEIGHT_DTYPES,
    BLOCK_K,
    BLOCK_M,
    BLOCK_N,
    NUM_WARPS,
    prepare_value_head_weights,
)

if HAS_TRITON:
    # The single-head kernel's tile loop and tanh: the same arithmetic, so the ops agree row by row.
    from value_steer.kernels.value_head import _linear_tile, _tanh

__all__ = [
    "check_value_head_grouped_args",
    "prepare_value_head_grouped_weights",
    "value_head_grouped",
    "value_head_grouped_reference",
    "value_head_grouped_triton",
]


def prepare_value_head_grouped_weights(
    heads: Sequence[torch.nn.Module | Sequence[torch.Tensor]], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Stack several value heads' weights for the grouped op (head ``g`` = ``heads[g]``).

    Args:
        heads: ``value_steer.core.value_head.ValueHead`` modules (anything with ``.weights()``) or
            ``(w0, b0, w2, b2, w4, b4)`` tuples, all over the same hidden size ``H`` and on one device.
        dtype: storage dtype of the stacked ``[NH, H, H]`` matrices: ``torch.float32`` (exact mode) or
            ``torch.bfloat16`` / ``torch.float16`` (half the weight bytes, looser tolerance).
    Returns:
        ``(w0, b0, w2, b2, w4, b4)``: ``w0``/``w2`` ``[NH, H, H]`` contiguous in ``dtype``; ``b0``/``b2``/
        ``w4`` ``[NH, H]`` and ``b4`` ``[NH]`` contiguous fp32. Detached from autograd.
    Raises:
        ValueError: no heads, a head without six tensors, a bad dtype, or a head whose shapes do not fit
            head 0's hidden size (the message names the head's index).
    """
    if len(heads) == 0:
        raise ValueError("heads must hold at least one value head")
    per_head = []
    h = None
    for i, head in enumerate(heads):
        try:
            w0, b0, w2, b2, w4, b4 = prepare_value_head_weights(head, dtype)
        except ValueError as exc:
            raise ValueError(f"head {i}: {exc}") from None
        if h is None:
            h = w0.shape[-1]
        want = {"w0": (h, h), "w2": (h, h), "b0": (h,), "b2": (h,), "w4": (h,), "b4": (1,)}
        for name, t in (("w0", w0), ("b0", b0), ("w2", w2), ("b2", b2), ("w4", w4), ("b4", b4)):
            if tuple(t.shape) != want[name]:
                raise ValueError(
                    f"head {i}: {name} must be {list(want[name])} (hidden size H={h} of head 0), got {list(t.shape)}"
                )
        per_head.append((w0, b0, w2, b2, w4, b4))
    w0, b0, w2, b2, w4, b4 = (torch.stack(ts).contiguous() for ts in zip(*per_head))
    return w0, b0, w2, b2, w4, b4.reshape(-1)


def check_value_head_grouped_args(
    x: torch.Tensor,
    head_idx: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> tuple[int, int, int]:
    """Validate shapes/dtypes shared by every implementation; returns ``(M, H, NH)``.

    Shapes and dtypes only (no host sync): the range of ``head_idx``'s values is checked by the C++ op.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, H], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    m, h = (int(s) for s in x.shape)
    if head_idx.dim() != 1 or head_idx.dtype != torch.int32 or head_idx.numel() < m:
        raise ValueError(
            f"head_idx must be a 1-D int32 tensor with at least M={m} elements, got {list(head_idx.shape)} "
            f"{head_idx.dtype}"
        )
    if w0.dim() != 3 or tuple(w0.shape[1:]) != (h, h) or w0.shape[0] < 1:
        raise ValueError(f"w0 must be [NH, {h}, {h}] with NH >= 1, got {list(w0.shape)}")
    nh = int(w0.shape[0])
    if tuple(w2.shape) != (nh, h, h):
        raise ValueError(f"w2 must be [NH={nh}, {h}, {h}] (NH from w0), got {list(w2.shape)}")
    for name, w in (("w0", w0), ("w2", w2)):
        if w.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"{name} dtype must be one of {_WEIGHT_DTYPES}, got {w.dtype}")
    if w0.dtype != w2.dtype:
        raise ValueError(f"w0 and w2 must share a dtype, got {w0.dtype} and {w2.dtype}")
    for name, v, shape in (("b0", b0, (nh, h)), ("b2", b2, (nh, h)), ("w4", w4, (nh, h)), ("b4", b4, (nh,))):
        if tuple(v.shape) != shape or not v.is_floating_point():
            raise ValueError(
                f"{name} must be a float tensor of shape {list(shape)} (NH={nh} from w0, H={h}), "
                f"got {list(v.shape)} {v.dtype}"
            )
    return m, h, nh


def value_head_grouped_reference(
    x: torch.Tensor,
    head_idx: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Torch reference: every head on every row (batched matmuls), then each row's own head's value is gathered.

    ``NH`` times the work of the grouped kernels, but vectorised and free of host syncs and data-dependent
    shapes (correctness first: it is what the kernels are tested against). Per head it is
    ``value_steer.core.value_head.value_head_reference`` on the whole batch (batched, so equal to ~1e-6).

    Args:
        x: ``[M, H]`` any float dtype (cast to fp32); head_idx: ``[M_max >= M]`` integer, the first ``M``
            read, each in ``[0, NH)`` (not checked: an index outside raises in ``gather`` on CPU).
        w0, w2: ``[NH, H, H]``; b0, b2, w4: ``[NH, H]``; b4: ``[NH]`` (used in fp32).
    Returns:
        ``[M]`` fp32 values in (0, 1).
    """
    m, h = x.shape
    nh = w0.shape[0]
    xs = x.float().unsqueeze(0).expand(nh, m, h)
    h1 = torch.tanh(torch.baddbmm(b0.float().unsqueeze(1), xs, w0.float().transpose(1, 2)))  # [NH, M, H]
    h2 = torch.relu(torch.baddbmm(b2.float().unsqueeze(1), h1, w2.float().transpose(1, 2)))
    logits = torch.bmm(h2, w4.float().unsqueeze(2)).squeeze(2) + b4.float().reshape(nh, 1)  # [NH, M]
    idx = head_idx[:m].to(device=logits.device, dtype=torch.int64)
    return torch.sigmoid(logits.gather(0, idx.unsqueeze(0)).squeeze(0))


def _tile_table(
    head_idx: torch.Tensor, nh: int, n_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort rows by head and cut each head's rows into BLOCK_M tiles, on the device (no host sync).

    Returns ``(order [M], tile_head [T], tile_row0 [T], tile_row1 [T])`` int32: ``order[i]`` is the
    original row at sorted position ``i``; tile ``t`` covers sorted positions ``[row0, min(row0 + BLOCK_M,
    row1))`` of head ``tile_head[t]``, or is unused (``-1``). Rows whose head is outside ``[0, NH)`` sort
    outside every head's segment and belong to no tile.
    """
    dev = head_idx.device
    sorted_heads, order = torch.sort(head_idx.to(torch.int64), stable=True)
    bounds = torch.searchsorted(sorted_heads, torch.arange(nh + 1, device=dev, dtype=torch.int64))  # [NH + 1]
    tiles = (bounds[1:] - bounds[:-1] + (BLOCK_M - 1)) // BLOCK_M  # tiles per head, [NH]
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(n_slots, device=dev, dtype=torch.int64)
    head = torch.searchsorted(tile_end, t, right=True)  # first head whose tiles end after t; NH: unused
    g = head.clamp(max=nh - 1)
    row0 = bounds[g] + (t - (tile_end[g] - tiles[g])) * BLOCK_M
    tile_head = torch.where(head < nh, head, -1)
    return order.to(torch.int32), tile_head.to(torch.int32), row0.to(torch.int32), bounds[g + 1].to(torch.int32)


if HAS_TRITON:

    @triton.jit
    def _vhg_tile(tile_head_ptr, tile_row0_ptr, tile_row1_ptr, order_ptr, BLOCK_M: tl.constexpr):
        """This program's tile: ``(head, sorted positions, their mask, original rows)``."""
        pid_t = tl.program_id(0)
        head = tl.load(tile_head_ptr + pid_t)
        row0 = tl.load(tile_row0_ptr + pid_t)
        row1 = tl.load(tile_row1_ptr + pid_t)
        rs = row0 + tl.arange(0, BLOCK_M)
        s_mask = rs < row1
        rm = tl.load(order_ptr + rs, mask=s_mask, other=0)
        return head, rs, s_mask, rm

    @triton.jit
    def _vhg_layer1_kernel(
        x_ptr,
        order_ptr,
        tile_head_ptr,
        tile_row0_ptr,
        tile_row1_ptr,
        w_ptr,
        b_ptr,
        h_ptr,
        H,
        stride_xm,
        stride_xk,
        stride_wg,
        stride_wn,
        stride_wk,
        stride_bg,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_FP32: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        head, rs, s_mask, rm = _vhg_tile(tile_head_ptr, tile_row0_ptr, tile_row1_ptr, order_ptr, BLOCK_M)
        if head < 0:  # an unused slot of the fixed-size tile table
            return
        g = head.to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < H
        z = _linear_tile(
            x_ptr,
            stride_xm,
            stride_xk,
            w_ptr + g * stride_wg,
            b_ptr + g * stride_bg,
            stride_wn,
            stride_wk,
            rm,
            rn,
            s_mask,
            n_mask,
            H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            W_FP32,
            INTERPRET,
        )
        # h1 is kept in sorted order: layer 2 reads each tile's rows back contiguously.
        tl.store(
            h_ptr + rs[:, None].to(tl.int64) * stride_hm + rn[None, :],
            _tanh(z),
            mask=s_mask[:, None] & n_mask[None, :],
        )

    @triton.jit
    def _vhg_layer2_dot_kernel(
        h_ptr,
        order_ptr,
        tile_head_ptr,
        tile_row0_ptr,
        tile_row1_ptr,
        w_ptr,
        b_ptr,
        w4_ptr,
        part_ptr,
        H,
        stride_hm,
        stride_wg,
        stride_wn,
        stride_wk,
        stride_bg,
        stride_w4g,
        stride_pm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_FP32: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        head, rs, s_mask, rm = _vhg_tile(tile_head_ptr, tile_row0_ptr, tile_row1_ptr, order_ptr, BLOCK_M)
        if head < 0:
            return
        g = head.to(tl.int64)
        pid_n = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < H
        z = _linear_tile(
            h_ptr,
            stride_hm,
            1,
            w_ptr + g * stride_wg,
            b_ptr + g * stride_bg,
            stride_wn,
            stride_wk,
            rs,
            rn,
            s_mask,
            n_mask,
            H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            W_FP32,
            INTERPRET,
        )
        w4 = tl.load(w4_ptr + g * stride_w4g + rn, mask=n_mask, other=0.0).to(tl.float32)
        part = tl.sum(tl.maximum(z, 0.0) * w4[None, :], axis=1)
        # Partials go back to the rows' original positions: the finish kernel then writes p in order.
        tl.store(part_ptr + rm.to(tl.int64) * stride_pm + pid_n, part, mask=s_mask)

    @triton.jit
    def _vhg_finish_kernel(
        part_ptr, head_idx_ptr, b4_ptr, out_ptr, NH, N_TILES, stride_pm, stride_b4, BLOCK_T: tl.constexpr
    ):
        row = tl.program_id(0)
        head = tl.load(head_idx_ptr + row)
        ok = (head >= 0) & (head < NH)
        t = tl.arange(0, BLOCK_T)
        # A row with a bad head has no partials written; they are read (allocated, unset) and discarded.
        part = tl.load(part_ptr + row.to(tl.int64) * stride_pm + t, mask=t < N_TILES, other=0.0)
        b4 = tl.load(b4_ptr + tl.where(ok, head, 0).to(tl.int64) * stride_b4).to(tl.float32)
        logit = tl.sum(part, axis=0) + b4
        p = 1.0 / (1.0 + tl.exp(-logit))
        tl.store(out_ptr + row, tl.where(ok, p, float("nan")))


def value_head_grouped_triton(
    x: torch.Tensor,
    head_idx: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher: ``p[m] = sigmoid(w4[g] · relu(W2[g] tanh(W0[g] x[m] + b0[g]) + b2[g]) + b4[g])``,
    ``g = head_idx[m]``.

    Args:
        x: ``[M, H]`` fp32/bf16/fp16, any strides.
        head_idx: ``[M_max >= M]`` int32 (only the first ``M`` read), each in ``[0, NH)``; a row with an
            index outside gets NaN (not checked: that would need a host sync).
        w0, w2: ``[NH, H, H]`` fp32 (exact mode) or bf16/fp16, same dtype, any strides (contiguous is
            fastest); see ``prepare_value_head_grouped_weights``.
        b0, b2, w4: ``[NH, H]``; b4: ``[NH]`` (any float dtype, read as fp32).
    Returns:
        ``[M]`` fp32 values in (0, 1). A few small torch ops (the sort and tile table) and three launches;
        no host synchronisation and no data-dependent shape (CUDA-graph safe).
    """
    require_triton()
    m, h, nh = check_value_head_grouped_args(x, head_idx, w0, b0, w2, b2, w4, b4)
    out = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    head_idx = head_idx[:m]
    k = min(nh, m)
    n_slots = k + (m - k) // BLOCK_M  # the most tiles m rows can need over any split into heads
    order, tile_head, tile_row0, tile_row1 = _tile_table(head_idx, nh, n_slots)
    n_tiles = triton.cdiv(h, BLOCK_N)
    h1 = torch.empty((m, h), dtype=torch.float32, device=x.device)
    partials = torch.empty((m, n_tiles), dtype=torch.float32, device=x.device)
    w_fp32 = w0.dtype == torch.float32
    interpret = is_interpreted(_vhg_layer1_kernel)
    grid = (n_slots, n_tiles)
    _vhg_layer1_kernel[grid](
        x, order, tile_head, tile_row0, tile_row1, w0, b0, h1, h,
        x.stride(0), x.stride(1), w0.stride(0), w0.stride(1), w0.stride(2), b0.stride(0), h1.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_FP32=w_fp32, INTERPRET=interpret,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    _vhg_layer2_dot_kernel[grid](
        h1, order, tile_head, tile_row0, tile_row1, w2, b2, w4, partials, h,
        h1.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), b2.stride(0), w4.stride(0), partials.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, W_FP32=w_fp32, INTERPRET=interpret,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    _vhg_finish_kernel[(m,)](
        partials, head_idx, b4, out, nh, n_tiles, partials.stride(0), b4.stride(0),
        BLOCK_T=next_power_of_2(n_tiles), num_warps=1,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("value_steer::value_head_grouped", mutates_args=())
def _value_head_grouped_op(
    x: torch.Tensor,
    head_idx: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    ext = _ext.extension()
    if ext is not None:
        return ext.value_head_grouped(x, head_idx, w0, b0, w2, b2, w4, b4)
    check_value_head_grouped_args(x, head_idx, w0, b0, w2, b2, w4, b4)
    return value_head_grouped_reference(x, head_idx, w0, b0, w2, b2, w4, b4)


@_value_head_grouped_op.register_fake
def _(x, head_idx, w0, b0, w2, b2, w4, b4):
    m, _, _ = check_value_head_grouped_args(x, head_idx, w0, b0, w2, b2, w4, b4)
    return x.new_empty((m,), dtype=torch.float32)


@_value_head_grouped_op.register_kernel("cuda")
def _(x, head_idx, w0, b0, w2, b2, w4, b4):
    return value_head_grouped_triton(x, head_idx, w0, b0, w2, b2, w4, b4)


def value_head_grouped(
    x: torch.Tensor,
    head_idx: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Grouped value head over mixed heads (``torch.ops.value_steer.value_head_grouped``).

    Args:
        x: ``[M, H]`` fp32/bf16/fp16 hidden states.
        head_idx: ``[M_max >= M]`` int32, the first ``M`` read: row ``m``'s head, in ``[0, NH)`` (the CPU
            op raises naming ``head_idx`` otherwise; the CUDA op gives that row NaN).
        w0, w2, b0, b2, w4, b4: the stacked heads from ``prepare_value_head_grouped_weights``: ``[NH, H, H]``
            (fp32, or bf16/fp16 with a looser tolerance), ``[NH, H]`` and ``[NH]``.
    Returns:
        ``[M]`` fp32: row ``m`` is ``value_head`` of ``x[m]`` with head ``head_idx[m]``. Batch invariant: a
        row's value does not depend on ``M`` or on the other rows' heads.
    """
    return torch.ops.value_steer.value_head_grouped(
        x, head_idx, w0.detach(), b0.detach(), w2.detach(), b2.detach(), w4.detach(), b4.detach()
    )
