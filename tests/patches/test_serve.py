"""`vllm serve` with ValueSteerWorker on 127.0.0.1: OpenAI API, vllm_xargs, 400s, start-up errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.patches.conftest import TINY_HIDDEN, write_constant_head

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(model, config: dict, port: int) -> list[str]:
    return [sys.executable, "-m", "value_steer.vllm_cli", "serve", str(model),
            "--worker-cls", "value_steer.worker.ValueSteerWorker", "--additional-config", json.dumps(config),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "256", "--max-num-seqs", "8", "--served-model-name", "tiny"]


def _env() -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    head = write_constant_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, 0.0, 0.6)
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_serve_cmd(tiny_model_dir, {"abstain": {"value_head_path": head}}, port),
                                env=_env(), stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"server did not become healthy:\n{log.read_text()[-4000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _complete(url, **body):
    return requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8,
                                                         "temperature": 0.0, **body}, timeout=60)


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
                                              ({"value_steer": "maybe"}, "value_steer"),
                                              ({"num_candidates": 2}, "num_candidates")])
def test_bad_request_is_400_and_server_keeps_serving(server, xargs, field):
    r = _complete(server, vllm_xargs=xargs)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert _complete(server).status_code == 200


def test_bad_config_fails_at_startup_naming_field(tiny_model_dir, tmp_path):
    head = write_constant_head(tmp_path / "h.safetensors", TINY_HIDDEN, 0.0)
    proc = subprocess.run(_serve_cmd(tiny_model_dir, {"vfd": {"value_head_path": head, "num_candidates": 0}},
                                     _free_port()), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "vfd.num_candidates must be an integer in [1, 64]" in proc.stdout + proc.stderr


def test_head_hidden_size_mismatch_fails_at_startup(tiny_model_dir, tmp_path):
    head = write_constant_head(tmp_path / "h.safetensors", TINY_HIDDEN * 2, 0.0)
    proc = subprocess.run(_serve_cmd(tiny_model_dir, {"abstain": {"value_head_path": head}}, _free_port()),
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "hidden size" in out and "128" in out and "64" in out, out[-3000:]
