"""checkpoint: the published seed format, strict validation, the safe pickle path, exact round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from value_steer.core.checkpoint import (
    CheckpointError,
    FeatureSpec,
    HeadCheckpoint,
    load_value_head,
    save_value_head,
    sidecar_path,
)
from value_steer.core.value_head import STATE_DICT_KEYS, ValueHead

H = 8


def _head(seed: int = 0, h: int = H) -> ValueHead:
    torch.manual_seed(seed)
    return ValueHead(h)


def _sidecar(**overrides: object) -> dict:
    raw = {
        "feature_spec": {"layer": "final", "norm": "post", "pooling": "token", "dtype": "bfloat16"},
        "threshold": 0.3,
        "meta": {"model": "tiny", "run": 7},
    }
    raw.update(overrides)
    return raw


def _write_sidecar(path: Path, raw: object) -> None:
    Path(sidecar_path(path)).write_text(json.dumps(raw), encoding="utf-8")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_load_published_pickle_format(tmp_path: Path, suffix: str) -> None:
    head = _head()
    path = tmp_path / f"value_head{suffix}"
    torch.save(head.state_dict(), path)
    _write_sidecar(path, _sidecar(calibration={"method": "split_conformal", "tau": 0.1}))
    ck = load_value_head(path, hidden_size=H)
    assert isinstance(ck, HeadCheckpoint)
    assert ck.path == str(path) and ck.hidden_size == H
    assert ck.threshold == 0.3
    assert ck.feature_spec == FeatureSpec(layer="final", norm="post", pooling="token", dtype="bfloat16")
    assert ck.meta == {"model": "tiny", "run": 7}
    assert ck.calibration == {"method": "split_conformal", "tau": 0.1}
    assert not ck.head.training
    for key in STATE_DICT_KEYS:
        assert torch.equal(ck.head.state_dict()[key], head.state_dict()[key])
    x = torch.randn(5, H)
    assert torch.equal(ck.head.p(x), head.p(x))


def test_load_safetensors_fp16_is_upcast(tmp_path: Path) -> None:
    head = _head(1)
    path = tmp_path / "head.safetensors"
    save_file({k: v.half().contiguous() for k, v in head.state_dict().items()}, str(path))
    ck = load_value_head(path)
    for key, v in ck.head.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, head.state_dict()[key].half().float())


def test_missing_sidecar_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in _head().state_dict().items()}, str(path))
    assert not os.path.exists(sidecar_path(path))
    ck = load_value_head(str(path))
    assert ck.threshold is None
    assert ck.feature_spec == FeatureSpec() == FeatureSpec(layer="final", norm="post", pooling="token", dtype="auto")
    assert ck.meta == {} and ck.calibration is None


def test_round_trip_is_exact(tmp_path: Path) -> None:
    head = _head(2)
    path = tmp_path / "sub" / "head.safetensors"
    spec = FeatureSpec(layer=17, norm="post", pooling="token", dtype="float16")
    meta = {"lr": 0.001, "history": [{"epoch": 0, "val_loss": 0.1234567890123}], "note": "ü"}
    calib = {"method": "split_conformal", "tau": 0.1, "n": 100, "threshold": 0.30000001192092896}
    threshold = 0.1 + 0.2  # not a "nice" decimal: must survive JSON exactly
    save_value_head(path, head, threshold=threshold, feature_spec=spec, meta=meta, calibration=calib)
    assert path.is_file() and Path(sidecar_path(path)).is_file()
    ck = load_value_head(path, hidden_size=H)
    assert ck.threshold == threshold
    assert ck.feature_spec == spec and ck.meta == meta and ck.calibration == calib
    for key in STATE_DICT_KEYS:
        assert torch.equal(ck.head.state_dict()[key], head.state_dict()[key])
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.safetensors", "head.safetensors.meta.json"]
    # the sidecar is plain, standard JSON in the documented layout
    raw = json.loads(Path(sidecar_path(path)).read_text())
    assert set(raw) == {"feature_spec", "threshold", "meta", "calibration"}
    assert raw["feature_spec"] == {"layer": 17, "norm": "post", "pooling": "token", "dtype": "float16"}


def test_numpy_threshold_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_value_head(path, _head(), threshold=np.float32(0.25))
    ck = load_value_head(path)
    assert ck.threshold == 0.25 and type(ck.threshold) is float


def test_save_defaults_and_dict_feature_spec(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_value_head(path, _head(), feature_spec={"layer": 3, "norm": "post", "pooling": "token", "dtype": "auto"})
    ck = load_value_head(path)
    assert ck.threshold is None and ck.meta == {} and ck.calibration is None
    assert ck.feature_spec.layer == 3
    raw = json.loads(Path(sidecar_path(path)).read_text())
    assert raw["threshold"] is None and "calibration" not in raw


def test_save_validation(tmp_path: Path) -> None:
    head = _head()
    with pytest.raises(CheckpointError, match="safetensors"):
        save_value_head(tmp_path / "h.bin", head)
    with pytest.raises(CheckpointError, match="threshold"):
        save_value_head(tmp_path / "h.safetensors", head, threshold=float("nan"))
    with pytest.raises(CheckpointError, match="threshold"):
        save_value_head(tmp_path / "h.safetensors", head, threshold=1.5)
    with pytest.raises(CheckpointError, match="JSON"):
        save_value_head(tmp_path / "h.safetensors", head, meta={"x": float("inf")})
    with pytest.raises(CheckpointError, match="layer"):
        save_value_head(
            tmp_path / "h.safetensors",
            head,
            feature_spec={"layer": 1.5, "norm": "post", "pooling": "token", "dtype": "auto"},
        )
    with torch.no_grad():
        head[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"0\.weight.*non-finite"):
        save_value_head(tmp_path / "h.safetensors", head)
    assert list(tmp_path.iterdir()) == []  # nothing written on failure


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        load_value_head(missing)


def test_code_carrying_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # executed by an unsafe torch.load
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.bin"
    sd = {k: v for k, v in _head().state_dict().items()}
    sd["0.bias"] = Evil()  # type: ignore[assignment]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="not a plain tensor state_dict") as info:
        load_value_head(path)
    assert not marker.exists()
    assert "makedirs" in str(info.value)  # names what was refused ...
    assert "weights_only` set to `False`" not in str(info.value)  # ... without advising the unsafe retry


def test_non_tensor_and_non_dict_pickles(tmp_path: Path) -> None:
    path = tmp_path / "h.pt"
    sd = dict(_head().state_dict())
    sd["0.bias"] = [1.0, 2.0]  # type: ignore[assignment]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"0\.bias must be a tensor"):
        load_value_head(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a plain tensor state_dict"):
        load_value_head(path)
    path.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a plain tensor state_dict"):
        load_value_head(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "h.ckpt"
    torch.save(_head().state_dict(), path)
    with pytest.raises(CheckpointError, match="extension"):
        load_value_head(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_value_head(path)


def _save_sd(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / "h.pt"
    torch.save(sd, path)
    return path


def test_missing_key(tmp_path: Path) -> None:
    sd = dict(_head().state_dict())
    del sd["2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['2\.bias'\]"):
        load_value_head(_save_sd(tmp_path, sd))


def test_unexpected_key(tmp_path: Path) -> None:
    sd = dict(_head().state_dict())
    sd["6.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['6\.weight'\]"):
        load_value_head(_save_sd(tmp_path, sd))
    # a wrapped state_dict ("state_dict": {...}) is not the bare format
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_value_head(_save_sd(tmp_path, {"state_dict": dict(_head().state_dict())}))


def test_prefixed_keys_are_rejected(tmp_path: Path) -> None:
    sd = {f"head.{k}": v for k, v in _head().state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing key.*0\.weight"):
        load_value_head(_save_sd(tmp_path, sd))


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("2.weight", (H, H + 1), f"\\({H}, {H}\\)"),
        ("0.bias", (H + 1,), f"\\({H},\\)"),
        ("4.weight", (H,), f"\\(1, {H}\\)"),
        ("4.bias", (2,), "\\(1,\\)"),
    ],
)
def test_wrong_shape_names_key_and_shapes(tmp_path: Path, key: str, shape: tuple, expected: str) -> None:
    sd = dict(_head().state_dict())
    sd[key] = torch.zeros(shape)
    found = str(tuple(shape)).replace("(", "\\(").replace(")", "\\)")
    with pytest.raises(
        CheckpointError, match=rf"{key.replace('.', chr(92) + '.')}: expected shape {expected}.*found {found}"
    ):
        load_value_head(_save_sd(tmp_path, sd))


def test_non_square_first_layer(tmp_path: Path) -> None:
    sd = dict(_head().state_dict())
    sd["0.weight"] = torch.zeros(H)
    with pytest.raises(CheckpointError, match=r"0\.weight"):
        load_value_head(_save_sd(tmp_path, sd))


def test_hidden_size_is_inferred_and_checked(tmp_path: Path) -> None:
    path = _save_sd(tmp_path, dict(_head(h=16).state_dict()))
    assert load_value_head(path).hidden_size == 16
    with pytest.raises(CheckpointError, match=r"hidden size is 16.*backbone's hidden size is 32"):
        load_value_head(path, hidden_size=32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    sd = dict(_head().state_dict())
    sd["4.weight"] = sd["4.weight"].clone()
    sd["4.weight"][0, 3] = bad
    with pytest.raises(CheckpointError, match=r"4\.weight has 1 non-finite"):
        load_value_head(_save_sd(tmp_path, sd))


def test_integer_weights_rejected(tmp_path: Path) -> None:
    sd = dict(_head().state_dict())
    sd["4.bias"] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"4\.bias must be a floating-point"):
        load_value_head(_save_sd(tmp_path, sd))


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_sidecar(threshold="0.3"), "threshold"),
        (_sidecar(threshold=True), "threshold"),
        (_sidecar(threshold=2.0), "threshold"),
        (_sidecar(meta=[1, 2]), "meta"),
        (_sidecar(calibration=3), "calibration"),
        (_sidecar(feature_spec="final"), "feature_spec"),
        (_sidecar(feature_spec={"layer": 1.5, "norm": "post", "pooling": "token", "dtype": "auto"}), "layer"),
        (_sidecar(feature_spec={"layer": "last", "norm": "post", "pooling": "token", "dtype": "auto"}), "layer"),
        (_sidecar(feature_spec={"layer": 3, "norm": "", "pooling": "token", "dtype": "auto"}), "norm"),
        (_sidecar(feature_spec={"layer": 3, "norm": "post", "pooling": 1, "dtype": "auto"}), "pooling"),
        (_sidecar(feature_spec={"layer": 3, "norm": "post", "pooling": "token"}), "dtype"),
        (_sidecar(feature_spec={"layer": 3, "norm": "post", "pooling": "token", "dtype": "a", "x": 1}), "'x'"),
        (_sidecar(treshold=0.3), "treshold"),
        ({"feature_spec": _sidecar()["feature_spec"], "meta": {}}, "threshold"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_malformed_sidecar_names_field(tmp_path: Path, raw: object, field: str) -> None:
    path = tmp_path / "h.safetensors"
    save_file({k: v.contiguous() for k, v in _head().state_dict().items()}, str(path))
    _write_sidecar(path, raw)
    with pytest.raises(CheckpointError, match=field) as info:
        load_value_head(path)
    assert "meta.json" in str(info.value)


def test_sidecar_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_file({k: v.contiguous() for k, v in _head().state_dict().items()}, str(path))
    Path(sidecar_path(path)).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"h\.safetensors\.meta\.json.*not valid JSON"):
        load_value_head(path)


def test_null_threshold_and_integer_layer(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_file({k: v.contiguous() for k, v in _head().state_dict().items()}, str(path))
    _write_sidecar(
        path,
        _sidecar(threshold=None, feature_spec={"layer": -1, "norm": "post", "pooling": "token", "dtype": "bfloat16"}),
    )
    ck = load_value_head(path)
    assert ck.threshold is None and ck.feature_spec.layer == -1


def test_feature_spec_validation() -> None:
    with pytest.raises(CheckpointError, match="layer"):
        FeatureSpec(layer=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        FeatureSpec(dtype="")
    assert FeatureSpec.from_dict(FeatureSpec(layer=2).to_dict()) == FeatureSpec(layer=2)


def test_device_argument(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    save_value_head(path, _head())
    ck = load_value_head(path, device=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in ck.head.parameters())


def test_other_model_names_both_models():
    """A head made on another model (sizes fit): the reason names both; no record, or the same config: None."""
    from value_steer.core.checkpoint import other_model

    made = {"model": {"name": "SmolLM2-135M-Instruct", "hidden_size": 576, "config_sha256": "a" * 64}}
    assert other_model(made, "SmolLM2-135M-Instruct", "a" * 64) is None
    reason = other_model(made, "my-llama", "b" * 64)
    assert "SmolLM2-135M-Instruct" in reason and "my-llama" in reason
    assert "my-llama" in other_model(made, "my-llama", None)  # no hash for the served model: names decide
    assert other_model({}, "my-llama", "b" * 64) is None and other_model({"model": "text"}, "x", None) is None
