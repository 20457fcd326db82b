"""value_steer.runtime.token_filter: the token-mode tables with several Q-heads (the op itself: tests/kernels)."""

from __future__ import annotations

import torch


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
    out, changed = st.token.filter(torch.randn(3, h), logits, row_idx, t.threshold, t.sign, t.mode, t.head)
    removed = [torch.isinf(out[i]).nonzero().flatten().tolist() for i in range(3)]
    assert removed == [[7], [3, 4], []] and changed.tolist() == [True, True, False]
    assert torch.equal(out[2], logits[2])
    # The sampled tokens' predicted values come from each row's own head.
    assert st.token.sampled_values(torch.tensor([7, 3, 5])).tolist() == [-8.0, 8.0, -8.0]
