"""SteeringState with a ``logit_steering`` section: the generator checked against the model at start-up, logit rows
independent of the other rows, the strength table and batch-slot rows, one fused op per step (matching the
reference), telemetry (mean / max gate strength) in the stats, and the host-sync budget of a steady step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from value_steer.core.checkpoint import save_value_head
from value_steer.core.config import RequestArgError, parse_additional_config
from value_steer.core.logit_steer import LogitSteerGenerator, logit_steer_rows, save_logit_steer
from value_steer.core.value_head import ValueHead
from value_steer.runtime.state import SteeringState

H, V = 16, 40
META = torch.device("meta")


@pytest.fixture
def gen_path(tmp_path) -> str:
    torch.manual_seed(0)
    gen = LogitSteerGenerator(H, V, rank=2, gate_hidden=3, max_strength=1.5)
    with torch.no_grad():
        gen.w_up.normal_()
    path = str(tmp_path / "gen.safetensors")
    save_logit_steer(path, gen)
    return path


def _state(gen_path: str, device: torch.device | None = None, vocab_size: int = V, **sections) -> SteeringState:
    device = device or torch.device("cpu")
    cfg = parse_additional_config({"logit_steering": {"checkpoint": gen_path}, **sections})
    return SteeringState(cfg, hidden_size=H, max_num_seqs=4, device=device, max_batch_slots=6, vocab_size=vocab_size)


def test_generator_must_fit_the_model(gen_path):
    cfg = parse_additional_config({"logit_steering": {"checkpoint": gen_path}})
    with pytest.raises(ValueError, match=r"logit_steering.checkpoint: .*vocab_size.*40 logit columns.*needs 48"):
        SteeringState(cfg, hidden_size=H, max_num_seqs=2, device=torch.device("cpu"), vocab_size=48)
    with pytest.raises(ValueError, match=r"logit_steering.checkpoint: .*hidden_size"):
        SteeringState(cfg, hidden_size=H + 1, max_num_seqs=2, device=torch.device("cpu"), vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        SteeringState(cfg, hidden_size=H, max_num_seqs=2, device=torch.device("cpu"))


def test_logit_rows_are_their_own_and_steer_like_the_reference(gen_path, tmp_path):
    head = str(tmp_path / "head.safetensors")
    save_value_head(head, ValueHead(H), threshold=0.5)
    st = _state(gen_path, abstain={"value_head_path": head})
    a = st.add_request("a", {"logit_steering": 2.0}, 2, False)
    b = st.add_request("b", {"value_steer": False}, 2, False)
    c = st.add_request("c", {"logit_steering": "0.5", "value_steer": False}, 2, False)
    assert (a.row, a.logit_row, b.logit_row, c.row, c.logit_row) == (1, 1, 0, 0, 2)
    with pytest.raises(RequestArgError, match="logit_steering must be"):
        st.add_request("x", {"logit_steering": 9}, 2, False)
    assert st.steer_logits(torch.zeros(3, H), torch.zeros(3, V)) is None  # no batch yet: nothing to do
    st.update_batch(["c", "b", "a"])
    st.flush()
    assert st.slot_logit_row[:3].tolist() == [2, 0, 1]
    hidden, logits = torch.randn(3, H), torch.randn(3, V)
    out, gs, rows = st.steer_logits(hidden, logits)
    gen = st.logit.checkpoint.generator
    ref, ref_gs = logit_steer_rows(hidden, logits, torch.tensor([0.5, 0.0, 2.0]), *gen.weights(), gen.max_strength)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[1], logits[1]) and rows.tolist() == [2, 0, 1]
    # A row that samples nothing this step (partial prefill) is left alone.
    out2, gs2, rows2 = st.steer_logits(hidden, logits, skip=np.array([True, False, False]))
    assert torch.equal(out2[0], logits[0]) and float(gs2[0]) == 0.0 and rows2.tolist() == [0, 0, 1]

    # Telemetry: mean and max gate strength over the recorded steps, per request.
    st.logit.record(rows, gs)
    st.logit.record(rows2, gs2)
    sa, sc = st.stats_for("a")["logit_steering"], st.stats_for("c")["logit_steering"]
    assert sa["strength"] == 2.0 and sa["num_steered"] == 2
    assert sa["mean_gate_strength"] == pytest.approx(float(gs[2]) / 1.0, rel=1e-6)
    assert sa["max_gate_strength"] == pytest.approx(float(gs[2]), rel=1e-6)
    assert sc["num_steered"] == 1 and sc["max_gate_strength"] == pytest.approx(float(gs[0]), rel=1e-6)
    assert 0.0 < sc["mean_gate_strength"] < 1.5
    assert st.stats_for("b")["logit_steering"] is None

    # Finish: the stats are kept, the row is freed (its strength back to 0 so a stale index is inert) and reused
    # with fresh telemetry.
    st.finish_request("a")
    st.flush()
    assert st.stats_for("a")["logit_steering"]["num_steered"] == 2
    assert float(st.logit.row_strength[1]) == 0.0
    d = st.add_request("d", {"logit_steering": True}, 2, False)
    st.update_batch(["c", "b", "d"])
    st.flush()
    assert d.logit_row == 1 and st.stats_for("d")["logit_steering"] == {
        "strength": 1.0, "generator": "default", "num_steered": 0, "mean_gate_strength": None,
        "max_gate_strength": None}


def test_batch_without_logit_requests_skips_the_op(gen_path):
    st = _state(gen_path)
    st.add_request("a", None, 2, False)
    st.add_request("b", {"logit_steering": 0}, 2, False)
    st.update_batch(["a", "b"])
    st.flush()
    assert st.steer_logits(torch.randn(2, H), torch.randn(2, V)) is None
    assert st.logit.live == 0


def test_padded_logits(gen_path):
    """Wider logits than the generator are refused by the worker's exact check; the op itself leaves the
    padding alone (a generator loaded for a padded vocabulary)."""
    from value_steer.core.logit_steer import load_logit_steer
    from value_steer.runtime.logit_steer import LogitSteerTables

    lt = LogitSteerTables(load_logit_steer(gen_path, hidden_size=H, vocab_size=V + 8, min_vocab_size=V), 3, 2,
                          "cpu")
    row = lt.add_request(1.0)
    lt.update_batch(np.array([row, 0], dtype=np.int32))
    lt.flush()
    logits = torch.randn(2, V + 8)
    out, _ = lt.apply(torch.randn(2, H), logits, lt.step_rows(2))
    assert torch.equal(out[:, V:], logits[:, V:]) and torch.equal(out[1], logits[1])
    assert not torch.equal(out[0, :V], logits[0, :V])


def test_steady_step_budget(gen_path, sync_counter):
    """A steady logit-steered step: no host->device copy (the slot table is published at lifecycle steps), nothing
    read back; a step with a partial prefill row makes one non-blocking copy."""
    st = _state(gen_path, device=META)
    st.add_request("a", {"logit_steering": 1.0}, 2, False)
    st.add_request("b", None, 2, False)
    st.update_batch(["a", "b"])
    st.flush()
    hidden = torch.empty((2, H), device=META)
    logits = torch.empty((2, V), device=META)
    with sync_counter() as c:
        st.update_batch(["a", "b"])  # steady: unchanged
        st.flush()
        out, gs, rows = st.steer_logits(hidden, logits, skip=np.zeros(2, dtype=bool))
        st.logit.record(rows, gs)
    assert c.blocking == 0 and c.counts["h2d"] == 0 and c.counts["list_to_device"] == 0, c.log
    assert out.shape == (2, V) and gs.shape == (2,)
    with sync_counter() as c:
        st.steer_logits(hidden, logits, skip=np.array([True, False]))
    assert c.blocking == 0 and c.counts["h2d"] == 1, c.log


def test_several_generators_steer_each_row_by_its_own(gen_path, tmp_path, sync_counter):
    """Named generators: a request picks one by ``generator``; in a mixed batch each row equals its own generator's
    reference, the unsteered row is bitwise, the stats name the generator; a steady step still copies nothing."""
    torch.manual_seed(1)
    other = LogitSteerGenerator(H, V, rank=3, gate_hidden=2, max_strength=2.0)
    with torch.no_grad():
        other.w_up.normal_()
    other_path = str(tmp_path / "other.safetensors")
    save_logit_steer(other_path, other)
    section = {"generators": {"tone": {"checkpoint": gen_path}, "prices": {"checkpoint": other_path}},
               "default_generator": "tone"}
    cfg = parse_additional_config({"logit_steering": section})
    st = SteeringState(cfg, hidden_size=H, max_num_seqs=4, device=torch.device("cpu"), max_batch_slots=6,
                       vocab_size=V)
    st.add_request("a", {"logit_steering": 2.0}, 2, False)  # default: tone
    st.add_request("b", None, 2, False)
    st.add_request("c", {"logit_steering": 1.0, "generator": "prices"}, 2, False)
    with pytest.raises(RequestArgError, match=r"generator must be one of \['tone', 'prices'\]"):
        st.add_request("x", {"logit_steering": 1.0, "generator": "toxicity"}, 2, False)
    with pytest.raises(RequestArgError, match="generator: send logit_steering"):
        st.add_request("y", {"generator": "prices"}, 2, False)
    st.update_batch(["c", "b", "a"])
    st.flush()
    hidden, logits = torch.randn(3, H), torch.randn(3, V)
    out, gs, _ = st.steer_logits(hidden, logits)
    g0, g1 = (c.generator for c in st.logit.checkpoints)
    ref0, gs0 = logit_steer_rows(hidden, logits, torch.tensor([0.0, 0.0, 2.0]), *g0.weights(), g0.max_strength)
    ref1, gs1 = logit_steer_rows(hidden, logits, torch.tensor([1.0, 0.0, 0.0]), *g1.weights(), g1.max_strength)
    torch.testing.assert_close(out[2], ref0[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], ref1[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], logits[1])
    torch.testing.assert_close(gs, torch.stack([gs1[0], torch.tensor(0.0), gs0[2]]), rtol=1e-6, atol=1e-6)
    st.logit.record(st.logit.step_rows(3), gs)
    assert st.stats_for("a")["logit_steering"]["generator"] == "tone"
    assert st.stats_for("c")["logit_steering"]["generator"] == "prices"
    # Only the generators the batch uses run: a batch of tone rows leaves prices' pass out.
    st.update_batch(["a", "b"])
    st.flush()
    assert st.logit.batch_generators == (0,)
    out2, _, _ = st.steer_logits(hidden[:2], logits[:2])
    ref_a, _ = logit_steer_rows(hidden[:1], logits[:1], torch.tensor([2.0]), *g0.weights(), g0.max_strength)
    torch.testing.assert_close(out2[0], ref_a[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out2[1], logits[1])
