"""Abstention scores the right hidden state: the values it reports are the head applied to the exact
decode-matched states the capture writer records (a random head, so a wrong row would show)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY_HIDDEN, make_llm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_abstention_values_are_the_head_on_the_captured_states(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from vllm import SamplingParams

    from value_steer.core.checkpoint import load_value_head, save_value_head
    from value_steer.core.value_head import ValueHead

    torch.manual_seed(3)
    head_path = str(tmp_path / "head.safetensors")
    save_value_head(head_path, ValueHead(TINY_HIDDEN), threshold=1.0)  # values near 0.5: never crosses
    cap = tmp_path / "capture"
    llm = make_llm(tiny_model_dir, {"abstain": {"value_head_path": head_path}, "capture": {"dir": str(cap)}})
    try:
        n = 8
        outs = llm.generate(["hello world", "the quick brown fox"],
                            SamplingParams(temperature=0.0, max_tokens=n,
                                           extra_args={"value_steer_capture": True}), use_tqdm=False)
        llm.collective_rpc("value_steer_flush_capture")
        stats = {o.request_id: llm.collective_rpc("value_steer_stats", args=(o.request_id,))[0]["stats"] for o in outs}
    finally:
        del llm
    head = load_value_head(head_path, hidden_size=TINY_HIDDEN).head
    index = [json.loads(line) for line in (cap / "requests.jsonl").read_text().splitlines()]
    shards = [load_file(str(f)) for f in sorted(cap.glob("shard-*.safetensors"))]
    seq = torch.cat([s["seq_id"] for s in shards])
    pos = torch.cat([s["position"] for s in shards])
    hid = torch.cat([s["hidden"] for s in shards])
    for o in outs:
        sid = next(r["seq_id"] for r in index if r["request_id"].startswith(o.request_id + "-"))
        sel = seq == sid
        order = torch.argsort(pos[sel])
        with torch.no_grad():
            p = head.p(hid[sel][order].float())
        st = stats[o.request_id]
        # Every decode step is scored (the first token comes from prefill): one value per captured state.
        assert st["num_scored"] == len(o.outputs[0].token_ids) - 1 == p.numel() >= 1
        assert st["last_value"] == pytest.approx(float(p[-1]), abs=1e-6)
        assert st["max_value"] == pytest.approx(float(p.max()), abs=1e-6)
        assert not st["forced_eos"]
