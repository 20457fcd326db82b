"""Several value heads in one engine (``vfd.heads``, per-request ``head``): in one mixed batch every request's
candidates are scored by its own head (the grouped value-head op over the heads' stacked weights)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import TINY_HIDDEN, make_llm, write_constant_head, write_random_head

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 3
N = 10
PROMPTS = ["hello world", "the quick brown fox", "a b c d e", "one two three"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    return {"a": write_random_head(d / "a.safetensors", TINY_HIDDEN, seed=0),
            "b": write_random_head(d / "b.safetensors", TINY_HIDDEN, seed=1),
            # sigmoid(-6) = 0.0025 everywhere: under its threshold 0.5, never intervenes.
            "calm": write_constant_head(d / "calm.safetensors", TINY_HIDDEN, -6.0, 0.5)}


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def llm(tiny_model_dir, heads, capture_dir):
    old = os.environ.get("VALUE_STEER_DEBUG")
    os.environ["VALUE_STEER_DEBUG"] = "1"
    try:
        # Heads a and b at threshold 0: every candidate is unsafe, so each step commits its head's safest candidate.
        engine = make_llm(tiny_model_dir, {
            "vfd": {"heads": {"a": {"path": heads["a"], "threshold": 0.0}, "b": {"path": heads["b"], "threshold": 0.0},
                              "calm": {"path": heads["calm"]}},
                    "default_head": "calm", "num_candidates": K, "schedule": "eager"},
            "capture": {"dir": str(capture_dir)}})
    finally:
        if old is None:
            os.environ.pop("VALUE_STEER_DEBUG", None)
        else:
            os.environ["VALUE_STEER_DEBUG"] = old
    yield engine
    del engine


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": N, **kw})


def _steps(llm, request_id):
    dbg = llm.collective_rpc(lambda w: w.model_runner.vfd_debug_state())[0]["steps"]
    hits = [v for k, v in dbg.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, f"no unique debug record for {request_id}"
    return hits[0]


def _stats(llm, request_id):
    return llm.collective_rpc("value_steer_stats", args=(request_id,))[0]["stats"]


def test_mixed_batch_scores_each_request_by_its_own_head(llm, heads, capture_dir):
    from value_steer.core.checkpoint import load_value_head
    from value_steer.offline.qhead_training import _positions_rows

    chosen = ["a", "b", None, "a"]  # None: the default head (calm)
    sps = [_sp(extra_args={"value_steer_capture": True, **({"head": h} if h else {})}) for h in chosen]
    outs = llm.generate(PROMPTS, sps, use_tqdm=False)
    base = llm.generate(PROMPTS, _sp(extra_args={"value_steer": False}), use_tqdm=False)
    assert llm.collective_rpc("value_steer_flush_capture")[0] >= 1
    rows = _positions_rows(capture_dir)
    ref = {name: load_value_head(path, hidden_size=TINY_HIDDEN).head.eval() for name, path in heads.items()}
    for out, b, name in zip(outs, base, chosen):
        name = name or "calm"
        assert _stats(llm, out.request_id)["head"] == name
        steps = _steps(llm, out.request_id)
        toks = list(out.outputs[0].token_ids)
        assert [s["winner_token"] for s in steps] == toks and len(toks) == N
        captured = next(v for k, v in rows.items() if k.startswith(out.request_id + "-"))
        with torch.no_grad():
            winner_values = ref[name].p(torch.stack([captured[s["position"]] for s in steps])).tolist()
        for s, v in zip(steps, winner_values):
            # The committed token's value, scored in the batch, is the request's own head's value of its state.
            assert v == pytest.approx(s["values"][s["winner_col"]], abs=1e-5)
            if name == "calm":
                assert s["winner_col"] == 0
            else:
                assert s["winner_col"] == int(np.argmin(s["values"]))  # all unsafe: the safest candidate
        if name == "calm":
            assert toks == list(b.outputs[0].token_ids)  # never intervenes: the base text
    # Heads a and b disagree on the same prompt's first step (the test can tell the heads apart).
    same = llm.generate(PROMPTS[:1] * 2, [_sp(extra_args={"head": h}) for h in ("a", "b")], use_tqdm=False)
    va, vb = (_steps(llm, o.request_id)[0]["values"] for o in same)
    assert va != pytest.approx(vb, abs=1e-3)


def test_a_request_alone_equals_the_same_request_in_a_mixed_batch(llm):
    alone = llm.generate(PROMPTS[2:3], _sp(extra_args={"head": "b"}), use_tqdm=False)[0]
    mixed = llm.generate(PROMPTS, [_sp(extra_args={"head": h}) for h in ("a", "calm", "b", "a")], use_tqdm=False)[2]
    assert list(alone.outputs[0].token_ids) == list(mixed.outputs[0].token_ids)


@pytest.mark.parametrize("bad", ["toxicity", "A", 3])
def test_unknown_head_is_refused_naming_the_known_ones(llm, bad):
    from vllm.exceptions import VLLMValidationError  # the offline engine's form of a 400

    with pytest.raises((ValueError, VLLMValidationError), match=r"head must be one of \['a', 'b', 'calm'\]"):
        llm.generate(PROMPTS[:1], _sp(extra_args={"head": bad}), use_tqdm=False)
