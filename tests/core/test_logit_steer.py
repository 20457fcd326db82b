"""The generator's math (one row, batched, the module) and its checkpoint: exact round trip, and every bad file
refused with the field named (sizes against the model, tensors, sidecar, pickles never loaded)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from value_steer.core.checkpoint import sidecar_path
from value_steer.core.logit_steer import (
    TENSOR_KEYS,
    LogitSteerCheckpointError,
    LogitSteerGenerator,
    gate_strength_rows,
    load_logit_steer,
    logit_steer_row,
    logit_steer_rows,
    save_logit_steer,
)

H, V, R, G = 24, 50, 3, 4


def _gen(seed: int = 0, v: int = V) -> LogitSteerGenerator:
    torch.manual_seed(seed)
    gen = LogitSteerGenerator(H, v, R, G, max_strength=2.0)
    with torch.no_grad():
        gen.w_up.normal_()
        gen.pos.normal_()
    return gen


@pytest.fixture
def ckpt(tmp_path) -> str:
    path = str(tmp_path / "gen.safetensors")
    save_logit_steer(path, _gen(), training={"loss": "dpo"}, command="value-steer train-logit --rank 3")
    return path


def test_untrained_generator_adds_nothing():
    torch.manual_seed(0)
    gen = LogitSteerGenerator(H, V, R, G)
    hidden, logits = torch.randn(5, H), torch.randn(5, V)
    with torch.no_grad():
        assert torch.equal(gen(hidden, logits), logits)
        torch.testing.assert_close(gen.strength(hidden), torch.full((5,), gen.max_strength) * torch.sigmoid(
            torch.tanh(hidden @ gen.gate_w1.t()) @ gen.gate_w2), rtol=1e-6, atol=1e-6)  # fmt: skip


def test_rows_match_one_row_and_the_module():
    gen = _gen()
    hidden, logits = torch.randn(4, H), torch.randn(4, V + 6)  # 6 padded columns
    strength = torch.tensor([0.0, 1.0, 2.5, 1.0])
    with torch.no_grad():
        out, gs = logit_steer_rows(hidden, logits, strength, *gen.weights(), gen.max_strength)
        for i in range(4):
            row, g = logit_steer_row(hidden[i], logits[i], float(strength[i]), gen)
            # (BLAS may sum a batch in another order than one row: equal to fp32 rounding.)
            torch.testing.assert_close(row, out[i], rtol=1e-6, atol=1e-5)
            assert g == pytest.approx(float(gs[i]), rel=1e-6)
        assert torch.equal(out[0], logits[0]) and float(gs[0]) == 0.0  # strength 0: bitwise, no gate
        assert torch.equal(out[:, V:], logits[:, V:])  # padded columns untouched
        torch.testing.assert_close(out[1], gen(hidden[1:2], logits[1:2])[0], rtol=1e-6, atol=1e-6)
        # The formula, spelled out.
        x = hidden[2]
        z = gen.w_down @ (x + gen.pos)
        s = 2.0 / (1 + math.exp(-float(gen.gate_w2 @ torch.tanh(gen.gate_w1 @ x + gen.gate_b1) + gen.gate_b2)))
        torch.testing.assert_close(out[2, :V], logits[2, :V] + 2.5 * s * (gen.w_up @ z), rtol=1e-5, atol=1e-5)
        assert float(gs[2]) == pytest.approx(s, rel=1e-6)


def test_gate_is_bounded_by_max_strength():
    gen = _gen()
    with torch.no_grad():
        gen.gate_b2.fill_(100.0)
        assert torch.allclose(gen.strength(torch.randn(3, H)), torch.full((3,), 2.0))
        gen.gate_b2.fill_(-100.0)
        assert float(gate_strength_rows(torch.randn(3, H), *gen.weights()[3:], 2.0).max()) < 1e-20


def test_round_trip_is_exact(ckpt):
    loaded = load_logit_steer(ckpt, hidden_size=H, vocab_size=V)
    ref = _gen()
    for key in TENSOR_KEYS:
        assert torch.equal(getattr(loaded.generator, key), getattr(ref, key)), key
    assert loaded.max_strength == 2.0 and loaded.training == {"loss": "dpo"}
    assert loaded.command == "value-steer train-logit --rank 3"
    assert not loaded.generator.training  # eval mode
    meta = json.loads(open(sidecar_path(ckpt)).read())
    assert {meta[k] for k in ("hidden_size", "vocab_size", "rank", "gate_hidden")} == {H, V, R, G}


def test_model_size_mismatches_name_the_field(ckpt):
    with pytest.raises(LogitSteerCheckpointError, match=r"hidden_size.*24.*576"):
        load_logit_steer(ckpt, hidden_size=576, vocab_size=V)
    with pytest.raises(LogitSteerCheckpointError, match=r"vocab_size.*50 logit columns.*logits have 40"):
        load_logit_steer(ckpt, hidden_size=H, vocab_size=40)
    # The model's logits are wider (vLLM's config vocabulary past the generator's): refused by default ...
    with pytest.raises(LogitSteerCheckpointError, match=r"vocab_size.*needs 64"):
        load_logit_steer(ckpt, hidden_size=H, vocab_size=64)
    # ... accepted when the caller says the extra columns are padding (the tokenizer has 48 tokens).
    assert load_logit_steer(ckpt, hidden_size=H, vocab_size=64, min_vocab_size=48).vocab_size == V


def _rewrite(path: str, drop: str | None = None, add: dict | None = None, replace: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(path)
    if drop:
        del t[drop]
    t.update(add or {})
    t.update(replace or {})
    save_file(t, path)


@pytest.mark.parametrize("change,field", [
    (dict(drop="gate_w2"), r"missing tensor\(s\) \['gate_w2'\]"),
    (dict(add={"extra": torch.zeros(2)}), r"unexpected tensor\(s\) \['extra'\]"),
    (dict(replace={"w_up": torch.zeros(V, R + 1)}), r"w_up: expected shape \(50, 3\)"),
    (dict(replace={"pos": torch.zeros(H + 1)}), r"pos: expected shape \(24,\)"),
    (dict(replace={"gate_b1": torch.zeros(G, dtype=torch.int32)}), "gate_b1 must be a float tensor"),
    (dict(replace={"w_down": torch.full((R, H), math.nan)}), "w_down has 72 non-finite"),
])  # fmt: skip
def test_bad_tensors_are_refused_by_name(ckpt, change, field):
    _rewrite(ckpt, **change)
    with pytest.raises(LogitSteerCheckpointError, match=field):
        load_logit_steer(ckpt, hidden_size=H, vocab_size=V)


@pytest.mark.parametrize("edit,field", [
    ({"max_strength": 0.0}, "max_strength must be a number in"),
    ({"max_strength": "2"}, "max_strength must be a number in"),
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"format": "other"}, "format must be"),
    ({"treshold": 1}, r"unknown key\(s\) \['treshold'\]"),
    ({"vocab_size": 51}, r"w_up: expected shape \(51, 3\)"),  # the sidecar and the tensors disagree
])  # fmt: skip
def test_bad_sidecars_are_refused_by_name(ckpt, edit, field):
    side = sidecar_path(ckpt)
    meta = json.loads(open(side).read())
    meta.update(edit)
    open(side, "w").write(json.dumps(meta))
    with pytest.raises(LogitSteerCheckpointError, match=field):
        load_logit_steer(ckpt)


def test_missing_sidecar_and_missing_file(ckpt, tmp_path):
    import os

    os.unlink(sidecar_path(ckpt))
    with pytest.raises(LogitSteerCheckpointError, match="no sidecar"):
        load_logit_steer(ckpt)
    with pytest.raises(FileNotFoundError):
        load_logit_steer(str(tmp_path / "nope.safetensors"))


class _Boom:
    """Anything unpickling this would run code: the loader must never get that far."""

    def __reduce__(self):
        return (os_system, ("echo pwned > /dev/null",))


def os_system(cmd: str) -> int:  # a stand-in the pickle names; the test fails if it is ever called
    raise AssertionError("a pickle was unpickled")


def test_pickles_are_never_loaded(ckpt, tmp_path):
    # A pickle under a pickle's name is refused by name, whatever its content.
    pt = tmp_path / "gen.pt"
    pt.write_bytes(pickle.dumps({"w_up": _Boom()}))
    open(str(pt) + ".meta.json", "w").write(open(sidecar_path(ckpt)).read())
    with pytest.raises(LogitSteerCheckpointError, match=r"pickles .* are never loaded"):
        load_logit_steer(str(pt))
    # A pickle renamed to .safetensors is not a readable safetensors file.
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps({"w_up": _Boom()}))
    open(sidecar_path(str(fake)), "w").write(open(sidecar_path(ckpt)).read())
    with pytest.raises(LogitSteerCheckpointError, match="not a readable safetensors file"):
        load_logit_steer(str(fake))


def test_save_refuses_non_finite_and_wrong_suffix(tmp_path):
    gen = _gen()
    with pytest.raises(LogitSteerCheckpointError, match=r"must end in .safetensors"):
        save_logit_steer(str(tmp_path / "g.pt"), gen)
    with torch.no_grad():
        gen.pos[0] = math.inf
    with pytest.raises(LogitSteerCheckpointError, match="pos has non-finite"):
        save_logit_steer(str(tmp_path / "g.safetensors"), gen)
    assert not (tmp_path / "g.safetensors").exists()
