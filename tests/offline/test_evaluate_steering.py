"""value_steer.offline.evaluate.steering: the vectors' sidecars and the activation rows' specs (pure; no engine)."""

from __future__ import annotations

import json

import pytest

from value_steer.core.steering_spec import parse_steering_spec
from value_steer.offline.evaluate.steering import (
    PROBE,
    VECTOR,
    activation_conditions,
    gate_values,
    gated_add,
    load_vectors,
)


def _write(directory, vec=None, probe=None):
    directory.mkdir(parents=True, exist_ok=True)
    vec = {"layer": 9, "residual_norm": 31.5, "scales": [2.0, 4.0, 8.0], "cap": {"min": 0.75}, "extra": 1} \
        if vec is None else vec
    probe = {"layer": 6, "threshold": 1.25, "sharpness": 4.0, "calibration": {"tau": 0.1}} if probe is None else probe
    for name, meta in ((VECTOR, vec), (PROBE, probe)):
        (directory / f"{name}.safetensors").write_bytes(b"stand-in")  # the loader reads sidecars only
        (directory / f"{name}.safetensors.meta.json").write_text(json.dumps(meta))
    return directory


def test_load_vectors_reads_both_sidecars(tmp_path):
    v = load_vectors(_write(tmp_path / "v"))
    assert (v.layer, v.residual_norm, v.scales, v.cap_min) == (9, 31.5, (2.0, 4.0, 8.0), 0.75)
    assert (v.probe_layer, v.probe_threshold, v.probe_sharpness) == (6, 1.25, 4.0)
    assert v.meta[VECTOR]["extra"] == 1 and v.meta[PROBE]["calibration"] == {"tau": 0.1}
    assert v.add_layer == 9 and v.gated_scale() == 8.0 and v.gated_scale(3) == 3.0


@pytest.mark.parametrize(("vec", "probe", "match"), [
    ({"residual_norm": 1.0, "scales": [1.0], "cap": {"min": 0.0}}, None, "missing 'layer'"),
    ({"layer": 9, "residual_norm": 1.0, "scales": [], "cap": {"min": 0.0}}, None, "scales must be a non-empty"),
    ({"layer": 9, "residual_norm": 1.0, "scales": [1.0], "cap": {}}, None, "missing 'cap.min'"),
    ({"layer": 9.5, "residual_norm": 1.0, "scales": [1.0], "cap": {"min": 0.0}}, None,
     "layer must be a finite integer"),
    (None, {"layer": 6, "threshold": float("nan"), "sharpness": 4.0}, "threshold must be a finite number"),
])
def test_load_vectors_names_the_bad_field(tmp_path, vec, probe, match):
    with pytest.raises(ValueError, match=match):
        load_vectors(_write(tmp_path / "v", vec, probe))


def test_load_vectors_says_how_to_make_missing_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="value-steer vectors"):
        load_vectors(tmp_path)


def test_activation_rows_and_their_specs(tmp_path):
    v = load_vectors(_write(tmp_path / "v"))
    rows = activation_conditions(v)
    assert [r.name for r in rows] == ["add s=2", "add s=4", "add s=8", "cap min=0.75", "ablate", "gated add s=8"]
    assert [r.mode for r in rows] == ["add", "add", "add", "cap", "ablate", "gated_add"]
    assert [r.gated for r in rows] == [False] * 5 + [True]
    specs = {r.name: parse_steering_spec(r.steering, hidden_size=None, num_layers=30, max_ops=8,
                                         max_inline_floats=0, resolve=lambda n: n in (VECTOR, PROBE))
             for r in rows}
    add8 = specs["add s=8"].ops[0]
    assert (add8.layer, add8.op, add8.vector, add8.scale, add8.tokens) == (9, "add", VECTOR, 8.0, "all")
    capped = specs["cap min=0.75"].ops[0]
    assert (capped.op, capped.min, capped.max) == ("cap", 0.75, None)  # a floor only: positive drift left alone
    assert specs["ablate"].ops[0].scale == 0.0
    gated = specs["gated add s=8"]
    assert gated.gate.layer == 6 and gated.gate.probe == PROBE and gated.gate.threshold == 1.25
    assert gated.ops[0].layer == 9 and gated.ops[0].gated  # at or above the gate layer: blended by the gate
    assert activation_conditions(v, gated_scale=3.0)[-1].name == "gated add s=3"


def test_gated_add_goes_to_the_gate_layer_when_the_vector_sits_below_it(tmp_path):
    v = load_vectors(_write(tmp_path / "v", probe={"layer": 12, "threshold": 0.0, "sharpness": 2.0}))
    assert v.add_layer == 12
    spec = parse_steering_spec(gated_add(v).to_dict(), hidden_size=None, num_layers=30, max_ops=8,
                               max_inline_floats=0)
    assert spec.ops[0].layer == 12 and spec.ops[0].gated


def test_gate_values_match_the_spec_formula():
    import torch

    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = torch.tensor([2.0, 1.0])
    g = gate_values(h, p, threshold=2.0, sharpness=3.0)
    torch.testing.assert_close(g, torch.sigmoid(3.0 * (torch.tensor([2.0, 2.0, 3.0]) - 2.0)))
