"""Shared helpers for the Triton kernels: a guarded ``triton`` import and interpreter detection.

Every op module imports ``triton``/``tl`` from here and defines its ``@triton.jit`` kernels only when
``HAS_TRITON`` is true, so ``value_steer.kernels`` imports on machines without Triton (the custom ops
then run their CPU implementations; the CUDA implementations raise).

The kernels stay within the Triton 3.6 language: ``tl.dot(..., input_precision=...)``,
``tl.pointer_type`` casts of loaded int64 addresses, ``tl.where``/``tl.min``/``tl.sum``; no newer APIs.
"""

from __future__ import annotations

from typing import Any

try:  # Triton is optional: CPU-only installs run the C++ / torch paths.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "is_interpreted", "next_power_of_2", "require_triton", "tl", "triton"]


def require_triton() -> None:
    """Raise a clear error when a Triton launcher is called without Triton installed."""
    if not HAS_TRITON:
        raise RuntimeError("value_steer.kernels: this launcher needs `triton` (pip install triton)")


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors via numpy).

    The decision is taken by ``triton.jit`` at import time, so this inspects the kernel object rather
    than the environment.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()
