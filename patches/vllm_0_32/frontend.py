"""The frontend (API server / ``LLM``) process side of activation steering for vLLM 0.32: vector names, the
prefix-cache salt and the fingerprint the worker checks.

- :class:`FrontendVectorNames` (one per process, :func:`vector_names`): the name -> content-hash mirror of
  the worker's vector bank. It starts from the server's ``steering.vectors`` directory, hashed with the bank's
  own rules (a CPU :class:`~value_steer.runtime.activation.VectorBank` loads it), lazily on the first request
  that names a vector; it follows the registry (``value_steer_vectors`` RPC answers seen by
  :func:`observe_vectors_answer`) and can be replaced by the worker's own table (action ``"hashes"``).
- :func:`salt_request`: after vLLM's ``InputProcessor.process_inputs`` (which runs the request validator,
  so a bad spec is already an HTTP 400), a request carrying a ``steering`` spec gets
  ``cache_salt = "value_steer:<fingerprint>[:<client salt>]"`` and ``extra_args[FINGERPRINT_KEY] =
  <fingerprint>``. Every steered request is salted, whatever tokens it edits: vLLM also caches the full
  blocks of generated tokens, so a decode-only spec changes cached KV too (docs/activation-steering.md).
  The client's own salt is kept inside ours, so it still isolates tenants; a client salt that starts with
  ``value_steer:`` is refused (it could name a steered request's blocks from an unsteered request).
- :func:`install_frontend_hooks` (called by the start-up hook, once per process): wraps
  ``InputProcessor.process_inputs`` with :func:`salt_request` for engines that run value_steer's worker, and
  ``LLMEngine.collective_rpc`` / ``AsyncLLM.collective_rpc`` with :func:`observe_vectors_answer`, so the
  mirror follows registrations made offline (``llm.collective_rpc("value_steer_vectors", ...)``) as well as
  over HTTP.
- :func:`remember_model`: the model facts (hidden size, decoder layers) the mirror and the validator check
  specs against, taken from the engine config the start-up hook builds.

Where errors go: the wrapped ``process_inputs`` raises ``VLLMValidationError`` with the ``RequestArgError``'s
message, as vLLM does for a validator's ``ValueError`` (``validate_logits_processors_parameters``). The OpenAI
server answers it with HTTP 400 (``serve/exception_handling``: the ``VLLMError`` handler,
``create_error_response``: ``VLLMValidationError`` -> ``BadRequestError``), for a streamed response as an
error event; offline ``LLM.generate`` raises it to the caller.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from vllm.exceptions import GracefulHTTPError

from value_steer.core.config import STEERING_KEY, RequestArgError, parse_request_args
from value_steer.core.steering_spec import InlineVector, SteeringSpec, VectorRef, fingerprint, inline_norm
from value_steer.patches.vllm_0_32.api import (
    _TYPE_CHECK_ONLY,
    _api_config,
    is_request_validator,
    set_steering_context,
)

logger = logging.getLogger("value_steer")

# The worker reads the spec's fingerprint from here, recomputes it with its own bank and refuses the request
# on a mismatch (a vector re-registered between admission and scheduling). Set only by salt_request; a
# client that sends it is refused.
FINGERPRINT_KEY = "_value_steer_fingerprint"
# ``{name: content hash}`` of the named vectors the spec was admitted with: the worker runs the request with those
# versions even when a name is re-registered or deleted before it is scheduled. Set only by salt_request too.
PINS_KEY = "_value_steer_pins"
RESERVED_KEYS = (FINGERPRINT_KEY, PINS_KEY)
# Every steered request's cache salt starts with this; client salts may not.
SALT_PREFIX = "value_steer:"
VECTORS_RPC = "value_steer_vectors"


# ---- model facts ----------------------------------------------------------------------------------------------

_MODEL: tuple[int, int] | None = None  # (hidden size, decoder layers)


def remember_model(vllm_config: Any) -> None:
    """Keep the model's hidden size and decoder-layer count for the validator and the vector mirror.

    Called by the start-up hook with the engine config it built (the API process and ``LLM`` never see the
    worker's model otherwise). The layer count is the one the worker's bank and layer wrapping use
    (``ModelConfig.get_num_layers(parallel_config)``; pipeline parallelism is refused at start-up, so it is
    the whole model).
    """
    global _MODEL, _RESIDUAL_NORMS
    model_config = vllm_config.model_config
    _MODEL = (int(model_config.get_hidden_size()), int(model_config.get_num_layers(vllm_config.parallel_config)))
    _RESIDUAL_NORMS = None  # a new engine's model: its norms come with its worker's first "hashes" answer


def _set_model_facts(hidden_size: int, num_layers: int) -> None:
    global _MODEL
    if _MODEL is None:
        _MODEL = (int(hidden_size), int(num_layers))


_RESIDUAL_NORMS: tuple[float, ...] | None = None


def model_facts() -> tuple[int | None, int | None]:
    """``(hidden size, decoder layers)``, or ``(None, None)`` before :func:`remember_model` ran."""
    return _MODEL if _MODEL is not None else (None, None)


def set_residual_norms(norms: Iterable[float]) -> None:
    """The worker's start-up measurement of each decoder layer's typical residual norm (its ``"hashes"`` answer)."""
    global _RESIDUAL_NORMS
    _RESIDUAL_NORMS = tuple(float(x) for x in norms)


def residual_norms() -> tuple[float, ...] | None:
    """``[num_layers]`` typical residual norms, or None before the worker's answer was seen."""
    return _RESIDUAL_NORMS


# ---- the name -> content-hash mirror --------------------------------------------------------------------------


def vector_dir_facts(path: str, hidden_size: int, num_layers: int,
                     max_vectors: int) -> dict[str, tuple[str, tuple[float, ...]]]:
    """``{name: (content hash, per-row norms)}`` of a ``steering.vectors`` directory, as the worker's bank loads it.

    A CPU :class:`VectorBank` runs ``load_dir`` (same file rules, same validation, same hashes), sized to
    what the files can need (one slot per row) but never more than the worker's ``max_vectors``, so a
    directory the worker could not hold fails here too. The bank is dropped afterwards.
    """
    from value_steer.runtime.activation import VectorBank

    files = sum(1 for f in os.listdir(path) if f.endswith(".safetensors"))
    if files == 0:
        return {}
    bank = VectorBank(max(1, min(max_vectors, files * num_layers)), hidden_size, num_layers, "cpu")
    return {info.name: (info.content_hash, info.norms) for info in bank.load_dir(path)}


def _load_configured_vectors() -> dict[str, tuple[str, tuple[float, ...]]]:
    """The mirror's start: the server config's ``steering.vectors`` directory (empty without one)."""
    cfg = _api_config()
    if cfg is None or cfg.steering is None or not cfg.steering.vectors:
        return {}
    hidden_size, num_layers = model_facts()
    if hidden_size is None or num_layers is None:
        raise RuntimeError(
            "value_steer: the vector names of steering.vectors cannot be resolved in this process: the model's "
            "hidden size and layer count are unknown (the start-up hook did not call remember_model)"
        )
    return vector_dir_facts(cfg.steering.vectors, hidden_size, num_layers, cfg.steering.max_vectors)


class FrontendVectorNames:
    """Thread-safe mirror of the worker bank's names: ``name -> content hash`` (and the per-row norms, for the
    dose check, where known).

    Loaded lazily by ``loader`` (the configured directory) on the first lookup; :meth:`update` /
    :meth:`remove` made before that are kept and applied on top of the load, so a registration seen early
    is never undone by the directory. :meth:`replace` installs the worker's own table (authoritative).
    ``process_inputs`` may run on the renderer's thread pool, hence the lock.

    Args:
        loader: returns the starting ``{name: content hash}`` or ``{name: (content hash, norms)}`` (default: the
            configured directory).
    """

    def __init__(self, loader: Callable[[], Mapping[str, Any]] = _load_configured_vectors) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._hashes: dict[str, str] | None = None
        self._norms: dict[str, tuple[float, ...]] = {}  # by content hash
        self._pending: dict[str, str | None] = {}  # updates before the load (None: removed)
        self.refreshed_at = 0.0  # time.monotonic() of the last replace() (0: never)

    def _split(self, entries: Mapping[str, Any]) -> dict[str, str]:
        hashes = {}
        for name, v in entries.items():
            if isinstance(v, tuple):
                hashes[name] = v[0]
                self._norms[v[0]] = tuple(v[1])
            else:
                hashes[name] = v
        return hashes

    @property
    def loaded(self) -> bool:
        return self._hashes is not None

    def _table(self) -> dict[str, str]:
        # Caller holds the lock. A failed load raises and is retried by the next lookup.
        if self._hashes is None:
            table = self._split(self._loader())
            for name, h in self._pending.items():
                if h is None:
                    table.pop(name, None)
                else:
                    table[name] = h
            self._pending.clear()
            self._hashes = table
        return self._hashes

    def content_hash(self, name: str) -> str | None:
        """The content hash ``name`` stands for, or None when no vector of that name is known."""
        with self._lock:
            return self._table().get(name)

    def norms(self, content_hash: str) -> tuple[float, ...] | None:
        """The per-row norms of the vector with ``content_hash`` (one for ``[H]``), or None when not known."""
        with self._lock:
            return self._norms.get(content_hash)

    def resolve(self, name: str) -> bool:
        """Whether ``name`` is known (the ``resolve`` callable of ``parse_steering_spec``)."""
        return self.content_hash(name) is not None

    def known(self, names: Iterable[str]) -> bool:
        """Whether every name is known, without loading (False when not loaded yet)."""
        with self._lock:
            return self._hashes is not None and all(n in self._hashes for n in names)

    def _prune_norms(self) -> None:
        # Caller holds the lock. Norms of contents no name holds any more go (registry churn must not grow this).
        if self._hashes is not None and len(self._norms) > 2 * len(self._hashes) + 16:
            live = set(self._hashes.values()) | {h for h in self._pending.values() if h is not None}
            self._norms = {h: n for h, n in self._norms.items() if h in live}

    def update(self, name: str, content_hash: str, norms: Iterable[float] | None = None) -> None:
        """``name`` now stands for ``content_hash`` (the worker confirmed a registration)."""
        with self._lock:
            if norms is not None:
                self._norms[content_hash] = tuple(float(x) for x in norms)
                self._prune_norms()
            if self._hashes is None:
                self._pending[name] = content_hash
            else:
                self._hashes[name] = content_hash

    def remove(self, name: str) -> None:
        """``name`` is gone (the worker confirmed a deletion, or does not know it)."""
        with self._lock:
            if self._hashes is None:
                self._pending[name] = None
            else:
                self._hashes.pop(name, None)

    def replace(self, hashes: Mapping[str, str], norms: Mapping[str, Iterable[float]] | None = None) -> None:
        """Install the worker's whole table (its ``"hashes"`` or ``"list"`` answer; ``norms`` by name)."""
        with self._lock:
            for name, n in (norms or {}).items():
                if name in hashes:
                    self._norms[hashes[name]] = tuple(float(x) for x in n)
            self._hashes = dict(hashes)
            self._pending.clear()
            self._prune_norms()
            self.refreshed_at = time.monotonic()

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._table())


_NAMES = FrontendVectorNames()


def vector_names() -> FrontendVectorNames:
    """This process's mirror."""
    return _NAMES


def steering_parse_kwargs() -> dict[str, Any]:
    """What the request validator passes to ``parse_request_args`` for a steering spec: the model facts
    (None where unknown) and the mirror's ``resolve``, so an unknown vector, a wrong length or a layer out
    of range is an HTTP 400 at admission."""
    hidden_size, num_layers = model_facts()
    return {"hidden_size": hidden_size, "num_layers": num_layers, "resolve": _NAMES.resolve,
            "residual_norms": _RESIDUAL_NORMS, "vector_norm": _vector_norm}


def _vector_norm(ref: VectorRef, layer: int, names: FrontendVectorNames | None = None) -> float | None:
    """The norm of the vector an op at ``layer`` uses, from the mirror (None where it does not know it)."""
    if not isinstance(ref, str):
        return inline_norm(ref)
    names = names if names is not None else _NAMES
    h = names.content_hash(ref)
    norms = names.norms(h) if h is not None else None
    if not norms:
        return None
    return norms[layer] if len(norms) > 1 and 0 <= layer < len(norms) else norms[0]


# ---- fingerprint and salt -------------------------------------------------------------------------------------


def spec_fingerprint(spec: SteeringSpec, names: FrontendVectorNames) -> str:
    """The spec's fingerprint (:func:`spec_pins`)."""
    return spec_pins(spec, names)[0]


def spec_pins(spec: SteeringSpec, names: FrontendVectorNames) -> tuple[str, dict[str, str]]:
    """``(fingerprint, {name: content hash})``: every name resolved ONCE through ``names`` (a name re-registered
    meanwhile cannot give one request two hashes). Raises ``RequestArgError`` naming the field of an unknown
    name."""
    hashes: dict[str, str] = {}
    for field, ref, _layer in spec.vector_refs():
        if isinstance(ref, str) and ref not in hashes:
            h = names.content_hash(ref)
            if h is None:
                raise RequestArgError(
                    f"{field}: unknown vector {ref!r} (no vector of that name is registered on this server; "
                    "register it, or send the vector inline)"
                )
            hashes[ref] = h

    def vector_hash(ref: VectorRef) -> str:
        return ref.content_hash if isinstance(ref, InlineVector) else hashes[ref]

    return fingerprint(spec, vector_hash), hashes


def steered_cache_salt(fingerprint_hex: str, client_salt: str | None) -> str:
    """The cache salt of a steered request: our prefix, the fingerprint (fixed length, so the string is
    unambiguous), then the client's salt when it sent one (tenants stay isolated)."""
    salt = SALT_PREFIX + fingerprint_hex
    return f"{salt}:{client_salt}" if client_salt else salt


def salt_request(request: Any, names: FrontendVectorNames | None = None) -> None:
    """Salt an ``EngineCoreRequest`` that carries a steering spec and stamp its fingerprint (in place).

    ``request.sampling_params`` is ``process_inputs``' own clone of the caller's parameters; its
    ``extra_args`` is replaced by a new dict rather than written into, because a shallow clone
    (``skip_clone``) shares the caller's dict. Requests without a spec are left as they are (beyond the
    two reserved-value checks). Raises ``RequestArgError`` (HTTP 400) naming the field.
    """
    sp = request.sampling_params
    if sp is None:  # a pooling request
        return
    args = sp.extra_args or {}
    client_salt = request.cache_salt
    if client_salt and client_salt.startswith(SALT_PREFIX):
        raise RequestArgError(
            f"cache_salt: values starting with {SALT_PREFIX!r} are reserved for steered requests; choose another salt"
        )
    if not isinstance(args, dict):
        return  # the validator already refused it
    for key in RESERVED_KEYS:
        if key in args:
            raise RequestArgError(f"{key} is set by the server; remove it from vllm_xargs / extra_args")
    if args.get(STEERING_KEY) is None:
        return
    hidden_size, num_layers = model_facts()
    # Names are resolved once, in spec_fingerprint (the validator checked them at admission already).
    steer = parse_request_args(args, _api_config() or _TYPE_CHECK_ONLY, default_threshold=0.5,
                               hidden_size=hidden_size, num_layers=num_layers)
    if steer.steering is None:  # not reached: a non-None spec parses or raises
        return
    fp, pins = spec_pins(steer.steering, names if names is not None else _NAMES)
    sp.extra_args = {**args, FINGERPRINT_KEY: fp, PINS_KEY: pins}
    request.cache_salt = steered_cache_salt(fp, client_salt)


# ---- the registry's answers -----------------------------------------------------------------------------------


def _call_action(args: tuple, kwargs: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    kwargs = kwargs or {}
    action = args[0] if args else kwargs.get("action")
    name = args[1] if len(args) > 1 else kwargs.get("name")
    return (action if isinstance(action, str) else None), (name if isinstance(name, str) else None)


async def rpc_each_engine(client: Any, method: str, args: tuple = (), timeout: float | None = None) -> list[Any]:
    """``collective_rpc`` on every engine of ``client`` (an ``AsyncLLM``): one list of worker answers per engine.

    Under ``--data-parallel-size N`` vLLM's ``collective_rpc`` asks every engine but returns the first engine's
    answer only (``DPLBAsyncMPClient.call_utility_async``); a request's stats live on the engine that served it, a
    refusal on the engine that refused it, and each engine has its own counters and registry. Without data
    parallelism this is ``[client.collective_rpc(...)]``."""
    core = getattr(client, "engine_core", None)
    engines = getattr(core, "core_engines", None)
    if core is not None and isinstance(engines, list) and len(engines) > 1 and hasattr(core, "call_utility_all_async"):
        return list(await core.call_utility_all_async("collective_rpc", method, timeout, args, None))
    return [await client.collective_rpc(method, timeout=timeout, args=args)]


def sum_counters(answers: list[Any]) -> dict[str, Any]:
    """The engines' ``counters`` summed key by key (numbers added, nested dicts summed the same way)."""

    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return a + b
        return a

    total: Any = None
    for answer in answers:
        counters = answer.get("counters") if isinstance(answer, dict) else None
        if isinstance(counters, dict):
            total = counters if total is None else add(total, counters)
    return total or {}


def first_answer(results: Any) -> Any:
    """One answer for all workers: the first error if any worker refused (tensor-parallel workers hold the
    same bank, so they should agree), else the first answer."""
    if not isinstance(results, list):
        return results
    for r in results:
        if isinstance(r, dict) and "error" in r:
            return r
    return results[0] if results else None


def observe_vectors_answer(action: str | None, name: str | None, answer: Any,
                           names: FrontendVectorNames | None = None) -> None:
    """Bring the mirror in line with a ``value_steer_vectors`` answer (idempotent; errors change nothing,
    except a 404 on delete: the worker does not know the name either)."""
    names = names if names is not None else _NAMES
    if not isinstance(answer, dict):
        return
    if "error" in answer:
        if action == "delete" and answer.get("status") == 404 and name:
            names.remove(name)
        return
    if action == "register" and isinstance(answer.get("vector"), dict):
        v = answer["vector"]
        names.update(v["name"], v["hash"], v.get("norms"))
    elif action == "delete" and isinstance(answer.get("deleted"), str):
        names.remove(answer["deleted"])
    elif action == "list" and isinstance(answer.get("vectors"), list):
        names.replace({v["name"]: v["hash"] for v in answer["vectors"]},
                      {v["name"]: v["norms"] for v in answer["vectors"] if "norms" in v})
    elif action == "hashes" and isinstance(answer.get("hashes"), dict):
        if answer.get("hidden_size") and answer.get("num_layers"):
            _set_model_facts(answer["hidden_size"], answer["num_layers"])
        if isinstance(answer.get("residual_norms"), list):
            set_residual_norms(answer["residual_norms"])
        names.replace(answer["hashes"], answer.get("norms"))


def _observe_rpc(method: Any, args: tuple, kwargs: Mapping[str, Any] | None, results: Any) -> None:
    if method != VECTORS_RPC:
        return
    try:
        action, name = _call_action(tuple(args or ()), kwargs)
        observe_vectors_answer(action, name, first_answer(results))
    except Exception:  # the caller's RPC succeeded; a malformed answer must not turn it into an error
        logger.exception("value_steer: could not follow a %s answer", VECTORS_RPC)


# ---- installation ---------------------------------------------------------------------------------------------


class SteeringRefusedError(GracefulHTTPError):
    """A request the worker refused (a check only it could make): the client gets an HTTP 409 with the reason
    (for a streamed response, an error event), never an empty 200."""

    def __init__(self, message: str) -> None:
        super().__init__(message, HTTPStatus.CONFLICT)


def _maybe_refused(out: Any) -> bool:
    # A refused request ends at its first step on its end token: one token at most, finish reason "stop".
    return bool(out.outputs) and all(len(c.token_ids) <= 1 and c.finish_reason == "stop" for c in out.outputs)


async def _raise_if_refused(engine: Any, request_id: str) -> None:
    """Ask the worker whether ``request_id`` (or one of its choices) was refused; raise its reason if so."""
    try:
        per_engine = await rpc_each_engine(engine, "value_steer_stats", (request_id,), 10.0)
    except Exception:  # the answer stands; the stats route still has the reason
        logger.warning("value_steer: could not ask the worker about request %s", request_id, exc_info=True)
        return
    for results in per_engine:  # data parallel: the engine that served it knows it
        answer = first_answer(results)
        stats = answer.get("stats") if isinstance(answer, dict) else None
        if not isinstance(stats, dict):
            continue
        for s in [stats, *(c.get("stats") or {} for c in stats.get("choices", ()))]:
            if s.get("error"):
                raise SteeringRefusedError(str(s["error"]))


def _steers_engine(engine: Any) -> bool:
    return any(is_request_validator(p) for p in (engine.vllm_config.model_config.logits_processors or ()))


def _steers(processor: Any) -> bool:
    # Only engines that run value_steer's worker (the start-up hook gave them the request validator):
    # another engine in the process may use "steering" in its extra_args for something else.
    return any(is_request_validator(p) for p in (processor.vllm_config.model_config.logits_processors or ()))


def install_frontend_hooks() -> None:
    """Wrap ``InputProcessor.process_inputs`` (cache salt, fingerprint) and ``LLMEngine.collective_rpc`` /
    ``AsyncLLM.collective_rpc`` (the vector mirror follows registrations), once per process; give the
    request validator the model facts and the mirror (``api.set_steering_context``).

    Must run before the engine's ``InputProcessor`` is built: its ``process_inputs_async`` is bound to
    ``self.process_inputs`` in ``__init__`` (the start-up hook runs before vLLM builds the engine).
    """
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.llm_engine import LLMEngine

    set_steering_context(steering_parse_kwargs)

    original = InputProcessor.process_inputs
    if not getattr(original, "_value_steer_salt", False):

        @functools.wraps(original)
        def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
            request = original(self, *args, **kwargs)  # runs the validator: a bad spec has been refused
            if _steers(self):
                try:
                    salt_request(request)
                except RequestArgError as exc:
                    # vLLM's own class for a refused request (its validators' ValueErrors become one too).
                    raise VLLMValidationError(str(exc)) from exc
            return request

        process_inputs._value_steer_salt = True  # type: ignore[attr-defined]
        InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]

    engine_init = LLMEngine.__init__
    if not getattr(engine_init, "_value_steer_facts", False):

        @functools.wraps(engine_init)
        def init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
            engine_init(self, vllm_config, *args, **kwargs)
            cfg = _api_config()
            if cfg is not None and cfg.steering is not None and any(
                    is_request_validator(p) for p in (vllm_config.model_config.logits_processors or ())):
                # Offline engines have no body middleware: learn the names and the residual norms now, so the
                # validator checks doses at admission (the collective_rpc hook below records the answer).
                self.collective_rpc(VECTORS_RPC, args=("hashes",))

        init._value_steer_facts = True  # type: ignore[attr-defined]
        LLMEngine.__init__ = init  # type: ignore[method-assign]

    generate = AsyncLLM.generate
    if not getattr(generate, "_value_steer_refusals", False):

        @functools.wraps(generate)
        async def generate_checked(self: Any, *args: Any, **kwargs: Any) -> Any:
            async for out in generate(self, *args, **kwargs):
                if out.finished and _steers_engine(self) and _maybe_refused(out):
                    await _raise_if_refused(self, out.request_id)
                yield out

        generate_checked._value_steer_refusals = True  # type: ignore[attr-defined]
        AsyncLLM.generate = generate_checked  # type: ignore[method-assign]

    sync_rpc = LLMEngine.collective_rpc
    if not getattr(sync_rpc, "_value_steer_names", False):

        @functools.wraps(sync_rpc)
        def collective_rpc(self: Any, method: Any, timeout: float | None = None, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
            results = sync_rpc(self, method, timeout, args, kwargs)
            _observe_rpc(method, args, kwargs, results)
            return results

        collective_rpc._value_steer_names = True  # type: ignore[attr-defined]
        LLMEngine.collective_rpc = collective_rpc  # type: ignore[method-assign]

    async_rpc = AsyncLLM.collective_rpc
    if not getattr(async_rpc, "_value_steer_names", False):

        @functools.wraps(async_rpc)
        async def collective_rpc_async(self: Any, method: str, timeout: float | None = None, args: tuple = (),
                                       kwargs: dict | None = None) -> Any:
            results = await async_rpc(self, method, timeout, args, kwargs)
            _observe_rpc(method, args, kwargs, results)
            return results

        collective_rpc_async._value_steer_names = True  # type: ignore[attr-defined]
        AsyncLLM.collective_rpc = collective_rpc_async  # type: ignore[method-assign]
