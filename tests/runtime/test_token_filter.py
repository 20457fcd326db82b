"""value_steer.runtime.token_filter: the runtime's mask path equals the core reference (issue 24)."""

from __future__ import annotations

import pytest
import torch

from value_steer.core.qhead import token_filter_rows
from value_steer.runtime.token_filter import mask_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_rows_equals_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    b, v = 6, 300
    logits = (torch.randn(b, v + 4, generator=g) * 3).to(dtype)
    q = torch.randn(b, v, generator=g) * 2
    q[3] = 5.0  # every token predicted unsafe: the fallback keeps the safest
    q[3, 17] = 4.0
    threshold = torch.tensor([0.5, 0.3, 0.9, 0.5, 0.0, 1.0])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    on = torch.tensor([True, True, True, True, True, False])
    want = token_filter_rows(logits, q, threshold, sign, torch.zeros(b), on)
    got = mask_rows(logits, q, threshold, sign, on)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got[0][3, :v]).sum() == 1 and torch.isfinite(got[0][3, 17])


def test_mask_rows_with_k_equals_the_reference():
    torch.manual_seed(3)
    b, v = 6, 300
    logits = torch.randn(b, v + 4) * 3
    q = torch.randn(b, v) * 2
    threshold = torch.tensor([0.5, 0.3, 0.7, 0.5, 0.5, 0.9])
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    on = torch.tensor([True, True, True, False, True, True])
    k = torch.tensor([0, 4, 8, 4, 1, 2])
    want = token_filter_rows(logits, q, threshold, sign, torch.zeros(b), on, k=k)
    got = mask_rows(logits, q, threshold, sign, on, k=k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0][3], logits[3])


def _planted(path, hidden: int, vocab: int, unsafe: list[int], direction: str = "above") -> str:
    from value_steer.core.qhead import QHead, save_qhead

    head = QHead(hidden, vocab, rank=2)
    with torch.no_grad():
        head.bias.fill_(-8.0 if direction == "above" else 8.0)
        head.bias[unsafe] = 8.0 if direction == "above" else -8.0
    save_qhead(str(path), head, threshold=0.5, direction=direction)
    return str(path)


def test_several_qheads_filter_each_row_by_its_own(tmp_path):
    """Token mode with named Q-heads: each row's tokens are masked by its request's Q-head (direction and threshold
    from that head's sidecar); an unsteered row and a row of the other head stay as they are."""
    import numpy as np

    from value_steer.core.config import parse_additional_config
    from value_steer.runtime.state import SteeringState

    h, v = 8, 32
    heads = {"tone": {"path": _planted(tmp_path / "a.safetensors", h, v, [3, 4])},
             "prices": {"path": _planted(tmp_path / "b.safetensors", h, v, [7], direction="below")}}
    cfg = parse_additional_config({"vfd": {"mode": "token", "heads": heads, "default_head": "tone"}})
    st = SteeringState(cfg, hidden_size=h, max_num_seqs=4, device=torch.device("cpu"), vocab_size=v)
    for rid, args in (("a", {"head": "prices"}), ("b", None), ("c", {"value_steer": False})):
        st.add_request(rid, args, 2, False)
    st.update_batch(["a", "b", "c"])
    st.flush()
    assert [st.stats_for(r)["head"] for r in "abc"] == ["prices", "tone", None]
    logits = torch.zeros(3, v)
    row_idx = st.upload_step_rows(st.slot_row[:3].astype(np.int32))
    t = st.rows
    out, q, changed = st.token.filter(torch.randn(3, h), logits, row_idx, t.threshold, t.sign, t.mode, t.head)
    removed = [torch.isinf(out[i]).nonzero().flatten().tolist() for i in range(3)]
    assert removed == [[7], [3, 4], []] and changed.tolist() == [True, True, False]
    assert torch.equal(out[2], logits[2])
    assert float(q[0, 7]) == -8.0 and float(q[1, 3]) == 8.0  # each row's own head's predictions
