"""Decode-matched capture in a real vLLM 0.32 engine: one row per scored decode token, bit-for-bit
the backbone's final post-norm hidden state (checked against transformers on the same tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import make_llm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def llm(tiny_model_dir, capture_dir):
    engine = make_llm(tiny_model_dir, {"capture": {"dir": str(capture_dir)}}, max_num_batched_tokens=64,
                      enable_prefix_caching=False)
    yield engine
    del engine


def _rows(capture_dir, request_id):
    from safetensors.torch import load_file

    index = [json.loads(line) for line in (capture_dir / "requests.jsonl").read_text().splitlines()]
    seq = [r["seq_id"] for r in index if r["request_id"].startswith(request_id + "-")]
    assert len(seq) <= 1
    if not seq:
        return torch.empty(0, dtype=torch.long), None
    shards = [load_file(str(f)) for f in sorted(capture_dir.glob("shard-*.safetensors"))]
    sel = torch.cat([t["seq_id"] for t in shards]) == seq[0]
    pos = torch.cat([t["position"] for t in shards])[sel]
    hidden = torch.cat([t["hidden"] for t in shards])[sel]
    order = torch.argsort(pos)
    return pos[order], hidden[order]


def test_capture_matches_the_backbone_hidden_state(llm, tiny_model_dir, capture_dir):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    prompts = ["hello world", "the quick brown fox jumps"]
    n = 12
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                extra_args={"value_steer_capture": True}), use_tqdm=False)
    quiet = llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    assert llm.collective_rpc("value_steer_flush_capture")[0] >= 1

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        pos, hidden = _rows(capture_dir, o.request_id)
        # Every decode step scores the state after the last generated token: positions P .. P+n-2.
        p0 = len(o.prompt_token_ids)
        assert pos.tolist() == list(range(p0, p0 + n - 1))
        with torch.no_grad():
            ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(hidden, ref[pos], atol=2e-4, rtol=2e-4)
    # Capture is per request: one that did not ask is not recorded.
    assert _rows(capture_dir, quiet.request_id)[0].numel() == 0


def test_replayed_response_rows_equal_the_decode_rows(llm, tiny_model_dir, capture_dir):
    """``capture_prompt_from``: a given response prefilled after its prompt (a ``labels`` task's replay) is captured
    at the response's positions, equal to the rows decoding it wrote, over a prefill split into chunks (the engine's
    64-token budget) and beside a request that did not ask."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    n = 12
    sampled = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                    extra_args={"value_steer_capture": True}), use_tqdm=False)[0]
    p0 = len(sampled.prompt_token_ids)
    ids = list(sampled.prompt_token_ids) + list(sampled.outputs[0].token_ids)
    assert len(ids) > 64  # chunked
    replay, plain = llm.generate(
        [{"prompt_token_ids": ids}, {"prompt_token_ids": ids}],
        [SamplingParams(max_tokens=1, temperature=0.0, extra_args={"capture_prompt_from": p0}),
         SamplingParams(max_tokens=1, temperature=0.0)], use_tqdm=False)
    llm.collective_rpc("value_steer_flush_capture")
    pos, hidden = _rows(capture_dir, replay.request_id)
    assert pos.tolist() == list(range(p0, len(ids)))  # the state after each response token, the last included
    dpos, dhidden = _rows(capture_dir, sampled.request_id)
    torch.testing.assert_close(hidden[: n - 1], dhidden, atol=2e-4, rtol=2e-4)
    assert dpos.tolist() == pos[: n - 1].tolist()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(hidden, ref[pos], atol=2e-4, rtol=2e-4)
    assert _rows(capture_dir, plain.request_id)[0].numel() == 0
