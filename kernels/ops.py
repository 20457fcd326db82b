"""``torch.ops.value_steer.*`` custom ops: one schema, three implementations each.

==================  ==========================================================================
implementation      what runs
==================  ==========================================================================
CUDA                the Triton launcher (``value_steer.kernels.<op>.<op>_triton``)
CPU                 the C++ extension ``value_steer._C`` when it is built, else the torch reference
Meta / fake         shape-only (``register_fake``), for torch.compile and FakeTensor tracing
==================  ==========================================================================

The public functions below (``value_head``, ``score_and_select``, ``write_kv``, ``copy_kv_slots``)
call the ops through ``torch.ops.value_steer`` and so work on any device, inside ``torch.compile`` and
inside CUDA-graph capture (no host synchronisation on the CUDA path). The ops are inference-only (no
autograd formulas). ``torch.library.opcheck`` passes for each op on CPU (tests/kernels/test_ops.py).
"""

import torch

from value_steer._ext import extension, has_extension
from value_steer.kernels.score_and_select import (
    check_score_and_select_args,
    empty_score_and_select_outputs,
    score_and_select_reference,
    score_and_select_triton,
)
from value_steer.kernels.value_head import check_value_head_args, value_head_reference, value_head_triton
from value_steer.kernels.write_kv import (
    check_copy_kv_slots_args,
    check_write_kv_args,
    copy_kv_slots_reference,
    copy_kv_slots_triton,
    write_kv_reference,
    write_kv_triton,
)

__all__ = ["copy_kv_slots", "score_and_select", "value_head", "write_kv"]

ScoreOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _ext():
    return extension() if has_extension() else None


# --------------------------------------------------------------------------------------------------
# value_head
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
    ext = _ext()
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


# --------------------------------------------------------------------------------------------------
# score_and_select
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
    ext = _ext()
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
        apply ``value_steer.steering.vfd_select`` over their first ``num_candidates`` (clamped to
        ``[1, K]``) columns; MODE_ABSTAIN rows keep column 0 and flag ``force_eos`` per
        ``value_steer.steering.force_eos`` on ``values[:, 0]``; MODE_OFF rows (row 0) keep column 0.
    """
    return torch.ops.value_steer.score_and_select(
        values, cand_tokens, cand_logprobs, row_idx, row_threshold, row_sign, row_mode, row_num_candidates,
        cand_hidden,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("value_steer::write_kv", mutates_args=("key_cache", "value_cache"))
def _write_kv_op(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    ext = _ext()
    if ext is not None:
        check_write_kv_args(key, value, key_cache, value_cache, slot_mapping)
        ext.write_kv(key, value, key_cache, value_cache, slot_mapping)
    else:
        write_kv_reference(key, value, key_cache, value_cache, slot_mapping)


@_write_kv_op.register_fake
def _(key, value, key_cache, value_cache, slot_mapping):
    check_write_kv_args(key, value, key_cache, value_cache, slot_mapping)


@_write_kv_op.register_kernel("cuda")
def _(key, value, key_cache, value_cache, slot_mapping):
    write_kv_triton(key, value, key_cache, value_cache, slot_mapping)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` rows into paged caches by slot, in place (``torch.ops.value_steer.write_kv``).

    Args:
        key, value: ``[N, kvh, d]`` (any strides; cast to the cache dtype).
        key_cache, value_cache: logical views ``[num_blocks, block_size, kvh, d]`` with arbitrary strides
            (see ``kv_views_fa_v019`` / ``kv_views_fa`` / ``kv_views_cpu``); fp32/bf16/fp16. The CPU
            implementation also takes the 6-D tiled views ``kv_views_cpu(..., "amx")`` returns.
        slot_mapping: ``[N]`` int64; token ``n`` goes to block ``slot // block_size``, offset
            ``slot % block_size``; a negative slot is skipped.
    """
    torch.ops.value_steer.write_kv(key, value, key_cache, value_cache, slot_mapping)


# --------------------------------------------------------------------------------------------------
# copy_kv_slots
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("value_steer::copy_kv_slots", mutates_args=("caches",))
def _copy_kv_slots_op(caches: list[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    ext = _ext()
    if ext is not None:
        check_copy_kv_slots_args(caches, src_slots, dst_slots)
        ext.copy_kv_slots(list(caches), src_slots, dst_slots)
    else:
        copy_kv_slots_reference(caches, src_slots, dst_slots)


@_copy_kv_slots_op.register_fake
def _(caches, src_slots, dst_slots):
    check_copy_kv_slots_args(caches, src_slots, dst_slots)


@_copy_kv_slots_op.register_kernel("cuda")
def _(caches, src_slots, dst_slots):
    copy_kv_slots_triton(caches, src_slots, dst_slots)


def copy_kv_slots(caches: list[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Copy slot ``src_slots[p]`` to ``dst_slots[p]`` in every cache view, in place, in ONE launch on CUDA.

    Args:
        caches: the per-layer K and V logical views (``[nb, bs, kvh, d]``, same shape and dtype, strides
            may differ per view), e.g. ``[k0, v0, k1, v1, ...]``.
        src_slots, dst_slots: ``[P]`` int64; pairs with a negative slot are skipped. Destination slots
            must be distinct and disjoint from the source slots (pairs run concurrently).

    On CUDA the kernel reads each view's base address from a cached device pointer table
    (``kv_pointer_table``); build it once before CUDA-graph capture.
    """
    torch.ops.value_steer.copy_kv_slots(list(caches), src_slots, dst_slots)
