"""Host->device staging buffers (vLLM's ``CpuGpuBuffer`` pattern): fill on the host, copy once, non-blocking.

:class:`HostDeviceBuffer` is a persistent device buffer with a host mirror (pinned on CUDA).
:class:`PackedStaging` packs a step's variable-length int64 index arrays into one pinned buffer and
publishes them with ONE non-blocking copy, returning device views.
"""

from __future__ import annotations

import numpy as np
import torch


class HostDeviceBuffer:
    """A persistent device buffer with a host staging mirror (pinned on CUDA).

    ``np`` is the numpy view to fill on the host; :meth:`copy_to_device` publishes ``np[:n]`` with one
    non-blocking copy and returns the device slice.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        host = torch.zeros(size, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        self.host = host
        self.np = host.numpy()
        self.device = torch.zeros(size, dtype=dtype, device=device)

    def copy_to_device(self, n: int) -> torch.Tensor:
        dst = self.device[:n]
        if dst.data_ptr() != self.host.data_ptr():
            dst.copy_(self.host[:n], non_blocking=True)
        return dst


class PackedStaging:
    """One host->device copy for many int64 index arrays, through a ring of ``slots`` buffer pairs.

    Each :meth:`stage` call packs its arrays into the next pinned host buffer and copies it, non-blocking,
    into the paired device buffer; the returned device views stay valid for the next ``slots - 1`` calls.
    A host buffer is refilled only a full ring later: by then the copy that read it has run, because each
    steered step reads the device once (its winners) and so orders every copy queued before it, and a step
    makes far fewer than ``slots`` calls. Buffers grow (rarely) and are otherwise reused.
    """

    def __init__(self, device: torch.device, capacity: int = 4096, slots: int = 8) -> None:
        self.device = torch.device(device)
        self._host: list[torch.Tensor] = []
        self._dev: list[torch.Tensor] = []
        self._next = 0
        for _ in range(slots):
            h, d = self._alloc(capacity)
            self._host.append(h)
            self._dev.append(d)

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = torch.empty(capacity, dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host, torch.empty(capacity, dtype=torch.int64, device=self.device)

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Pack ``arrays`` (any int dtype, any shape: flattened) and copy them in one go; returns the
        device views, flat, in order."""
        sizes = [int(a.size) for a in arrays]
        total = sum(sizes)
        slot = self._next
        self._next = (slot + 1) % len(self._host)
        if self._host[slot].numel() < total:
            self._host[slot], self._dev[slot] = self._alloc(max(total, 2 * self._host[slot].numel()))
        host, dev = self._host[slot], self._dev[slot]
        host_np = host.numpy()
        off = 0
        for a, n in zip(arrays, sizes):
            host_np[off : off + n] = np.asarray(a).reshape(-1)
            off += n
        if dev.data_ptr() != host.data_ptr():
            dev[:total].copy_(host[:total], non_blocking=True)
        out, off = [], 0
        for n in sizes:
            out.append(dev[off : off + n])
            off += n
        return out
