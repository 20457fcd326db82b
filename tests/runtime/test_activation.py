"""Activation-steering runtime: the vector bank's lifecycle, the op tables against the spec, the per-token fill,
and the host-sync budget of a steady step (on the ``meta`` stand-in device, see ``conftest.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from value_steer.core import activation as ref
from value_steer.core.config import RequestArgError
from value_steer.core.steering_spec import (
    FLAG_DECODE,
    FLAG_GATED,
    FLAG_PROMPT,
    OP_CODES,
    InlineVector,
    fingerprint,
    parse_steering_spec,
    vector_content_hash,
)
from value_steer.runtime.activation import (
    ActivationTables,
    BankFullError,
    VectorBank,
    VectorBankError,
)

H, L, R, M = 8, 4, 6, 4
CPU = torch.device("cpu")
META = torch.device("meta")


def _vec(seed: int, n: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, H) if n else (H,), generator=g)


def _bank(max_vectors: int = 8, device: torch.device = CPU) -> VectorBank:
    return VectorBank(max_vectors, H, L, device)


def _parse(bank: VectorBank, raw) -> object:
    return parse_steering_spec(raw, hidden_size=H, num_layers=L, max_ops=M, max_inline_floats=4 * H,
                               resolve=bank.resolve)


# ---- the bank ---------------------------------------------------------------------------------------------


def test_register_lookup_list_and_flush():
    bank = _bank()
    calm, layers = _vec(0), _vec(1, L)
    a = bank.register("calm", calm)
    assert a.shape == (H,) and a.slots == (0,) and a.content_hash == vector_content_hash(calm)
    assert math.isclose(a.norms[0], float(calm.norm()), rel_tol=1e-6)
    b = bank.register("per_layer", layers.numpy())
    assert b.per_layer and b.slots == (1, 2, 3, 4) and b.row_hash(2) == vector_content_hash(layers[2])
    # Same content under another name shares the slot.
    c = bank.register("calm_copy", calm.tolist())
    assert c.slots == (0,) and bank.usage() == {"max_vectors": 8, "slots_used": 5, "slots_free": 3,
                                                "inline_slots": 0, "private_slots_per_request": 0,
                                                "retired_versions": 0}
    assert bank.lookup("calm") == a and bank.lookup("nope") is None and bank.resolve("calm")
    assert [e["name"] for e in bank.list()] == ["calm", "calm_copy", "per_layer"]
    assert bank.list()[2]["slots"] == [1, 2, 3, 4] and bank.list()[0]["in_use"] == 0
    assert bank.register("calm", calm.clone()) == a  # same data again: nothing changes
    assert bank.flush() and not bank.flush()  # one copy of the written span, then nothing
    assert torch.equal(bank.table[0], calm) and torch.equal(bank.table[1:5], layers)
    assert bank.vector_hash("calm") == a.content_hash
    assert bank.vector_hash(InlineVector.from_values(calm)) == a.content_hash


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("bad/name", torch.ones(H), "vector name must be"),
        ("", torch.ones(H), "vector name must be"),
        ("v", torch.ones(H + 1), r"shape must be \[8\] or \[4, 8\]"),
        ("v", torch.ones(L + 1, H), r"shape must be \[8\] or \[4, 8\]"),
        ("v", torch.zeros(H), "zero vector"),
        ("v", torch.zeros(L, H), "zero vector"),
        ("v", torch.tensor([math.nan] + [1.0] * (H - 1)), "NaN or inf"),
    ],
)
def test_register_refuses_bad_input(name, data, match):
    with pytest.raises(VectorBankError, match=match):
        _bank().register(name, data)


def test_a_per_layer_vector_may_leave_layers_zero_but_no_op_uses_them():
    """Issue 22's per-layer files (``vectors --pairs``) leave unrequested layers zero: they register, and an op or a
    gate at such a layer is refused naming the layer (a zero row has no direction to add, cap or ablate along)."""
    bank = _bank()
    rows = torch.stack([torch.ones(H), torch.zeros(H), torch.ones(H), torch.ones(H)])
    info = bank.register("v", rows)
    assert info.norms[1] == 0.0
    assert bank.acquire_ref("v", 2)[1] == info.slots[2]
    with pytest.raises(VectorBankError, match="no direction at layer 1"):
        bank.acquire_ref("v", 1)


def test_refcounts_delete_and_replace():
    bank = _bank(max_vectors=3)
    old = bank.register("calm", _vec(0))
    slot = bank.acquire(old.content_hash)  # a running request holds calm
    held = bank.register("held", _vec(5))
    hslot = bank.acquire(held.content_hash)
    assert bank.delete("held") == 1  # the name goes; the running request keeps the content
    assert bank.lookup("held") is None and not bank.resolve("held")
    assert bank.usage()["slots_used"] == 2 and torch.equal(bank._host[hslot], _vec(5))
    bank.release(held.content_hash)
    assert bank.usage()["slots_used"] == 1
    # Replacing the data makes a new vector; the request keeps the old content in its slot.
    new = bank.register("calm", _vec(1))
    assert new.content_hash != old.content_hash and new.slots != (slot,)
    assert bank.usage()["slots_used"] == 2 and bank.usage()["inline_slots"] == 1
    assert torch.equal(bank._host[slot], _vec(0))  # untouched while held
    bank.release(old.content_hash)
    assert bank.usage()["slots_used"] == 1  # the old slot is freed once unreferenced
    with pytest.raises(VectorBankError, match="not held"):
        bank.release(old.content_hash)
    bank.delete("calm")
    assert bank.usage()["slots_used"] == 0 and bank.list() == []
    with pytest.raises(VectorBankError, match="unknown vector 'calm'"):
        bank.delete("calm")


def test_full_bank_names_max_vectors():
    bank = _bank(max_vectors=2)
    bank.register("a", _vec(0))
    with pytest.raises(BankFullError, match=r"max_vectors=2 \(steering\.max_vectors"):
        bank.register("layers", _vec(1, L))
    assert bank.usage()["slots_used"] == 1  # nothing half-done
    bank.register("b", _vec(2))
    with pytest.raises(BankFullError, match="max_vectors=2"):
        bank.acquire_inline(InlineVector.from_values(_vec(3)))
    # An inline vector equal to a stored one shares its slot (no new slot needed).
    h, s = bank.acquire_inline(InlineVector.from_values(_vec(2)))
    assert s == bank.lookup("b").slots[0]
    bank.release(h)
    # Replacing a name whose old slot would be freed fits in a full bank.
    assert bank.register("a", _vec(4)).slots == (0,)


def test_load_dir(tmp_path):
    save_file({"v": _vec(0)}, str(tmp_path / "calm.safetensors"))
    save_file({"layers": _vec(1, L)}, str(tmp_path / "per_layer.safetensors"))
    (tmp_path / "notes.txt").write_text("ignored")
    bank = _bank()
    assert [i.name for i in bank.load_dir(str(tmp_path))] == ["calm", "per_layer"]
    assert bank.lookup("per_layer").per_layer and bank.usage()["slots_used"] == 1 + L
    save_file({"a": _vec(0), "b": _vec(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(VectorBankError, match=r"two\.safetensors: expected exactly one tensor"):
        _bank().load_dir(str(tmp_path))
    (tmp_path / "two.safetensors").unlink()
    save_file({"v": torch.ones(3)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(VectorBankError, match=r"short\.safetensors: vector 'short': shape must be"):
        _bank().load_dir(str(tmp_path))


# ---- the tables ---------------------------------------------------------------------------------------------

SPEC = {
    "ops": [
        {"layer": 1, "op": "add", "vector": "calm", "scale": 4.0, "tokens": "prompt"},
        {"layer": 3, "op": "cap", "vector": "per_layer", "min": -1.0},
        {"layer": 1, "op": "ablate", "vector": [0.5] * H, "scale": 0.25, "tokens": "decode"},
        {"layer": 3, "op": "add", "vector": "calm", "scale": -2.0, "tokens": "all"},
    ],
    "gate": {"layer": 2, "probe": "probe", "threshold": 0.5, "sharpness": 3.0},
}


def _setup(device: torch.device = CPU, max_vectors: int = 16, max_tokens: int = 64):
    bank = _bank(max_vectors, device)
    bank.register("calm", _vec(0))
    bank.register("per_layer", _vec(1, L))
    bank.register("probe", _vec(2))
    return bank, ActivationTables(bank, R, M, max_tokens, device)


def test_tables_match_the_spec():
    bank, t = _setup()
    spec = _parse(bank, SPEC)
    t.add_request(2, spec)
    # Published once (on CPU the tables are their own mirrors; the bank copies), then nothing on a steady step.
    assert t.flush() >= 1 and t.flush() == 0
    kind, slot, a, b, flags = (x[2] for x in t.op_tables(1))
    calm, pl, probe = bank.lookup("calm").slots[0], bank.lookup("per_layer"), bank.lookup("probe").slots[0]
    inline_slot = next(s for s in range(16) if s not in {calm, *pl.slots, probe})
    # Layer 1 (below the gate): add on prompt tokens, then ablate on decode tokens, in the spec's order.
    assert kind.tolist() == [OP_CODES["add"], OP_CODES["ablate"], 0, 0]
    assert slot[:2].tolist() == [calm, inline_slot]
    assert a[:2].tolist() == [4.0, 0.25] and flags[:2].tolist() == [FLAG_PROMPT, FLAG_DECODE]
    # Layer 3 (above the gate): gated and decode-only; the per-layer vector gives its row 3.
    kind, slot, a, b, flags = (x[2] for x in t.op_tables(3))
    assert kind.tolist() == [OP_CODES["cap"], OP_CODES["add"], 0, 0]
    assert slot[:2].tolist() == [pl.slots[3], calm]
    assert a[:2].tolist() == [-1.0, -2.0] and b[0].item() == math.inf
    assert flags[:2].tolist() == [FLAG_DECODE | FLAG_GATED] * 2
    assert not t.op_tables(0)[0].any() and not t.op_tables(2)[0].any()
    gs, thr, sharp = t.gate_tables(2)
    assert gs.tolist() == [-1, -1, probe, -1, -1, -1] and thr[2].item() == 0.5 and sharp[2].item() == 3.0
    assert (t.gate_tables(1)[0] == -1).all() and (t.gate_tables(3)[0] == -1).all()
    assert t.layer_use.tolist() == [0, 1, 0, 1] and t.gate_use.tolist() == [0, 0, 1, 0] and t.active
    # The request holds its vectors: deleting one leaves its content in place until the request is removed.
    assert bank.delete("calm") == 2  # two of its ops use calm
    assert torch.equal(bank._host[calm], _vec(0)) and bank.usage()["inline_slots"] == 2
    t.remove_request(2)
    t.flush()
    assert not t.op_tables(1)[0].any() and not t.op_tables(3)[0].any() and (t.gate_tables(2)[0] == -1).all()
    assert bank.usage()["inline_slots"] == 0 and not t.active and t.layer_use.sum() == 0
    assert bank.usage()["slots_used"] == L + 1  # per_layer's rows and probe; calm's slot is free
    t.remove_request(2)  # idempotent


def test_add_request_is_all_or_nothing():
    bank, t = _setup(max_vectors=1 + L + 1 + 1)  # one free slot left
    two_inline = {"ops": [{"layer": 0, "op": "add", "vector": [1.0] * H},
                          {"layer": 0, "op": "add", "vector": "calm"},
                          {"layer": 1, "op": "add", "vector": [2.0] * H}]}
    with pytest.raises(RequestArgError, match=r"steering\.ops\[2\]\.vector: vector bank full.*max_vectors=7"):
        t.add_request(1, _parse(bank, two_inline))
    assert bank.usage()["inline_slots"] == 0 and bank.list()[0]["in_use"] == 0 and t.row_of(1) is None
    assert not t.host["op_kind"].any()
    # A name deleted between validation and admission.
    spec = _parse(bank, {"ops": [{"layer": 0, "op": "add", "vector": "probe"}]})
    bank.delete("probe")
    with pytest.raises(RequestArgError, match=r"steering\.ops\[0\]\.vector: unknown vector 'probe'"):
        t.add_request(1, spec)
    with pytest.raises(ValueError, match=r"row must be an int in \[1, 6\)"):
        t.add_request(0, spec)
    ok = _parse(bank, {"ops": [{"layer": 0, "op": "add", "vector": "calm"}]})
    t.add_request(1, ok)
    with pytest.raises(ValueError, match="already holds"):
        t.add_request(1, ok)


@pytest.mark.parametrize("pad_to", [None, 20])
def test_fill_tokens_mixed_batch(pad_to):
    _, t = _setup()
    rows = np.array([3, 0, 5, 2, 4], dtype=np.int32)
    num_scheduled = np.array([5, 2, 3, 1, 6])
    num_computed = np.array([0, 9, 4, 20, 0])
    num_prompt = np.array([12, 4, 7, 12, 3])
    # 3: a first prefill chunk (prompt); 0: an unsteered decode... row 0 stays 0; 5: the last chunk of a prompt;
    # 2: a decode token; 4: a resumed request recomputing its prompt (3) and 3 generated tokens (decode).
    n = t.fill_tokens(rows, num_scheduled, num_computed, num_prompt, pad_to=pad_to)
    assert n == 17
    tp = pad_to or n
    assert t.token_row[:tp].tolist() == [3] * 5 + [0] * 2 + [5] * 3 + [2] + [4] * 6 + [0] * (tp - n)
    assert t.token_decode[:tp].tolist() == [0] * 5 + [1] * 2 + [0] * 3 + [1] + [0] * 3 + [1] * 3 + [0] * (tp - n)
    # A later, smaller step overwrites the prefix it uses.
    assert t.fill_tokens(np.array([2], dtype=np.int32), np.array([1]), np.array([21]), np.array([12])) == 1
    assert t.token_row[0].item() == 2 and t.token_decode[0].item() == 1
    with pytest.raises(ValueError, match="exceed the token buffers"):
        t.fill_tokens(rows, num_scheduled * 10, num_computed, num_prompt)


def _apply_spec(x, spec, bank, is_decode, layer, g):
    """The design's semantics, straight from the spec (references in value_steer.core.activation)."""
    for op in spec.ops:
        if op.layer != layer:
            continue
        if not (op.tokens == "all" or (op.tokens == "decode") == is_decode):
            continue
        gated = spec.gate is not None and layer >= spec.gate.layer
        if gated and not is_decode:
            continue
        if isinstance(op.vector, InlineVector):
            v = op.vector.tensor()
        else:
            info = bank.lookup(op.vector)
            v = bank._host[info.slots[layer if info.per_layer else 0]]
        if op.op == "add":
            y = ref.add(x, v, op.scale)
        elif op.op == "ablate":
            y = ref.ablate(x, v, op.scale)
        else:
            y = ref.projection_cap(x, v, op.min, op.max)
        x = x + g * (y - x) if gated else y
    return x


def _apply_tables(x, t, token, layer):
    """What the op computes for one token from the tables and the per-token buffers."""
    row = int(t.token_row[token])
    kind, slot, a, b, flags = (c[row] for c in t.op_tables(layer))
    dec = bool(t.token_decode[token])
    for j in range(t.max_ops):
        if kind[j] == 0:
            break
        f = int(flags[j])
        if not f & (FLAG_DECODE if dec else FLAG_PROMPT):
            continue
        v = t.bank.table[int(slot[j])]
        k = int(kind[j])
        if k == OP_CODES["add"]:
            y = x + a[j] * v
        else:
            u = v / v.norm()
            p = x @ u
            target = p.clamp(a[j], b[j]) if k == OP_CODES["cap"] else a[j] * p
            y = x + (target - p) * u
        x = x + t.gate[token] * (y - x) if f & FLAG_GATED else y
    return x


def test_tables_reproduce_the_spec_semantics():
    """Walk a mixed batch through identity layers: tables + token buffers give what the spec says."""
    bank, t = _setup()
    spec_a = _parse(bank, SPEC)
    spec_b = _parse(bank, {"ops": [{"layer": 0, "op": "cap", "vector": "calm", "min": -0.5, "max": 0.5},
                                   {"layer": 2, "op": "add", "vector": "per_layer", "scale": 3.0}]})
    t.add_request(1, spec_a)
    t.add_request(4, spec_b)
    t.flush()
    rows = np.array([1, 4, 0, 1], dtype=np.int32)
    t.fill_tokens(rows, np.array([3, 2, 1, 1]), np.array([0, 5, 7, 30]), np.array([6, 6, 3, 6]))
    specs = {1: spec_a, 4: spec_b}
    x0 = torch.randn(7, H, generator=torch.Generator().manual_seed(5)) * 3
    for token in range(7):
        row, dec = int(t.token_row[token]), bool(t.token_decode[token])
        got = want = x0[token]
        g = None
        for layer in range(L):
            gs, thr, sharp = t.gate_tables(layer)
            if gs[row] >= 0:  # steer_gate at the row's gate layer, before that layer's edits
                t.gate[token] = torch.sigmoid(sharp[row] * (got @ bank.table[int(gs[row])] - thr[row]))
                g = torch.sigmoid(spec_a.gate.sharpness * (want @ bank._host[bank.lookup("probe").slots[0]]
                                                           - spec_a.gate.threshold))
            got = _apply_tables(got, t, token, layer)
            want = _apply_spec(want, specs[row], bank, dec, layer, g) if row else want
        torch.testing.assert_close(got, want)
        if row == 0:
            assert torch.equal(got, x0[token])
    # Something was edited on both kinds of token.
    assert t.token_decode[:7].tolist() == [0, 0, 0, 0, 1, 1, 1]  # row 4 crosses its prompt end


def test_fingerprint_through_the_bank():
    bank, _ = _setup()
    spec = _parse(bank, SPEC)
    fp = fingerprint(spec, bank.vector_hash)
    bank.register("per_layer", _vec(9, L))
    assert fingerprint(spec, bank.vector_hash) != fp


# ---- host synchronisation -----------------------------------------------------------------------------------


def _admitted_on_meta():
    bank, t = _setup(META)
    t.add_request(1, _parse(bank, SPEC))
    t.add_request(3, _parse(bank, {"ops": [{"layer": 0, "op": "add", "vector": "calm"}]}))
    t.flush()
    return bank, t


def test_steady_step_makes_one_copy(sync_counter):
    bank, t = _admitted_on_meta()
    rows = np.array([1, 0, 3], dtype=np.int32)
    with sync_counter() as c:
        t.flush()  # steady: nothing staged
        n = t.fill_tokens(rows, np.array([4, 1, 1]), np.array([0, 7, 9]), np.array([10, 3, 5]), pad_to=8)
        views = (*t.op_tables(2), *t.gate_tables(2), t.token_row[:n], t.token_decode[:n], t.gate[:n], bank.table)
    assert c.counts["h2d"] == 1, c.log  # the packed per-token buffers
    assert c.blocking == 0 and c.counts["list_to_device"] == 0, c.log
    assert all(v.device.type == "meta" for v in views)


def test_lifecycle_step_flushes_in_bulk(sync_counter):
    bank, t = _admitted_on_meta()
    with sync_counter() as c:
        t.remove_request(3)
        t.add_request(2, _parse(bank, SPEC))  # an inline vector: one bank write too
        copies = t.flush()
    assert c.blocking == 0 and c.counts["list_to_device"] == 0, c.log
    # Bank span + 5 op columns + gate slot + threshold + sharpness: bulk copies, not per element.
    assert c.counts["h2d"] == copies <= 9, c.log


def test_staged_forward_with_appended_candidates_publishes_once(sync_counter):
    """The main forward's tokens, then VFD's appended candidate tokens (decode, their parent's row), then the
    CUDA-graph padding: one copy."""
    _, t = _admitted_on_meta()
    with sync_counter() as c:
        n = t.stage_tokens(np.array([1, 0, 3], dtype=np.int32), np.array([4, 1, 1]), np.array([0, 7, 9]),
                           np.array([10, 3, 5]))
        assert n == 6
        assert t.extend_tokens(np.array([3, 3, 1], dtype=np.int32)) == 9
        assert t.publish_tokens(12) == 9
    assert c.counts["h2d"] == 1 and c.blocking == 0, c.log


def test_stage_extend_publish_values():
    _, t = _setup()
    t.stage_tokens(np.array([2, 0], dtype=np.int32), np.array([3, 1]), np.array([0, 5]), np.array([2, 5]))
    t.extend_tokens(np.array([2, 2], dtype=np.int32))
    assert t.publish_tokens(pad_to=8) == 6
    assert t.token_row[:8].tolist() == [2, 2, 2, 0, 2, 2, 0, 0]
    assert t.token_decode[:8].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    # A candidate-only forward (VFD's first-token / second-phase forwards): all decode tokens.
    t.stage_decode_tokens(np.array([5, 0, 2], dtype=np.int32))
    assert t.publish_tokens() == 3
    assert t.token_row[:3].tolist() == [5, 0, 2] and t.token_decode[:3].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="exceed the token buffers"):
        t.extend_tokens(np.zeros(t.max_tokens, dtype=np.int32))


def test_capture_tables_and_tokens():
    bank = _bank()
    t = ActivationTables(bank, R, M, max_tokens=32, device=CPU, capture=True)
    assert t.capture_buf is not None and tuple(t.capture_buf.shape) == (L, 32, H)
    spec = _parse(bank, {"ops": [{"layer": 1, "op": "add", "vector": _vec(1).tolist()}]})
    t.add_request(2, spec, capture_layers=(0, 3))
    t.add_request(4, None, capture_layers=(3,))  # capture only
    t.flush()
    flag = t.dev["capture_flag"]
    assert flag[0].tolist() == [0, 0, 1, 0, 0, 0] and flag[3].tolist() == [0, 0, 1, 0, 1, 0]
    assert t.capture_use.tolist() == [1, 0, 0, 2]
    # Requests: row 2 (prefill chunk of 3 from position 4), row 0 (decode), row 4 (decode at position 9).
    t.stage_tokens(np.array([2, 0, 4], dtype=np.int32), np.array([3, 1, 1]), np.array([4, 6, 9]),
                   np.array([10, 5, 8]))
    tok, req, pos = t.take_capture_tokens()
    assert tok.tolist() == [0, 1, 2, 4] and req.tolist() == [0, 0, 0, 2] and pos.tolist() == [4, 5, 6, 9]
    assert t.take_capture_tokens() is None
    rows = t.staged_rows(tok)
    assert t.capture_rows_at(0, rows).tolist() == [True, True, True, False]
    assert t.capture_rows_at(3, rows).tolist() == [True, True, True, True]
    t.remove_request(2)
    t.remove_request(4)
    t.flush()
    assert not t.dev["capture_flag"].any() and not t.capture_use.any() and not t.active
    with pytest.raises(ValueError, match="capture=True"):
        ActivationTables(bank, R, M, 8, CPU).add_request(1, None, capture_layers=(0,))
