"""value_steer.core.safe_json and the request parsers built on it: hostile numbers and nesting name the field."""

from __future__ import annotations

import pytest

from value_steer.core.config import parse_additional_config, parse_request_args
from value_steer.core.safe_json import (
    MAX_JSON_DEPTH,
    RequestArgError,
    finite_float,
    json_depth,
    loads_bounded,
    short_repr,
)
from value_steer.core.steering_spec import check_doses, inline_norm, op_dose, parse_steering_spec

HUGE = 10**400


@pytest.mark.parametrize(("text", "depth"), [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "]]"]', 1), (r'["\"[[["]', 1),
    ("[" * 5000 + "]" * 5000, 5000), ('{"a": "}}}}"}', 1),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth == json_depth(text.encode())


def test_loads_bounded_refuses_deep_and_unconvertible_json():
    assert loads_bounded('{"a": [1]}', "x") == {"a": [1]}
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(RequestArgError, match=r"^steering: JSON nested 65 levels deep"):
        loads_bounded(deep, "steering")
    with pytest.raises(RequestArgError, match=r"^body: not valid JSON"):
        loads_bounded("[1" + "0" * 5000 + "]", "body")  # beyond sys.get_int_max_str_digits
    with pytest.raises(RequestArgError, match=r"^body: not valid JSON"):
        loads_bounded("{", "body")


@pytest.mark.parametrize("value", [HUGE, -HUGE, float("inf"), float("nan"), "inf", "nan", "-inf", True, None, [1]])
def test_finite_float_names_the_field(value):
    with pytest.raises(RequestArgError, match=r"^f\.x"):
        finite_float(value, "f.x", strings=True)


def test_finite_float_accepts_numbers_and_bounds_fp32():
    assert finite_float(3, "x") == 3.0 and finite_float("0.5", "x", strings=True) == 0.5
    with pytest.raises(RequestArgError, match="float32 range"):
        finite_float(1e39, "x", f32=True)
    assert "digits" in short_repr(10**5000) and len(short_repr("x" * 1000)) == 80


CFG = parse_additional_config({"vfd": {"value_head_path": "/h", "num_candidates": 4},
                               "steering": {}, "logit_steering": {"checkpoint": "/g.safetensors"},
                               "capture": {"dir": "/c"}}, check_files=False)


@pytest.mark.parametrize(("args", "field"), [
    ({"threshold": HUGE}, "threshold"), ({"threshold": "nan"}, "threshold"),
    ({"num_candidates": "inf"}, "num_candidates"), ({"num_candidates": "nan"}, "num_candidates"),
    ({"num_candidates": HUGE}, "num_candidates"),
    ({"logit_steering": HUGE}, "logit_steering"), ({"logit_steering": "inf"}, "logit_steering"),
    ({"value_steer": False, "capture_layers": "[" * 100 + "]" * 100}, "capture_layers"),
    ({"value_steer": False, "capture_layers": "1" + "0" * 5000}, "capture_layers"),
    ({"steering": {"ops": [{"layer": 0, "op": "add", "vector": [1.0] * 4, "scale": HUGE}]}}, "steering.ops[0].scale"),
    ({"steering": {"ops": [{"layer": 0, "op": "add", "vector": [HUGE] + [1.0] * 3}]}}, "steering.ops[0].vector[0]"),
    ({"steering": {"ops": [{"layer": 0, "op": "cap", "vector": [1.0] * 4, "min": HUGE}]}}, "steering.ops[0].min"),
    ({"steering": '{"ops": ' + "[" * 100 + "]" * 100 + "}"}, "steering"),
])
def test_request_args_name_the_field(args, field):
    with pytest.raises(RequestArgError) as info:
        parse_request_args(args, CFG, 0.5, hidden_size=4, num_layers=2)
    assert str(info.value).startswith(field), str(info.value)


def _spec(*ops):
    return parse_steering_spec({"ops": list(ops)}, hidden_size=4, num_layers=2, max_ops=8, max_inline_floats=64)


def test_doses_per_op_kind():
    v = [3.0, 4.0, 0.0, 0.0]  # |v| = 5
    add, cap_up, cap_shrink, ablate = _spec(
        {"layer": 0, "op": "add", "vector": v, "scale": 2.0},
        {"layer": 0, "op": "cap", "vector": v, "min": 20.0},
        {"layer": 0, "op": "cap", "vector": v, "min": -1e30, "max": 1e30},
        {"layer": 1, "op": "ablate", "vector": v, "scale": 0.0}).ops
    assert op_dose(add, 5.0, 10.0) == 1.0 and op_dose(cap_up, 5.0, 10.0) == 2.0
    assert op_dose(cap_shrink, 5.0, 10.0) == 0.0 and op_dose(ablate, 5.0, 10.0) == 1.0
    spec = _spec({"layer": 1, "op": "add", "vector": v, "scale": 300.0})
    check_doses(spec, [10.0, 20.0], 100.0, lambda ref, layer: inline_norm(ref))  # 300 * 5 / 20 = 75
    with pytest.raises(RequestArgError, match=r"^steering.ops\[0\]: relative dose 150"):
        check_doses(spec, [10.0, 10.0], 100.0, lambda ref, layer: inline_norm(ref))
    check_doses(spec, [10.0, 0.0], 100.0, lambda ref, layer: inline_norm(ref))  # no measurement: not checked
    cfg = parse_additional_config({"steering": {"max_relative_dose": 100}})
    with pytest.raises(RequestArgError, match="relative dose"):
        parse_request_args({"steering": spec.to_dict()}, cfg, 0.5, hidden_size=4, num_layers=2,
                           residual_norms=[10.0, 10.0], vector_norm=lambda ref, layer: inline_norm(ref))
    none = parse_additional_config({"steering": {"max_relative_dose": None}})
    assert parse_request_args({"steering": spec.to_dict()}, none, 0.5, hidden_size=4, num_layers=2,
                              residual_norms=[10.0, 10.0], vector_norm=lambda r, layer: 5.0).steering is not None


@pytest.mark.parametrize(("section", "message"), [
    ({"max_relative_dose": 0}, "max_relative_dose"), ({"max_relative_dose": HUGE}, "max_relative_dose"),
    ({"max_relative_dose": "x"}, "max_relative_dose"), ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"admin_key": "short"}, "admin_key"), ({"admin_key": 12345678}, "admin_key"),
])
def test_bad_hardening_config_names_the_field(section, message):
    from value_steer.core.config import ConfigError

    with pytest.raises(ConfigError, match=f"steering.{message}"):
        parse_additional_config({"steering": section})
    assert "secret-key" not in repr(parse_additional_config({"steering": {"admin_key": "secret-key"}}))
