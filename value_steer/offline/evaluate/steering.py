"""The evaluation's activation-steering rows: the committed vectors' sidecars (:func:`load_vectors`) and the
request specs built from them (:func:`activation_conditions`). Pure (JSON and the spec helper; no vLLM).

The vectors directory (``value-steer vectors`` writes it; default ``value_steer/data/vectors``) holds:

- ``sentiment.safetensors``: one unit tensor ``[H]`` at decoder layer ``layer``, pointing from negative-judged
  toward positive-judged responses' mean residual stream; its sidecar ``sentiment.safetensors.meta.json``
  gives ``layer``, ``residual_norm``, ``scales`` (suggested add scales, ascending) and ``cap.min`` (a floor for
  the projection on it);
- ``sentiment_probe.safetensors``: the gate's probe ``[H]``; its sidecar gives ``layer``, ``threshold`` and
  ``sharpness`` (the gate opens on few responses the judge finds fine: see the sidecar's ``calibration``).

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
    """What the evaluation reads of the vectors directory (both sidecars are kept whole in ``meta``)."""

    dir: str
    layer: int
    residual_norm: float
    scales: tuple[float, ...]
    cap_min: float
    probe_layer: int
    probe_threshold: float
    probe_sharpness: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def add_layer(self) -> int:
        """The gated add's layer: the vector's own, unless it sits below the gate (an op below the gate layer
        is not gated), then the gate's."""
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


def load_vectors(directory: str | Path) -> SteeringVectors:
    """Read and check the two sidecars of ``directory`` (raises naming the file and key)."""
    d = Path(directory)
    vec, probe = _sidecar(d, VECTOR), _sidecar(d, PROBE)
    vside, pside = d / f"{VECTOR}.safetensors.meta.json", d / f"{PROBE}.safetensors.meta.json"
    scales = vec.get("scales")
    if (not isinstance(scales, list) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in scales)):
        raise ValueError(f"{vside}: scales must be a non-empty list of finite numbers, got {scales!r}")
    return SteeringVectors(
        dir=str(d), layer=int(_number(vec, "layer", vside, integer=True)),
        residual_norm=float(_number(vec, "residual_norm", vside)), scales=tuple(float(s) for s in scales),
        cap_min=float(_number(vec, "cap.min", vside)),
        probe_layer=int(_number(probe, "layer", pside, integer=True)),
        probe_threshold=float(_number(probe, "threshold", pside)),
        probe_sharpness=float(_number(probe, "sharpness", pside)),
        meta={VECTOR: vec, PROBE: probe})


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
    return Steering([add(v.add_layer, VECTOR, v.gated_scale(scale))],
                    gate=gate(v.probe_layer, PROBE, v.probe_threshold, v.probe_sharpness))


def activation_conditions(v: SteeringVectors, gated_scale: float | None = None) -> list[ActivationRow]:
    """The activation-only rows, in report order (VFD + gated add is built by the run, which knows the
    chosen VFD point). ``gated_scale``: the gated add's scale (None: the largest suggested)."""
    rows = [ActivationRow(f"add s={s:g}", "add", Steering([add(v.layer, VECTOR, s)]).to_dict(), s)
            for s in v.scales]
    rows.append(ActivationRow(f"cap min={v.cap_min:.3g}", "cap",
                              Steering([cap(v.layer, VECTOR, min=v.cap_min)]).to_dict()))
    rows.append(ActivationRow("ablate", "ablate", Steering([ablate(v.layer, VECTOR, 0.0)]).to_dict(), 0.0))
    g = v.gated_scale(gated_scale)
    rows.append(ActivationRow(f"gated add s={g:g}", "gated_add", gated_add(v, g).to_dict(), g))
    return rows


def gate_values(hidden: Any, probe: Any, threshold: float, sharpness: float) -> Any:
    """The gate ``sigmoid(sharpness * (x · probe - threshold))`` of each row of ``hidden [T, H]`` (torch)."""
    import torch

    return torch.sigmoid(sharpness * (hidden.float() @ probe.float() - threshold))
