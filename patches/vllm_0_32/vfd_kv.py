"""VFD's KV cache: the scratch blocks past the scheduler's (one per candidate and steering row), their check against
the engine's KV budget, the cache views and the slot copies that commit a winner's KV."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from value_steer.core.vfd_math import scratch_blocks_needed
from value_steer.patches.vllm_0_32.vfd_common import logger
from value_steer.runtime.staging import PackedStaging
from value_steer.runtime.vfd_state import ScratchAllocator


class VFDKVCacheMixin:
    """The runner's KV cache grown by VFD's scratch blocks, and the slot copies over every cache view."""

    _vs_state: Any

    # ---- KV cache with scratch blocks --------------------------------------------------------------
    def initialize_kv_cache(
        self, kv_cache_config: Any, is_profiling: bool = False, kv_cache_allocation_context: Any = None
    ) -> None:
        n = int(kv_cache_config.num_blocks)
        s = scratch_blocks_needed(self._vfd_k, self._vfd_sched_max_seqs)
        kc = copy.deepcopy(kv_cache_config)
        if len(kc.kv_cache_groups) != 1:
            raise RuntimeError("value_steer VFD needs one KV cache group; this engine has "
                               f"{len(kc.kv_cache_groups)} (vLLM's hybrid KV cache manager is on: start it with "
                               "--disable-hybrid-kv-cache-manager)")
        kc.num_blocks = n + s
        tensors = []
        for t in kc.kv_cache_tensors:
            if t.size % n:
                raise RuntimeError(f"value_steer VFD: KV cache tensor size {t.size} is not a multiple of {n} blocks")
            layer_outer = len(t.layers) > 1 and t.layer_stride >= t.block_stride * n
            repl: dict[str, int] = {"size": t.size // n * (n + s)}
            if layer_outer:
                repl["layer_stride"] = t.layer_stride // n * (n + s)
                repl["offset"] = t.offset // n * (n + s)
            tensors.append(dataclasses.replace(t, **repl))
        kc.kv_cache_tensors = tensors
        super().initialize_kv_cache(kc, is_profiling, kv_cache_allocation_context)  # type: ignore[misc]
        self._vfd_check_kv(n + s)
        self._vfd_scratch = ScratchAllocator(n, s)
        self._vfd_kv_views = None
        self._vfd_live.clear()
        self._vfd_pipes = None
        logger.info("value_steer VFD: K=%d, %d scratch KV blocks beyond the scheduler's %d", self._vfd_k, s, n)

    def vfd_scratch_bytes(self) -> int:
        """KV bytes of the scratch blocks; the worker takes them out of the scheduler's KV budget."""
        specs = self.get_kv_cache_spec()  # type: ignore[attr-defined]
        per_block = sum(int(spec.page_size_bytes) for spec in specs.values())
        return scratch_blocks_needed(self._vfd_k, self._vfd_sched_max_seqs) * per_block

    def _vfd_check_kv(self, num_blocks: int) -> None:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        group = self.kv_cache_config.kv_cache_groups[0]  # type: ignore[attr-defined]
        spec = group.kv_cache_spec
        # A FullAttentionSpec with a sliding_window is a sliding-window layer promoted to full-length KV (the hybrid
        # KV cache manager off): its attention applies the window on positions, so candidates' rows see exactly
        # the keys their natural sample would.
        if not isinstance(spec, FullAttentionSpec):
            raise RuntimeError(f"value_steer VFD supports full-length KV caches only, got {type(spec).__name__}")
        for ag in self.attn_groups[0]:  # type: ignore[attr-defined]
            if getattr(ag, "kernel_block_size", None) is not None:
                raise RuntimeError(
                    "value_steer VFD: kernel block size differs from the KV block size; "
                    "set --block-size to a size the attention backend supports natively"
                )
        for kv in self.kv_caches:  # type: ignore[attr-defined]
            if kv.shape[0] != num_blocks:
                raise RuntimeError(f"value_steer VFD: KV cache view has {kv.shape[0]} blocks, expected {num_blocks}")

    def _vfd_views(self) -> list[torch.Tensor]:
        """Per-layer K and V views ``[nb, bs, kvh, d]`` through the backend's own layout."""
        if self._vfd_kv_views is None:
            from value_steer.patches.vllm_0_32.kv_layout import kv_views_cpu, kv_views_fa

            views: list[torch.Tensor] = []
            if torch.device(self.device).type == "cpu":  # type: ignore[attr-defined]
                isa = getattr(self.attn_groups[0][0].get_metadata_builder(), "isa", "vec")  # type: ignore[attr-defined]
                for kv in self.kv_caches:  # type: ignore[attr-defined]
                    views.extend(kv_views_cpu(kv, isa))
            else:
                for kv in self.kv_caches:  # type: ignore[attr-defined]
                    views.extend(kv_views_fa(kv))
            self._vfd_kv_views = views
        return self._vfd_kv_views

    def _vfd_stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """One host->device copy of every index array a step needs (device views, valid until the next call)."""
        if self._vfd_staging is None:
            self._vfd_staging = PackedStaging(torch.device(self.device))  # type: ignore[attr-defined]
        return self._vfd_staging.stage(arrays)

    def _vfd_copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy KV slots ``src[i] -> dst[i]`` (device int64) in every layer (one op call)."""
        if not src.numel():
            return
        from value_steer.kernels import copy_kv_slots

        copy_kv_slots(self._vfd_views(), src, dst)
        self._vfd_counters["committed_slots"] += int(src.numel())
