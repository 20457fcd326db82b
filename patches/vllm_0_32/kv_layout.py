"""vLLM's paged-KV layouts as logical ``[num_blocks, block_size, kvh, d]`` views (adapter knowledge).

The kernels (``value_steer.kernels.write_kv`` / ``copy_kv_slots``) take logical views with arbitrary
strides; how a vLLM version and attention backend lay out its cache is a vLLM fact, so it lives here.
Pure torch: importing this module imports no vLLM.
"""

from __future__ import annotations

import torch

from value_steer.kernels import write_kv

__all__ = ["kv_views_cpu", "kv_views_fa", "kv_views_fa_v019", "write_kv_fa2"]


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
    write_kv(key, value, k_cache, v_cache, slot_mapping)
