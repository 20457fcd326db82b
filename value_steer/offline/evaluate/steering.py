"""The evaluation's activation-steering rows: the committed vectors' sidecars (:func:`load_vectors`) and the
request specs built from them (:func:`activation_conditions`). Pure (JSON and the spec helper; no vLLM).

The vectors directory (``value-steer vectors`` writes it; default ``value_steer/data/vectors``) holds:

- ``sentiment.safetensors``: one unit tensor ``[H]`` at decoder layer ``layer``, pointing from negative-judged
  toward positive-judged responses' mean residual stream; its sidecar ``sentiment.safetensors.meta.json``
  gives ``layer``, ``residual_norm``, ``scales`` (suggested add scales, ascending) and ``cap.min`` (a floor for
  the projection on it);
- ``sentiment_probe.safetensors``: the gate's probe ``[H]``; its sidecar gives ``layer``, ``threshold`` and
  ``sharpness`` (the gate opens on few responses the judge finds fine: see the sidecar's ``calibration``).

A task's vectors go by its name (``value-steer vectors --task`` writes ``<task>`` and ``<task>_probe``); ``value-steer
vectors --pairs`` writes one vector (any name) whose sidecar lists ``layers``, ``norms`` and
``suggested_add_scales`` (multiples of the vector as written) and no probe or cap floor: its rows are the adds and
ablate (cap and the gated rows need what only the judged-sample method measures).

Rows (test split; same prompts, sampling and budget as the others):

- ``add s=S``: ``x + S v`` at the vector's layer, every token (prompt and decode), one row per suggested scale;
- ``cap min=M``: the component along ``v`` floored at ``M`` (negative drift clamped, positive left alone);
- ``ablate``: the component along ``v`` removed (scale 0). It removes *both* directions' component, the
  positive along with the negative; reported anyway as the no-direction-preference baseline;
- ``gated add s=S``: the add, blended per decode token by the probe's gate; by default at the largest
  suggested scale (pre-specified, not chosen on test: the gate exists to make a strong push affordable where
  it is needed; ``--gated-scale`` sets another).
  A gated op must sit at or above the gate layer: the add goes at ``max(vector layer, probe layer)``, and the
  report says when that is not the vector's own layer;
- ``vfd ... + gated add``: the chosen VFD point (first K) with the gated add in the same request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from value_steer.core.steering_spec import Steering, ablate, add, cap, gate

VECTOR = "sentiment"
PROBE = "sentiment_probe"


@dataclass(frozen=True)
class SteeringVectors:
    """What the evaluation reads of the vectors directory (the sidecars are kept whole in ``meta``).

    ``cap_min`` is None when the sidecar has no cap floor, and the ``probe*`` fields are None without a probe
    (a pairs vector): those rows are then left out. ``unit``: the vector has unit norm (scales are absolute);
    False for a pairs vector (scales multiply the vector as written)."""

    dir: str
    layer: int
    residual_norm: float | None
    scales: tuple[float, ...]
    cap_min: float | None
    probe_layer: int | None
    probe_threshold: float | None
    probe_sharpness: float | None
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = VECTOR
    probe: str | None = PROBE
    unit: bool = True

    @property
    def add_layer(self) -> int:
        """The gated add's layer: the vector's own, unless it sits below the gate (an op below the gate layer
        is not gated), then the gate's."""
        if self.probe_layer is None:
            return self.layer
        return max(self.layer, self.probe_layer)

    def gated_scale(self, override: float | None = None) -> float:
        """The gated add's scale: ``override`` when given, else the largest suggested scale."""
        return max(self.scales) if override is None else float(override)


def _sidecar(directory: Path, name: str) -> dict[str, Any]:
    tensor = directory / f"{name}.safetensors"
    side = directory / f"{name}.safetensors.meta.json"
    for p in (tensor, side):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (write the vectors with `value-steer vectors`, pass "
                                    "--vectors DIR, or --no-activation to skip the activation rows)")
    with open(side, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"{side}: expected a JSON object")
    return meta


def _number(meta: dict[str, Any], path: str, where: Path, *, integer: bool = False) -> Any:
    cur: Any = meta
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise ValueError(f"{where}: missing {path!r}")
        cur = cur[key]
    ok = isinstance(cur, int) if integer else isinstance(cur, (int, float))
    if isinstance(cur, bool) or not ok or not math.isfinite(cur):
        raise ValueError(f"{where}: {path} must be a finite {'integer' if integer else 'number'}, got {cur!r}")
    return cur


def _scales(scales: Any, where: Path, key: str) -> tuple[float, ...]:
    if (not isinstance(scales, list) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in scales)):
        raise ValueError(f"{where}: {key} must be a non-empty list of finite numbers, got {scales!r}")
    return tuple(float(s) for s in scales)


def load_vectors(directory: str | Path, name: str = VECTOR, layer: int | None = None) -> SteeringVectors:
    """Read and check the sidecars of vector ``name`` in ``directory`` and of its probe ``<name>_probe`` when there
    is one (raises naming the file and key). ``layer``: which of a pairs vector's layers the rows steer (default:
    its first)."""
    d = Path(directory)
    vec = _sidecar(d, name)
    vside = d / f"{name}.safetensors.meta.json"
    probe_name = f"{name}_probe"
    probe: dict[str, Any] | None = None
    if (d / f"{probe_name}.safetensors").is_file() or (d / f"{probe_name}.safetensors.meta.json").is_file():
        probe = _sidecar(d, probe_name)
    pside = d / f"{probe_name}.safetensors.meta.json"
    pfacts: dict[str, Any] = {"probe_layer": None, "probe_threshold": None, "probe_sharpness": None}
    if probe is not None:
        pfacts = {"probe_layer": int(_number(probe, "layer", pside, integer=True)),
                  "probe_threshold": float(_number(probe, "threshold", pside)),
                  "probe_sharpness": float(_number(probe, "sharpness", pside))}
    meta = {name: vec, **({probe_name: probe} if probe is not None else {})}
    if "layer" not in vec and "suggested_add_scales" in vec:  # value-steer vectors --pairs
        layers = vec.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in layers):
            raise ValueError(f"{vside}: layers must be a non-empty list of layer indices, got {layers!r}")
        if layer is None:
            layer = layers[0]
        elif layer not in layers:
            raise ValueError(f"--vector-layer {layer}: vector {name!r} has rows for layers {layers} only")
        table = vec["suggested_add_scales"]
        key = f"suggested_add_scales.{layer}"
        scales = _scales(table.get(str(layer)) if isinstance(table, dict) else None, vside, key)
        return SteeringVectors(dir=str(d), layer=int(layer), residual_norm=None, scales=scales, cap_min=None,
                               **pfacts, meta=meta, name=name, probe=probe_name if probe is not None else None,
                               unit=False)
    if layer is not None and layer != vec.get("layer"):
        raise ValueError(f"--vector-layer {layer}: vector {name!r} is for layer {vec.get('layer')!r} only")
    return SteeringVectors(
        dir=str(d), layer=int(_number(vec, "layer", vside, integer=True)),
        residual_norm=float(_number(vec, "residual_norm", vside)), scales=_scales(vec.get("scales"), vside, "scales"),
        cap_min=float(_number(vec, "cap.min", vside)) if isinstance(vec.get("cap"), dict) else None,
        **pfacts, meta=meta, name=name, probe=probe_name if probe is not None else None)


@dataclass(frozen=True)
class ActivationRow:
    """One activation-steering condition: its report name, mode, spec and what the gate trajectories need."""

    name: str
    mode: str  # "add" | "cap" | "ablate" | "gated_add"
    steering: dict[str, Any]  # the request's spec (JSON form)
    scale: float | None = None

    @property
    def gated(self) -> bool:
        return "gate" in self.steering


def gated_add(v: SteeringVectors, scale: float | None = None) -> Steering:
    """The probe-gated add at ``v.gated_scale(scale)`` (see the module docstring for the layer)."""
    if v.probe is None or v.probe_layer is None or v.probe_threshold is None or v.probe_sharpness is None:
        raise ValueError(f"vector {v.name!r} has no probe ({v.name}_probe): no gated add")
    return Steering([add(v.add_layer, v.name, v.gated_scale(scale))],
                    gate=gate(v.probe_layer, v.probe, v.probe_threshold, v.probe_sharpness))


def activation_conditions(v: SteeringVectors, gated_scale: float | None = None) -> list[ActivationRow]:
    """The activation-only rows, in report order (VFD + gated add is built by the run, which knows the
    chosen VFD point). ``gated_scale``: the gated add's scale (None: the largest suggested). Without a cap floor
    there is no cap row, without a probe no gated row."""
    rows = [ActivationRow(f"add s={s:g}", "add", Steering([add(v.layer, v.name, s)]).to_dict(), s)
            for s in v.scales]
    if v.cap_min is not None:
        rows.append(ActivationRow(f"cap min={v.cap_min:.3g}", "cap",
                                  Steering([cap(v.layer, v.name, min=v.cap_min)]).to_dict()))
    rows.append(ActivationRow("ablate", "ablate", Steering([ablate(v.layer, v.name, 0.0)]).to_dict(), 0.0))
    if v.probe is not None:
        g = v.gated_scale(gated_scale)
        rows.append(ActivationRow(f"gated add s={g:g}", "gated_add", gated_add(v, g).to_dict(), g))
    return rows


def gate_values(hidden: Any, probe: Any, threshold: float, sharpness: float) -> Any:
    """The gate ``sigmoid(sharpness * (x · probe - threshold))`` of each row of ``hidden [T, H]`` (torch)."""
    import torch

    return torch.sigmoid(sharpness * (hidden.float() @ probe.float() - threshold))
