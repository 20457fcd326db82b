"""Paged-KV writes: ``write_kv`` (scatter new tokens by slot) and ``copy_kv_slots`` (slot -> slot, all layers).

Logical cache view
------------------
Both ops take the K and V caches as the *views the attention backend itself uses*, permuted by the
caller to the logical order ``[num_blocks, block_size, kv_heads, head_dim]`` with arbitrary strides.
A slot ``s`` is token ``s % block_size`` of block ``s // block_size``; negative slots are skipped. The
kernels address every element through the four strides and never assume contiguity.

The helpers below build these views from the physical layouts (verified against the installed
vLLM 0.32 source; see each docstring):

- ``kv_views_fa_v019``: vLLM 0.19 FlashAttention, one ``[2, num_blocks, block_size, kvh, d]`` tensor.
- ``kv_views_fa``: vLLM >= 0.26 FlashAttention (0.32 checked), one per-layer tensor whose logical
  shape is ``[num_blocks, kvh, block_size, 2 * d]`` (K and V packed in the last dim) with whatever
  physical stride order the engine's ``KVCacheLayout`` chose; split exactly as the backend does:
  ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``.
- ``kv_views_cpu``: the vLLM 0.32 CPU backend (``cpu_attn.py``). Its cache is ``[num_blocks, kvh,
  block_size, 2 * d]`` but ``cpu_attn_reshape_and_cache`` stores an ISA-specific block interior: for the
  ``vec``/``vec16`` ISAs K is column-major ``[d, block_size]`` and V row-major ``[block_size, d]`` inside
  each (block, head) page, both plain strided 4-D views; for ``amx`` (bf16 on AMX CPUs) K and V are
  packed for AMX tiles, which no 4-D strided view expresses. ``kv_views_cpu(..., "amx")`` returns
  *6-D tiled views* ``[num_blocks, bs_outer, bs_inner, kvh, d_outer, d_inner]`` instead (token
  ``t = t_o * bs_inner + t_i``, dim ``i = i_o * d_inner + i_i``); the C++ CPU ops accept them, the
  Triton kernels (GPU layouts only) take 4-D views.

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

from value_steer.kernels._triton_utils import HAS_TRITON, next_power_of_2, require_triton, tl, triton

__all__ = [
    "check_copy_kv_slots_args",
    "check_write_kv_args",
    "copy_kv_slots_reference",
    "copy_kv_slots_triton",
    "kv_pointer_table",
    "kv_views_cpu",
    "kv_views_fa",
    "kv_views_fa_v019",
    "write_kv_fa2",
    "write_kv_reference",
    "write_kv_triton",
]

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def kv_views_fa_v019(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.19 FlashAttention layout ``[2, num_blocks, block_size, kvh, d]`` -> ``(K, V)`` logical views.

    Each view is ``kv_cache[i]``: ``[num_blocks, block_size, kvh, d]``, contiguous within the layer.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"vLLM 0.19 FA cache must be [2, nb, bs, kvh, d], got {list(kv_cache.shape)}")
    return kv_cache[0], kv_cache[1]


def kv_views_fa(kv_cache: torch.Tensor, head_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM >= 0.26 FlashAttention per-layer cache -> ``(K, V)`` logical views.

    ``kv_cache`` is the per-layer view vLLM hands the backend: logical ``[num_blocks, kvh, block_size,
    2 * head_size]`` (K then V in the last dim, ``vllm/v1/kv_cache_interface.py::create_kv_cache_views``),
    physically permuted by the resolved ``KVCacheLayout`` (default ``LBNHC``, i.e. per layer
    ``[nb, bs, kvh, 2d]`` contiguous). The split is the one ``FlashAttentionImpl.forward`` and
    ``do_kv_cache_update`` use (``vllm/v1/attention/backends/flash_attn.py`` lines 1252 and 1443 in 0.32):
    ``kv_cache.transpose(1, 2).split(head_size, dim=-1)`` -> two ``[nb, bs, kvh, d]`` strided views.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(f"FA cache must be [nb, kvh, bs, 2*d], got {list(kv_cache.shape)}")
    d = kv_cache.shape[-1] // 2 if head_size is None else int(head_size)
    if 2 * d != kv_cache.shape[-1]:
        raise ValueError(f"head_size {d} does not match the packed last dim {kv_cache.shape[-1]}")
    k, v = kv_cache.transpose(1, 2).split(d, dim=-1)
    return k, v


def kv_views_cpu(kv_cache: torch.Tensor, isa: str = "vec") -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.32 CPU-attention cache ``[num_blocks, kvh, block_size, 2 * d]`` -> ``(K, V)`` views.

    The CPU backend (``vllm/v1/attention/backends/cpu_attn.py``: ``supported_kv_cache_layouts`` = LBHNC
    at line 73, the split at lines 414-416 / 474-476) reinterprets each (block, head) page of
    ``2 * block_size * d`` elements as K (first half) and V (second half), and
    ``torch.ops._C.cpu_attn_reshape_and_cache`` writes an ISA-specific interior:

    - ``"vec"``, ``"vec16"``: K column-major ``[d, block_size]``, V row-major ``[block_size, d]``
      (verified by probing the installed op; upstream ``csrc/cpu/cpu_attn_vec.hpp``). Returns 4-D
      views ``[nb, bs, kvh, d]`` with strides K ``(s_b, 1, s_h, bs)`` and V ``(s_b, d, s_h, 1)``.
    - ``"amx"`` (bf16): K packs pairs of dims in 16-token groups, V packs pairs of tokens in 16-dim
      groups (upstream ``csrc/cpu/cpu_attn_amx.hpp::reshape_and_cache``; not probed: this machine has no
      AMX). Not a 4-D strided view; returns 6-D views K ``[nb, bs/16, 16, kvh, d/2, 2]`` and
      V ``[nb, bs/2, 2, kvh, d/16, 16]`` which the C++ CPU ops accept.

    Other ISAs (neon, vsx, ...) are not verified and raise ``NotImplementedError``.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(f"CPU cache must be [nb, kvh, bs, 2*d], got {list(kv_cache.shape)}")
    nb, kvh, bs, d2 = kv_cache.shape
    d = d2 // 2
    s_b, s_h, s_t, s_c = kv_cache.stride()
    if s_c != 1 or s_t != d2:
        raise ValueError(f"CPU cache pages must be contiguous [bs, 2d] per head, got strides {kv_cache.stride()}")
    off = kv_cache.storage_offset()
    if isa in ("vec", "vec16"):
        k = kv_cache.as_strided((nb, bs, kvh, d), (s_b, 1, s_h, bs), off)
        v = kv_cache.as_strided((nb, bs, kvh, d), (s_b, d, s_h, 1), off + bs * d)
        return k, v
    if isa == "amx":
        if bs % 16 or d % 16:
            raise ValueError(f"AMX layout needs block_size and head_dim multiples of 16, got {bs}, {d}")
        k = kv_cache.as_strided((nb, bs // 16, 16, kvh, d // 2, 2), (s_b, 16 * d, 2, s_h, 32, 1), off)
        v = kv_cache.as_strided((nb, bs // 2, 2, kvh, d // 16, 16), (s_b, 32, 1, s_h, 16 * bs, 2), off + bs * d)
        return k, v
    raise NotImplementedError(f"CPU attention ISA {isa!r}: KV layout not verified (supported: vec, vec16, amx)")


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


def write_kv_fa2(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``write_kv`` into a FlashAttention layer cache as vLLM stores it (design-card entry point).

    ``kv_cache`` is either the vLLM 0.19 ``[2, nb, bs, kvh, d]`` tensor or the vLLM >= 0.26 per-layer
    ``[nb, kvh, bs, 2*d]`` view; the K/V views come from ``kv_views_fa_v019`` / ``kv_views_fa`` and the
    write goes through ``torch.ops.value_steer.write_kv`` (Triton on CUDA, C++ on CPU).
    """
    k_cache, v_cache = kv_views_fa_v019(kv_cache) if kv_cache.dim() == 5 else kv_views_fa(kv_cache, key.shape[-1])
    torch.ops.value_steer.write_kv(key, value, k_cache, v_cache, slot_mapping)


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
