"""Hostile and unlucky requests against `vllm serve` (issue 21): every row of the issue's table answers with an
HTTP error naming the field, never a 500, an empty 200 or an unsteered answer.

One server (vLLM CPU's compiled mode) with every section: VFD (K=2 over a random head), activation steering
(a preloaded vector, a small bank, an admin key, a small body limit), logit steering (the planted generator) and
capture. Each test also checks the server still serves an unsteered greedy control request unchanged.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import TINY_HIDDEN, write_planted_generator, write_random_head
from tests.serving.test_serve import _start, _stop
from tests.serving.test_serve_steering import _vec

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

H = TINY_HIDDEN
MAX_VECTORS = 3
ADMIN = {"X-Steering-Admin-Key": "admin-key-for-tests"}
BODY_LIMIT = 256 << 10


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    vectors = tmp_path_factory.mktemp("vectors")
    save_file({"v": torch.tensor(_vec(1, 3.0))}, str(vectors / "calm.safetensors"))
    head = write_random_head(tmp_path_factory.mktemp("head") / "head.safetensors", H, seed=0)
    gen = write_planted_generator(tmp_path_factory.mktemp("gen") / "gen.safetensors")
    config = {"vfd": {"value_head_path": head, "num_candidates": 2, "enabled_by_default": False},
              "steering": {"vectors": str(vectors), "max_vectors": MAX_VECTORS, "admin_key": ADMIN[
                  "X-Steering-Admin-Key"], "max_body_bytes": BODY_LIMIT,
                           "max_relative_dose": 1e4},
              "logit_steering": {"checkpoint": gen},
              "capture": {"dir": str(tmp_path_factory.mktemp("capture"))}}
    proc, url = _start(tiny_model_dir, config, tmp_path_factory, "--no-enforce-eager")
    yield url
    _stop(proc)


def _post(url, path="/v1/completions", body=None, data=None, headers=None, **kw):
    headers = {"content-type": "application/json", **(headers or {})}
    if data is None:
        data = json.dumps({"model": "tiny", "prompt": "hello world, once more", "max_tokens": 8,
                           "temperature": 0.0, **(body or {})})
    return requests.post(url + path, data=data, headers=headers, timeout=120, **kw)


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _control(url) -> str:
    return _text(_post(url))


def _assert_400(r, field: str, status: int = 400) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert field in err["message"], err


STRONG = {"ops": [{"layer": 1, "op": "add", "vector": _vec(2), "scale": 40.0}]}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"])
def test_a_body_in_any_json_encoding_is_steered(server, encoding):
    base = _control(server)
    steered = _text(_post(server, body={"steering": STRONG}))
    assert steered != base
    raw = json.dumps({"model": "tiny", "prompt": "hello world, once more", "max_tokens": 8, "temperature": 0.0,
                      "steering": STRONG})
    assert _text(_post(server, data=raw.encode(encoding))) == steered
    bad = json.dumps({"model": "tiny", "prompt": "hi", "steering": {"ops": [{"layer": 9, "op": "add",
                                                                             "vector": _vec(0)}]}})
    _assert_400(_post(server, data=bad.encode(encoding)), "steering.ops[0].layer")


def test_beam_search_with_any_value_steer_key_is_400(server):
    for xargs in ({"logit_steering": 1.0}, {"threshold": 0.3}, {"steering": json.dumps(STRONG)}):
        r = _post(server, body={"use_beam_search": True, "n": 2, "vllm_xargs": xargs})
        _assert_400(r, "use_beam_search")
        assert r.json()["error"]["param"] == "use_beam_search"


def test_top_level_logit_steering_is_accepted_and_near_misses_refused(server):
    base = _control(server)
    top = _text(_post(server, body={"logit_steering": 4.0}))
    assert top == _text(_post(server, body={"vllm_xargs": {"logit_steering": 4.0}})) != base
    assert _text(_post(server, body={"logit_steering": True})) == _text(
        _post(server, body={"vllm_xargs": {"logit_steering": 1}}))
    for key in ("Steering", "steer", "stearing", "steering_spec", "logitSteering", "logit-steering"):
        r = _post(server, body={key: STRONG})
        _assert_400(r, key)
        assert r.json()["error"]["param"] == key
    _assert_400(_post(server, body={"threshold": 0.2}), "vllm_xargs")  # ours, but at the top level
    _assert_400(_post(server, body={"logit_steering": 1.0, "vllm_xargs": {"logit_steering": 1.0}}), "given twice")
    assert _control(server) == base


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100, 5000, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    base = _control(server)
    deep = _nested(depth)
    body = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "extra": DEEP}'.replace("DEEP", deep)
    _assert_400(_post(server, data=body), "nested")
    _assert_400(_post(server, body={"vllm_xargs": {"steering": '{"ops": DEEP}'.replace("DEEP", deep)}}), "steering")
    _assert_400(_post(server, body={"vllm_xargs": {"value_steer": False, "capture_layers": deep}}),
                "capture_layers")
    r = _post(server, "/v1/steering/vectors", data='{"name": "x", "data": DEEP}'.replace("DEEP", deep), headers=ADMIN)
    _assert_400(r, "nested")
    assert _control(server) == base


HUGE = "1" + "0" * 400  # an integer literal beyond the float range
HUGER = "1" + "0" * 5000  # beyond the digits Python converts (sys.get_int_max_str_digits)


@pytest.mark.parametrize(("body", "field"), [
    ('{"model": "tiny", "prompt": "hi", "steering": {"ops": [{"layer": 0, "op": "add", "vector": "calm", '
     '"scale": HUGE}]}}', "steering.ops[0].scale"),
    ('{"model": "tiny", "prompt": "hi", "steering": {"ops": [{"layer": 0, "op": "add", "vector": "calm", '
     '"scale": 1e400}]}}', "steering.ops[0].scale"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"value_steer": true, "num_candidates": "inf"}}',
     "num_candidates"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"value_steer": true, "num_candidates": "nan"}}',
     "num_candidates"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"value_steer": true, "threshold": HUGE}}', "threshold"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"value_steer": true, "threshold": "nan"}}', "threshold"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"logit_steering": HUGE}}', "logit_steering"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"logit_steering": "inf"}}', "logit_steering"),
    ('{"model": "tiny", "prompt": "hi", "vllm_xargs": {"value_steer": true, "threshold": HUGER}}', "body"),
])
def test_huge_and_non_finite_numbers_name_the_field(server, body, field):
    body = body.replace("HUGER", HUGER).replace("HUGE", HUGE)
    for stream in (False, True):
        raw = body if HUGER in body else body[:-1] + f', "stream": {json.dumps(stream)}}}'
        _assert_400(_post(server, data=raw), field)


def test_registry_entries_that_are_not_finite_fp32_name_the_entry(server):
    url = "/v1/steering/vectors"
    huge = '{"name": "big", "data": [HUGE' + ", 1.0" * (H - 1) + "]}"
    huge = huge.replace("HUGE", HUGE)
    _assert_400(_post(server, url, data=huge, headers=ADMIN), "data[0]")
    r = _post(server, url, data=json.dumps({"name": "big", "data": [1e39] + [1.0] * (H - 1)}), headers=ADMIN)
    _assert_400(r, "data[0]")


def test_a_streamed_request_with_a_bad_spec_is_400_before_the_stream(server):
    for body in ({"steering": {"ops": [{"layer": 0, "op": "add", "vector": "nope"}]}},
                 {"vllm_xargs": {"treshold": 0.3}},
                 {"vllm_xargs": {"value_steer": True}, "response_format": {"type": "json_object"}}):
        r = _post(server, body={**body, "stream": True}, stream=True)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")


def test_stats_answer_exact_ids_only(server):
    r = _post(server, body={"vllm_xargs": {"value_steer": True}})
    rid = r.json()["id"]
    assert requests.get(f"{server}/v1/value_steer/requests/{rid}", timeout=30).status_code == 200
    for prefix in ("cmpl", "cmpl-", rid[:-4]):
        assert requests.get(f"{server}/v1/value_steer/requests/{prefix}", timeout=30).status_code == 404, prefix
    # n > 1: every choice's stats, in the response's order.
    r = _post(server, body={"n": 3, "temperature": 1.0, "seed": 3, "vllm_xargs": {"value_steer": True}})
    stats = requests.get(f"{server}/v1/value_steer/requests/{r.json()['id']}", timeout=30).json()["stats"]
    assert len(stats["choices"]) == 3 and all(c["stats"]["mode"] == "vfd" for c in stats["choices"])


def test_preloaded_vectors_are_read_only_and_mutations_need_the_admin_key(server):
    url = "/v1/steering/vectors"
    entry = json.dumps({"name": "mine", "data": _vec(7)})
    _assert_400(_post(server, url, data=entry), "admin key", status=401)
    _assert_400(_post(server, url, data=entry, headers={"X-Steering-Admin-Key": "wrong-key"}), "wrong", 403)
    assert _post(server, url, data=entry, headers=ADMIN).status_code == 200
    assert requests.delete(f"{server}{url}/mine", timeout=30).status_code == 401
    assert requests.delete(f"{server}{url}/mine", headers=ADMIN, timeout=30).status_code == 200
    r = _post(server, url, data=json.dumps({"name": "calm", "data": _vec(8)}), headers=ADMIN)
    _assert_400(r, "read-only", status=403)
    _assert_400(requests.delete(f"{server}{url}/calm", headers=ADMIN, timeout=30), "read-only", status=403)
    assert requests.get(server + url, timeout=30).status_code == 200  # reading stays open


def test_bodies_over_the_limit_are_413(server):
    big = json.dumps({"model": "tiny", "prompt": "x" * BODY_LIMIT, "max_tokens": 1})
    _assert_400(_post(server, data=big), "max_body_bytes", status=413)
    _assert_400(_post(server, "/v1/steering/vectors", data=big, headers=ADMIN), "max_body_bytes", status=413)

    def chunks():  # no content-length: counted while reading
        for _ in range(8):
            yield b"x" * (BODY_LIMIT // 4)

    r = requests.post(server + "/v1/completions", data=chunks(), headers={"content-type": "application/json"},
                      timeout=60)
    _assert_400(r, "max_body_bytes", status=413)


def test_a_dose_beyond_the_limit_is_400_naming_the_op(server):
    r = _post(server, body={"steering": {"ops": [{"layer": 1, "op": "add", "vector": "calm", "scale": 1e6}]}})
    _assert_400(r, "steering.ops[0]: relative dose")
    r = _post(server, body={"steering": {"ops": [{"layer": 0, "op": "cap", "vector": "calm", "min": 1e9}]}})
    _assert_400(r, "steering.ops[0]: relative dose")
    r = _post(server, body={"steering": {"ops": [{"layer": 0, "op": "ablate", "vector": "calm", "scale": 1e6}]}})
    _assert_400(r, "steering.ops[0]: relative dose")
    # A cap bound that only shrinks the stream, and ordinary doses, pass.
    ok = {"ops": [{"layer": 0, "op": "cap", "vector": "calm", "max": 1e9},
                  {"layer": 1, "op": "add", "vector": "calm", "scale": 2.0}]}
    assert _post(server, body={"steering": ok}).status_code == 200


def test_inline_vectors_run_when_the_bank_is_full(server):
    url = "/v1/steering/vectors"
    names = [f"fill{i}" for i in range(MAX_VECTORS)]
    for i, name in enumerate(names):
        _post(server, url, data=json.dumps({"name": name, "data": _vec(30 + i)}), headers=ADMIN)
    assert requests.get(server + url, timeout=30).json()["usage"]["slots_free"] == 0
    try:
        spec = {"ops": [{"layer": 1, "op": "add", "vector": _vec(40), "scale": 30.0}]}
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: _text(_post(server, body={"steering": spec})), range(8)))
        assert len(set(texts)) == 1 and texts[0] != _control(server)
    finally:
        for name in names:
            requests.delete(f"{server}{url}/{name}", headers=ADMIN, timeout=30)


@pytest.mark.parametrize("change", ["re-register", "delete"])
def test_requests_queued_across_a_registry_change_run_with_their_admitted_version(server, change):
    """16 requests naming a vector are in flight (8 running, 8 queued) when it is re-registered or deleted: each
    runs with the version it was admitted with (its solo greedy text), or is a 400 for a name that no longer
    exists; never an empty 200."""
    url = "/v1/steering/vectors"
    old, new = _vec(50, 2.0), _vec(51, 2.0)
    assert _post(server, url, data=json.dumps({"name": "churn", "data": old}), headers=ADMIN).status_code == 200

    def spec(vector):
        return {"ops": [{"layer": 1, "op": "add", "vector": vector, "scale": 20.0}]}

    body = {"max_tokens": 24}
    want = {_text(_post(server, body={**body, "steering": spec(v)})) for v in ((old, new) if change != "delete"
                                                                              else (old,))}
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_post, server, body={**body, "steering": spec("churn")}) for _ in range(16)]
        if change == "re-register":
            r = _post(server, url, data=json.dumps({"name": "churn", "data": new}), headers=ADMIN)
        else:
            r = requests.delete(f"{server}{url}/churn", headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
        answers = [f.result() for f in futures]
    for a in answers:
        if a.status_code == 400:
            assert change == "delete" and "unknown vector 'churn'" in a.json()["error"]["message"]
        else:
            assert _text(a) in want, a.text
    if change == "re-register":
        requests.delete(f"{server}{url}/churn", headers=ADMIN, timeout=30)
