"""`vllm serve --data-parallel-size 2` (issue 23): the stats, registry and metrics routes answer for every engine.

vLLM balances requests over the two engines; each engine has its own steering state. The stats route finds a
request on the engine that served it (every request, not half), a registry mutation reaches both engines before
its 200 (every request naming the new vector is then served, whichever engine takes it), a refused request is a
409 whichever engine refused it, and the counters of the stats route and ``/metrics`` sum both engines.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest

from tests.helpers import TINY_DOSE, TINY_HIDDEN, write_random_head
from tests.serving.test_serve import _start, _stop

requests = pytest.importorskip("requests")
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="DP=2 on CPU binds one core per engine")]

N = 12


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    head = write_random_head(tmp_path_factory.mktemp("head") / "head.safetensors", TINY_HIDDEN, seed=0)
    proc, url = _start(tiny_model_dir, {"abstain": {"value_head_path": head},
                                        "steering": {"max_relative_dose": TINY_DOSE}},
                       tmp_path_factory, "--data-parallel-size", "2", "--max-num-seqs", "4",
                       env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # one core per engine
    yield url
    _stop(proc)


def _complete(url: str, i: int, **body) -> requests.Response:
    return requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": f"hello number {i}",
                                                         "max_tokens": 6, "temperature": 0.0, **body}, timeout=120)


def _many(url: str, **body) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(N) as pool:
        return list(pool.map(lambda i: _complete(url, i, **body), range(N)))


def test_stats_of_every_request_and_summed_counters(server):
    before = requests.get(server + "/v1/value_steer/stats", timeout=30).json()["counters"]["requests_steered"]
    outs = _many(server, vllm_xargs={"threshold": 0.999})
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    for r in outs:
        got = requests.get(server + f"/v1/value_steer/requests/{r.json()['id']}", timeout=30)
        assert got.status_code == 200, got.text  # whichever engine served it
        assert got.json()["stats"]["num_scored"] > 0
    after = requests.get(server + "/v1/value_steer/stats", timeout=30).json()["counters"]["requests_steered"]
    assert after - before == N  # both engines' counters
    metrics = requests.get(server + "/metrics", timeout=30).text
    line = next(x for x in metrics.splitlines() if x.startswith("value_steer_requests_steered_total"))
    assert float(line.split()[-1]) == after


def test_a_registered_vector_reaches_both_engines(server):
    vec = np.random.RandomState(0).randn(TINY_HIDDEN).astype(np.float32).tolist()
    r = requests.post(server + "/v1/steering/vectors", json={"name": "dp-vec", "data": vec}, timeout=30)
    assert r.status_code == 200, r.text
    spec = {"ops": [{"layer": 1, "op": "add", "vector": "dp-vec", "scale": 2.0}]}
    outs = _many(server, steering=spec, vllm_xargs={"value_steer": False})
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    r = requests.delete(server + "/v1/steering/vectors/dp-vec", timeout=30)
    assert r.status_code == 200, r.text
    outs = _many(server, steering=spec, vllm_xargs={"value_steer": False})
    assert all(r.status_code == 400 and "dp-vec" in r.text for r in outs), [r.text for r in outs]
