"""`vllm serve` with ValueSteerWorker on 127.0.0.1: OpenAI API, vllm_xargs, 400s, start-up errors.

The servers start through vLLM's own entry point, with value_steer named only by ``--worker-cls`` and
``--additional-config``: the request validator, the stats routes and the ``/metrics`` counters must come
from the installed package (its ``vllm.general_plugins`` entry point), not from extra flags or a
value_steer launcher. The module is ``vllm.entrypoints.launchers.api_server.entry``: the server ``vllm
serve`` runs (``run_server``), started as a module because the ``vllm`` console script of the CPU build
cannot find its own version (``value_steer.vllm_cli`` exists for that alone).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import TINY_HIDDEN, wait_healthy, write_constant_head, write_random_head

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_SERVER = "vllm.entrypoints.launchers.api_server.entry"


def _serve_cmd(model, config: dict, port: int) -> list[str]:
    return [sys.executable, "-m", VLLM_SERVER, "--model", str(model),
            "--worker-cls", "value_steer.worker.ValueSteerWorker", "--additional-config", json.dumps(config),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--max-num-seqs", "8", "--served-model-name", "tiny"]


def _env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1"}


def _start(model, config: dict, tmp_path_factory, *extra: str, env: dict | None = None):
    """A ``vllm serve`` process on a free port (``env``: variables over :func:`_env`'s); returns it and its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*_serve_cmd(model, config, port), *extra], env={**_env(), **(env or {})}, stdout=f,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout_s=240)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    return proc, url


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    head = write_constant_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, 0.0, 0.6)
    proc, url = _start(tiny_model_dir, {"abstain": {"value_head_path": head}}, tmp_path_factory)
    yield url
    _stop(proc)


# The VFD server runs with --api-key (the abstain server without): every request here carries it.
API_KEY = "vs-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def vfd_server(tiny_model_dir, tmp_path_factory):
    """VFD K=4 over a random head (values vary with the hidden state), sidecar threshold 0.5."""
    head = write_random_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, seed=0)
    proc, url = _start(tiny_model_dir, {"vfd": {"value_head_path": head, "num_candidates": 4}}, tmp_path_factory,
                       "--api-key", API_KEY)
    yield url
    _stop(proc)


def _complete(url, **body):
    return requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8,
                                                         "temperature": 0.0, **body}, headers=AUTH, timeout=60)


def test_completions_with_and_without_xargs(server):
    quiet = _complete(server)
    assert quiet.status_code == 200, quiet.text
    assert quiet.json()["choices"][0]["finish_reason"] == "length"
    fired = _complete(server, vllm_xargs={"threshold": 0.4})
    assert fired.status_code == 200, fired.text
    assert fired.json()["choices"][0]["finish_reason"] == "stop"
    assert fired.json()["usage"]["completion_tokens"] == 2


def test_chat_with_xargs(server):
    r = requests.post(server + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0,
        "vllm_xargs": {"threshold": 0.4}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("xargs", "field"), [({"threshold": 3}, "threshold"),
                                              ({"threshold": "high"}, "threshold"),
                                              ({"num_candidates": -2}, "num_candidates"),
                                              ({"num_candidates": 2}, "num_candidates"),
                                              ({"value_steer": "maybe"}, "value_steer"),
                                              ({"treshold": 0.3}, "did you mean 'threshold'")])
def test_bad_request_is_400_and_server_keeps_serving(server, xargs, field):
    r = _complete(server, vllm_xargs=xargs)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert _complete(server).status_code == 200


def test_misspelled_key_400_names_the_allowed_keys(server):
    r = _complete(server, vllm_xargs={"treshold": 0.3})
    assert r.status_code == 400, r.text
    from value_steer.core.config import REQUEST_KEYS

    keys = str(list(REQUEST_KEYS))
    assert keys in r.json()["error"]["message"]
    # Keys that are not value_steer's (vLLM's own, other plugins') are left alone.
    assert _complete(server, vllm_xargs={"ngram_size": 3}).status_code == 200


def test_bad_config_fails_at_startup_naming_field(tiny_model_dir, tmp_path):
    head = write_constant_head(tmp_path / "h.safetensors", TINY_HIDDEN, 0.0)
    proc = subprocess.run(_serve_cmd(tiny_model_dir, {"vfd": {"value_head_path": head, "num_candidates": 0}},
                                     _free_port()), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "vfd.num_candidates must be an integer in [1, 64]" in proc.stdout + proc.stderr


def _request_stats(url, response_id):
    return requests.get(f"{url}/v1/value_steer/requests/{response_id}", headers=AUTH, timeout=30)


def test_request_stats_route(server):
    fired = _complete(server, vllm_xargs={"threshold": 0.4})
    assert fired.status_code == 200, fired.text
    r = _request_stats(server, fired.json()["id"])
    assert r.status_code == 200, r.text
    stats = r.json()["stats"]
    assert stats["mode"] == "abstain" and stats["forced_eos"] is True
    assert stats["num_interventions"] == 1 and stats["num_scored"] == 1
    assert stats["threshold"] == pytest.approx(0.4) and stats["last_value"] == pytest.approx(0.5)

    quiet = _complete(server, vllm_xargs={"value_steer": False})
    off = _request_stats(server, quiet.json()["id"]).json()["stats"]
    assert off["mode"] == "off" and off["num_scored"] == 0

    missing = _request_stats(server, "cmpl-does-not-exist")
    assert missing.status_code == 404 and "unknown request id" in missing.json()["error"]["message"]
    assert requests.get(server + "/v1/value_steer/nope", timeout=10).status_code == 404
    assert requests.post(server + "/v1/value_steer/stats", timeout=10).status_code == 405


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_export_worker_counters(server):
    before = _metric(requests.get(server + "/metrics", timeout=30).text, "value_steer_forced_eos_total")
    assert _complete(server, vllm_xargs={"threshold": 0.4}).status_code == 200
    text = requests.get(server + "/metrics", timeout=30).text
    assert _metric(text, "value_steer_forced_eos_total") == before + 1
    counters = requests.get(server + "/v1/value_steer/stats", timeout=30).json()["counters"]
    for key in ("requests_steered", "tokens_scored", "interventions", "forced_eos", "requests_refused"):
        assert _metric(text, f"value_steer_{key}_total") == counters[key]
    assert _metric(text, 'value_steer_requests_by_mode_total{mode="abstain"}') == counters["by_mode"]["abstain"]
    assert _metric(text, "value_steer_stats_rpc_errors_total") == 0
    assert "vllm:num_requests_running" in text  # vLLM's own metrics are still served


def test_vfd_serve_quiet_threshold_is_base_and_stats_count_tokens(vfd_server):
    # Values lie strictly inside (0, 1): threshold 1.0 makes every candidate safe.
    base = _complete(vfd_server, max_tokens=12, vllm_xargs={"value_steer": False})
    steered = _complete(vfd_server, max_tokens=12, vllm_xargs={"threshold": 1.0})
    assert base.status_code == 200 and steered.status_code == 200, steered.text
    assert steered.json()["choices"][0]["text"] == base.json()["choices"][0]["text"]
    stats = _request_stats(vfd_server, steered.json()["id"]).json()["stats"]
    assert stats["mode"] == "vfd" and stats["num_candidates"] == 4
    assert stats["num_scored"] == steered.json()["usage"]["completion_tokens"]
    assert stats["num_interventions"] == 0


def test_vfd_serve_chat_with_xargs_intervenes(vfd_server):
    # Threshold 0: nothing is safe, the safest of the top-2 wins; it differs from the natural sample
    # (the argmax) at some steps, and each such step is an intervention.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
            "temperature": 0.0}
    r = requests.post(vfd_server + "/v1/chat/completions", timeout=60, headers=AUTH,
                      json={**body, "vllm_xargs": {"threshold": 0.0, "num_candidates": 2}})
    base = requests.post(vfd_server + "/v1/chat/completions", timeout=60, headers=AUTH,
                         json={**body, "vllm_xargs": {"value_steer": False}})
    assert r.status_code == 200 and base.status_code == 200, r.text
    stats = _request_stats(vfd_server, r.json()["id"]).json()["stats"]
    assert stats["num_candidates"] == 2 and stats["threshold"] == 0.0
    assert stats["num_scored"] == r.json()["usage"]["completion_tokens"]
    assert 0 < stats["num_interventions"] <= stats["num_scored"]
    assert r.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]


def test_vfd_serve_refuses_what_it_cannot_filter(vfd_server):
    r = requests.post(vfd_server + "/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": {"type": "json_object"}}, timeout=60)
    assert r.status_code == 400, r.text
    assert "structured outputs" in r.json()["error"]["message"]
    for k in (5, -2):
        r = _complete(vfd_server, vllm_xargs={"num_candidates": k})
        assert r.status_code == 400 and "num_candidates must be an integer in [1, 4]" in r.json()["error"]["message"]


def test_stats_routes_are_behind_the_api_key(vfd_server):
    # The routes are FastAPI routes inside vLLM's middleware stack, so --api-key guards them like /v1/*.
    assert requests.get(vfd_server + "/v1/value_steer/stats", timeout=10).status_code == 401
    assert requests.get(vfd_server + "/v1/value_steer/stats", headers=AUTH, timeout=30).status_code == 200
    # /metrics is unguarded in vLLM; the steering counters are on it.
    assert "value_steer_requests_steered_total" in requests.get(vfd_server + "/metrics", timeout=30).text
