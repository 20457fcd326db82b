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
import hmac
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# FastAPI resolves route parameters by annotation: a handler's ``request: Request`` is the HTTP request.
from fastapi import Request

from value_steer.core.config import (
    ALL_REQUEST_KEYS,
    DEFAULT_MAX_BODY_BYTES,
    LOGIT_STEERING_KEY,
    REQUEST_KEYS,
    STEERING_KEY,
    TOP_LEVEL_REQUEST_KEYS,
    misspelled_top_level_key,
    parse_request_args,
)
from value_steer.core.modes import MODE_VFD
from value_steer.core.safe_json import JSONSyntaxError, RequestArgError, loads_bounded, short_repr
from value_steer.core.steering_spec import NAME_RE, NAME_RULE
from value_steer.patches.vllm_0_32.api import _api_config
from value_steer.patches.vllm_0_32.frontend import (
    VECTORS_RPC,
    first_answer,
    model_facts,
    observe_vectors_answer,
    residual_norms,
    rpc_each_engine,
    steering_parse_kwargs,
    sum_counters,
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
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 413: "RequestEntityTooLargeError"}
# The header that carries steering.admin_key on registry mutations (vLLM's --api-key keeps Authorization).
ADMIN_KEY_HEADER = "x-steering-admin-key"


async def _rpc_engines(request: Any, method: str, *args: Any) -> list[Any]:
    """Each engine's answer (data parallel: one per engine), from its first worker (tensor-parallel workers hold
    identical steering state): the first error a worker gave, else the first answer."""
    per_engine = await rpc_each_engine(request.app.state.engine_client, method, args, RPC_TIMEOUT_S)
    return [first_answer(results) for results in per_engine]


async def _counters(request: Any) -> dict[str, Any]:
    """The process-wide counters, summed over the engines."""
    return sum_counters(await _rpc_engines(request, "value_steer_stats"))


async def _stats(request: Request) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"counters": await _counters(request)})


async def _request_stats(request: Request, request_id: str) -> Any:
    from fastapi.responses import JSONResponse

    answers = await _rpc_engines(request, "value_steer_stats", request_id)
    # Data parallel: the engine that served the request holds its stats; the others do not know the id.
    answer = next((a for a in answers if isinstance(a, dict) and a.get("stats") is not None), answers[0])
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
                collector.update(await _counters(request))
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


def decode_json_text(body: bytes) -> tuple[str, bool] | None:
    """The body as text in the encoding JSON allows (RFC 8259 / Python's ``json``: UTF-8, UTF-16 or UTF-32, with or
    without a BOM), and whether it was plain UTF-8; None when it decodes in none of them (vLLM answers it)."""
    try:
        encoding = json.detect_encoding(body)
        return body.decode(encoding), encoding == "utf-8"
    except (UnicodeDecodeError, LookupError):
        return None


def _parse_body(body: bytes) -> tuple[Any, bool] | None:
    """``(parsed JSON, was plain UTF-8)``; None for a body that is not JSON text (vLLM answers it with a 400).

    Raises:
        SteeringBodyError: JSON nested deeper than ``safe_json.MAX_JSON_DEPTH``, or a number Python will not convert
            (an integer of thousands of digits): answered here, as vLLM's own parser would raise a 500 on them.
    """
    decoded = decode_json_text(body)
    if decoded is None:
        return None
    text, utf8 = decoded
    try:
        return loads_bounded(text, "body"), utf8
    except JSONSyntaxError:
        return None  # plain invalid JSON: vLLM's own 400
    except RequestArgError as exc:
        raise SteeringBodyError(str(exc), "body") from None


def _move_top_level(data: dict[str, Any]) -> bool:
    """Move the top-level ``steering`` / ``logit_steering`` into ``vllm_xargs`` (in place); True if ``data``
    changed. Refuses value_steer's per-request keys sent at the top level and near misses of its top-level keys."""
    for key in data:
        if not isinstance(key, str) or key in TOP_LEVEL_REQUEST_KEYS:
            continue
        if key in REQUEST_KEYS:
            raise SteeringBodyError(f"{key}: value_steer's per-request keys go in vllm_xargs (\"vllm_xargs\": "
                                    f"{{\"{key}\": ...}}); at the top level it would be ignored", key)
        near = misspelled_top_level_key(key)
        if near is not None:
            raise SteeringBodyError(f"unknown top-level key {key!r} (did you mean {near!r}?); value_steer reads "
                                    f"{list(TOP_LEVEL_REQUEST_KEYS)} at the top level and {list(ALL_REQUEST_KEYS)} in "
                                    "vllm_xargs", key)
    changed = False
    xargs = data.get("vllm_xargs")
    for key in TOP_LEVEL_REQUEST_KEYS:
        if key not in data:
            continue
        changed = True
        top = data.pop(key)
        if top is None:  # "steering": null asks for nothing: dropped, so no unknown field is left behind
            continue
        if key == STEERING_KEY and not isinstance(top, (dict, str)):
            raise SteeringBodyError(
                f"steering must be a JSON object like {{\"ops\": [...], \"gate\": {{...}}}} (or a JSON string of "
                f"one), got {type(top).__name__}", STEERING_KEY)
        if key == LOGIT_STEERING_KEY and not isinstance(top, (bool, int, float, str)):
            raise SteeringBodyError(f"logit_steering must be a number or true/false, got {type(top).__name__}", key)
        if xargs is None:
            xargs = data["vllm_xargs"] = {}
        elif not isinstance(xargs, dict):
            raise SteeringBodyError(f"vllm_xargs must be a JSON object to carry {key}, got {type(xargs).__name__}",
                                    "vllm_xargs")
        if xargs.get(key) is not None:
            raise SteeringBodyError(f"{key} and vllm_xargs.{key}: given twice; send it once (the top-level '{key}' "
                                    f"or 'vllm_xargs.{key}')", key)
        # vLLM's schema takes strings and numbers in vllm_xargs: a bool would become 1/0, a switch says what it means.
        xargs[key] = ("true" if top else "false") if isinstance(top, bool) else top
    return changed


def prepare_body(body: bytes) -> tuple[dict[str, Any] | None, bool, Any]:
    """Parse a generation body and bring value_steer's keys where vLLM reads them.

    Returns ``(data, changed, spec)``: the parsed object (None: not a JSON object, forward the body as it is),
    whether it must be re-serialised (a key moved, a spec object turned into its JSON string, or a body that was not
    UTF-8), and the steering spec as the client gave it (a dict or a string; None without one).

    Raises:
        SteeringBodyError: see :func:`rewrite_steering_body`.
    """
    parsed = _parse_body(body)
    if parsed is None or not isinstance(parsed[0], dict):
        return None, False, None
    data, utf8 = parsed
    changed = _move_top_level(data) or not utf8
    xargs = data.get("vllm_xargs")
    ours = [k for k in ALL_REQUEST_KEYS if isinstance(xargs, dict) and k in xargs]
    if ours and data.get("use_beam_search"):
        what = "the steering spec" if STEERING_KEY in ours else f"vllm_xargs.{ours[0]}"
        raise SteeringBodyError(f"use_beam_search: beam search does not carry vllm_xargs, so {what} would be ignored "
                                "and the request served unsteered; steer without beam search", "use_beam_search")
    spec = xargs.get(STEERING_KEY) if isinstance(xargs, dict) else None
    if isinstance(spec, dict):
        xargs[STEERING_KEY] = json.dumps(spec, separators=(",", ":"))
        changed = True
    return data, changed, spec


def rewrite_steering_body(body: bytes) -> tuple[bytes | None, Any]:
    """Move a top-level ``"steering"`` / ``"logit_steering"`` of a JSON body into ``vllm_xargs`` (the spec as a JSON
    string).

    Returns ``(new body, spec)``: the rewritten body (None: forward the body as it is) and the spec as the client
    gave it (a dict or a string; None without one). A spec object under ``vllm_xargs.steering`` is turned into its
    JSON string (vLLM's schema takes strings and numbers there). A body in UTF-16 or UTF-32 (which vLLM reads too) is
    re-encoded, so what is checked here is what vLLM reads.

    Raises:
        SteeringBodyError: a key given both ways; a top-level ``steering`` that is neither an object nor a string;
            ``vllm_xargs`` that is not an object while a key must go into it; any value_steer key with
            ``use_beam_search`` (vLLM's beam search builds its own sampling parameters without ``vllm_xargs``: the
            request would be served unsteered); value_steer's ``vllm_xargs`` keys at the top level, near misses of
            its top-level keys (``Steering``, ``steer``); JSON nested too deeply.
    """
    data, changed, spec = prepare_body(body)
    return (_dump(data) if data is not None and changed else None), spec


def spec_vector_names(spec: Any) -> set[str]:
    """The vector names a raw (unvalidated) spec uses: ops' ``vector`` and the gate's ``probe`` strings."""
    if isinstance(spec, str):
        try:
            spec = loads_bounded(spec, STEERING_KEY)
        except RequestArgError:  # the validator names the problem
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


def body_limit() -> int:
    """Bytes of one body the middleware and the registry read (``steering.max_body_bytes``, else the default)."""
    cfg = _api_config()
    return cfg.steering.max_body_bytes if cfg is not None and cfg.steering is not None else DEFAULT_MAX_BODY_BYTES


def _declared_length(scope: MutableMapping[str, Any]) -> int | None:
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> Any:
    return _error(f"body: larger than {limit} bytes (steering.max_body_bytes); send less, or raise the limit", 413,
                  "body")


_PARAM = re.compile(r"[A-Za-z_][\w.\[\]]*")


def _field_of(message: str) -> str | None:
    """The field a value_steer error message names first (``steering.ops[1].min``, ``threshold``)."""
    m = _PARAM.match(message)
    return m.group(0) if m else None


def _body_vfd_problem(data: dict[str, Any]) -> str | None:
    """What in a body VFD cannot filter, read from its fields before vLLM builds the sampling parameters (the
    worker and the validator check the parameters themselves; this makes a streamed request a 400 too)."""
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return "response_format"
    for key in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if data.get(key) is not None:
            return key
    if data.get("logprobs") == -1 or data.get("top_logprobs") == -1:
        return "logprobs"
    return None


def validate_generation_body(data: dict[str, Any]) -> None:
    """Check a generation body's value_steer arguments as the request validator will, before vLLM starts a
    response, so a streamed request with a bad argument is a 400 too, not an error event after a 200.

    Raises:
        RequestArgError: naming the field.
    """
    cfg = _api_config()
    xargs = data.get("vllm_xargs")
    if cfg is None or not isinstance(xargs, dict):
        return  # vLLM answers a vllm_xargs that is not an object; without the server config the validator checks
    steer = parse_request_args(xargs, cfg, default_threshold=0.5, **steering_parse_kwargs())
    if steer.mode == MODE_VFD:
        field = _body_vfd_problem(data)
        if field is not None:
            raise RequestArgError(f"{field}: vfd cannot steer a request with {field} (structured outputs or "
                                  "full-vocabulary logprobs); send vllm_xargs.value_steer=false to serve it unsteered")


class SteeringBodyMiddleware:
    """Raw ASGI middleware over the generation routes (:data:`STEERING_ROUTES`) and the registry's POST.

    For a generation body: the size limit (413, checked on the declared length before reading and while reading),
    :func:`prepare_body` (top-level keys into ``vllm_xargs``, encodings, nesting), the vector-name mirror and the
    layers' residual norms refreshed from the worker where a spec needs them, then
    :func:`validate_generation_body` (400 naming the field, before vLLM starts any response, streamed or not).
    The registry's POST gets the size limit only (its route parses the body itself).

    Raw ASGI rather than ``@app.middleware("http")``: the downstream app must read the rewritten body from
    ``receive``, which an HTTP middleware's ``request.body()`` does not replace. Only those POSTs are
    buffered; everything else passes straight through.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._refresh_lock = asyncio.Lock()
        self._last_refresh = -math.inf
        self._asked_norms = False  # the worker answered once: its residual norms are what it has

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Any) -> None:
        path = _route_path(scope)
        generation = path in STEERING_ROUTES
        if scope["type"] != "http" or scope.get("method") != "POST" or not (generation or path == VECTORS_PATH):
            await self.app(scope, receive, send)
            return
        limit = body_limit()
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        messages: list[MutableMapping[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                await _too_large(limit)(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if messages[-1]["type"] != "http.request" or not generation:  # the client left mid-body; or the registry
            await self.app(scope, _replay(messages, receive), send)
            return
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            data, changed, spec = prepare_body(body)
            if data is not None:
                if spec is not None:
                    await self._refresh_names(scope, spec_vector_names(spec))
                validate_generation_body(data)
        except SteeringBodyError as exc:
            await _error(str(exc), 400, exc.param)(scope, receive, send)
            return
        except RequestArgError as exc:
            await _error(str(exc), 400, _field_of(str(exc)))(scope, receive, send)
            return
        if changed:
            body = _dump(data)
            scope = {**scope, "headers": _with_length(list(scope.get("headers", [])), len(body))}
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _refresh_names(self, scope: MutableMapping[str, Any], names: set[str]) -> None:
        """Load the worker's name table when ``names`` are not all known here (the first spec naming vectors, no
        directory hashing in this process then; or names another API server process registered), or when the
        layers' residual norms (the dose check's reference) were not seen yet. At most once per
        :data:`MIN_REFRESH_S`; a failure leaves the validator to answer."""
        mirror = vector_names()

        def satisfied() -> bool:
            return (not names or mirror.known(names)) and (residual_norms() is not None or self._asked_norms)

        if satisfied():
            return
        client = getattr(getattr(scope.get("app"), "state", None), "engine_client", None)
        if client is None:
            return
        async with self._refresh_lock:  # concurrent misses wait for one refresh, then look again
            if satisfied():
                return
            if time.monotonic() - self._last_refresh < MIN_REFRESH_S:
                return
            self._last_refresh = time.monotonic()
            try:
                results = await client.collective_rpc(VECTORS_RPC, timeout=RPC_TIMEOUT_S, args=("hashes",))
            except Exception:
                logger.warning("value_steer: refreshing vector names from the worker failed", exc_info=True)
                return
            self._asked_norms = True
            observe_vectors_answer("hashes", None, first_answer(results))


# ---- activation steering: the vector registry -----------------------------------------------------------------

_F32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max: larger values become inf in the bank
_REGISTER_KEYS = ("name", "data")


def _bad_entry(row: list) -> int | None:
    """Index of the first entry that is not a finite fp32-range number (bools are not numbers here; an integer
    beyond the float range neither)."""
    for j, x in enumerate(row):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return j
        try:
            if not math.isfinite(x) or abs(x) > _F32_MAX:
                return j
        except OverflowError:
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
        return None if j is None else f"data[{j}] must be a finite float32 number, got {short_repr(data[j])}"
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
            return f"data[{i}][{j}] must be a finite float32 number, got {short_repr(row[j])}"
    return None


async def _vectors_rpc(request: Any, action: str, name: str | None = None, data: list | None = None) -> Any:
    """The worker registry's answer; the name mirror follows it at once (the RPC hook does too: idempotent)."""
    # Every engine's registry answers before the client gets one (data parallel: each engine has its own bank);
    # an engine that refused gives the answer.
    answers = await _rpc_engines(request, VECTORS_RPC, action, name, data)
    answer = next((a for a in answers if isinstance(a, dict) and "error" in a), answers[0])
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


def _admin_problem(request: Any) -> Any | None:
    """The refusal of a registry mutation without ``steering.admin_key`` (when one is configured), else None."""
    cfg = _api_config()
    key = cfg.steering.admin_key if cfg is not None and cfg.steering is not None else None
    if key is None:
        return None
    given = request.headers.get(ADMIN_KEY_HEADER)
    if given is None:
        return _error(f"registering and deleting steering vectors needs the admin key: send it in the "
                      f"{ADMIN_KEY_HEADER} header (steering.admin_key)", 401, ADMIN_KEY_HEADER)
    if not hmac.compare_digest(given.encode(), key.encode()):
        return _error(f"{ADMIN_KEY_HEADER}: wrong admin key", 403, ADMIN_KEY_HEADER)
    return None


async def _register_vector(request: Request) -> Any:
    refused = _admin_problem(request)
    if refused is not None:
        return refused
    try:
        body = loads_bounded(await request.body(), "body")
    except JSONSyntaxError:
        body = None  # answered below with the shape a registration needs
    except RequestArgError as exc:  # too deep, or a number Python will not read
        return _error(str(exc), 400, "body")
    if not isinstance(body, dict):
        return _error('the body must be a JSON object {"name": "<vector name>", "data": [...]}', 400)
    unknown = sorted(str(k) for k in body if k not in _REGISTER_KEYS)
    if unknown:
        return _error(f"unknown key(s) {unknown}; allowed: {list(_REGISTER_KEYS)}", 400, unknown[0])
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return _error(f"name must be a vector name ({NAME_RULE}), got {short_repr(name)}", 400, "name")
    hidden_size, num_layers = model_facts()
    problem = vector_data_problem(body.get("data"), hidden_size, num_layers)
    if problem is not None:
        return _error(problem, 400, "data")
    return _answer(await _vectors_rpc(request, "register", name, body["data"]))


async def _delete_vector(request: Request, name: str) -> Any:
    refused = _admin_problem(request)
    if refused is not None:
        return refused
    if not NAME_RE.fullmatch(name):
        return _error(f"name must be a vector name ({NAME_RULE}), got {short_repr(name)}", 400, "name")
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
