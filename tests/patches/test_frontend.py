"""Activation steering in the frontend process: the vector-name mirror (same hashes as the worker's bank), the
cache salt and fingerprint on a real ``InputProcessor``, the validator's model checks, the body rewrite
middleware and the vector registry routes (against a fake engine client). No engine runs here."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi import Request
from safetensors.torch import save_file

from value_steer.core.config import RequestArgError
from value_steer.core.steering_spec import InlineVector, fingerprint, parse_steering_spec, vector_content_hash
from value_steer.patches.vllm_0_32 import api, frontend, http
from value_steer.patches.vllm_0_32.frontend import (
    FINGERPRINT_KEY,
    SALT_PREFIX,
    FrontendVectorNames,
    salt_request,
    spec_fingerprint,
    steered_cache_salt,
    vector_dir_facts,
)
from value_steer.patches.vllm_0_32.worker import REQUEST_VALIDATOR
from value_steer.runtime.activation import VectorBank

H, L = 64, 2  # the session's tiny Llama (tests/conftest.py: tiny_model_dir)


def _vec(seed: int, rows: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, H) if rows else (H,), generator=g)


@pytest.fixture
def vector_dir(tmp_path):
    d = tmp_path / "vectors"
    d.mkdir()
    save_file({"v": _vec(0)}, str(d / "calm.safetensors"))
    save_file({"v": _vec(1, L)}, str(d / "layers.safetensors"))
    (d / "README.txt").write_text("not a vector")
    return d


@pytest.fixture
def steering_server(monkeypatch, vector_dir):
    """The published server config (a steering section over ``vector_dir``), the model facts and a fresh
    process mirror; all restored afterwards."""
    monkeypatch.setenv(api.CONFIG_ENV, json.dumps({"steering": {"vectors": str(vector_dir), "max_ops_per_request": 4}}))
    monkeypatch.setattr(api, "_API_CONFIG", None)
    monkeypatch.setattr(frontend, "_MODEL", (H, L))
    monkeypatch.setattr(frontend, "_RESIDUAL_NORMS", None)  # not learnt from an engine here
    names = FrontendVectorNames()
    monkeypatch.setattr(frontend, "_NAMES", names)
    return names


def _worker_bank(vector_dir) -> VectorBank:
    bank = VectorBank(16, H, L, "cpu")
    bank.load_dir(str(vector_dir))
    return bank


# ---- the mirror -----------------------------------------------------------------------------------------------


def test_mirror_hashes_equal_the_worker_bank(vector_dir):
    bank = _worker_bank(vector_dir)
    hashes = {n: h for n, (h, _) in vector_dir_facts(str(vector_dir), H, L, max_vectors=64).items()}
    assert hashes == {"calm": bank.lookup("calm").content_hash, "layers": bank.lookup("layers").content_hash}
    assert hashes["calm"] == vector_content_hash(_vec(0))  # an [H] entry: its fp32 bytes' sha256


def test_mirror_loads_lazily_from_the_configured_directory(steering_server, vector_dir):
    names = steering_server
    assert not names.loaded
    names.update("fresh", "f" * 64)  # seen before the load: kept on top of it
    names.remove("calm")
    assert names.resolve("layers") and names.loaded
    assert names.content_hash("fresh") == "f" * 64 and not names.resolve("calm")
    names.replace({"only": "0" * 64})  # the worker's own table wins outright
    assert names.snapshot() == {"only": "0" * 64}


def test_mirror_without_model_facts_says_why(steering_server, monkeypatch):
    monkeypatch.setattr(frontend, "_MODEL", None)
    with pytest.raises(RuntimeError, match="remember_model"):
        steering_server.resolve("calm")


def test_remember_model_reads_the_engine_config(monkeypatch):
    monkeypatch.setattr(frontend, "_MODEL", None)
    model_config = SimpleNamespace(get_hidden_size=lambda: 96, get_num_layers=lambda parallel: 7)
    frontend.remember_model(SimpleNamespace(model_config=model_config, parallel_config=None))
    assert frontend.model_facts() == (96, 7)


# ---- fingerprint and salt -------------------------------------------------------------------------------------

SPEC = {"ops": [{"layer": 1, "op": "add", "vector": "calm", "scale": 2.0},
                {"layer": 0, "op": "ablate", "vector": "layers", "tokens": "decode"}],
        "gate": {"layer": 1, "probe": [0.5] * H}}


def test_fingerprint_matches_the_worker_bank(steering_server, vector_dir):
    bank = _worker_bank(vector_dir)
    spec = parse_steering_spec(SPEC, hidden_size=H, num_layers=L, max_ops=4, max_inline_floats=4 * H)
    assert spec_fingerprint(spec, steering_server) == fingerprint(spec, bank.vector_hash)
    # A name re-registered with new data is a new vector: a new fingerprint. (Preloaded names are read-only, so
    # the worker's "calm" here is one registered over the registry: the same data, then new data.)
    bank._readonly.discard("calm")
    steering_server.update("calm", bank.register("calm", _vec(5)).content_hash)
    assert spec_fingerprint(spec, steering_server) == fingerprint(spec, bank.vector_hash)
    assert spec_fingerprint(spec, steering_server) != fingerprint(spec, _worker_bank(vector_dir).vector_hash)


def _request(extra_args: dict | None, cache_salt: str | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(request_id="r", prompt_token_ids=[1, 2], mm_features=None,
                             sampling_params=SamplingParams(max_tokens=4, extra_args=extra_args),
                             pooling_params=None, arrival_time=0.0, lora_request=None, cache_salt=cache_salt,
                             data_parallel_rank=None)


def test_salt_request_salts_every_steering_spec(steering_server):
    caller_args = {"steering": json.dumps(SPEC), "other_plugin": 1}
    req = _request(caller_args)
    salt_request(req)
    fp = req.sampling_params.extra_args[FINGERPRINT_KEY]
    assert req.cache_salt == SALT_PREFIX + fp == steered_cache_salt(fp, None)
    assert req.sampling_params.extra_args["other_plugin"] == 1
    assert FINGERPRINT_KEY not in caller_args  # a new dict: a shallow clone shares the caller's
    # The client's salt stays inside ours (tenant isolation); the same spec gives the same fingerprint.
    tenant = _request({"steering": SPEC}, cache_salt="tenant-a")
    salt_request(tenant)
    assert tenant.cache_salt == f"{SALT_PREFIX}{fp}:tenant-a"
    # Decode-only specs salt too (vLLM caches generated blocks).
    decode_only = _request({"steering": {"ops": [{"layer": 0, "op": "add", "vector": "calm", "tokens": "decode"}]}})
    salt_request(decode_only)
    assert decode_only.cache_salt.startswith(SALT_PREFIX) and decode_only.cache_salt != req.cache_salt


def test_salt_request_leaves_unsteered_requests_and_refuses_reserved_values(steering_server):
    plain = _request({"threshold": 0.3}, cache_salt="mine")
    salt_request(plain)
    assert plain.cache_salt == "mine" and plain.sampling_params.extra_args == {"threshold": 0.3}
    none = _request({"steering": None})
    salt_request(none)
    assert none.cache_salt is None
    with pytest.raises(RequestArgError, match="cache_salt: values starting with 'value_steer:' are reserved"):
        salt_request(_request(None, cache_salt=SALT_PREFIX + "0" * 64))
    with pytest.raises(RequestArgError, match=f"{FINGERPRINT_KEY} is set by the server"):
        salt_request(_request({"steering": SPEC, FINGERPRINT_KEY: "forged"}))
    with pytest.raises(RequestArgError, match=r"steering\.ops\[0\]\.vector: unknown vector 'nope'"):
        salt_request(_request({"steering": {"ops": [{"layer": 0, "op": "add", "vector": "nope"}]}}))


def test_fingerprint_key_is_not_a_request_key():
    """The worker parses extra_args with the stamped key in them: it must not read as a misspelling."""
    from value_steer.core.config import misspelled_request_keys

    assert misspelled_request_keys({FINGERPRINT_KEY: "x"}) == {}


# ---- a real InputProcessor ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_config(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(tiny_model_dir), max_model_len=256, logits_processors=[REQUEST_VALIDATOR]
                      ).create_engine_config()


@pytest.fixture
def hooked(monkeypatch, engine_config, steering_server):
    """install_frontend_hooks on the real classes; the originals come back after the test."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.llm_engine import LLMEngine

    for owner, attr in ((InputProcessor, "process_inputs"), (LLMEngine, "collective_rpc"),
                        (AsyncLLM, "collective_rpc"), (LLMEngine, "__init__"), (AsyncLLM, "generate"),
                        (api, "_STEERING_CONTEXT")):
        monkeypatch.setattr(owner, attr, getattr(owner, attr))
    frontend.install_frontend_hooks()
    frontend.install_frontend_hooks()  # idempotent
    assert not getattr(InputProcessor.process_inputs.__wrapped__, "_value_steer_salt", False)
    frontend.remember_model(engine_config)
    return InputProcessor(engine_config)


def _process(ip, extra_args, salt=None, run_async=False):
    from vllm import SamplingParams
    from vllm.inputs import tokens_input

    args = ("r1", tokens_input([1, 2, 3], cache_salt=salt), SamplingParams(max_tokens=4, extra_args=extra_args))
    if not run_async:
        return ip.process_inputs(*args, supported_tasks=("generate",))

    async def in_loop() -> Any:  # make_async needs a running loop
        return await ip.process_inputs_async(*args, supported_tasks=("generate",))

    return asyncio.run(in_loop())


def test_process_inputs_salts_steered_requests(hooked):
    assert frontend.model_facts() == (H, L)
    caller = {"steering": SPEC}
    req = _process(hooked, caller, salt="t1")
    fp = req.sampling_params.extra_args[FINGERPRINT_KEY]
    assert req.cache_salt == f"{SALT_PREFIX}{fp}:t1" and caller == {"steering": SPEC}
    # process_inputs_async is bound in InputProcessor.__init__: built after the hook, it salts too.
    assert _process(hooked, {"steering": SPEC}, salt="t1", run_async=True).cache_salt == req.cache_salt
    plain = _process(hooked, {"value_steer": False}, salt="t1")
    assert plain.cache_salt == "t1" and FINGERPRINT_KEY not in plain.sampling_params.extra_args


@pytest.mark.parametrize(("spec", "message"), [
    ({"ops": [{"layer": 0, "op": "add", "vector": "nope"}]}, r"steering\.ops\[0\]\.vector: unknown vector 'nope'"),
    ({"ops": [{"layer": L, "op": "add", "vector": "calm"}]},
     r"steering\.ops\[0\]\.layer must be an integer in \[0, 2\)"),
    ({"ops": [{"layer": 0, "op": "add", "vector": [1.0] * (H - 1)}]},
     rf"steering\.ops\[0\]\.vector must have exactly {H} floats"),
])
def test_process_inputs_refuses_specs_the_model_cannot_take(hooked, spec, message):
    """The validator (inside process_inputs) checks names, layers and lengths: an HTTP 400 at admission."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        _process(hooked, {"steering": json.dumps(spec)})


def test_process_inputs_refusals_are_vllm_validation_errors(hooked):
    """The salt's own refusals surface as vLLM's validation error (HTTP 400), like the validator's."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="cache_salt: values starting with 'value_steer:'"):
        _process(hooked, None, salt=SALT_PREFIX + "x")
    with pytest.raises(VLLMValidationError, match=f"{FINGERPRINT_KEY} is set by the server"):
        _process(hooked, {FINGERPRINT_KEY: "forged"})


def test_other_engines_are_not_salted(hooked):
    other = SimpleNamespace(vllm_config=SimpleNamespace(model_config=SimpleNamespace(logits_processors=None)))
    assert not frontend._steers(other) and frontend._steers(hooked)
    for proc in (REQUEST_VALIDATOR, "value_steer.patches.vllm_0_32.api.RequestArgsValidator",
                 "value_steer.patches.vllm_0_32.api:RequestArgsValidator", api.RequestArgsValidator):
        assert api.is_request_validator(proc), proc
    for proc in ("other.module:RequestArgsValidator", "value_steer.patches.vllm_0_32:Other", object):
        assert not api.is_request_validator(proc), proc


def test_validator_checks_specs_only_with_the_frontend_context(steering_server, monkeypatch):
    """Without the frontend hooks the validator checks types and ranges only; with them, names and sizes."""
    from vllm import SamplingParams

    monkeypatch.setattr(api, "_STEERING_CONTEXT", None)
    params = SamplingParams(extra_args={"steering": {"ops": [{"layer": 9, "op": "add", "vector": "nope"}]}})
    api.RequestArgsValidator.validate_params(params)
    api.set_steering_context(frontend.steering_parse_kwargs)
    with pytest.raises(RequestArgError, match=r"steering\.ops\[0\]\.layer must be an integer in \[0, 2\)"):
        api.RequestArgsValidator.validate_params(params)


def test_collective_rpc_answers_update_the_mirror(hooked, steering_server):
    from vllm.v1.engine.llm_engine import LLMEngine

    answers = {"register": [{"vector": {"name": "new", "hash": "a" * 64}}] * 2,
               "delete": [{"deleted": "calm"}], "hashes": [{"hashes": {"x": "b" * 64}, "hidden_size": H,
                                                            "num_layers": L}]}
    core = SimpleNamespace(
        collective_rpc=lambda method, timeout, args, kwargs: answers[(args or (kwargs["action"],))[0]])
    engine = SimpleNamespace(engine_core=core)
    assert LLMEngine.collective_rpc(engine, "value_steer_vectors", args=("register", "new", [1.0] * H)) == \
        answers["register"]
    assert steering_server.content_hash("new") == "a" * 64
    LLMEngine.collective_rpc(engine, "value_steer_vectors", args=("delete", "calm"))
    assert not steering_server.resolve("calm")
    LLMEngine.collective_rpc(engine, "value_steer_vectors", kwargs={"action": "hashes"})
    assert steering_server.snapshot() == {"x": "b" * 64}


# ---- the request body -----------------------------------------------------------------------------------------


def _rewrite(body: dict | bytes) -> tuple[Any, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    new, spec = http.rewrite_steering_body(raw)
    return (None if new is None else json.loads(new)), spec


def test_rewrite_moves_a_top_level_spec_into_vllm_xargs():
    body, spec = _rewrite({"model": "m", "prompt": "hi", "steering": SPEC, "vllm_xargs": {"threshold": 0.2}})
    assert spec == SPEC and "steering" not in body
    assert body["vllm_xargs"]["threshold"] == 0.2 and json.loads(body["vllm_xargs"]["steering"]) == SPEC
    body, spec = _rewrite({"prompt": "hi", "steering": json.dumps(SPEC)})  # a JSON string goes as it is
    assert body["vllm_xargs"] == {"steering": json.dumps(SPEC)} and spec == json.dumps(SPEC)
    body, _ = _rewrite({"prompt": "hi", "vllm_xargs": {"steering": SPEC}})  # an object there becomes a string
    assert json.loads(body["vllm_xargs"]["steering"]) == SPEC
    body, spec = _rewrite({"prompt": "hi", "steering": None})
    assert body == {"prompt": "hi"} and spec is None
    # JSON may escape the key; vLLM would read it as "steering", so must we.
    body, _ = _rewrite(b'{"prompt": "x", "\\u0073teering": {"ops": []}}')
    assert body["vllm_xargs"] == {"steering": '{"ops":[]}'}


def test_rewrite_passes_other_bodies_through():
    assert _rewrite({"prompt": "tell me about steering wheels"}) == (None, None)
    assert _rewrite({"prompt": "hi", "vllm_xargs": {"steering": "{}"}}) == (None, "{}")
    assert _rewrite({"prompt": "steering", "use_beam_search": True}) == (None, None)
    assert _rewrite(b'{"steering": ') == (None, None)  # invalid JSON: vLLM answers it
    assert _rewrite(b'["steering"]') == (None, None)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"steering": SPEC, "vllm_xargs": {"steering": "{}"}}, "steering", "steering and vllm_xargs.steering"),
    ({"steering": [1, 2]}, "steering", "steering must be a JSON object"),
    ({"steering": 3}, "steering", "got int"),
    ({"steering": SPEC, "vllm_xargs": "x"}, "vllm_xargs", "vllm_xargs must be a JSON object"),
    ({"steering": SPEC, "use_beam_search": True}, "use_beam_search", "the steering spec would be ignored"),
    ({"vllm_xargs": {"steering": "{}"}, "use_beam_search": True}, "use_beam_search", "beam search"),
])
def test_rewrite_refuses_what_cannot_be_forwarded(body, param, message):
    with pytest.raises(http.SteeringBodyError, match=message) as info:
        http.rewrite_steering_body(json.dumps(body).encode())
    assert info.value.param == param


class FakeEngineClient:
    """``collective_rpc`` answering from ``answers[action]`` (a list: one answer per worker) and recording
    the calls."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple] = []

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> Any:
        assert method == "value_steer_vectors"
        self.calls.append(tuple(args))
        return self.answers[args[0]]


def _app(engine_client: Any = None) -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    app.state.engine_client = engine_client

    async def echo(request: Request) -> Any:  # FastAPI resolves the annotation from this module's globals
        return {"body": json.loads(await request.body()), "length": request.headers.get("content-length")}

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        app.add_api_route(path, echo, methods=["POST"])
    http.add_routes(app)
    http.add_routes(app)  # idempotent
    return app


def _client(app: Any) -> Any:
    from fastapi.testclient import TestClient

    return TestClient(app)


def test_middleware_rewrites_generation_bodies(steering_server):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    client = _client(_app())
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "steering": SPEC})
    assert r.status_code == 200, r.text
    body = r.json()["body"]
    assert "steering" not in body and json.loads(body["vllm_xargs"]["steering"]) == SPEC
    assert int(r.json()["length"]) == len(json.dumps(body, separators=(",", ":")))
    # vLLM's own request model takes the rewritten body and hands the spec on as extra_args.
    params = CompletionRequest.model_validate(body).to_sampling_params(max_tokens=4)
    assert json.loads(params.extra_args["steering"]) == SPEC
    # Other routes and bodies without a spec go through untouched.
    untouched = {"input": "x", "steering": SPEC}
    assert client.post("/v1/embeddings", json=untouched).json()["body"] == untouched
    plain = {"model": "m", "messages": [{"role": "user", "content": "steering"}]}
    assert client.post("/v1/chat/completions", json=plain).json()["body"] == plain


def test_middleware_answers_400_naming_the_field(steering_server):
    r = _client(_app()).post("/v1/chat/completions",
                             json={"messages": [], "steering": SPEC, "vllm_xargs": {"steering": "{}"}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "steering" and "vllm_xargs.steering" in err["message"] and err["code"] == 400


def test_middleware_reads_a_body_sent_in_chunks(steering_server):
    seen: dict[str, Any] = {}

    async def downstream(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        seen["body"] = (await receive())["body"]

    raw = json.dumps({"prompt": "hi", "steering": SPEC}).encode()
    chunks = [{"type": "http.request", "body": raw[:10], "more_body": True},
              {"type": "http.request", "body": raw[10:], "more_body": False}]

    async def receive():
        return chunks.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/completions", "root_path": "/api",
             "headers": [(b"content-length", str(len(raw)).encode())]}
    asyncio.run(http.SteeringBodyMiddleware(downstream)(scope, receive, None))
    assert json.loads(json.loads(seen["body"])["vllm_xargs"]["steering"]) == SPEC
    assert seen["headers"][b"content-length"] == str(len(seen["body"])).encode()


def test_middleware_refreshes_unknown_names_from_the_worker(steering_server, monkeypatch):
    engine = FakeEngineClient({"hashes": [{"hashes": {"calm": "c" * 64, "remote": "d" * 64}, "hidden_size": H,
                                            "num_layers": L}]})
    client = _client(_app(engine))
    spec = {"ops": [{"layer": 0, "op": "add", "vector": "remote"}]}
    assert client.post("/v1/completions", json={"prompt": "hi", "steering": spec}).status_code == 200
    assert engine.calls == [("hashes",)] and steering_server.content_hash("remote") == "d" * 64
    monkeypatch.setattr(http, "MIN_REFRESH_S", 0.0)
    client.post("/v1/completions", json={"prompt": "hi", "steering": spec})  # known now: no RPC
    assert len(engine.calls) == 1
    spec = {"ops": [{"layer": 0, "op": "add", "vector": "missing"}]}
    client.post("/v1/completions", json={"prompt": "hi", "vllm_xargs": {"steering": json.dumps(spec)}})
    assert len(engine.calls) == 2  # a miss asks again
    monkeypatch.setattr(http, "MIN_REFRESH_S", 3600.0)
    client.post("/v1/completions", json={"prompt": "hi", "steering": spec})  # a miss within MIN_REFRESH_S: no RPC
    assert len(engine.calls) == 2


# ---- the vector registry --------------------------------------------------------------------------------------


def test_registry_routes_forward_to_the_worker_and_follow_its_answers(steering_server):
    vec = {"name": "new", "hash": "e" * 64, "shape": [H], "norms": [1.0], "slots": [3], "in_use": 0}
    engine = FakeEngineClient({
        "register": [{"vector": vec}, {"vector": vec}],
        "list": [{"vectors": [vec], "usage": {"max_vectors": 64, "slots_used": 1, "slots_free": 63,
                                               "inline_slots": 0}}],
        "delete": [{"deleted": "new"}],
    })
    client = _client(_app(engine))
    r = client.post(http.VECTORS_PATH, json={"name": "new", "data": [0.5] * H})
    assert r.status_code == 200 and r.json() == {"vector": vec}
    assert engine.calls[-1] == ("register", "new", [0.5] * H) and steering_server.content_hash("new") == "e" * 64
    r = client.get(http.VECTORS_PATH)
    assert r.status_code == 200 and r.json()["usage"]["slots_free"] == 63
    assert steering_server.snapshot() == {"new": "e" * 64}  # a list is the worker's whole table
    r = client.delete(http.VECTORS_PATH + "/new")
    assert r.status_code == 200 and r.json() == {"deleted": "new"} and not steering_server.resolve("new")


@pytest.mark.parametrize(("status", "action", "call"), [
    (409, "register", lambda c: c.post(http.VECTORS_PATH, json={"name": "big", "data": [1.0] * H})),
    (409, "delete", lambda c: c.delete(http.VECTORS_PATH + "/busy")),
    (404, "delete", lambda c: c.delete(http.VECTORS_PATH + "/calm")),
    (400, "list", lambda c: c.get(http.VECTORS_PATH)),
])
def test_registry_keeps_the_workers_status(steering_server, status, action, call):
    refusal = {"error": f"refused with {status}", "status": status}
    # Tensor-parallel workers: any refusal is the answer.
    engine = FakeEngineClient({action: [{"deleted": "x"} if action == "delete" else {"vectors": []}, refusal]})
    assert steering_server.resolve("calm")
    r = call(_client(_app(engine)))
    assert r.status_code == status and r.json()["error"]["message"] == f"refused with {status}"
    if status == 404:  # the worker does not know it: neither does the mirror
        assert not steering_server.resolve("calm")


@pytest.mark.parametrize(("body", "param", "message"), [
    ([1, 2], None, "the body must be a JSON object"),
    ({"name": "x", "data": [1.0] * H, "extra": 1}, "extra", "unknown key"),
    ({"name": "bad name", "data": [1.0] * H}, "name", "name must be a vector name"),
    ({"data": [1.0] * H}, "name", "got None"),
    ({"name": "x"}, "data", "data must be a non-empty list"),
    ({"name": "x", "data": [1.0] * (H - 1)}, "data", f"exactly {H} numbers"),
    ({"name": "x", "data": ["1"] * H}, "data", r"data\[0\] must be a finite float32 number, got '1'"),
    ({"name": "x", "data": [1.0] * (H - 1) + [True]}, "data", rf"data\[{H - 1}\]"),
    ({"name": "x", "data": [1.0] * (H - 1) + [1e39]}, "data", rf"data\[{H - 1}\]"),
    ({"name": "x", "data": [[1.0] * H]}, "data", f"exactly {L} rows"),
    ({"name": "x", "data": [[1.0] * H, [1.0] * 3]}, "data", r"data\[1\] must be a list of exactly"),
    ({"name": "x", "data": [[1.0] * H, [1.0] * (H - 1) + [None]]}, "data", rf"data\[1\]\[{H - 1}\]"),
])
def test_register_refuses_bad_bodies_without_asking_the_worker(steering_server, body, param, message):
    engine = FakeEngineClient({})
    r = _client(_app(engine)).post(http.VECTORS_PATH, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError"
    assert re.search(message, err["message"]), err["message"]
    assert engine.calls == []


def test_inline_vector_hash_is_the_bank_rule():
    """An inline vector in a spec and the same values registered as [H] are one content (one slot)."""
    v = _vec(3)
    bank = VectorBank(4, H, L, "cpu")
    assert InlineVector.from_values(v).content_hash == bank.register("same", v).content_hash
