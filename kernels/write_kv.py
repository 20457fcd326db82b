"""Paged-KV writes: ``write_kv`` (scatter new tokens by slot) and ``copy_kv_slots`` (slot -> slot, all layers).

Logical cache view
------------------
Both ops take the K and V caches as the *views the attention backend itself uses*, permuted by the
caller to the logical order ``[num_blocks, block_size, kv_heads, head_dim]`` with arbitrary strides.
A slot ``s`` is token ``s % block_size`` of block ``s // block_size``; negative slots are skipped. The
kernels address every element through the four strides and never assume contiguity.

The views come from the vLLM adapter (``value_steer.patches.<version>.kv_layout``), which knows each
version's and backend's physical layout (FlashAttention: strided 4-D views; the vLLM CPU backend's ``amx``
interior: 6-D tiled views ``[num_blocks, bs_outer, bs_inner, kvh, d_outer, d_inner]`` that the C++ CPU
ops accept; the Triton kernels take 4-D views).

Launches
--------
- ``write_kv_triton``: grid ``(N, cdiv(kvh, BLOCK_H))``; each program moves one token's
  ``[BLOCK_H, d]`` K and V tiles (cast to the cache dtype); a negative slot masks everything.
- ``copy_kv_slots_triton``: ONE launch for all layers, grid ``(P, T, cdiv(kvh, BLOCK_H))`` over the
  ``P`` slot pairs and the ``T`` cache views (K and V of every layer). The kernel reads view ``l``'s
  base address from a device ``int64`` table and casts it with ``.to(tl.pointer_type(dtype))``; its
  four strides come from a device ``[T, 4]`` table, so K and V views may have different strides (the
  CPU layout does) while sharing shape and dtype. The tables are cached per set of views and built on
  first use; under CUDA-graph capture they must already exist (warm up once, or call
  ``kv_pointer_table`` before capturing).

Ordering caveat for ``copy_kv_slots``: pairs run concurrently, so destination slots must be distinct
and disjoint from the source slots (the reference gathers all sources before scattering).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from value_steer import _ext
from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton

__all__ = [
    "check_copy_kv_slots_args",
    "check_write_kv_args",
    "copy_kv_slots",
    "copy_kv_slots_reference",
    "copy_kv_slots_triton",
    "kv_pointer_table",
    "write_kv",
    "write_kv_reference",
    "write_kv_triton",
]

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cache_geometry(cache: torch.Tensor) -> tuple[int, int, int, int]:
    """``(num_blocks, block_size, kv_heads, head_dim)`` of a 4-D logical view or a 6-D tiled view."""
    if cache.dim() == 4:
        nb, bs, kvh, d = cache.shape
        return int(nb), int(bs), int(kvh), int(d)
    if cache.dim() == 6:
        nb, bo, bi, kvh, do, di = cache.shape
        return int(nb), int(bo * bi), int(kvh), int(do * di)
    raise ValueError(f"cache view must be 4-D [nb, bs, kvh, d] (or 6-D tiled), got {list(cache.shape)}")


def _slot_index(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Advanced-index tuple addressing ``slots`` (all >= 0) in a 4-D or 6-D view."""
    _, bs, _, _ = cache_geometry(cache)
    blk, off = slots // bs, slots % bs
    if cache.dim() == 4:
        return blk, off
    bi = cache.shape[2]
    return blk, off // bi, off % bi


def _rows_for(cache: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[n, kvh, d]`` -> the shape ``cache[_slot_index(...)]`` has (split the head dim for 6-D views)."""
    if cache.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], cache.shape[4], cache.shape[5])


# --------------------------------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------------------------------


def check_write_kv_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[int, int, int, int]:
    """Validate; returns ``(N, block_size, kv_heads, head_dim)``."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must be [N, kvh, d] with equal shapes, got {list(key.shape)} {list(value.shape)}")
    geom_k = cache_geometry(key_cache)
    if cache_geometry(value_cache) != geom_k:
        raise ValueError(f"key_cache/value_cache geometry differs: {geom_k} vs {cache_geometry(value_cache)}")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"caches must share a dtype in {_CACHE_DTYPES}, got {key_cache.dtype} {value_cache.dtype}")
    _, bs, kvh, d = geom_k
    n = key.shape[0]
    if (key.shape[1], key.shape[2]) != (kvh, d):
        raise ValueError(f"key is [N, {key.shape[1]}, {key.shape[2]}] but the cache holds [.., {kvh}, {d}]")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != n or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be [{n}] int64, got {list(slot_mapping.shape)} {slot_mapping.dtype}")
    return int(n), bs, kvh, d


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference: ``cache[slot // bs, slot % bs] = x`` for every ``slot >= 0`` (in place).

    Args:
        key, value: ``[N, kvh, d]`` any float dtype (cast to the cache dtype).
        key_cache, value_cache: logical views ``[num_blocks, block_size, kvh, d]`` (any strides) or 6-D
            tiled views (see ``kv_views_cpu``); fp32/bf16/fp16.
        slot_mapping: ``[N]`` int64; negative = skip.
    """
    check_write_kv_args(key, value, key_cache, value_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for cache, x in ((key_cache, key), (value_cache, value)):
        cache[_slot_index(cache, slots)] = _rows_for(cache, x[keep].to(cache.dtype))


if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(
        key_ptr,
        value_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        KVH,
        D,
        BS,
        s_kn,
        s_kh,
        s_kd,
        s_vn,
        s_vh,
        s_vd,
        s_kcb,
        s_kct,
        s_kch,
        s_kcd,
        s_vcb,
        s_vct,
        s_vch,
        s_vcd,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        slot = tl.load(slot_ptr + n)
        blk = slot // BS
        off = slot % BS
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        d_lim = tl.where(slot >= 0, D, 0)  # a negative slot masks the whole tile
        mask = (h[:, None] < KVH) & (d[None, :] < d_lim)
        k = tl.load(key_ptr + n * s_kn + h[:, None] * s_kh + d[None, :] * s_kd, mask=mask)
        v = tl.load(value_ptr + n * s_vn + h[:, None] * s_vh + d[None, :] * s_vd, mask=mask)
        kc = kc_ptr + blk * s_kcb + off * s_kct + h[:, None] * s_kch + d[None, :] * s_kcd
        vc = vc_ptr + blk * s_vcb + off * s_vct + h[:, None] * s_vch + d[None, :] * s_vcd
        tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _copy_kv_slots_kernel(
        ptr_table,
        stride_table,
        src_ptr,
        dst_ptr,
        ref_ptr,
        KVH,
        D,
        BS,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        p = tl.program_id(0)
        layer = tl.program_id(1)
        hb = tl.program_id(2)
        src = tl.load(src_ptr + p)
        dst = tl.load(dst_ptr + p)
        # Base address of view `layer`, rebuilt as a typed pointer inside the kernel.
        base = tl.load(ptr_table + layer).to(ref_ptr.dtype)
        s_b = tl.load(stride_table + layer * 4 + 0)
        s_t = tl.load(stride_table + layer * 4 + 1)
        s_h = tl.load(stride_table + layer * 4 + 2)
        s_d = tl.load(stride_table + layer * 4 + 3)
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        inner = h[:, None] * s_h + d[None, :] * s_d
        d_lim = tl.where((src >= 0) & (dst >= 0), D, 0)  # a negative slot masks the whole tile
        mask = (h[:, None] < KVH) & (d[None, :] < d_lim)
        x = tl.load(base + (src // BS) * s_b + (src % BS) * s_t + inner, mask=mask)
        tl.store(base + (dst // BS) * s_b + (dst % BS) * s_t + inner, x, mask=mask)


def _head_blocking(kvh: int, d: int) -> tuple[int, int]:
    block_d = next_power_of_2(d)
    block_h = min(next_power_of_2(kvh), max(1, 4096 // block_d))
    return block_h, block_d


def write_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton launcher for ``write_kv`` (4-D logical views only; one launch; CUDA-graph safe)."""
    require_triton()
    n, bs, kvh, d = check_write_kv_args(key, value, key_cache, value_cache, slot_mapping)
    if key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("the Triton write_kv takes 4-D [nb, bs, kvh, d] views (6-D tiled views are CPU-only)")
    if n == 0:
        return
    block_h, block_d = _head_blocking(kvh, d)
    grid = (n, triton.cdiv(kvh, block_h))
    _write_kv_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, kvh, d, bs,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# copy_kv_slots
# --------------------------------------------------------------------------------------------------


def check_copy_kv_slots_args(
    caches: Sequence[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate; returns ``(P, block_size, kv_heads, head_dim)`` (zeros when ``caches`` is empty)."""
    if src_slots.dim() != 1 or src_slots.shape != dst_slots.shape:
        raise ValueError(
            f"src/dst slots must be [P] with equal shapes, got {list(src_slots.shape)} {list(dst_slots.shape)}"
        )
    if src_slots.dtype != torch.int64 or dst_slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64, got {src_slots.dtype} {dst_slots.dtype}")
    p = int(src_slots.shape[0])
    if not caches:
        return p, 0, 0, 0
    geom = cache_geometry(caches[0])
    for c in caches:
        if cache_geometry(c) != geom or c.dtype != caches[0].dtype or c.device != caches[0].device:
            raise ValueError("all caches must share geometry [nb, bs, kvh, d], dtype and device")
        if c.dtype not in _CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {_CACHE_DTYPES}, got {c.dtype}")
    return p, geom[1], geom[2], geom[3]


def copy_kv_slots_reference(caches: Sequence[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Torch reference: for every view and every pair with both slots >= 0, ``cache[dst] = cache[src]``.

    Args:
        caches: per-layer K and V logical views ``[nb, bs, kvh, d]`` (or 6-D tiled views), same
            geometry and dtype, any strides.
        src_slots, dst_slots: ``[P]`` int64; a pair with a negative slot is skipped.
    """
    check_copy_kv_slots_args(caches, src_slots, dst_slots)
    keep = (src_slots >= 0) & (dst_slots >= 0)
    src, dst = src_slots[keep], dst_slots[keep]
    for cache in caches:
        cache[_slot_index(cache, dst)] = cache[_slot_index(cache, src)]


# Kept for the life of the process: a captured CUDA graph holds the table's device address, so a table
# must never be freed while a graph may replay. There is one entry per distinct set of cache views
# (normally one per engine), so this does not grow in practice.
_PTR_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def kv_pointer_table(caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tables for ``copy_kv_slots``: ``ptrs [T] int64`` (data pointers) and ``strides [T, 4] int64``.

    Cached per (pointers, strides, device) for the life of the process (graphs keep the address); call
    once before CUDA-graph capture (a miss during capture raises: building a table is a host-to-device
    copy).
    """
    key = (caches[0].device, *((c.data_ptr(), *c.stride()) for c in caches))
    hit = _PTR_TABLES.get(key)
    if hit is not None:
        return hit
    dev = caches[0].device
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "copy_kv_slots: pointer table for these caches is not built; call "
            "value_steer.kernels.kv_pointer_table(caches) (or run the op once) before CUDA-graph capture"
        )
    ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=dev)
    strides = torch.tensor([list(c.stride()) for c in caches], dtype=torch.int64, device=dev).reshape(-1, 4)
    _PTR_TABLES[key] = (ptrs, strides)
    return ptrs, strides


def copy_kv_slots_triton(caches: Sequence[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Triton launcher: copy ``src_slots[p] -> dst_slots[p]`` in every view of ``caches`` in ONE launch.

    ``caches`` are 4-D logical views with the same shape and dtype (strides may differ per view).
    """
    require_triton()
    p, bs, kvh, d = check_copy_kv_slots_args(caches, src_slots, dst_slots)
    if p == 0 or not caches:
        return
    if any(c.dim() != 4 for c in caches):
        raise ValueError("the Triton copy_kv_slots takes 4-D [nb, bs, kvh, d] views (6-D tiled views are CPU-only)")
    ptrs, strides = kv_pointer_table(caches)
    block_h, block_d = _head_blocking(kvh, d)
    grid = (p, len(caches), triton.cdiv(kvh, block_h))
    _copy_kv_slots_kernel[grid](
        ptrs, strides, src_slots, dst_slots, caches[0], kvh, d, bs, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4
    )

# --------------------------------------------------------------------------------------------------
# Custom op: CUDA = the Triton launcher; CPU = value_steer._C when built, else the reference; fake = shapes
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("value_steer::write_kv", mutates_args=("key_cache", "value_cache"))
def _write_kv_op(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    ext = _ext.extension()
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
            (built by the adapter's ``kv_layout`` module); fp32/bf16/fp16. The CPU
            implementation also takes the 6-D tiled views the adapter's ``amx`` CPU views are.
        slot_mapping: ``[N]`` int64; token ``n`` goes to block ``slot // block_size``, offset
            ``slot % block_size``; a negative slot is skipped.
    """
    torch.ops.value_steer.write_kv(key, value, key_cache, value_cache, slot_mapping)


@torch.library.custom_op("value_steer::copy_kv_slots", mutates_args=("caches",))
def _copy_kv_slots_op(caches: list[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    ext = _ext.extension()
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
