"""``capture_stream``: copy the residual stream of capturing tokens at one layer into a persistent buffer.

The in-graph half of per-request layer capture (``capture_layers``, ``docs/activation-steering.md``): the
steering wrapper of decoder layer ``L`` calls it with that layer's buffer, inside the compiled graph; the
runner reads the buffer after the forward for the tokens whose request asked for ``L``.

It is a masked copy (no reduction, no per-row math), so one torch implementation serves every device:
the op boundary exists to keep the buffer write an opaque in-place mutation that ``torch.compile`` and
CUDA graphs replay as it is, not for a custom kernel.
"""

from __future__ import annotations

import torch


def capture_stream_reference(hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor,
                             capture_flag: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = hidden[t] + residual[t]`` (fp32) for ``t < T`` whose row has ``capture_flag[row] != 0``;
    other entries of ``out`` are left as they are."""
    t = hidden.shape[0]
    x = hidden.float()
    if residual.numel():
        x = x + residual.float()
    keep = capture_flag.index_select(0, token_row[:t].long()) != 0
    out[:t].copy_(torch.where(keep.unsqueeze(1), x, out[:t]))


def _check(hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor, capture_flag: torch.Tensor,
           out: torch.Tensor) -> None:
    t, h = hidden.shape
    if residual.numel() and tuple(residual.shape) != (t, h):
        raise ValueError(f"residual must be [{t}, {h}] or empty, got {list(residual.shape)}")
    if token_row.dtype != torch.int32 or token_row.dim() != 1 or token_row.shape[0] < t:
        raise ValueError(f"token_row must be int32 [>= {t}], got {token_row.dtype} {list(token_row.shape)}")
    if capture_flag.dtype != torch.int8 or capture_flag.dim() != 1:
        raise ValueError(f"capture_flag must be int8 [R], got {capture_flag.dtype} {list(capture_flag.shape)}")
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] < t or out.shape[1] != h:
        raise ValueError(f"out must be fp32 [>= {t}, {h}], got {out.dtype} {list(out.shape)}")


@torch.library.custom_op("value_steer::capture_stream", mutates_args=("out",))
def _capture_stream_op(hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor,
                       capture_flag: torch.Tensor, out: torch.Tensor) -> None:
    _check(hidden, residual, token_row, capture_flag, out)
    capture_stream_reference(hidden, residual, token_row, capture_flag, out)


@_capture_stream_op.register_fake
def _(hidden, residual, token_row, capture_flag, out):
    _check(hidden, residual, token_row, capture_flag, out)


def capture_stream(hidden: torch.Tensor, residual: torch.Tensor, token_row: torch.Tensor,
                   capture_flag: torch.Tensor, out: torch.Tensor) -> None:
    """Capture the residual stream of flagged tokens at one layer (``torch.ops.value_steer.capture_stream``).

    Args:
        hidden: ``[T, H]`` fp32/bf16/fp16, the layer output (the full stream when ``residual`` is empty).
        residual: ``[T, H]`` fused residual, or a 0-element tensor.
        token_row: ``[T_max]`` int32 steering row per token; ``[:T]`` is read.
        capture_flag: ``[R]`` int8, non-zero for rows capturing at this layer.
        out: ``[T_max, H]`` fp32, written in place for flagged tokens.
    """
    torch.ops.value_steer.capture_stream(hidden, residual, token_row, capture_flag, out)
