"""Server-config schema and per-request overrides: every bad input names its field."""

from __future__ import annotations

import pytest

from value_steer.core.config import ConfigError, RequestArgError, parse_additional_config, parse_request_args
from value_steer.core.modes import MODE_ABSTAIN, MODE_OFF, MODE_VFD


@pytest.fixture
def head_file(tmp_path):
    p = tmp_path / "head.safetensors"
    p.write_bytes(b"x")
    return str(p)


def test_vfd_defaults(head_file):
    cfg = parse_additional_config({"vfd": {"value_head_path": head_file}})
    assert cfg.mode == MODE_VFD and cfg.num_candidates == 4 and cfg.direction == "above"
    assert cfg.sign == 1.0 and cfg.threshold is None and cfg.enabled_by_default


def test_abstain_below(head_file):
    cfg = parse_additional_config({"abstain": {"value_head_path": head_file, "direction": "below", "threshold": 0.2}})
    assert cfg.mode == MODE_ABSTAIN and cfg.sign == -1.0 and cfg.threshold == 0.2 and cfg.num_candidates == 1


def test_empty_is_off():
    assert parse_additional_config(None).mode == MODE_OFF
    assert parse_additional_config({}).mode == MODE_OFF


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"vfd": {}, "abstain": {}}, "exclusive"),
        ({"vdf": {}}, "vdf"),
        ({"vfd": {"value_head_path": "H", "thresh": 0.1}}, "thresh"),
        ({"vfd": {"value_head_path": "H", "threshold": 1.5}}, "vfd.threshold"),
        ({"vfd": {"value_head_path": "H", "threshold": "0.3"}}, "vfd.threshold"),
        ({"vfd": {"value_head_path": "H", "num_candidates": 0}}, "vfd.num_candidates"),
        ({"vfd": {"value_head_path": "H", "num_candidates": 2.0}}, "vfd.num_candidates"),
        ({"vfd": {"value_head_path": "H", "num_candidates": True}}, "vfd.num_candidates"),
        ({"vfd": {"value_head_path": "H", "direction": "up"}}, "vfd.direction"),
        ({"vfd": {"value_head_path": "H", "enabled_by_default": "yes"}}, "vfd.enabled_by_default"),
        ({"abstain": {"value_head_path": "H", "num_candidates": 4}}, "num_candidates"),
        ({"vfd": {}}, "vfd.value_head_path"),
        ({"vfd": []}, "vfd must be"),
        ({"capture": {}}, "capture.dir"),
    ],
)
def test_bad_config_names_field(raw, field, head_file):
    for sec in raw.values():
        if isinstance(sec, dict) and sec.get("value_head_path") == "H":
            sec["value_head_path"] = head_file
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_additional_config(raw)


def test_missing_head_file(tmp_path):
    with pytest.raises(ConfigError, match=r"vfd\.value_head_path: no such file"):
        parse_additional_config({"vfd": {"value_head_path": str(tmp_path / "nope.safetensors")}})


def test_allowed_values_in_message(head_file):
    with pytest.raises(ConfigError, match=r"\['above', 'below'\]"):
        parse_additional_config({"vfd": {"value_head_path": head_file, "direction": "sideways"}})


def _cfg(head_file, **kw):
    return parse_additional_config({"vfd": {"value_head_path": head_file, "num_candidates": 8, **kw}})


def test_request_defaults(head_file):
    r = parse_request_args(None, _cfg(head_file), 0.3)
    assert (r.mode, r.threshold, r.num_candidates, r.sign) == (MODE_VFD, 0.3, 8, 1.0)


def test_request_overrides(head_file):
    r = parse_request_args({"threshold": "0.25", "num_candidates": 2, "other_plugin": 1}, _cfg(head_file), 0.3)
    assert (r.mode, r.threshold, r.num_candidates) == (MODE_VFD, 0.25, 2)
    assert parse_request_args({"value_steer": "off"}, _cfg(head_file), 0.3).mode == MODE_OFF
    opt_in = _cfg(head_file, enabled_by_default=False)
    assert parse_request_args({}, opt_in, 0.3).mode == MODE_OFF
    assert parse_request_args({"value_steer": True}, opt_in, 0.3).mode == MODE_VFD


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"threshold": 2}, "threshold"),
        ({"threshold": "abc"}, "threshold"),
        ({"num_candidates": 9}, "num_candidates"),
        ({"num_candidates": 0}, "num_candidates"),
        ({"num_candidates": 1.5}, "num_candidates"),
        ({"value_steer": "maybe"}, "value_steer"),
    ],
)
def test_bad_request_names_field(args, field, head_file):
    with pytest.raises(RequestArgError, match=field):
        parse_request_args(args, _cfg(head_file), 0.3)


def test_request_on_without_server_steering():
    with pytest.raises(RequestArgError, match="value_steer=true"):
        parse_request_args({"value_steer": True}, parse_additional_config({}), 0.5)


@pytest.mark.parametrize(("key", "near"), [("treshold", "threshold"), ("Threshold", "threshold"),
                                           ("thresh", "threshold"), ("num-candidates", "num_candidates"),
                                           ("num_candidate", "num_candidates"), ("valuesteer", "value_steer"),
                                           ("value_steer_foo", "value_steer")])
def test_misspelled_request_key_is_refused_naming_our_keys(key, near, head_file):
    with pytest.raises(RequestArgError) as err:
        parse_request_args({key: 0.3}, _cfg(head_file), 0.5)
    msg = str(err.value)
    assert repr(key) in msg and f"did you mean {near!r}" in msg
    assert "['value_steer', 'threshold', 'num_candidates', 'value_steer_capture']" in msg


def test_foreign_request_keys_are_left_alone(head_file):
    # vLLM's own extra_args keys and other plugins' keys are not value_steer's to refuse.
    args = {"kv_transfer_params": {"x": 1}, "ec_transfer_params": None, "kv_cache_report_mode": "full",
            "ngram_size": 3, "window_size": 100, "whitelist_token_ids": [1], "k": 2, "seed": 1}
    assert parse_request_args(args, _cfg(head_file), 0.3).mode == MODE_VFD
