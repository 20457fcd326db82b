"""`vllm serve` with activation steering (issue 13): the OpenAI API's top-level ``steering`` field (the SDK's
``extra_body``) and ``vllm_xargs``, preloaded and registered vectors over HTTP, a 400 naming the field for
every bad spec while the server keeps serving. The server runs vLLM CPU's default compiled mode (no
``--enforce-eager``), as ``vllm serve`` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import TINY_DOSE, TINY_HIDDEN
from tests.serving.test_serve import _start, _stop
from value_steer.core.steering_spec import Steering, add

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

H = TINY_HIDDEN
MAX_VECTORS = 4


def _vec(seed: int, scale: float = 1.0) -> list[float]:
    return (np.random.RandomState(seed).randn(H) * scale).astype(np.float32).tolist()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    vectors = tmp_path_factory.mktemp("vectors")
    save_file({"v": torch.tensor(_vec(1, 3.0))}, str(vectors / "calm.safetensors"))
    proc, url = _start(tiny_model_dir, {"steering": {"vectors": str(vectors), "max_vectors": MAX_VECTORS,
                                                     "max_relative_dose": TINY_DOSE}},
                       tmp_path_factory, "--no-enforce-eager")
    yield url
    _stop(proc)


def _complete(url, **body):
    return requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello world, once more",
                                                         "max_tokens": 8, "temperature": 0.0, **body}, timeout=60)


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_top_level_steering_and_vllm_xargs(server):
    base = _text(_complete(server))
    strong = Steering([add(1, _vec(2), 40.0)])
    steered = _text(_complete(server, **strong.extra_body()))
    assert steered != base
    assert _text(_complete(server, vllm_xargs=strong.vllm_xargs())) == steered
    assert _text(_complete(server, **Steering([add(1, _vec(2), 0.0)]).extra_body())) == base
    # The preloaded vector, by name.
    assert _text(_complete(server, steering={"ops": [{"layer": 1, "op": "add", "vector": "calm", "scale": 15}]})) \
        == _text(_complete(server, steering={"ops": [{"layer": 1, "op": "add", "vector": _vec(1, 3.0), "scale": 15}]}))


def test_chat_with_top_level_steering(server):
    def chat(**extra):
        r = requests.post(server + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 8,
            "temperature": 0.0, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert chat(steering={"ops": [{"layer": 0, "op": "add", "vector": _vec(3), "scale": 40.0}]}) != chat()


@pytest.mark.parametrize(("steering", "field"), [
    ({"ops": [{"layer": 0, "op": "add", "vector": "nope"}]}, "steering.ops[0].vector"),
    ({"ops": [{"layer": 0, "op": "add", "vector": [1.0] * (H - 1)}]}, "steering.ops[0].vector"),
    ({"ops": [{"layer": 0, "op": "add", "vector": [1e400] + [1.0] * (H - 1)}]}, "steering.ops[0].vector"),
    ({"ops": [{"layer": 0, "op": "add", "vector": [0.0] * H}]}, "steering.ops[0].vector"),
    ({"ops": [{"layer": 0, "op": "cap", "vector": [1.0] * H, "min": 1.0, "max": 0.0}]}, "steering.ops[0]"),
    ({"ops": [{"layer": 2, "op": "add", "vector": [1.0] * H}]}, "steering.ops[0].layer"),
    ({"ops": [{"layer": 0, "op": "add", "vector": [1.0] * H}] * 9}, "steering.ops"),
    ({"ops": [{"layer": 0, "op": "shift", "vector": [1.0] * H}]}, "steering.ops[0].op"),
    ("not a spec", "steering"),
])
def test_bad_spec_is_400_naming_the_field(server, steering, field):
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 4, "steering": steering})
    r = requests.post(server + "/v1/completions", data=body, headers={"content-type": "application/json"},
                      timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.json()
    assert _complete(server).status_code == 200


def test_spec_given_both_ways_is_400(server):
    spec = {"ops": [{"layer": 0, "op": "add", "vector": _vec(4)}]}
    r = _complete(server, steering=spec, vllm_xargs={"steering": json.dumps(spec)})
    assert r.status_code == 400 and "steering" in r.json()["error"]["message"]


def test_registry_round_trip(server):
    url = server + "/v1/steering/vectors"
    listed = requests.get(url, timeout=30).json()
    assert [v["name"] for v in listed["vectors"]] == ["calm"] and listed["usage"]["max_vectors"] == MAX_VECTORS
    r = requests.post(url, json={"name": "anger", "data": _vec(5, 3.0)}, timeout=30)
    assert r.status_code == 200, r.text
    first = r.json()["vector"]
    assert first["name"] == "anger" and first["shape"] == [H]
    assert abs(first["norms"][0] - float(np.linalg.norm(_vec(5, 3.0)))) < 1e-3
    by_name = {"ops": [{"layer": 1, "op": "add", "vector": "anger", "scale": 15.0}]}
    inline = {"ops": [{"layer": 1, "op": "add", "vector": _vec(5, 3.0), "scale": 15.0}]}
    assert _text(_complete(server, steering=by_name)) == _text(_complete(server, steering=inline))
    # Same name, new data: a new vector (content identity), and requests by name follow it.
    second = requests.post(url, json={"name": "anger", "data": _vec(6, 3.0)}, timeout=30).json()["vector"]
    assert second["hash"] != first["hash"]
    inline["ops"][0]["vector"] = _vec(6, 3.0)
    assert _text(_complete(server, steering=by_name)) == _text(_complete(server, steering=inline))
    # Bad registrations name the field; a full bank is a 409 naming max_vectors.
    assert "data" in requests.post(url, json={"name": "x", "data": [1.0] * (H - 1)}, timeout=30).json()["error"][
        "message"]
    assert requests.post(url, json={"name": "bad name!", "data": _vec(7)}, timeout=30).status_code == 400
    statuses = [requests.post(url, json={"name": f"f{i}", "data": _vec(10 + i)}, timeout=30).status_code
                for i in range(MAX_VECTORS)]
    assert statuses[-1] == 409 and 200 in statuses
    full = requests.post(url, json={"name": "g", "data": _vec(20)}, timeout=30)
    assert full.status_code == 409 and "max_vectors" in full.json()["error"]["message"]
    # Delete frees the slots; a deleted name is a 400 for requests; unknown names are 404.
    for name in ["anger", *[f"f{i}" for i in range(MAX_VECTORS)]]:
        requests.delete(f"{url}/{name}", timeout=30)
    assert requests.delete(f"{url}/anger", timeout=30).status_code == 404
    r = _complete(server, steering=by_name)
    assert r.status_code == 400 and "steering.ops[0].vector" in r.json()["error"]["message"]
    assert [v["name"] for v in requests.get(url, timeout=30).json()["vectors"]] == ["calm"]
