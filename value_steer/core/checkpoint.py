"""Checkpoint IO for the value head.

On-disk format (the published seed checkpoints):

- **Weights**: a bare state_dict with exactly the keys ``0.weight [H, H], 0.bias [H], 2.weight [H, H],
  2.bias [H], 4.weight [1, H], 4.bias [1]`` (see :data:`value_steer.core.value_head.STATE_DICT_KEYS`),
  stored either as ``.safetensors`` or as a ``torch.save`` pickle (``.bin`` / ``.pt`` / ``.pth``).
  Any float dtype is accepted on load and converted to fp32; :func:`save_value_head` always writes
  safetensors with contiguous fp32 tensors.
- **Sidecar**: a JSON object at ``<path>.meta.json`` (e.g. ``head.safetensors.meta.json``)::

      {
        "feature_spec": {"layer": "final", "norm": "post", "pooling": "token", "dtype": "bfloat16"},
        "threshold": 0.31,            # number, or null
        "meta": {...},                # free-form JSON object (training run, data, ...)
        "calibration": {...}          # optional: see value_steer.core.calibration.calibration_record
      }

  ``feature_spec``, ``threshold`` and ``meta`` are required keys, ``calibration`` is optional; no
  other keys are allowed (a typo such as ``"treshold"`` is an error, not a silently ignored field).
  A checkpoint **without** a sidecar still loads: its threshold is ``None`` (the serving config must
  then give one) and its feature spec is the default :class:`FeatureSpec` (final layer, post-norm,
  per-token), which is what the vLLM worker scores.

Security: pickles are only ever read through ``torch.load(weights_only=True)``; a pickle that carries
code (or any object other than plain tensors/containers) is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from value_steer.core.value_head import STATE_DICT_KEYS, ValueHead, expected_shapes

SIDECAR_SUFFIX = ".meta.json"
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SIDECAR_KEYS = ("feature_spec", "threshold", "meta", "calibration")
_REQUIRED_SIDECAR_KEYS = ("feature_spec", "threshold", "meta")
FEATURE_SPEC_KEYS = ("layer", "norm", "pooling", "dtype")
# The smallest float32 above 1.0: what a conformal threshold over values that reach exactly 1.0 becomes
# (``score >= threshold`` then never holds for a probability). See value_steer.core.calibration.
_MAX_THRESHOLD = 1.0000001192092896


class CheckpointError(ValueError):
    """A value-head checkpoint or its sidecar is invalid (the message names the file and the field)."""


@dataclass(frozen=True)
class FeatureSpec:
    """Which backbone activation the head scores.

    Attributes:
        layer: decoder layer index (int) or ``"final"`` (the last layer's output).
        norm: where the hidden state is taken relative to the final norm (``"post"``: after it).
        pooling: ``"token"``: one score per token (no pooling across tokens).
        dtype: dtype of the features the head was trained on (e.g. ``"bfloat16"``; ``"auto"``: the
            backbone's dtype). Informational: the head itself always runs in fp32.
    """

    layer: int | str = "final"
    norm: str = "post"
    pooling: str = "token"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _validate_feature_spec_fields(asdict(self), "feature_spec")

    @classmethod
    def from_dict(cls, raw: Any, where: str = "feature_spec") -> FeatureSpec:
        """Parse and validate a ``feature_spec`` JSON object (all four keys required)."""
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{where} must be a JSON object, got {type(raw).__name__}")
        missing = [k for k in FEATURE_SPEC_KEYS if k not in raw]
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {missing}; required: {list(FEATURE_SPEC_KEYS)}")
        unknown = sorted(set(raw) - set(FEATURE_SPEC_KEYS))
        if unknown:
            raise CheckpointError(f"{where}: unknown key(s) {unknown}; allowed: {list(FEATURE_SPEC_KEYS)}")
        _validate_feature_spec_fields(raw, where)
        return cls(layer=raw["layer"], norm=raw["norm"], pooling=raw["pooling"], dtype=raw["dtype"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"layer", "norm", "pooling", "dtype"}``."""
        return asdict(self)


def _validate_feature_spec_fields(raw: Mapping[str, Any], where: str) -> None:
    layer = raw["layer"]
    if not ((isinstance(layer, int) and not isinstance(layer, bool)) or layer == "final"):
        raise CheckpointError(f'{where}.layer must be an integer layer index or "final", got {layer!r}')
    for key in ("norm", "pooling", "dtype"):
        value = raw[key]
        if not isinstance(value, str) or not value:
            raise CheckpointError(f"{where}.{key} must be a non-empty string, got {value!r}")


@dataclass
class HeadCheckpoint:
    """A loaded value head with its sidecar.

    Attributes:
        head: the fp32 :class:`ValueHead` (``eval()`` mode, on the requested device).
        feature_spec: which activation it scores (default spec when there is no sidecar).
        threshold: the sidecar's threshold on the value ``p``, or None (no sidecar / null).
        meta: the sidecar's free-form ``meta`` object (``{}`` without a sidecar).
        calibration: the sidecar's ``calibration`` record, or None.
        path: the weights file it was loaded from.
    """

    head: ValueHead
    feature_spec: FeatureSpec = field(default_factory=FeatureSpec)
    threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    path: str = ""

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size


def other_model(meta: Mapping[str, Any], served_name: str, served_config_sha256: str | None) -> str | None:
    """Why a head made for another model may not fit the served one (sizes already checked), or None.

    ``meta["model"]`` is what ``value-steer pipeline`` records (``name``, ``hidden_size``, ``config_sha256``); a head
    without that record (older heads, hand-made ones) is not judged. The config hashes decide when both are known,
    else the names.
    """
    rec = meta.get("model") if isinstance(meta, Mapping) else None
    if not isinstance(rec, Mapping):
        return None
    made_sha, made_name = rec.get("config_sha256"), rec.get("name")
    if made_sha and served_config_sha256:
        if made_sha == served_config_sha256:
            return None
        return (f"it was made on {made_name!r} (config sha256 {str(made_sha)[:12]}...), the server runs "
                f"{served_name!r} (config sha256 {served_config_sha256[:12]}...)")
    if made_name and made_name != served_name:
        return f"it was made on {made_name!r}, the server runs {served_name!r}"
    return None


def sidecar_path(path: str | os.PathLike[str]) -> str:
    """``<path>.meta.json``: where the sidecar of the weights file ``path`` lives."""
    return os.fspath(path) + SIDECAR_SUFFIX


def check_sidecar_keys(raw: Any, where: str, keys: tuple[str, ...], required: tuple[str, ...],
                       err: type[CheckpointError]) -> None:
    """``raw`` is a JSON object holding only ``keys`` and all of ``required``; else ``err`` naming ``where``."""
    if not isinstance(raw, dict):
        raise err(f"{where}: the sidecar must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise err(f"{where}: unknown key(s) {unknown}; allowed: {list(keys)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise err(f"{where}: missing key(s) {missing}; required: {list(required)}")


def read_strict_sidecar(path: str, *, fmt: str, keys: tuple[str, ...], required: tuple[str, ...], what: str,
                        err: type[CheckpointError]) -> dict[str, Any]:
    """The JSON sidecar of the weights file ``path``: present, a JSON object holding only ``keys`` and all of
    ``required``, with ``format == fmt``, and (when present) ``training`` a JSON object and ``command`` a string or
    null. Raises ``err`` naming the sidecar and the field; ``what`` says what needs it (for the missing-file case).
    The checkpoint formats of logit steering and the Q-head share it; each checks its own fields after."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        raise err(f"{path}: no sidecar {side} (it holds {', '.join(required[1:])}; {what} needs it)")
    try:
        with open(side, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise err(f"{side}: sidecar is not valid JSON ({exc})") from None
    check_sidecar_keys(raw, side, keys, required, err)
    if raw["format"] != fmt:
        raise err(f"{side}: format must be {fmt!r}, got {raw['format']!r}")
    if not isinstance(raw.get("training", {}), dict):
        raise err(f"{side}: training must be a JSON object")
    if raw.get("command") is not None and not isinstance(raw["command"], str):
        raise err(f"{side}: command must be a string or null")
    return raw


def _check_threshold(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckpointError(f"{where} must be a number or null, got {value!r}")
    t = float(value)
    if not math.isfinite(t) or not 0.0 <= t <= _MAX_THRESHOLD:
        raise CheckpointError(
            f"{where} must be a finite value-head probability in [0, 1] (or the float32 successor of 1.0, "
            f"'never intervene'), got {value!r}"
        )
    return t


def _check_json_object(value: Any, where: str, *, nullable: bool) -> dict[str, Any] | None:
    if value is None and nullable:
        return None
    if not isinstance(value, Mapping):
        kind = "a JSON object or null" if nullable else "a JSON object"
        raise CheckpointError(f"{where} must be {kind}, got {type(value).__name__}")
    return dict(value)


def _parse_sidecar(raw: Any, where: str) -> tuple[FeatureSpec, float | None, dict[str, Any], dict[str, Any] | None]:
    check_sidecar_keys(raw, where, SIDECAR_KEYS, _REQUIRED_SIDECAR_KEYS, CheckpointError)
    spec = FeatureSpec.from_dict(raw["feature_spec"], f"{where}: feature_spec")
    threshold = _check_threshold(raw["threshold"], f"{where}: threshold")
    meta = _check_json_object(raw["meta"], f"{where}: meta", nullable=False)
    calibration = _check_json_object(raw.get("calibration"), f"{where}: calibration", nullable=True)
    assert meta is not None
    return spec, threshold, meta, calibration


def _torch_load_reason(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error (drops torch's advice to retry with weights_only=False)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith(boiler)]
    return " ".join(kept) or (lines[0] if lines else "no details")


def _read_state_dict(path: str) -> Mapping[str, Any]:
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if lower.endswith(PICKLE_SUFFIXES):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for code-carrying pickles, RuntimeError for corrupt zips
            raise CheckpointError(
                f"{path}: not a plain tensor state_dict; torch.load(weights_only=True) refused it "
                f"({type(exc).__name__}: {_torch_load_reason(exc)}). Only bare state_dicts of tensors are "
                "loaded; a pickle that carries code or other objects is never executed."
            ) from exc
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: not a plain tensor state_dict (the file holds a {type(obj).__name__})")
        return obj
    raise CheckpointError(
        f"{path}: unsupported checkpoint extension; expected one of {list(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def _validate_state_dict(sd: Mapping[str, Any], path: str) -> tuple[int, dict[str, torch.Tensor]]:
    """Strict key/shape/dtype/finiteness check; returns ``(H, fp32 contiguous state dict)``."""
    keys = set(sd)
    missing = [k for k in STATE_DICT_KEYS if k not in keys]
    unexpected = sorted(str(k) for k in keys - set(STATE_DICT_KEYS))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        raise CheckpointError(
            f"{path}: state_dict does not match the value head ({'; '.join(parts)}); "
            f"expected exactly {list(STATE_DICT_KEYS)}"
        )
    for key in STATE_DICT_KEYS:
        value = sd[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key} must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise CheckpointError(f"{path}: {key} must be a floating-point tensor, got {value.dtype}")
    w0 = sd["0.weight"]
    if w0.dim() != 2 or w0.shape[0] < 1:
        raise CheckpointError(f"{path}: 0.weight: expected shape (H, H), found {tuple(w0.shape)}")
    hidden = int(w0.shape[0])
    for key, shape in expected_shapes(hidden).items():
        found = tuple(sd[key].shape)
        if found != shape:
            raise CheckpointError(
                f"{path}: {key}: expected shape {shape} (hidden size {hidden}, from 0.weight), found {found}"
            )
    out: dict[str, torch.Tensor] = {}
    for key in STATE_DICT_KEYS:
        t = sd[key].detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: {key} has {bad} non-finite (NaN/inf) value(s)")
        out[key] = t
    return hidden, out


def load_value_head(
    path: str | os.PathLike[str], hidden_size: int | None = None, device: torch.device | str = "cpu"
) -> HeadCheckpoint:
    """Load a value-head checkpoint (weights + optional sidecar), strictly validated.

    Args:
        path: ``.safetensors`` (read with safetensors) or ``.bin``/``.pt``/``.pth`` (read with
            ``torch.load(weights_only=True)`` only).
        hidden_size: the backbone's hidden size; when given, the head's ``H`` must equal it.
        device: where the fp32 head is placed.
    Returns:
        :class:`HeadCheckpoint` with the head in ``eval()`` mode.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable / code-carrying pickle, missing or unexpected keys, wrong shapes,
            non-float or non-finite weights, hidden-size mismatch, malformed sidecar (the message
            names the key or field).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"value head checkpoint not found: {path}")
    hidden, state = _validate_state_dict(_read_state_dict(path), path)
    if hidden_size is not None and hidden != int(hidden_size):
        raise CheckpointError(
            f"{path}: the value head's hidden size is {hidden} but the backbone's hidden size is {hidden_size}"
        )

    spec, threshold, meta, calibration = FeatureSpec(), None, {}, None
    side = sidecar_path(path)
    if os.path.exists(side):
        try:
            with open(side, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{side}: sidecar is not valid JSON ({exc})") from exc
        spec, threshold, meta, calibration = _parse_sidecar(raw, side)

    head = ValueHead(hidden)
    head.load_state_dict(state, strict=True)
    head.to(device)
    head.eval()
    return HeadCheckpoint(
        head=head, feature_spec=spec, threshold=threshold, meta=meta, calibration=calibration, path=path
    )


def _atomic_write(path: str, write: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_value_head(
    path: str | os.PathLike[str],
    head: ValueHead,
    *,
    threshold: float | None = None,
    feature_spec: FeatureSpec | Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> None:
    """Write ``head`` as safetensors (contiguous fp32) plus its sidecar ``<path>.meta.json``.

    The round trip through :func:`load_value_head` is exact: identical fp32 weights, threshold,
    feature spec, ``meta`` and ``calibration`` (for JSON-native values; tuples come back as lists).
    Both files are written atomically (temporary file + rename). Everything is validated before
    anything is written.

    Args:
        path: destination; must end in ``.safetensors``.
        head: the value head (its state_dict must have exactly the six head keys, finite values).
        threshold: threshold on the value ``p`` (finite, in [0, 1]) or None.
        feature_spec: :class:`FeatureSpec` or its dict; default :class:`FeatureSpec()`.
        meta: JSON-serialisable free-form object (default ``{}``).
        calibration: JSON-serialisable calibration record or None.
    """
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        raise CheckpointError(f"{path}: save_value_head writes safetensors; the path must end in .safetensors")
    _, state = _validate_state_dict(dict(head.state_dict()), f"save_value_head({path})")
    if feature_spec is None:
        spec = FeatureSpec()
    elif isinstance(feature_spec, FeatureSpec):
        spec = feature_spec
    else:
        spec = FeatureSpec.from_dict(feature_spec)
    sidecar: dict[str, Any] = {
        "feature_spec": spec.to_dict(),
        "threshold": _check_threshold(threshold, "threshold"),
        "meta": _check_json_object({} if meta is None else meta, "meta", nullable=False),
    }
    if calibration is not None:
        sidecar["calibration"] = _check_json_object(calibration, "calibration", nullable=False)
    try:
        text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"sidecar for {path} is not JSON-serialisable (no NaN/inf allowed): {exc}") from exc

    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
