"""Server-config schema and per-request overrides: every bad input names its field."""

from __future__ import annotations

import pytest

from value_steer.core.config import (
    REQUEST_KEYS,
    ConfigError,
    RequestArgError,
    parse_additional_config,
    parse_request_args,
)
from value_steer.core.modes import MODE_ABSTAIN, MODE_OFF, MODE_TOKEN, MODE_VFD


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
    assert str(list(REQUEST_KEYS)) in msg


def test_foreign_request_keys_are_left_alone(head_file):
    # vLLM's own extra_args keys and other plugins' keys are not value_steer's to refuse.
    args = {"kv_transfer_params": {"x": 1}, "ec_transfer_params": None, "kv_cache_report_mode": "full",
            "ngram_size": 3, "window_size": 100, "whitelist_token_ids": [1], "k": 2, "seed": 1}
    assert parse_request_args(args, _cfg(head_file), 0.3).mode == MODE_VFD


# ---- activation steering: the "steering" section and the per-request "steering" spec ----------------------


def test_steering_section_defaults_alone_and_beside(head_file, tmp_path):
    from value_steer.core.config import SteeringConfig

    cfg = parse_additional_config({"steering": {}})
    assert cfg.mode == MODE_OFF and cfg.steering == SteeringConfig(None, 64, 8, 8 * 4096)
    assert parse_additional_config({}).steering is None
    both = parse_additional_config({"vfd": {"value_head_path": head_file}, "capture": {"dir": str(tmp_path)},
                                    "steering": {"vectors": str(tmp_path), "max_vectors": 3,
                                                 "max_ops_per_request": 64, "max_inline_floats": 0}})
    assert both.mode == MODE_VFD and both.capture is not None
    assert both.steering == SteeringConfig(str(tmp_path), 3, 64, 0)
    assert parse_additional_config({"abstain": {"value_head_path": head_file}, "steering": {}}).steering is not None
    # check_files=False (an API process without the worker's files): the directory is not looked at.
    assert parse_additional_config({"steering": {"vectors": "/no/such/dir"}}, check_files=False).steering.vectors


@pytest.mark.parametrize(
    ("sec", "field"),
    [
        ([], "steering must be a JSON object"),
        ({"vector": "x"}, r"steering: unknown key\(s\) \['vector'\]; allowed: \['vectors', 'max_vectors'"),
        ({"vectors": ""}, r"steering\.vectors must be a non-empty string"),
        ({"vectors": 3}, r"steering\.vectors must be a non-empty string"),
        ({"vectors": "/no/such/dir"}, r"steering\.vectors: no such directory"),
        ({"max_vectors": 0}, r"steering\.max_vectors must be an integer >= 1"),
        ({"max_vectors": 2.0}, r"steering\.max_vectors must be an integer >= 1"),
        ({"max_vectors": True}, r"steering\.max_vectors must be an integer >= 1"),
        ({"max_ops_per_request": 0}, r"steering\.max_ops_per_request must be an integer \[1, 64\]"),
        ({"max_ops_per_request": 65}, r"steering\.max_ops_per_request must be an integer \[1, 64\]"),
        ({"max_inline_floats": -1}, r"steering\.max_inline_floats must be an integer >= 0"),
        ({"max_inline_floats": "8"}, r"steering\.max_inline_floats must be an integer >= 0"),
    ],
)
def test_bad_steering_section_names_field(sec, field):
    with pytest.raises(ConfigError, match=field):
        parse_additional_config({"steering": sec})


def test_steering_vectors_file_is_not_a_directory(head_file):
    with pytest.raises(ConfigError, match=r"steering\.vectors: no such directory"):
        parse_additional_config({"steering": {"vectors": head_file}})


def test_unknown_top_level_key_lists_steering():
    with pytest.raises(ConfigError, match=r"\['vfd', 'abstain', 'capture', 'steering', 'logit_steering'\]"):
        parse_additional_config({"steer": {}})


_SPEC = {"ops": [{"layer": 1, "op": "add", "vector": [1.0, 0.0, 0.0, 0.0], "scale": 2.0}]}


def test_request_steering_parsed_when_configured(head_file):
    import json

    cfg = parse_additional_config({"steering": {"max_ops_per_request": 2}})
    r = parse_request_args({"steering": _SPEC}, cfg, 0.5, hidden_size=4, num_layers=3)
    assert r.mode == MODE_OFF and r.steering is not None and r.steering.ops[0].scale == 2.0
    # As vllm_xargs carries it: a JSON string.
    assert parse_request_args({"steering": json.dumps(_SPEC)}, cfg, 0.5, hidden_size=4, num_layers=3) == r
    assert parse_request_args({}, cfg, 0.5).steering is None
    assert parse_request_args({"steering": None}, cfg, 0.5).steering is None
    # Independent of the value-head switch; beside VFD.
    vfd = parse_additional_config({"vfd": {"value_head_path": head_file}, "steering": {}})
    r = parse_request_args({"value_steer": False, "steering": _SPEC}, vfd, 0.5, hidden_size=4, num_layers=3)
    assert r.mode == MODE_OFF and r.steering is not None
    assert parse_request_args({"steering": _SPEC}, vfd, 0.5).mode == MODE_VFD


@pytest.mark.parametrize(
    ("steering", "field"),
    [
        ("{", r"steering: not valid JSON"),
        ({"ops": [{"layer": 3, "op": "add", "vector": "x"}]},
         r"steering\.ops\[0\]\.layer must be an integer in \[0, 3\)"),
        ({"ops": [{"layer": 0, "op": "add", "vector": [1.0, 2.0]}]}, r"steering\.ops\[0\]\.vector must have exactly 4"),
        ({"ops": [{"layer": 0, "op": "add", "vector": "x"}] * 3}, r"at most 2 ops"),
        ({"ops": [{"layer": 0, "op": "add", "vector": "missing"}]}, r"steering\.ops\[0\]\.vector: unknown vector"),
    ],
)
def test_bad_request_steering_names_field(steering, field):
    cfg = parse_additional_config({"steering": {"max_ops_per_request": 2}})
    with pytest.raises(RequestArgError, match=field):
        parse_request_args({"steering": steering}, cfg, 0.5, hidden_size=4, num_layers=3, resolve={"x"}.__contains__)


def test_request_steering_without_server_section(head_file):
    for cfg in (parse_additional_config({}), _cfg(head_file)):
        with pytest.raises(RequestArgError, match=r"no 'steering' section in --additional-config"):
            parse_request_args({"steering": _SPEC}, cfg, 0.5)


@pytest.mark.parametrize("key", ["Steering", "stearing", "steerng"])
def test_misspelled_steering_key(key):
    with pytest.raises(RequestArgError, match="did you mean 'steering'"):
        parse_request_args({key: _SPEC}, parse_additional_config({"steering": {}}), 0.5)


def test_words_near_steering_are_left_alone():
    # Other plugins' plain words: not close enough to "steering" to be taken for it.
    args = {"string": 1, "seeding": 2, "tiering": 3, "steer": 4, "steering_vector": 5}
    assert parse_request_args(args, parse_additional_config({"steering": {}}), 0.5).steering is None


@pytest.mark.parametrize(("value", "want"), [([3, 1, 3], (1, 3)), ("[2, 0]", (0, 2)), ("4,1", (1, 4)), ([], ())])
def test_capture_layers_forms(value, want):
    cfg = parse_additional_config({"steering": {}, "capture": {"dir": "/tmp/x"}})
    assert parse_request_args({"capture_layers": value}, cfg, 0.5, num_layers=8).capture_layers == want


@pytest.mark.parametrize(("raw", "value", "match"), [
    ({"steering": {}, "capture": {"dir": "/tmp/x"}}, [8], r"capture_layers\[0\] must be a decoder layer in \[0, 8\)"),
    ({"steering": {}, "capture": {"dir": "/tmp/x"}}, [-1], r"capture_layers\[0\]"),
    ({"steering": {}, "capture": {"dir": "/tmp/x"}}, "a,b", "list of layer indices"),
    ({"steering": {}, "capture": {"dir": "/tmp/x"}}, [True], "integer layer indices"),
    ({"steering": {}}, [0], "needs both a 'capture' and a 'steering' section"),
])
def test_capture_layers_refused(raw, value, match):
    with pytest.raises(RequestArgError, match=match):
        parse_request_args({"capture_layers": value}, parse_additional_config(raw, check_files=False), 0.5,
                           num_layers=8)


@pytest.mark.parametrize(("value", "want"), [(0, 0), (17, 17), ("17", 17), (5.0, 5)])
def test_capture_prompt_from_forms(value, want):
    got = parse_request_args({"capture_prompt_from": value}, parse_additional_config({"capture": {"dir": "/x"}}), 0.5)
    assert (got.capture_prompt_from, got.capture) == (want, True)  # it asks for capture too
    assert parse_request_args({}, parse_additional_config({"capture": {"dir": "/x"}}), 0.5).capture_prompt_from == -1


@pytest.mark.parametrize(("raw", "value", "match"), [
    ({"capture": {"dir": "/x"}}, -1, r"capture_prompt_from must be a prompt position \(an integer >= 0\), got -1"),
    ({"capture": {"dir": "/x"}}, 2.5, "capture_prompt_from must be"),
    ({"capture": {"dir": "/x"}}, True, "capture_prompt_from must be"),
    ({"capture": {"dir": "/x"}}, "ten", "capture_prompt_from must be"),
    ({"capture": {"dir": "/x"}}, "1e400", "capture_prompt_from must be"),
    ({"capture": {"dir": "/x"}}, [3], "capture_prompt_from must be"),
    ({"steering": {}}, 3, "capture_prompt_from: the server has no 'capture' section"),
])
def test_capture_prompt_from_refused(raw, value, match):
    with pytest.raises(RequestArgError, match=match):
        parse_request_args({"capture_prompt_from": value}, parse_additional_config(raw, check_files=False), 0.5)


# ---------------------------------------------------------------- logit steering


@pytest.fixture
def generator_file(tmp_path):
    path = tmp_path / "gen.safetensors"
    path.write_bytes(b"x")
    (tmp_path / "gen.safetensors.meta.json").write_text("{}")
    return str(path)


def test_logit_steering_section_alone_and_beside(head_file, generator_file):
    alone = parse_additional_config({"logit_steering": {"checkpoint": generator_file}})
    assert alone.mode == MODE_OFF and alone.logit_steering.checkpoint == generator_file
    beside = parse_additional_config({"vfd": {"value_head_path": head_file}, "steering": {},
                                      "capture": {"dir": "/tmp/c"}, "logit_steering": {"checkpoint": generator_file}})
    assert beside.mode == MODE_VFD and beside.steering is not None and beside.logit_steering is not None
    assert parse_additional_config({"vfd": {"value_head_path": head_file}}).logit_steering is None


@pytest.mark.parametrize(("sec", "field"), [
    ([], "logit_steering must be a JSON object"),
    ({}, "logit_steering.checkpoint must be a non-empty string"),
    ({"checkpoint": 3}, "logit_steering.checkpoint must be a non-empty string"),
    ({"checkpoint": "/g.pt"}, r"logit_steering.checkpoint must be a .safetensors file \(pickles are never loaded\)"),
    ({"checkpoint": "/nope.safetensors"}, "logit_steering.checkpoint: no such file"),
    ({"checkpoint": "/g.safetensors", "rank": 8}, r"logit_steering: unknown key\(s\) \['rank'\]"),
])  # fmt: skip
def test_bad_logit_steering_section_names_field(sec, field):
    with pytest.raises(ConfigError, match=field):
        parse_additional_config({"logit_steering": sec})


def test_logit_steering_checkpoint_needs_its_sidecar(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"logit_steering.checkpoint: no sidecar .*meta.json"):
        parse_additional_config({"logit_steering": {"checkpoint": str(path)}})


@pytest.mark.parametrize(("value", "want"), [(None, 0.0), (0, 0.0), (False, 0.0), ("off", 0.0), (True, 1.0),
                                             ("on", 1.0), (1.5, 1.5), ("2.5", 2.5), (4, 4.0), ("0", 0.0)])
def test_request_logit_strength_forms(generator_file, value, want):
    cfg = parse_additional_config({"logit_steering": {"checkpoint": generator_file}})
    steer = parse_request_args({"logit_steering": value} if value is not None else {}, cfg, 0.5)
    assert steer.logit_strength == want and steer.mode == MODE_OFF


@pytest.mark.parametrize("value", [-0.5, 4.5, "strong", float("nan"), float("inf"), [1.0], "nan"])
def test_bad_request_logit_strength_names_field(generator_file, value):
    cfg = parse_additional_config({"logit_steering": {"checkpoint": generator_file}})
    with pytest.raises(RequestArgError, match=r"logit_steering must be a strength multiplier in \[0, 4\]"):
        parse_request_args({"logit_steering": value}, cfg, 0.5)


def test_request_logit_steering_without_server_section(head_file):
    cfg = parse_additional_config({"vfd": {"value_head_path": head_file}})
    with pytest.raises(RequestArgError, match="logit_steering: this server has no 'logit_steering' section"):
        parse_request_args({"logit_steering": 1.0}, cfg, 0.5)
    # Asking for none is not asking for it.
    assert parse_request_args({"logit_steering": False}, cfg, 0.5).logit_strength == 0.0
    assert parse_request_args({"logit_steering": 0}, cfg, 0.5).logit_strength == 0.0


@pytest.mark.parametrize("key", ["logit_steer", "logits_steering", "Logit-Steering"])
def test_misspelled_logit_steering_key(key):
    with pytest.raises(RequestArgError, match="logit_steering"):
        parse_request_args({key: 1.0}, parse_additional_config({}), 0.5)


# ---------------------------------------------------------------- token mode (issue 24)

def test_token_mode_config_and_request_args():
    from value_steer.core.modes import MODE_TOKEN

    cfg = parse_additional_config({"vfd": {"mode": "token", "qhead_path": "/q.safetensors", "beta": 0.5}},
                                  check_files=False)
    assert (cfg.mode, cfg.qhead_path, cfg.beta, cfg.section, cfg.value_head_path) == (MODE_TOKEN, "/q.safetensors",
                                                                                       0.5, "vfd", None)
    got = parse_request_args({"token_beta": "2", "threshold": 0.3}, cfg, 0.6)
    assert (got.mode, got.beta, got.threshold) == (MODE_TOKEN, 2.0, 0.3)
    assert parse_request_args({}, cfg, 0.6).beta == 0.5
    assert parse_request_args({"value_steer": False}, cfg, 0.6).mode == MODE_OFF


@pytest.mark.parametrize(("sec", "match"), [
    ({"mode": "token"}, "vfd.qhead_path is required in token mode"),
    ({"mode": "token", "qhead_path": "/q", "num_candidates": 0}, r"vfd.num_candidates must be an integer in \[1, 64\]"),
    ({"mode": "token", "qhead_path": "/q", "direction": "below"}, "vfd.direction is not used in token mode"),
    ({"mode": "token", "qhead_path": "/q", "beta": -1}, r"vfd.beta must be a number in \[0, 100\]"),
    ({"mode": "token", "qhead_path": "/q", "beta": "1"}, "vfd.beta must be a number"),
    ({"mode": "fast", "value_head_path": "/h"}, r"vfd.mode must be one of \['exact', 'token'\]"),
    ({"value_head_path": "/h", "qhead_path": "/q"}, "vfd.qhead_path belongs to token mode"),
])
def test_token_mode_config_errors_name_the_field(sec, match):
    with pytest.raises(ConfigError, match=match):
        parse_additional_config({"vfd": sec}, check_files=False)


def test_beta_is_refused_outside_token_mode(head_file):
    with pytest.raises(RequestArgError, match="token_beta is only valid when the server runs vfd in token mode"):
        parse_request_args({"token_beta": 1.0}, _cfg(head_file), 0.5)


# ---------------------------------------------------------------- several named value heads


def test_named_heads_resolve_each_operating_point(head_file, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x")
    cfg = parse_additional_config({"vfd": {"heads": {"sentiment": {"path": head_file, "threshold": 0.6},
                                                     "prices": {"path": str(other), "direction": "below"}},
                                           "default_head": "prices"}})
    assert [h.name for h in cfg.heads] == ["sentiment", "prices"] and cfg.default_head == 1
    assert cfg.value_head_path == str(other) and cfg.direction == "below" and cfg.threshold is None
    assert cfg.heads[0].threshold == 0.6 and cfg.heads[0].sign == 1.0 and cfg.heads[1].sign == -1.0
    assert [h.field for h in cfg.heads] == ["vfd.heads.sentiment", "vfd.heads.prices"]
    r = parse_request_args({}, cfg, 0.5, head_thresholds=[0.6, 0.3])
    assert (r.head, r.threshold, r.sign) == (1, 0.3, -1.0)
    r = parse_request_args({"head": "sentiment"}, cfg, 0.5, head_thresholds=[0.6, 0.3])
    assert (r.head, r.threshold, r.sign) == (0, 0.6, 1.0)
    r = parse_request_args({"head": "sentiment", "threshold": 0.9}, cfg, 0.5, head_thresholds=[0.6, 0.3])
    assert (r.head, r.threshold) == (0, 0.9)


def test_single_path_form_is_one_head_named_default(head_file):
    cfg = parse_additional_config({"abstain": {"value_head_path": head_file, "threshold": 0.2}})
    assert [(h.name, h.path, h.threshold) for h in cfg.heads] == [("default", head_file, 0.2)]
    assert cfg.heads[0].field == "abstain.value_head_path"  # what messages about it name
    assert parse_request_args({"head": "default"}, cfg, 0.2).head == 0


def test_unknown_head_is_refused_naming_the_known_ones(head_file):
    cfg = parse_additional_config({"abstain": {"heads": {"a": {"path": head_file}, "b": {"path": head_file}},
                                               "default_head": "a"}})
    for bad in ("c", "", 3, ["a"], "A"):
        with pytest.raises(RequestArgError, match=r"head must be one of \['a', 'b'\]"):
            parse_request_args({"head": bad}, cfg, 0.5)
    off = parse_additional_config({})
    with pytest.raises(RequestArgError, match="head: this server has no value heads"):
        parse_request_args({"head": "a"}, off, 0.5)


@pytest.mark.parametrize(("sec", "msg"), [
    ({"heads": {}}, r"vfd\.heads must be a non-empty JSON object"),
    ({"heads": []}, r"vfd\.heads must be a non-empty JSON object"),
    ({"heads": {"a": {"path": "H"}, "b": {"path": "H"}}}, r"vfd\.default_head is required with several heads; one "
                                                          r"of \['a', 'b'\]"),
    ({"heads": {"a": {"path": "H"}}, "default_head": "z"}, r"vfd\.default_head must be one of \['a'\]"),
    ({"heads": {"a": {"path": "H"}}, "threshold": 0.3}, r"vfd\.threshold cannot be given beside vfd\.heads"),
    ({"heads": {"a": {"path": "H"}}, "value_head_path": "H"}, r"vfd\.value_head_path cannot be given beside"),
    ({"heads": {"a": {"path": "H", "thresh": 1}}}, r"vfd\.heads\.a: unknown key\(s\) \['thresh'\]"),
    ({"heads": {"a": {"threshold": 0.3}}}, r"vfd\.heads\.a\.path is required"),
    ({"heads": {"a": {"path": "H", "threshold": 2}}}, r"vfd\.heads\.a\.threshold must be a number in \[0, 1\]"),
    ({"heads": {"a": {"path": "H", "direction": "up"}}}, r"vfd\.heads\.a\.direction must be one of"),
    ({"heads": {"a": {"path": "/nonexistent/x.safetensors"}}}, r"vfd\.heads\.a\.path: no such file"),
    ({"heads": {"a b": {"path": "H"}}}, r"vfd\.heads: head name 'a b' must be"),
    ({"heads": {"a": "H"}}, r"vfd\.heads\.a must be a JSON object"),
    ({"value_head_path": "H", "default_head": "a"}, r"vfd\.default_head needs vfd\.heads"),
    ({"heads": {f"h{i}": {"path": "H"} for i in range(17)}, "default_head": "h0"}, r"vfd\.heads: at most 16"),
    ({"mode": "token", "qhead_path": "H", "heads": {"a": {"path": "H"}}}, r"vfd\.qhead_path cannot be given beside"),
    ({"mode": "token", "heads": {"a": {"path": "H", "direction": "below"}}},
     r"vfd\.heads\.a\.direction is not used in token mode"),
    ({"mode": "token", "heads": {"a": {"path": "H"}, "b": {"path": "H"}}}, r"vfd\.default_head is required"),
    ({"mode": "token", "qhead_path": "H", "default_head": "a"}, r"vfd\.default_head needs vfd\.heads"),
])
def test_bad_heads_config_names_the_field(head_file, sec, msg):
    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return head_file if x == "H" else x

    with pytest.raises(ConfigError, match=msg):
        parse_additional_config({"vfd": fill(sec)})


def test_token_mode_named_qheads(head_file, tmp_path):
    other = tmp_path / "q2.safetensors"
    other.write_bytes(b"x")
    cfg = parse_additional_config({"vfd": {"mode": "token", "heads": {"tone": {"path": head_file, "threshold": 0.7},
                                                                      "prices": {"path": str(other)}},
                                           "default_head": "prices", "beta": 1.0}})
    assert cfg.mode == MODE_TOKEN and cfg.qhead_path == str(other) and cfg.default_head == 1 and cfg.beta == 1.0
    assert [(h.name, h.threshold) for h in cfg.heads] == [("tone", 0.7), ("prices", None)]
    r = parse_request_args({"head": "tone"}, cfg, 0.5, head_thresholds=[0.7, 0.4])
    assert (r.mode, r.head, r.threshold) == (MODE_TOKEN, 0, 0.7)
    single = parse_additional_config({"vfd": {"mode": "token", "qhead_path": head_file, "threshold": 0.3}})
    assert [(h.name, h.path, h.threshold, h.field) for h in single.heads] == [("default", head_file, 0.3,
                                                                                "vfd.qhead_path")]
