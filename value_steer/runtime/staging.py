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
    """One host->device copy for many int64 index arrays.

    The device views returned by :meth:`stage` stay valid until the next :meth:`stage` call (the buffer
    is reused); clone what must outlive it. The buffers grow (rarely) and are otherwise reused.
    """

    def __init__(self, device: torch.device, capacity: int = 4096) -> None:
        self.device = torch.device(device)
        self._host: torch.Tensor | None = None
        self._dev: torch.Tensor | None = None
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        host = torch.empty(capacity, dtype=torch.int64)
        self._host = host.pin_memory() if self.device.type == "cuda" else host
        self._dev = torch.empty(capacity, dtype=torch.int64, device=self.device)

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Pack ``arrays`` (any int dtype, any shape: flattened) and copy them in one go; returns the
        device views, flat, in order."""
        sizes = [int(a.size) for a in arrays]
        total = sum(sizes)
        assert self._host is not None and self._dev is not None
        if self._host.numel() < total:
            self._grow(max(total, 2 * self._host.numel()))
        host_np = self._host.numpy()
        off = 0
        for a, n in zip(arrays, sizes):
            host_np[off : off + n] = np.asarray(a).reshape(-1)
            off += n
        if self._dev.data_ptr() != self._host.data_ptr():
            self._dev[:total].copy_(self._host[:total], non_blocking=True)
        out, off = [], 0
        for n in sizes:
            out.append(self._dev[off : off + n])
            off += n
        return out
