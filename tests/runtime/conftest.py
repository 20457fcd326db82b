"""Counting host<->device traffic of a step, on a stand-in accelerator (the ``meta`` device).

On ``meta`` every kernel runs shape-only, so a step that needs a device value on the host (``.item()``,
``.tolist()``, ``nonzero``, boolean-mask indexing) cannot even run; what it copies is seen by a
``TorchDispatchMode``. An explicit ``.cpu()`` / ``.to("cpu")`` is counted and answered with zeros, so a step
with a budgeted read-back runs to the end. ``torch.tensor(list, device=...)`` does not reach the
dispatcher, so it is counted by wrapping the constructor.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")

_SCALAR = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}
_DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten.unique.default",
                   "aten._unique2.default"}


def _dev(x: Any) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


class SyncCounter(TorchDispatchMode):
    """Counts, by kind: ``h2d`` copies, ``d2h`` copies, ``scalar`` reads, ``data_dependent`` ops
    (nonzero, boolean-mask indexing) and ``list_to_device`` constructions."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.log: list[str] = []
        self._orig_tensor = torch.tensor

    def _hit(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.log.append(f"{kind}: {what}")

    def __enter__(self) -> SyncCounter:
        orig = self._orig_tensor

        def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == DEVICE.type:
                self._hit("list_to_device", "torch.tensor(..., device=accelerator)")
            return orig(data, *args, **kwargs)

        torch.tensor = tensor  # type: ignore[assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.tensor = self._orig_tensor  # type: ignore[assignment]
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if name in _SCALAR:
            self._hit("scalar", name)
        elif name in _DATA_DEPENDENT:
            self._hit("data_dependent", name)
        elif name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self._hit("data_dependent", "boolean-mask index")
        elif name in ("aten._to_copy.default", "aten.to.dtype_layout"):
            src, dst = _dev(args[0]), kwargs.get("device")
            if dst is not None and src is not None and src.type != torch.device(dst).type:
                to_host = torch.device(dst).type != DEVICE.type
                self._hit("d2h" if to_host else "h2d", name)
                if to_host and src.type == DEVICE.type:
                    # A read back from the stand-in device: count it, then go on with zeros of the right shape.
                    return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        elif name == "aten.copy_.default":
            dst, src = _dev(args[0]), _dev(args[1])
            if dst is not None and src is not None and dst.type != src.type:
                self._hit("h2d" if dst.type == DEVICE.type else "d2h", name)
        return func(*args, **kwargs)

    @property
    def blocking(self) -> int:
        """What blocks the host on a real accelerator: device->host reads and data-dependent shapes."""
        return self.counts["d2h"] + self.counts["scalar"] + self.counts["data_dependent"]


@pytest.fixture
def sync_counter() -> type[SyncCounter]:
    """The :class:`SyncCounter` class (enter it around the step to measure)."""
    return SyncCounter
