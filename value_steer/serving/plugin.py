"""value_steer's ``vllm.general_plugins`` entry point (``pyproject.toml``): installed means wired.

vLLM calls :func:`register` in every vLLM process of this environment (the API server, the engine core,
the workers, offline ``LLM``), before any engine config is built (``EngineArgs.__post_init__``). It installs
the adapter's start-up hook, which acts only on engines whose ``--worker-cls`` is ``ValueSteerWorker``:
plain ``vllm serve MODEL --worker-cls value_steer.worker.ValueSteerWorker --additional-config '{...}'``
then gets the V1 runner, VFD's scheduling and CUDA-graph defaults, the start-up refusals, the request
validator (HTTP 400) and the stats routes and ``/metrics`` counters. Every other engine calls straight
through the hook.
"""

from __future__ import annotations

import logging

from value_steer.serving import WORKER_CLS

logger = logging.getLogger("value_steer")

# The public --worker-cls path and the class's home (both name ValueSteerWorker).
WORKER_PATHS = (WORKER_CLS, "value_steer.serving.worker.ValueSteerWorker")


def register() -> None:
    """Install the start-up hook of the adapter for the installed vLLM (a no-op for other workers)."""
    from value_steer.patches import get_adapter

    try:
        adapter = get_adapter()
    except RuntimeError as exc:
        # A vLLM with no adapter: ValueSteerWorker refuses to load there (naming the versions), and every
        # other engine in this environment must keep working, so the plugin stands aside.
        logger.debug("value_steer: plugin inactive: %s", exc)
        return
    adapter.install_startup_hook(WORKER_PATHS)
