"""SteeringState with a ``steering`` section: activation rows independent of value-steering rows, admission
through the bank (fingerprint check, all-or-nothing), release on finish, batch-slot rows, capture_layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from value_steer.core.config import RequestArgError, parse_additional_config
from value_steer.core.steering_spec import fingerprint, parse_steering_spec
from value_steer.runtime.state import SteeringState

H, L = 8, 3


def _state(tmp_path, capture: bool = False) -> SteeringState:
    raw = {"steering": {"max_vectors": 4, "max_ops_per_request": 2}}
    if capture:
        raw["capture"] = {"dir": str(tmp_path / "cap")}
    cfg = parse_additional_config(raw)
    return SteeringState(cfg, hidden_size=H, max_num_seqs=3, device=torch.device("cpu"), num_layers=L,
                         max_tokens=32)


def _spec(seed: int = 0, layer: int = 1) -> dict:
    return {"ops": [{"layer": layer, "op": "add", "vector": np.random.RandomState(seed).randn(H).tolist(),
                     "scale": 2.0}]}


def test_steering_section_needs_model_facts():
    cfg = parse_additional_config({"steering": {}})
    with pytest.raises(ValueError, match="num_layers"):
        SteeringState(cfg, hidden_size=H, max_num_seqs=2, device=torch.device("cpu"))


def test_activation_rows_are_their_own(tmp_path):
    st = _state(tmp_path)
    a = st.add_request("a", {"steering": _spec(0)}, eos_token_id=2, ignore_eos=False)
    b = st.add_request("b", None, eos_token_id=2, ignore_eos=False)
    c = st.add_request("c", {"steering": _spec(1, layer=2)}, eos_token_id=2, ignore_eos=False)
    assert a.row == 0 and a.act_row == 1 and b.act_row == 0 and c.act_row == 2
    assert st.activation.active and st.activation.layer_use.tolist() == [0, 1, 1]
    st.update_batch(["c", "b", "a"])
    assert st.slot_act_row[:3].tolist() == [2, 0, 1]
    info = st.stats_for("a")
    assert info["activation_steering"] == {"ops": 1, "gated": False, "gate_tokens": 0, "gate_open_rate": None}
    assert st.stats_for("b")["activation_steering"] is None
    st.finish_request("a")
    st.finish_request("c")
    assert not st.activation.active and st.activation.bank.usage()["slots_used"] == 0
    # Freed rows are reused.
    assert st.add_request("d", {"steering": _spec(2)}, eos_token_id=2, ignore_eos=False).act_row in (1, 2)


def test_fingerprint_mismatch_is_refused_without_leaking(tmp_path):
    st = _state(tmp_path)
    bank = st.activation.bank
    bank.register("calm", np.ones(H, dtype=np.float32))
    raw = {"ops": [{"layer": 0, "op": "add", "vector": "calm"}]}
    spec = parse_steering_spec(raw, hidden_size=H, num_layers=L, max_ops=2, max_inline_floats=64,
                               resolve=bank.resolve)
    good = fingerprint(spec, bank.vector_hash)
    bank.register("calm", np.full(H, 2.0, dtype=np.float32))  # re-registered after the frontend salted
    with pytest.raises(RequestArgError, match="does not match the vectors it was admitted with"):
        st.add_request("x", {"steering": raw}, 2, False, expected_fingerprint=good)
    assert "x" not in st.requests and not st.activation.active
    assert st.add_request("y", {"steering": raw}, 2, False,
                          expected_fingerprint=fingerprint(spec, bank.vector_hash)).act_row == 1


def test_unknown_vector_and_bad_layer_are_refused(tmp_path):
    st = _state(tmp_path)
    with pytest.raises(RequestArgError, match=r"steering.ops\[0\].vector"):
        st.add_request("x", {"steering": {"ops": [{"layer": 0, "op": "add", "vector": "nope"}]}}, 2, False)
    with pytest.raises(RequestArgError, match=r"steering.ops\[0\].layer"):
        st.add_request("x", {"steering": _spec(0, layer=L)}, 2, False)
    assert not st.activation.active and len(st._free_act_rows) == 3


def test_capture_layers(tmp_path):
    st = _state(tmp_path, capture=True)
    s = st.add_request("a", {"capture_layers": [2, 0]}, 2, False)
    assert s.act_row == 1 and s.steer.capture_layers == (0, 2) and s.steer.steering is None
    assert st.activation.capture_use.tolist() == [1, 0, 1]
    with pytest.raises(RequestArgError, match=r"capture_layers\[0\]"):
        st.add_request("b", {"capture_layers": [L]}, 2, False)
    with pytest.raises(RequestArgError, match="capture_layers"):
        _state(tmp_path).add_request("c", {"capture_layers": [0]}, 2, False)  # no capture section
    st.finish_request("a")
    assert not st.activation.capture_use.any()


def test_gate_telemetry(tmp_path):
    st = _state(tmp_path)
    act = st.activation
    probe = np.random.RandomState(9).randn(H).tolist()
    spec = {"ops": [{"layer": 1, "op": "add", "vector": probe}], "gate": {"layer": 1, "probe": probe}}
    g = st.add_request("g", {"steering": spec}, 2, False)
    u = st.add_request("u", {"steering": _spec(1)}, 2, False)
    st.update_batch(["g", "u"])
    st.flush()
    # A forward: g has 2 prompt tokens then 2 decode tokens; u one decode token. Gate values as the op wrote them.
    act.stage_tokens(st.slot_act_row[:2], np.array([4, 1]), np.array([0, 5]), np.array([2, 3]))
    act.publish_tokens()
    act.gate[:5] = torch.tensor([0.9, 0.9, 0.7, 0.2, 0.99])
    act.record_gates()
    act.end_forward()
    act.record_gates()  # nothing staged: no double count
    assert st.stats_for("g")["activation_steering"] == {"ops": 1, "gated": True, "gate_tokens": 2,
                                                         "gate_open_rate": 0.5}
    assert st.stats_for("u")["activation_steering"]["gate_tokens"] == 0
    st.finish_request("g")
    assert st.stats_for("g")["activation_steering"]["gate_open_rate"] == 0.5
    # A new request on the same row starts from zero.
    g2 = st.add_request("g2", {"steering": spec}, 2, False)
    assert g2.act_row == g.act_row
    st.flush()
    assert st.stats_for("g2")["activation_steering"]["gate_tokens"] == 0
    assert u.act_row != g.act_row


def _slot_data(st: SteeringState, req_id: str, layer: int = 0) -> np.ndarray:
    act = st.activation
    st.flush()
    row = st.requests[req_id].act_row
    return act.bank.table[int(act.dev["op_slot"][layer, row, 0])].numpy()


@pytest.mark.parametrize("change", ["re-register", "delete"])
def test_a_request_runs_with_the_version_it_was_admitted_with(tmp_path, change):
    """Issue 21: a vector re-registered or deleted while requests that name it are queued: each runs with the
    version its admission pinned (and its fingerprint), none is refused."""
    st = _state(tmp_path)
    bank = st.activation.bank
    old = np.full(H, 1.0, dtype=np.float32)
    bank.register("calm", old)
    raw = {"ops": [{"layer": 0, "op": "add", "vector": "calm", "scale": 2.0}]}
    spec = parse_steering_spec(raw, hidden_size=H, num_layers=L, max_ops=2, max_inline_floats=64, resolve=bank.resolve)
    pins = {"calm": bank.lookup("calm").content_hash}
    fp = fingerprint(spec, bank.vector_hash)
    if change == "delete":
        bank.delete("calm")
    else:
        bank.register("calm", np.full(H, 5.0, dtype=np.float32))
    st.add_request("q", {"steering": raw}, 2, False, expected_fingerprint=fp, pins=pins)
    np.testing.assert_array_equal(_slot_data(st, "q"), old)
    if change == "re-register":  # a request admitted after the change runs with the new version
        new_pins = {"calm": bank.lookup("calm").content_hash}
        st.add_request("r", {"steering": raw}, 2, False, pins=new_pins,
                       expected_fingerprint=fingerprint(spec, bank.vector_hash))
        np.testing.assert_array_equal(_slot_data(st, "r"), np.full(H, 5.0, dtype=np.float32))
    # A version that was never registered here is refused, naming the field.
    with pytest.raises(RequestArgError, match=r"steering.ops\[0\].vector: vector 'calm' was re-registered"):
        st.add_request("z", {"steering": raw}, 2, False, pins={"calm": "0" * 64})


def test_inline_vectors_never_wait_for_a_shared_slot(tmp_path):
    """Issue 21: with every shared slot taken, an inline-vector request still runs (its row's private slots)."""
    st = _state(tmp_path)
    bank = st.activation.bank
    for i in range(bank.max_vectors):
        bank.register(f"v{i}", np.random.RandomState(i).randn(H).astype(np.float32))
    assert bank.usage()["slots_free"] == 0
    vec = np.random.RandomState(99).randn(H).astype(np.float32)
    st.add_request("a", {"steering": {"ops": [{"layer": 1, "op": "add", "vector": vec.tolist()}]}}, 2, False)
    np.testing.assert_array_equal(_slot_data(st, "a", layer=1), vec)
    st.finish_request("a")
    assert bank.usage()["slots_free"] == 0  # nothing shared was taken or leaked


def test_preloaded_vectors_are_read_only(tmp_path):
    from safetensors.numpy import save_file

    from value_steer.runtime.activation import ReadOnlyVectorError

    d = tmp_path / "vecs"
    d.mkdir()
    save_file({"v": np.ones(H, dtype=np.float32)}, str(d / "calm.safetensors"))
    st = _state(tmp_path)
    bank = st.activation.bank
    bank.load_dir(str(d))
    with pytest.raises(ReadOnlyVectorError, match="read-only"):
        bank.register("calm", np.full(H, 2.0, dtype=np.float32))
    with pytest.raises(ReadOnlyVectorError, match="read-only"):
        bank.delete("calm")
    assert bank.list()[0]["readonly"] and bank.register("other", np.ones(H, dtype=np.float32)).name == "other"
