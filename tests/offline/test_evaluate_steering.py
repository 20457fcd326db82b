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

def _write_pairs_vector(directory, name="no-prices", layers=(3, 5)):
    """A sidecar as ``value-steer vectors --pairs`` writes it (no probe, no cap floor)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "made_by": "value-steer vectors --pairs (method mean)", "pairs": {"n": 24},
            "layers": list(layers), "norms": {str(x): 20.0 for x in layers},
            "suggested_add_scales": {str(x): [1.0, 2.0, 4.0] for x in layers}}
    (directory / f"{name}.safetensors").write_bytes(b"stand-in")
    (directory / f"{name}.safetensors.meta.json").write_text(json.dumps(meta))
    return directory


def test_a_task_vector_from_pairs_makes_add_and_ablate_rows(tmp_path):
    """A user's vector by name: a pairs vector has no probe and no cap floor, so its rows are the adds (scales of
    the vector as written) and ablate, at its first layer unless another is chosen."""
    d = _write_pairs_vector(tmp_path / "v")
    v = load_vectors(d, "no-prices")
    assert (v.name, v.layer, v.scales, v.cap_min, v.probe, v.unit) == ("no-prices", 3, (1.0, 2.0, 4.0), None, None,
                                                                       False)
    rows = activation_conditions(v)
    assert [r.name for r in rows] == ["add s=1", "add s=2", "add s=4", "ablate"]
    spec = parse_steering_spec(rows[2].steering, hidden_size=None, num_layers=30, max_ops=8, max_inline_floats=0,
                               resolve=lambda n: n == "no-prices")
    assert (spec.ops[0].layer, spec.ops[0].vector, spec.ops[0].scale) == (3, "no-prices", 4.0)
    assert load_vectors(d, "no-prices", 5).layer == 5
    with pytest.raises(ValueError, match=r"--vector-layer 4: vector 'no-prices' has rows for layers \[3, 5\] only"):
        load_vectors(d, "no-prices", 4)
    with pytest.raises(ValueError, match="has no probe"):
        gated_add(v)
    with pytest.raises(FileNotFoundError, match=r"other\.safetensors"):
        load_vectors(d, "other")


def test_a_task_vector_with_its_probe_is_read_by_name(tmp_path):
    """``value-steer vectors --task T`` names the pair after the task: ``<task>`` and ``<task>_probe``."""
    d = tmp_path / "v"
    d.mkdir()
    for name, meta in (("prices", {"layer": 4, "residual_norm": 9.0, "scales": [1.0], "cap": {"min": 0.5}}),
                       ("prices_probe", {"layer": 2, "threshold": 0.1, "sharpness": 3.0})):
        (d / f"{name}.safetensors").write_bytes(b"stand-in")
        (d / f"{name}.safetensors.meta.json").write_text(json.dumps(meta))
    v = load_vectors(d, "prices")
    assert (v.probe, v.probe_layer, v.unit) == ("prices_probe", 2, True)
    assert [r.name for r in activation_conditions(v)] == ["add s=1", "cap min=0.5", "ablate", "gated add s=1"]
    assert gated_add(v).to_dict()["gate"]["probe"] == "prices_probe"
