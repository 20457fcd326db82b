"""The activation-steering request spec: every bad input names its field; fingerprint; salting; the helper."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from value_steer.core.config import RequestArgError as ConfigRequestArgError
from value_steer.core.steering_spec import (
    FLAG_DECODE,
    FLAG_GATED,
    FLAG_PROMPT,
    InlineVector,
    RequestArgError,
    Steering,
    SteeringGate,
    SteeringOp,
    SteeringSpec,
    ablate,
    add,
    cap,
    fingerprint,
    gate,
    parse_steering_spec,
    salts_prompt,
    vector_content_hash,
)

H, L = 8, 6
NAMES = {"calm", "anger", "anger_probe"}


def parse(raw, **kw):
    args = {"hidden_size": H, "num_layers": L, "max_ops": 4, "max_inline_floats": 4 * H,
            "resolve": NAMES.__contains__}
    args.update(kw)
    return parse_steering_spec(raw, **args)


def vec(x: float = 1.0) -> list[float]:
    return [x] + [0.5] * (H - 1)


def test_the_design_example_parses():
    spec = parse({"ops": [{"layer": 5, "op": "add", "vector": "calm", "scale": 4.0, "tokens": "all"},
                          {"layer": 3, "op": "cap", "vector": vec(), "min": -1.0, "max": 1.0},
                          {"layer": 3, "op": "ablate", "vector": "anger", "scale": 0.0}],
                  "gate": {"layer": 4, "probe": "anger_probe", "threshold": 0.0, "sharpness": 10.0}})
    assert [op.op for op in spec.ops] == ["add", "cap", "ablate"]  # order kept
    add_op, cap_op, abl = spec.ops
    assert add_op == SteeringOp(5, "add", "calm", scale=4.0, tokens="all", gated=True)
    assert cap_op.min == -1.0 and cap_op.max == 1.0 and cap_op.scale is None and not cap_op.gated
    assert isinstance(cap_op.vector, InlineVector) and cap_op.vector.numpy().tolist() == vec()
    assert abl.scale == 0.0 and not abl.gated
    assert spec.gate == SteeringGate(4, "anger_probe", 0.0, 10.0)
    assert spec.layers == (3, 5)
    # Gated ops act on decode tokens only; ungated keep their tokens.
    assert add_op.flags == FLAG_DECODE | FLAG_GATED and cap_op.flags == FLAG_PROMPT | FLAG_DECODE


def test_defaults_and_json_string():
    spec = parse(json.dumps({"ops": [{"layer": 0, "op": "add", "vector": "calm"},
                                     {"layer": 1, "op": "ablate", "vector": "calm"}],
                             "gate": {"layer": 1, "probe": "calm"}}))
    assert spec.ops[0].scale == 1.0 and spec.ops[0].tokens == "all" and spec.ops[1].scale == 0.0
    assert spec.gate.threshold == 0.0 and spec.gate.sharpness == 10.0
    assert parse({"ops": []}).ops == ()


def test_request_arg_error_is_configs():
    assert RequestArgError is ConfigRequestArgError and issubclass(RequestArgError, ValueError)


OP = {"layer": 1, "op": "add", "vector": "calm"}


@pytest.mark.parametrize(
    ("raw", "field", "allowed"),
    [
        ("{not json", "steering: not valid JSON", None),
        ([OP], "steering must be a JSON object", "['ops', 'gate']"),
        ("[1]", "steering must be a JSON object", None),
        ({"ops": [OP], "gates": {}}, "steering: unknown key(s) ['gates']", "['ops', 'gate']"),
        ({}, "steering.ops is required", None),
        ({"ops": OP}, "steering.ops must be a list", None),
        ({"ops": [OP] * 5}, "steering.ops: at most 4 ops", "max_ops_per_request"),
        ({"ops": [OP, 3]}, "steering.ops[1] must be an object", None),
        ({"ops": [{"layer": 1, "vector": "calm"}]}, "steering.ops[0].op is required", "['add', 'cap', 'ablate']"),
        ({"ops": [OP, {**OP, "op": "mul"}]}, "steering.ops[1].op must be one of", "['add', 'cap', 'ablate']"),
        ({"ops": [{**OP, "min": 1.0}]}, "steering.ops[0]: unknown key(s) ['min'] for op 'add'", "'scale'"),
        ({"ops": [{**OP, "op": "cap", "scale": 1.0, "max": 1}]}, "steering.ops[0]: unknown key(s) ['scale']", None),
        ({"ops": [{"op": "add", "vector": "calm"}]}, "steering.ops[0].layer is required", None),
        ({"ops": [{"op": "add", "layer": 0}]}, "steering.ops[0].vector is required", None),
        ({"ops": [{**OP, "layer": L}]}, "steering.ops[0].layer must be an integer in [0, 6)", None),
        ({"ops": [{**OP, "layer": -1}]}, "steering.ops[0].layer must be an integer in [0, 6)", None),
        ({"ops": [{**OP, "layer": 1.0}]}, "steering.ops[0].layer must be an integer", None),
        ({"ops": [{**OP, "layer": True}]}, "steering.ops[0].layer must be an integer", None),
        ({"ops": [{**OP, "tokens": "some"}]}, "steering.ops[0].tokens must be one of", "['all', 'prompt', 'decode']"),
        ({"ops": [OP, {**OP, "vector": "nope"}]}, "steering.ops[1].vector: unknown vector 'nope'", None),
        ({"ops": [{**OP, "vector": ""}]}, "steering.ops[0].vector must be a vector name", None),
        ({"ops": [{**OP, "vector": "../x"}]}, "steering.ops[0].vector must be a vector name", None),
        ({"ops": [{**OP, "vector": 3}]}, "steering.ops[0].vector must be a vector name or a list of 8", None),
        ({"ops": [{**OP, "vector": [1.0] * (H - 1)}]}, "steering.ops[0].vector must have exactly 8 floats", None),
        ({"ops": [{**OP, "vector": [1.0] * (H + 1)}]}, "steering.ops[0].vector must have exactly 8 floats", None),
        ({"ops": [{**OP, "vector": [*vec()[:-1], "1"]}]}, "steering.ops[0].vector[7] must be a number", None),
        ({"ops": [{**OP, "vector": [*vec()[:-1], True]}]}, "steering.ops[0].vector[7] must be a number", None),
        ({"ops": [{**OP, "vector": [*vec()[:-1], math.nan]}]}, "steering.ops[0].vector[7] must be finite", None),
        ({"ops": [{**OP, "vector": [math.inf, *vec()[1:]]}]}, "steering.ops[0].vector[0] must be finite", None),
        ({"ops": [{**OP, "vector": [1e39, *vec()[1:]]}]}, "steering.ops[0].vector[0] = 1e+39 is outside", None),
        ({"ops": [{**OP, "vector": [0.0] * H}]}, "steering.ops[0].vector is the zero vector", None),
        ({"ops": [{**OP, "scale": math.nan}]}, "steering.ops[0].scale must be a finite number", None),
        ({"ops": [{**OP, "scale": "2"}]}, "steering.ops[0].scale must be a finite number", None),
        ({"ops": [{**OP, "op": "ablate", "scale": math.inf}]}, "steering.ops[0].scale must be a finite", None),
        ({"ops": [{**OP, "op": "cap"}]}, "steering.ops[0].min/steering.ops[0].max: a cap needs at least one", None),
        ({"ops": [OP, {**OP, "op": "cap", "min": 2, "max": 1}]}, "steering.ops[1].min (2.0) must be <=", None),
        ({"ops": [{**OP, "op": "cap", "min": -math.inf}]}, "steering.ops[0].min must be a finite number", None),
        ({"ops": [{**OP, "op": "cap", "max": math.nan}]}, "steering.ops[0].max must be a finite number", None),
        ({"ops": [OP], "gate": []}, "steering.gate must be an object", "['layer', 'probe', 'threshold', 'sharpness']"),
        ({"ops": [OP], "gate": {"layer": 1}}, "steering.gate.probe is required", None),
        ({"ops": [OP], "gate": {"probe": "calm"}}, "steering.gate.layer is required", None),
        ({"ops": [OP], "gate": {"layer": L, "probe": "calm"}}, "steering.gate.layer must be an integer in [0, 6)",
         None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "calm", "k": 1}}, "steering.gate: unknown key(s) ['k']",
         "'sharpness'"),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "what"}}, "steering.gate.probe: unknown vector 'what'", None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": [0.0] * H}}, "steering.gate.probe is the zero vector", None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "calm", "threshold": math.inf}},
         "steering.gate.threshold must be a finite number", None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "calm", "sharpness": 0}},
         "steering.gate.sharpness must be a finite number > 0", None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "calm", "sharpness": -1.0}},
         "steering.gate.sharpness must be a finite number > 0", None),
        ({"ops": [OP], "gate": {"layer": 0, "probe": "calm", "sharpness": math.nan}},
         "steering.gate.sharpness must be a finite number", None),
        ({"ops": [{**OP, "tokens": "prompt"}], "gate": {"layer": 1, "probe": "calm"}},
         "steering.ops[0].tokens: 'prompt' at layer 1 never applies", "['all', 'decode']"),
        # The inline budget (4 H floats here) counts the gate probe (parsed first) and the ops together.
        ({"ops": [{**OP, "vector": vec()}] * 4, "gate": {"layer": 0, "probe": vec()}},
         "steering.ops[3].vector: inline vectors total 40 floats", "steering.max_inline_floats = 32"),
        ({"ops": [OP], "gate": {"layer": 0, "probe": [1.0] * 33}},
         "steering.gate.probe: inline vectors total 33 floats", None),
        ({"ops": [{**OP, "vector": [1.0] * 10_000}]}, "steering.ops[0].vector: inline vectors total 10000", None),
    ],
)
def test_bad_spec_names_field(raw, field, allowed):
    with pytest.raises(RequestArgError) as err:
        parse(raw)
    msg = str(err.value)
    assert field in msg, msg
    if allowed:
        assert allowed in msg, msg


def test_unknown_dims_skip_those_checks_only():
    """An API process that does not know the model checks everything else."""
    spec = parse({"ops": [{"layer": 99, "op": "add", "vector": [1.0, 2.0]}]}, hidden_size=None, num_layers=None)
    assert spec.ops[0].layer == 99 and spec.ops[0].vector.size == 2
    with pytest.raises(RequestArgError, match=r"steering\.ops\[0\]\.layer must be a layer index >= 0"):
        parse({"ops": [{"layer": -1, "op": "add", "vector": "calm"}]}, hidden_size=None, num_layers=None)
    # No resolver: names are not checked here.
    assert parse({"ops": [{**OP, "vector": "anything"}]}, resolve=None).ops[0].vector == "anything"


def _hasher(bank: dict[str, torch.Tensor]):
    def vector_hash(ref):
        return ref.content_hash if isinstance(ref, InlineVector) else vector_content_hash(bank[ref])
    return vector_hash


def test_fingerprint_is_stable_and_content_addressed():
    torch.manual_seed(0)
    calm = torch.randn(H)
    bank = {"calm": calm, "anger": torch.randn(H), "anger_probe": torch.randn(H)}
    raw = {"ops": [{"layer": 1, "op": "add", "vector": "calm", "scale": 2.0},
                   {"layer": 2, "op": "cap", "vector": "anger", "max": 1.0}],
           "gate": {"layer": 2, "probe": "anger_probe"}}
    fp = fingerprint(parse(raw), _hasher(bank))
    assert len(fp) == 64 and fp == fingerprint(parse(json.dumps(raw)), _hasher(dict(bank)))
    # Defaults written out or left implicit: the same spec.
    assert fingerprint(parse({**raw, "gate": {**raw["gate"], "threshold": 0.0, "sharpness": 10.0}}),
                       _hasher(bank)) == fp
    # A name re-registered with new data is a new vector.
    assert fingerprint(parse(raw), _hasher({**bank, "calm": calm + 1})) != fp
    # A name and the same values inline are the same vector.
    inline = {**raw, "ops": [{**raw["ops"][0], "vector": calm.tolist()}, raw["ops"][1]]}
    assert fingerprint(parse(inline), _hasher(bank)) == fp
    # Any change of an op, its order, or the gate changes it.
    for other in ({**raw, "ops": raw["ops"][::-1]}, {**raw, "gate": {**raw["gate"], "sharpness": 5.0}},
                  {"ops": raw["ops"]}, {**raw, "ops": [{**raw["ops"][0], "scale": 2.5}, raw["ops"][1]]},
                  {**raw, "ops": [{**raw["ops"][0], "tokens": "decode"}, raw["ops"][1]]}):
        assert fingerprint(parse(other), _hasher(bank)) != fp


def test_vector_content_hash_is_fp32_bytes():
    v = torch.tensor([1.0, -2.5, 3.0], dtype=torch.float64)
    assert vector_content_hash(v) == vector_content_hash(v.float()) == vector_content_hash(v.numpy())
    assert vector_content_hash(v) == InlineVector.from_values([1.0, -2.5, 3.0]).content_hash
    import hashlib

    assert vector_content_hash(v) == hashlib.sha256(np.array([1, -2.5, 3], dtype="<f4").tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("ops", "gate_spec", "salts"),
    [
        ([{**OP, "tokens": "all"}], None, True),
        ([{**OP, "tokens": "prompt"}], None, True),
        ([{**OP, "tokens": "decode"}], None, False),
        ([{**OP, "layer": 3}], {"layer": 2, "probe": "calm"}, False),  # everything under the gate
        ([{**OP, "layer": 3}, {**OP, "layer": 1}], {"layer": 2, "probe": "calm"}, True),  # layer 1 is below it
        ([{**OP, "layer": 1, "tokens": "decode"}], {"layer": 2, "probe": "calm"}, False),
        ([], None, False),
    ],
)
def test_salts_prompt(ops, gate_spec, salts):
    raw = {"ops": ops} if gate_spec is None else {"ops": ops, "gate": gate_spec}
    assert salts_prompt(parse(raw)) is salts


def test_typed_helper_round_trips_through_parse():
    arr = np.linspace(-1, 1, H).astype(np.float32)
    ten = torch.arange(1, H + 1, dtype=torch.float16)
    s = Steering([add(5, "calm", 4.0), cap(3, arr, -1, 1), ablate(3, ten, tokens="decode"), cap(1, "anger", max=2)],
                 gate=gate(4, vec(), 0.5, 3.0))
    spec = parse(s.to_dict())
    assert s.extra_body() == s.extra_args() == {"steering": s.to_dict()}
    assert parse(s.vllm_xargs()["steering"]) == spec
    json.dumps(s.extra_body())  # JSON-ready: arrays and tensors became lists
    for built, parsed in zip(s.ops, spec.ops):
        assert parsed == SteeringOp(built.layer, built.op, built.vector, built.scale, built.min, built.max,
                                    built.tokens, gated=parsed.layer >= 4)
    assert spec.ops[1].vector.numpy().tolist() == arr.tolist()  # bitwise fp32
    assert spec.ops[2].vector.numpy().tolist() == ten.float().tolist()
    assert spec.ops[3].min is None and spec.ops[3].max == 2.0
    assert spec.gate == SteeringGate(4, InlineVector.from_values(vec()), 0.5, 3.0)
    assert SteeringSpec(spec.ops, spec.gate).to_dict() == s.to_dict()
    with pytest.raises(TypeError, match=r"ops\[0\]"):
        Steering([{"layer": 1}])
    with pytest.raises(TypeError, match="a vector is a name"):
        add(1, 3.0)


def test_inline_vector_identity():
    a, b = InlineVector.from_values([1, 2, 3]), InlineVector.from_values(np.array([1, 2, 3], dtype=np.float64))
    assert a == b and hash(a) == hash(b) and a.size == 3 and "size=3" in repr(a)
    assert torch.equal(a.tensor(), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="1-D"):
        InlineVector.from_values([[1.0]])
