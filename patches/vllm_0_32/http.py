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
  409 bank full). The frontend's name mirror follows every confirmed change.

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


# ---- activation steering: the request body ----------------------------------------------------------------


class SteeringBodyError(ValueError):
    """A generation body whose steering spec cannot be forwarded (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _dump(data: Any) -> bytes:
    # ASCII output: a lone surrogate the client escaped ("\ud800") survives, where UTF-8 encoding would fail.
    return json.dumps(data, separators=(",", ":")).encode()


def rewrite_steering_body(body: bytes) -> tuple[bytes | None, Any]:
    """Move a top-level ``"steering"`` of a JSON body into ``vllm_xargs["steering"]`` (a JSON string).

    Returns ``(new body, spec)``: the rewritten body (None: forward the body as it is) and the spec as the
    client gave it (a dict or a string; None without one). A spec object under ``vllm_xargs.steering`` is
    turned into its JSON string (vLLM's schema takes strings and numbers there).

    Raises:
        SteeringBodyError: a spec given both ways; a top-level ``steering`` that is neither an object nor a
            string; ``vllm_xargs`` that is not an object while a spec must go into it; a spec with
            ``use_beam_search`` (vLLM's beam search builds its own sampling parameters without
            ``vllm_xargs``: the request would be served unsteered).
    """
    # JSON can spell the key only as "steering" or with \u escapes: anything else has no top-level spec.
    if b"steering" not in body and b"\\u" not in body:
        return None, None
    try:
        data = json.loads(body)
    except ValueError:  # not JSON (or not UTF-8/16/32): vLLM answers it
        return None, None
    if not isinstance(data, dict):
        return None, None
    xargs = data.get("vllm_xargs")
    inner = xargs.get(STEERING_KEY) if isinstance(xargs, dict) else None
    # "steering": null asks for nothing: dropped, so no unknown field is left behind.
    changed = STEERING_KEY in data
    top = data.pop(STEERING_KEY, None)
    if top is not None:
        if not isinstance(top, (dict, str)):
            raise SteeringBodyError(
                f"steering must be a JSON object like {{\"ops\": [...], \"gate\": {{...}}}} (or a JSON string of "
                f"one), got {type(top).__name__}", STEERING_KEY)
        if xargs is None:
            xargs = data["vllm_xargs"] = {}
        elif not isinstance(xargs, dict):
            raise SteeringBodyError(f"vllm_xargs must be a JSON object to carry the steering spec, got "
                                    f"{type(xargs).__name__}", "vllm_xargs")
        if inner is not None:
            raise SteeringBodyError("steering and vllm_xargs.steering: the steering spec was given twice; send it "
                                    "once (the top-level 'steering' object, or 'vllm_xargs.steering' as a JSON "
                                    "string)", STEERING_KEY)
        xargs[STEERING_KEY] = top
    spec = xargs.get(STEERING_KEY) if isinstance(xargs, dict) else None
    if spec is None:
        return (_dump(data) if changed else None), None
    if data.get("use_beam_search"):
        raise SteeringBodyError("use_beam_search: beam search does not carry vllm_xargs, so the steering spec would "
                                "be ignored; steer without beam search", "use_beam_search")
    if isinstance(spec, dict):
        xargs[STEERING_KEY] = json.dumps(spec, separators=(",", ":"))
        changed = True
    return (_dump(data) if changed else None), spec


def spec_vector_names(spec: Any) -> set[str]:
    """The vector names a raw (unvalidated) spec uses: ops' ``vector`` and the gate's ``probe`` strings."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return set()
    if not isinstance(spec, dict):
        return set()
    found: set[str] = set()
    ops = spec.get("ops")
    for op in ops if isinstance(ops, list) else ():
        if isinstance(op, dict) and isinstance(op.get("vector"), str):
            found.add(op["vector"])
    gate = spec.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("probe"), str):
        found.add(gate["probe"])
    return found


def _route_path(scope: MutableMapping[str, Any]) -> str:
    # As Starlette's router sees it: the path below the mount point (--root-path).
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"transfer-encoding")]
    return [*kept, (b"content-length", str(length).encode())]


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def _replay(messages: list[MutableMapping[str, Any]], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then the client's own (a disconnect, later)."""
    pending = list(messages)

    async def replayed() -> MutableMapping[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replayed


def _error(message: str, status: int, param: str | None = None) -> Any:
    """vLLM's error body (``ErrorResponse``): ``{"error": {"message", "type", "param", "code"}}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "InternalServerError"),
                                   "param": param, "code": status}}, status_code=status)


class SteeringBodyMiddleware:
    """Raw ASGI middleware: rewrites the body of :data:`STEERING_ROUTES` POSTs (:func:`rewrite_steering_body`)
    and refreshes the vector-name mirror for specs naming vectors this process does not know.

    Raw ASGI rather than ``@app.middleware("http")``: the downstream app must read the rewritten body from
    ``receive``, which an HTTP middleware's ``request.body()`` does not replace. Only those POSTs are
    buffered; everything else passes straight through.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._refresh_lock = asyncio.Lock()
        self._last_refresh = -math.inf

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or _route_path(scope) not in STEERING_ROUTES:
            await self.app(scope, receive, send)
            return
        messages: list[MutableMapping[str, Any]] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if messages[-1]["type"] != "http.request":  # the client left mid-body: vLLM sees what it sent
            await self.app(scope, _replay(messages, receive), send)
            return
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            new_body, spec = rewrite_steering_body(body)
        except SteeringBodyError as exc:
            await _error(str(exc), 400, exc.param)(scope, receive, send)
            return
        if spec is not None:
            await self._refresh_names(scope, spec_vector_names(spec))
        if new_body is not None:
            body = new_body
            scope = {**scope, "headers": _with_length(list(scope.get("headers", [])), len(body))}
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _refresh_names(self, scope: MutableMapping[str, Any], names: set[str]) -> None:
        """Load the worker's name table when ``names`` are not all known here: the first spec naming vectors
        (no directory hashing in this process then), or names another API server process registered. At
        most once per :data:`MIN_REFRESH_S`; a failure leaves the validator to answer."""
        mirror = vector_names()
        if not names or mirror.known(names):
            return
        client = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
        if client is None:
            return
        async with self._refresh_lock:  # concurrent misses wait for one refresh, then look again
            if mirror.known(names) or time.monotonic() - self._last_refresh < MIN_REFRESH_S:
                return
            self._last_refresh = time.monotonic()
            try:
                results = await client.collective_rpc(VECTORS_RPC, timeout=RPC_TIMEOUT_S, args=("hashes",))
            except Exception:
                logger.warning("value_steer: refreshing vector names from the worker failed", exc_info=True)
                return
            observe_vectors_answer("hashes", None, first_answer(results))


# ---- activation steering: the vector registry -----------------------------------------------------------------

_F32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max: larger values become inf in the bank
_REGISTER_KEYS = ("name", "data")


def _bad_entry(row: list) -> int | None:
    """Index of the first entry that is not a finite fp32-range number (bools are not numbers here)."""
    for j, x in enumerate(row):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or abs(x) > _F32_MAX:
            return j
    return None


def vector_data_problem(data: Any, hidden_size: int | None, num_layers: int | None) -> str | None:
    """Why ``data`` cannot be a vector (``[H]`` or ``[num_layers][H]`` finite numbers), naming the entry;
    None when it can. ``hidden_size`` / ``num_layers`` None: lengths checked for consistency only (the
    worker checks them against the model)."""
    shape = f"[{hidden_size or 'H'}] or [{num_layers or 'num_layers'}][{hidden_size or 'H'}]"
    if not isinstance(data, list) or not data:
        return f"data must be a non-empty list of numbers: {shape}, got {type(data).__name__}"
    if not isinstance(data[0], list):
        if hidden_size is not None and len(data) != hidden_size:
            return f"data must have exactly {hidden_size} numbers (the model's hidden size), got {len(data)}"
        j = _bad_entry(data)
        return None if j is None else f"data[{j}] must be a finite float32 number, got {data[j]!r}"
    if num_layers is not None and len(data) != num_layers:
        return (f"data: a per-layer vector has exactly {num_layers} rows (the model's decoder layers), "
                f"got {len(data)}")
    width = hidden_size if hidden_size is not None else len(data[0])
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != width:
            got = f"{len(row)} numbers" if isinstance(row, list) else type(row).__name__
            return f"data[{i}] must be a list of exactly {width} numbers, got {got}"
        j = _bad_entry(row)
        if j is not None:
            return f"data[{i}][{j}] must be a finite float32 number, got {row[j]!r}"
    return None


async def _vectors_rpc(request: Any, action: str, name: str | None = None, data: list | None = None) -> Any:
    """The worker registry's answer; the name mirror follows it at once (the RPC hook does too: idempotent)."""
    results = await request.app.state.engine_client.collective_rpc(VECTORS_RPC, timeout=RPC_TIMEOUT_S,
                                                                   args=(action, name, data))
    answer = first_answer(results)
    observe_vectors_answer(action, name, answer)
    return answer


def _answer(answer: Any) -> Any:
    from fastapi.responses import JSONResponse

    if not isinstance(answer, dict):
        return _error(f"value_steer: the worker gave no registry answer (got {type(answer).__name__})", 500)
    if "error" in answer:
        status = answer.get("status")
        status = status if isinstance(status, int) and 400 <= status < 600 else 500
        return _error(str(answer["error"]), status)
    return JSONResponse(answer)


async def _list_vectors(request: Request) -> Any:
    return _answer(await _vectors_rpc(request, "list"))


async def _register_vector(request: Request) -> Any:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _error('the body must be a JSON object {"name": "<vector name>", "data": [...]}', 400)
    unknown = sorted(str(k) for k in body if k not in _REGISTER_KEYS)
    if unknown:
        return _error(f"unknown key(s) {unknown}; allowed: {list(_REGISTER_KEYS)}", 400, unknown[0])
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return _error(f"name must be a vector name ({NAME_RULE}), got {name!r}", 400, "name")
    hidden_size, num_layers = model_facts()
    problem = vector_data_problem(body.get("data"), hidden_size, num_layers)
    if problem is not None:
        return _error(problem, 400, "data")
    return _answer(await _vectors_rpc(request, "register", name, body["data"]))


async def _delete_vector(request: Request, name: str) -> Any:
    if not NAME_RE.fullmatch(name):
        return _error(f"name must be a vector name ({NAME_RULE}), got {name!r}", 400, "name")
    return _answer(await _vectors_rpc(request, "delete", name))


def add_routes(app: Any) -> None:
    """Add the stats routes, the ``/metrics`` pull, the steering body rewrite and the vector registry
    routes to a FastAPI ``app`` (idempotent; before the app starts: Starlette freezes its middleware then)."""
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
    app.add_api_route(VECTORS_PATH, _list_vectors, methods=["GET"], include_in_schema=False)
    app.add_api_route(VECTORS_PATH, _register_vector, methods=["POST"], include_in_schema=False)
    app.add_api_route(VECTORS_PATH + "/{name}", _delete_vector, methods=["DELETE"], include_in_schema=False)
    app.add_middleware(SteeringBodyMiddleware)


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
