"""value_steer.core.qhead: the Q-head's math, the token filter's semantics and the checkpoint format (issue 24)."""

from __future__ import annotations

import json

import pytest
import torch

from value_steer.core.qhead import (
    MIN_SAFE_MASS,
    QHead,
    QHeadCheckpointError,
    load_qhead,
    qhead_rows,
    save_qhead,
    token_filter_rows,
)

H, V, R = 16, 40, 4


def _head(seed: int = 0) -> QHead:
    torch.manual_seed(seed)
    head = QHead(H, V, R)
    with torch.no_grad():
        head.w_up.normal_()
        head.bias.normal_()
        head.pos.normal_(std=0.1)
    return head


def test_qhead_rows_and_gather_agree():
    head = _head()
    h = torch.randn(3, H)
    q = head(h)
    assert q.shape == (3, V) and q.dtype == torch.float32
    ref = (h + head.pos) @ head.w_down.t() @ head.w_up.t() + head.bias
    torch.testing.assert_close(q, ref)
    assert torch.equal(qhead_rows(h, *head.weights()), q)
    tok = torch.tensor([[0, 5], [7, 7], [39, 1]])
    torch.testing.assert_close(head.gather(h, tok), q.gather(1, tok))


def _rows(b: int, **kw):
    base = {"threshold": torch.full((b,), 0.5), "sign": torch.ones(b), "beta": torch.zeros(b),
            "on": torch.ones(b, dtype=torch.bool)}
    base.update(kw)
    return base


def test_mask_removes_exactly_the_tokens_over_the_threshold():
    logits = torch.randn(2, V + 3)
    q = torch.full((2, V), -3.0)
    q[0, [4, 9]] = 3.0  # predicted undesirable
    q[1, 2] = 3.0
    out, changed, mass = token_filter_rows(logits, q, **_rows(2))
    assert torch.isinf(out[0, [4, 9]]).all() and torch.isinf(out[1, 2])
    keep = torch.ones(2, V + 3, dtype=torch.bool)
    keep[0, [4, 9]] = False
    keep[1, 2] = False
    assert torch.equal(out[keep], logits[keep])  # everything else bitwise, padding columns included
    probs = torch.softmax(logits[:, :V], dim=-1)
    torch.testing.assert_close(mass, torch.stack([probs[0, [4, 9]].sum(), probs[1, 2]]))
    assert changed.tolist() == [True, True]


def test_direction_below_flips_the_side():
    logits = torch.randn(1, V)
    q = torch.full((1, V), 3.0)
    q[0, 1] = -3.0
    out, _, _ = token_filter_rows(logits, q, **_rows(1, sign=-torch.ones(1)))
    assert torch.isinf(out[0, 1]) and torch.isfinite(out[0, [0, 2]]).all()


def test_a_threshold_no_token_crosses_and_off_rows_are_bitwise():
    logits = torch.randn(3, V, dtype=torch.bfloat16)
    q = torch.randn(3, V)
    q2 = q.clone()
    q2[0] = q[0].clamp(max=5.0)  # sigmoid < 0.9999 everywhere
    out, changed, mass = token_filter_rows(logits, q2, **_rows(3, threshold=torch.tensor([0.9999, 0.5, 0.5]),
                                                             on=torch.tensor([True, False, True])))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[1], logits[1])
    assert changed[:2].tolist() == [False, False] and mass[:2].tolist() == [0.0, 0.0]


def test_fallback_keeps_only_the_safest_token_when_safe_mass_is_negligible():
    logits = torch.full((1, V), -30.0)
    logits[0, 3] = 30.0  # all the mass on token 3, predicted unsafe
    q = torch.full((1, V), 2.0)
    q[0, 3] = 4.0
    q[0, 11] = 1.0  # the safest prediction, still over the threshold... and one safe token with no mass:
    q[0, 20] = -2.0
    out, changed, mass = token_filter_rows(logits, q, **_rows(1))
    # Safe mass (token 20) is ~e-60 < MIN_SAFE_MASS: only the safest-predicted token (20) stays.
    assert MIN_SAFE_MASS > 0 and torch.isfinite(out[0]).sum() == 1 and torch.isfinite(out[0, 20])
    assert out[0, 20] == logits[0, 20] and changed.item() and mass.item() > 0.999


def test_tilt_shifts_every_token_by_its_predicted_value():
    logits = torch.randn(2, V)
    q = torch.randn(2, V)
    beta = torch.tensor([0.5, 0.0])
    out, changed, mass = token_filter_rows(logits, q, **_rows(2, beta=beta, threshold=torch.tensor([0.5, 0.9999])))
    torch.testing.assert_close(out[0], logits[0] - 0.5 * q[0])
    assert changed[0] and 0 < mass[0] < 1


def test_checkpoint_round_trip_and_errors(tmp_path):
    head = _head(1)
    path = tmp_path / "q.safetensors"
    save_qhead(path, head, threshold=0.6, direction="above", training={"n": 3}, command="value-steer train-qhead")
    ck = load_qhead(path, hidden_size=H, vocab_size=V)
    assert (ck.threshold, ck.direction, ck.sign, ck.training) == (0.6, "above", 1.0, {"n": 3})
    h = torch.randn(2, H)
    assert torch.equal(ck.head(h), head(h))
    with pytest.raises(QHeadCheckpointError, match="hidden_size 16 does not match the model's 32"):
        load_qhead(path, hidden_size=32)
    with pytest.raises(QHeadCheckpointError, match="vocab_size 40 does not match"):
        load_qhead(path, vocab_size=41)
    side = json.loads((tmp_path / "q.safetensors.meta.json").read_text())
    for key, value, match in [("threshold", 1.5, "threshold must be a number in"),
                              ("direction", "up", "direction must be one of"),
                              ("format", "x", "format must be"), ("extra", 1, "unknown key")]:
        bad = {**side, key: value}
        (tmp_path / "q.safetensors.meta.json").write_text(json.dumps(bad))
        with pytest.raises(QHeadCheckpointError, match=match):
            load_qhead(path)
    (tmp_path / "q.safetensors.meta.json").write_text(json.dumps({**side, "rank": R + 1}))
    with pytest.raises(QHeadCheckpointError, match="w_down must be F32"):
        load_qhead(path)
    with pytest.raises(QHeadCheckpointError, match=r"must be a \.safetensors file"):
        load_qhead(tmp_path / "q.pt")


def _vfd_commit_probs(p: torch.Tensor, unsafe: torch.Tensor, k: int) -> torch.Tensor:
    """Exact VFD's commit distribution by enumeration of every K-draw sequence: the first safe draw, else the first
    draw (the K-candidate rule's model of the fallback)."""
    import itertools

    v = p.shape[0]
    out = torch.zeros(v, dtype=torch.float64)
    for seq in itertools.product(range(v), repeat=k):
        prob = float(torch.prod(p[list(seq)].double()))
        safe = [t for t in seq if not unsafe[t]]
        out[safe[0] if safe else seq[0]] += prob
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_rule_is_exact_vfds_commit_distribution(k):
    torch.manual_seed(k)
    v = 5
    logits = torch.randn(3, v)
    q = torch.randn(3, v) * 3
    q[1] = -5.0  # every token safe: unchanged
    q[2] = 5.0  # every token unsafe: unchanged
    rows = _rows(3)
    out, changed, mass = token_filter_rows(logits, q, **rows, k=torch.full((3,), k))
    for b in range(3):
        p = torch.softmax(logits[b].double(), -1)
        unsafe = torch.sigmoid(q[b]) > 0.5
        want = _vfd_commit_probs(p, unsafe, k)
        torch.testing.assert_close(torch.softmax(out[b].double(), -1), want, rtol=1e-5, atol=1e-6)
        tv = 0.5 * float((want - p).abs().sum())
        assert float(mass[b]) == pytest.approx(tv, abs=1e-5)
    assert changed.tolist() == [k > 1 and 0 < int((torch.sigmoid(q[0]) > 0.5).sum()) < v, False, False]
    assert torch.equal(out[1:], logits[1:])


def test_k_rule_rows_beside_mask_and_tilt_rows():
    logits = torch.randn(3, V)
    q = torch.randn(3, V) * 2
    beta = torch.tensor([0.0, 0.0, 1.0])
    k = torch.tensor([0, 4, 4])
    out, _, _ = token_filter_rows(logits, q, **_rows(3, beta=beta), k=k)
    mask_only, _, _ = token_filter_rows(logits, q, **_rows(3, beta=beta))
    assert torch.equal(out[0], mask_only[0]) and torch.equal(out[2], mask_only[2])  # mask and tilt rows: as before
    assert torch.isfinite(out[1]).all()  # the K rule moves mass, it removes nothing
