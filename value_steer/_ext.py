"""Loads the compiled ``value_steer._C`` extension (CPU implementations of the custom ops).

The import of ``value_steer`` never fails because the extension is missing: one log line says so and
the ops dispatch to their torch references. ``require_extension()`` is for places that must have it
(the Makefile's post-install check, the tests that compare it with the references).
"""

from __future__ import annotations

import logging
from types import ModuleType

logger = logging.getLogger("value_steer")

_EXT: ModuleType | None = None
_EXT_ERROR: str | None = None

try:
    import torch  # noqa: F401  (the extension links against libtorch; load it first)

    from value_steer import _C as _EXT  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # the build is optional; say so once, then fall back
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    logger.info("value_steer._C not available (%s); custom ops use the torch reference on CPU", _EXT_ERROR)


def has_extension() -> bool:
    """True when the compiled ``value_steer._C`` extension imported."""
    return _EXT is not None


def extension() -> ModuleType | None:
    """The compiled extension module, or None when it is absent."""
    return _EXT


def require_extension() -> ModuleType:
    """Return the extension or raise with the import error that made it absent."""
    if _EXT is None:
        raise RuntimeError(
            f"value_steer._C is not built ({_EXT_ERROR}); rebuild with "
            "`pip install --no-build-isolation -e .` (needs torch and a C++ compiler)"
        )
    return _EXT
