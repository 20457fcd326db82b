"""API-process side for vLLM 0.32's OpenAI server: per-request steering stats over HTTP and ``/metrics``.

The start-up hook (``worker.install_startup_hook``) calls :func:`install_routes` in an API server process
whose engine runs ``ValueSteerWorker``: no ``--middleware`` flag is needed. vLLM builds its app with
``launchers.app.build_app``, which calls ``init_entrypoints_middleware(args, app, supported_tasks)``; the
hook wraps that call to add, before vLLM's own middleware (so ``--api-key`` and CORS apply to ours too):

- ``GET /v1/value_steer/requests/{id}`` (a FastAPI route): the stats of a live or recently finished
  request. ``id`` is the response's ``id`` (``cmpl-...`` / ``chatcmpl-...``); vLLM's internal ids extend
  it with suffixes. 404 when the worker does not know it.
- ``GET /v1/value_steer/stats``: the process-wide counters as JSON.
- ``GET /metrics`` (an HTTP middleware): before vLLM renders it, the counters are pulled once and exported
  as ``value_steer_*_total`` counter families (``value_steer.runtime.metrics``).

Activation steering (``docs/activation-steering.md``):

- :class:`SteeringBodyMiddleware` (raw ASGI, so the body it rewrites is the body vLLM reads): a top-level
  ``"steering"`` in a JSON body of the generation routes (:data:`STEERING_ROUTES`; the OpenAI SDK's
  ``extra_body``) moves into ``vllm_xargs["steering"]`` as a JSON string. vLLM's request models accept
  unknown fields and ignore them, so without this a steering request would be served unsteered. A spec
  given both ways, or a top-level value that cannot be a spec, is a 400 naming the field; a body that is not
  a JSON object is left to vLLM. Before a spec that names vectors this process does not know goes on, the
  name mirror is refreshed from the worker (another API server process may have registered them).
- ``POST /v1/steering/vectors`` (``{"name": ..., "data": [H] or [num_layers][H]}``), ``GET
  /v1/steering/vectors`` (list and slot usage), ``DELETE /v1/steering/vectors/{name}``: the worker's vector
  registry (RPC ``value_steer_vectors``); its refusals keep their status (400 bad data, 404 unknown name,
  409 in use or bank full). The frontend's name mirror follows every confirmed change.

The steering state lives in the worker processes; the routes read it through
``app.state.engine_client.collective_rpc`` (``AsyncLLM.collective_rpc``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# FastAPI resolves route parameters by annotation: a handler's ``request: Request`` is the HTTP request.
from fastapi import Request

from value_steer.core.config import STEERING_KEY
from value_steer.core.steering_spec import NAME_RE, NAME_RULE
from value_steer.patches.vllm_0_32.frontend import (
    VECTORS_RPC,
    first_answer,
    model_facts,
    observe_vectors_answer,
    vector_names,
)
from value_steer.runtime.metrics import steering_collector
from value_steer.runtime.state import MAX_FINISHED_KEPT

logger = logging.getLogger("value_steer")

STATS_PREFIX = "/v1/value_steer/"
RPC_TIMEOUT_S = 10.0
VECTORS_PATH = "/v1/steering/vectors"
# The JSON routes whose request model has ``vllm_xargs`` (the batch chat route passes its extra fields,
# vllm_xargs included, to each conversation's ChatCompletionRequest).
STEERING_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch",
                             "/v1/responses", "/v1/messages"})
# A name miss refreshes the mirror from the worker at most this often (a client naming unknown vectors
# must not turn every request into an RPC).
MIN_REFRESH_S = 0.5
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}


async def _rpc(request: Any, method: str, *args: Any) -> Any:
    """The first worker's answer (tensor-parallel workers hold identical steering state)."""
    results = await request.app.state.engine_client.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)
    return results[0] if isinstance(results, list) else results


async def _stats(request: Request) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(await _rpc(request, "value_steer_stats"))


async def _request_stats(request: Request, request_id: str) -> Any:
    from fastapi.responses import JSONResponse

    answer = await _rpc(request, "value_steer_stats", request_id)
    if answer.get("stats") is None:
        return JSONResponse({"error": {"message": f"value_steer: unknown request id {request_id!r} (finished "
                                       f"requests are kept for the last {MAX_FINISHED_KEPT})", "code": 404}},
                            status_code=404)
    return JSONResponse(answer)


def _metrics_middleware() -> Any:
    collector = steering_collector()

    async def value_steer_metrics(request: Any, call_next: Any) -> Any:
        if request.method == "GET" and request.url.path == "/metrics":
            try:
                collector.update((await _rpc(request, "value_steer_stats"))["counters"])
            except Exception:  # a failed pull must not take vLLM's own metrics down; it is logged and counted
                logger.exception("value_steer: pulling worker counters for /metrics failed")
                collector.record_error()
        return await call_next(request)

    return value_steer_metrics


def add_routes(app: Any) -> None:
    """Add the stats routes and the ``/metrics`` pull to a FastAPI ``app`` (idempotent)."""
    if getattr(app.state, "value_steer_routes", False):
        return
    app.state.value_steer_routes = True
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # vLLM then serves /metrics from a MultiProcessCollector (--api-server-count > 1), not from REGISTRY.
        logger.warning("value_steer: PROMETHEUS_MULTIPROC_DIR is set, so value_steer_* counters are not on "
                       "/metrics; read them from GET %sstats", STATS_PREFIX)
    app.add_api_route(STATS_PREFIX + "stats", _stats, methods=["GET"], include_in_schema=False)
    app.add_api_route(STATS_PREFIX + "requests/{request_id:path}", _request_stats, methods=["GET"],
                      include_in_schema=False)
    app.middleware("http")(_metrics_middleware())


def install_routes() -> None:
    """Make vLLM's app builder add :func:`add_routes` to every app it builds in this process (idempotent)."""
    import vllm.entrypoints.launchers.app as app_module

    original = app_module.init_entrypoints_middleware
    if getattr(original, "_value_steer_routes", False):
        return

    @functools.wraps(original)
    def init_entrypoints_middleware(args: Any, app: Any, *rest: Any, **kwargs: Any) -> Any:
        add_routes(app)  # first: vLLM's middleware (authentication, CORS) then wraps ours
        return original(args, app, *rest, **kwargs)

    init_entrypoints_middleware._value_steer_routes = True  # type: ignore[attr-defined]
    app_module.init_entrypoints_middleware = init_entrypoints_middleware
