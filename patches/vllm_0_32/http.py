"""API-process side for vLLM 0.32's OpenAI server: per-request steering stats over HTTP and ``/metrics``.

``value_steer.serving.launcher`` adds ``--middleware`` with this adapter's ``HTTP_MIDDLEWARE`` when the
server runs ``ValueSteerWorker``. The steering state lives in the worker process; this middleware
reads it through ``app.state.engine_client.collective_rpc`` (``AsyncLLM.collective_rpc``), the one
vLLM internal it binds to (listed in ``vllm_0_32.CONTRACT``):

- ``GET /v1/value_steer/requests/{id}``: the stats of a live or recently finished request. ``id`` is the
  response's ``id`` (``cmpl-...`` / ``chatcmpl-...``); vLLM's internal ids extend it with suffixes.
  404 when the worker does not know it.
- ``GET /v1/value_steer/stats``: the process-wide counters as JSON.
- ``GET /metrics``: before vLLM renders it, the counters are pulled once and exported as
  ``value_steer_*_total`` counter families (``value_steer.runtime.metrics``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from value_steer.runtime.metrics import steering_collector

logger = logging.getLogger("value_steer")

STATS_PREFIX = "/v1/value_steer/"
RPC_TIMEOUT_S = 10.0

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # vLLM then serves /metrics from a MultiProcessCollector (--api-server-count > 1), not from REGISTRY.
    logger.warning("value_steer: PROMETHEUS_MULTIPROC_DIR is set, so value_steer_* counters are not on /metrics; "
                   "read them from GET %sstats", STATS_PREFIX)
_COLLECTOR = steering_collector()


async def _rpc(request: Any, method: str, *args: Any) -> Any:
    """The first worker's answer (tensor-parallel workers hold identical steering state)."""
    results = await request.app.state.engine_client.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)
    return results[0] if isinstance(results, list) else results


async def value_steer_http(request: Any, call_next: Any) -> Any:
    """Starlette HTTP middleware (``--middleware``)."""
    path = request.url.path
    if request.method == "GET" and path == "/metrics":
        try:
            _COLLECTOR.update((await _rpc(request, "value_steer_stats"))["counters"])
        except Exception:  # a failed pull must not take vLLM's own metrics down; it is logged and counted
            logger.exception("value_steer: pulling worker counters for /metrics failed")
            _COLLECTOR.record_error()
        return await call_next(request)
    if not path.startswith(STATS_PREFIX):
        return await call_next(request)

    from fastapi.responses import JSONResponse

    if request.method != "GET":
        return JSONResponse({"error": {"message": f"{path}: only GET is allowed", "code": 405}}, status_code=405)
    rest = path[len(STATS_PREFIX):]
    if rest == "stats":
        return JSONResponse(await _rpc(request, "value_steer_stats"))
    if rest.startswith("requests/") and len(rest) > len("requests/"):
        req_id = rest[len("requests/"):]
        answer = await _rpc(request, "value_steer_stats", req_id)
        if answer.get("stats") is None:
            return JSONResponse({"error": {"message": f"value_steer: unknown request id {req_id!r} (finished "
                                           "requests are kept for the last 4096)", "code": 404}}, status_code=404)
        return JSONResponse(answer)
    return JSONResponse({"error": {"message": f"{path}: unknown value_steer route; routes: {STATS_PREFIX}stats, "
                                   f"{STATS_PREFIX}requests/{{id}}", "code": 404}}, status_code=404)
