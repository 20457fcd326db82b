"""The activation-steering request spec: parse and validate it, fingerprint it, build it (a typed helper).

A spec (``docs/activation-steering.md``)::

    {"ops": [{"layer": 5, "op": "add", "vector": "calm", "scale": 4.0, "tokens": "all"},
             {"layer": 10, "op": "cap", "vector": [0.1, ...], "min": -1.0, "max": 1.0},
             {"layer": 10, "op": "ablate", "vector": "anger", "scale": 0.0}],
     "gate": {"layer": 5, "probe": "anger_probe", "threshold": 0.0, "sharpness": 10.0}}

arrives as a JSON object (OpenAI ``extra_body``, ``SamplingParams.extra_args``) or as a JSON string
(``vllm_xargs`` carries strings). :func:`parse_steering_spec` turns it into a :class:`SteeringSpec` or
raises :class:`RequestArgError` naming the field (``steering.ops[1].min``) and the allowed values.

Vectors are either a registered *name* (resolved by the worker's vector bank) or an inline list of exactly
``H`` floats, kept as an :class:`InlineVector` (its fp32 little-endian bytes). Every vector is identified by
the sha256 of its fp32 bytes (:func:`vector_content_hash`), so :func:`fingerprint` is content-addressed: a
name re-registered with new data gives a new fingerprint.

The op tables' integer encoding (``OP_*`` / ``FLAG_*``) has its home in :mod:`value_steer.core.activation`
(beside the math the op implements); ``OP_CODES`` maps the spec's op names onto it.

Pure core: torch / numpy / stdlib and ``value_steer.core`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from value_steer.core.activation import FLAG_DECODE, FLAG_GATED, FLAG_PROMPT, OP_ABLATE, OP_ADD, OP_CAP
from value_steer.core.safe_json import F32_MAX, RequestArgError, finite_float, is_number, loads_bounded

OPS = ("add", "cap", "ablate")
TOKENS = ("all", "prompt", "decode")
SPEC_KEYS = ("ops", "gate")
OP_KEYS = {
    "add": ("layer", "op", "vector", "scale", "tokens"),
    "cap": ("layer", "op", "vector", "min", "max", "tokens"),
    "ablate": ("layer", "op", "vector", "scale", "tokens"),
}
GATE_KEYS = ("layer", "probe", "threshold", "sharpness")
DEFAULT_SCALE = {"add": 1.0, "ablate": 0.0}
DEFAULT_THRESHOLD = 0.0
DEFAULT_SHARPNESS = 10.0
# Vector names double as file stems (``<name>.safetensors``) and URL path segments: keep them plain.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = "letters, digits, '_', '.', '-'; starting with a letter or digit; at most 128 characters"

# The op tables' ``op_kind`` of each spec op, and ``op_flags`` of each ``tokens`` value (ungated).
OP_CODES = {"add": OP_ADD, "cap": OP_CAP, "ablate": OP_ABLATE}
TOKEN_FLAGS = {"all": FLAG_PROMPT | FLAG_DECODE, "prompt": FLAG_PROMPT, "decode": FLAG_DECODE}


__all__ = ["RequestArgError"]  # re-exported: defined in safe_json, public in value_steer.core.config


def vector_content_hash(t: torch.Tensor | np.ndarray) -> str:
    """sha256 (hex) of ``t`` as contiguous float32 little-endian bytes: the identity of a vector's content.

    Args:
        t: ``[H]`` (or any shape) tensor or array, any float dtype; converted to fp32 first.
    """
    if isinstance(t, torch.Tensor):
        a = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    else:
        a = np.asarray(t, dtype=np.float32)
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


@dataclass(frozen=True, repr=False)
class InlineVector:
    """A vector sent inline with a request: ``data`` holds its fp32 little-endian bytes (``4 * H`` bytes).

    Compared and hashed by content (bytes), so specs holding inline vectors compare equal when their
    values do.
    """

    data: bytes

    @classmethod
    def from_values(cls, values: Any) -> InlineVector:
        """From a 1-D list / tuple / numpy array / tensor of numbers (cast to fp32; not validated)."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to(device="cpu", dtype=torch.float32).numpy()
        a = np.asarray(values, dtype=np.float32)
        if a.ndim != 1:
            raise ValueError(f"an inline vector must be 1-D, got shape {list(a.shape)}")
        return cls(np.ascontiguousarray(a, dtype="<f4").tobytes())

    @property
    def size(self) -> int:
        return len(self.data) // 4

    def numpy(self) -> np.ndarray:
        """``[H]`` float32 read-only view of the bytes."""
        return np.frombuffer(self.data, dtype="<f4")

    def tensor(self) -> torch.Tensor:
        """``[H]`` float32 CPU tensor (a copy)."""
        return torch.from_numpy(self.numpy().astype(np.float32))

    def to_list(self) -> list[float]:
        """The values as Python floats (exact: fp32 -> float64 -> JSON -> fp32 round-trips bitwise)."""
        return self.numpy().tolist()

    @cached_property
    def content_hash(self) -> str:
        """Equal to :func:`vector_content_hash` of the same values."""
        return hashlib.sha256(self.data).hexdigest()

    def __repr__(self) -> str:
        return f"InlineVector(size={self.size}, hash={self.content_hash[:12]})"


VectorRef = str | InlineVector


def _ref_to_json(ref: VectorRef) -> str | list[float]:
    return ref if isinstance(ref, str) else ref.to_list()


@dataclass(frozen=True)
class SteeringOp:
    """One edit of the residual stream at decoder layer ``layer``.

    op: ``"add"`` (``x + scale v``), ``"cap"`` (component along ``v/|v|`` clamped into ``[min, max]``) or
    ``"ablate"`` (``x + (scale - 1)(x·u)u``). ``scale`` is set for add/ablate, ``min``/``max`` (None: no bound)
    for cap. tokens: ``"all"`` / ``"prompt"`` / ``"decode"``. gated: the op sits at or above the spec's gate
    layer, so it is blended by the gate and acts on decode tokens only (set by the parser).
    """

    layer: int
    op: str
    vector: VectorRef
    scale: float | None = None
    min: float | None = None
    max: float | None = None
    tokens: str = "all"
    gated: bool = False

    @property
    def edits_prompt(self) -> bool:
        """Whether the op can change a prompt token (gated ops act on decode tokens only)."""
        return self.tokens in ("all", "prompt") and not self.gated

    @property
    def edits_decode(self) -> bool:
        return self.tokens in ("all", "decode")

    @property
    def flags(self) -> int:
        """The ``op_flags`` table entry: ``FLAG_PROMPT`` / ``FLAG_DECODE`` bits, plus ``FLAG_GATED``."""
        if self.gated:
            return (FLAG_DECODE | FLAG_GATED) if self.edits_decode else FLAG_GATED
        return TOKEN_FLAGS[self.tokens]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``gated`` is derived by the parser from the gate, so it is not written)."""
        d: dict[str, Any] = {"layer": self.layer, "op": self.op, "vector": _ref_to_json(self.vector)}
        if self.op == "cap":
            if self.min is not None:
                d["min"] = self.min
            if self.max is not None:
                d["max"] = self.max
        elif self.scale is not None:
            d["scale"] = self.scale
        d["tokens"] = self.tokens
        return d


@dataclass(frozen=True)
class SteeringGate:
    """The per-token gate ``g = sigmoid(sharpness * (x_layer · probe - threshold))``, read at ``layer``
    before that layer's own edits; every op at a layer ``>= layer`` is blended by it."""

    layer: int
    probe: VectorRef
    threshold: float = DEFAULT_THRESHOLD
    sharpness: float = DEFAULT_SHARPNESS

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "probe": _ref_to_json(self.probe), "threshold": self.threshold,
                "sharpness": self.sharpness}


@dataclass(frozen=True)
class SteeringSpec:
    """A parsed request spec: ``ops`` in the order given (per layer, that is the order they apply in)."""

    ops: tuple[SteeringOp, ...]
    gate: SteeringGate | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The edited layers, ascending."""
        return tuple(sorted({op.layer for op in self.ops}))

    def vector_refs(self) -> Iterator[tuple[str, VectorRef, int]]:
        """``(field path, vector, layer)`` of every vector the spec uses (ops, then the gate probe)."""
        for i, op in enumerate(self.ops):
            yield f"steering.ops[{i}].vector", op.vector, op.layer
        if self.gate is not None:
            yield "steering.gate.probe", self.gate.probe, self.gate.layer

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ops": [op.to_dict() for op in self.ops]}
        if self.gate is not None:
            d["gate"] = self.gate.to_dict()
        return d


# ---- parsing ------------------------------------------------------------------------------------------------


def _unknown_keys(obj: dict[str, Any], allowed: Sequence[str], field: str, what: str = "") -> None:
    bad = sorted(str(k) for k in obj if k not in allowed)
    if bad:
        raise RequestArgError(f"{field}: unknown key(s) {bad}{what}; allowed: {list(allowed)}")


class _Parser:
    def __init__(self, hidden_size: int | None, num_layers: int | None, max_inline_floats: int,
                 resolve: Callable[[str], bool] | None) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.max_inline_floats = max_inline_floats
        self.resolve = resolve
        self.inline_floats = 0

    def number(self, value: Any, field: str) -> float:
        return finite_float(value, field, f32=True)

    def layer(self, value: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise RequestArgError(f"{field} must be an integer layer index, got {value!r}")
        v = int(value)
        if self.num_layers is not None and not 0 <= v < self.num_layers:
            raise RequestArgError(
                f"{field} must be an integer in [0, {self.num_layers}) (the model's decoder layers), got {v}"
            )
        if v < 0:
            raise RequestArgError(f"{field} must be a layer index >= 0, got {v}")
        return v

    def vector(self, value: Any, field: str) -> VectorRef:
        h = self.hidden_size
        shape = f"{h}" if h is not None else "H"
        if isinstance(value, str):
            if not NAME_RE.fullmatch(value):
                raise RequestArgError(
                    f"{field} must be a vector name ({NAME_RULE}) or a list of {shape} floats, got {value!r}"
                )
            if self.resolve is not None and not self.resolve(value):
                raise RequestArgError(
                    f"{field}: unknown vector {value!r} (no vector of that name is registered on this server; "
                    f"register it, or send the vector inline as a list of {shape} floats)"
                )
            return value
        if not isinstance(value, (list, tuple)):
            raise RequestArgError(
                f"{field} must be a vector name or a list of {shape} floats, got {type(value).__name__}"
            )
        # The budget is checked before any per-element work: a huge list costs the server nothing.
        self.inline_floats += len(value)
        if self.inline_floats > self.max_inline_floats:
            raise RequestArgError(
                f"{field}: inline vectors total {self.inline_floats} floats, more than the server allows "
                f"(steering.max_inline_floats = {self.max_inline_floats}); register large vectors by name"
            )
        if h is not None and len(value) != h:
            raise RequestArgError(f"{field} must have exactly {h} floats (the model's hidden size), got {len(value)}")
        if not value:
            raise RequestArgError(f"{field} must be a non-empty list of floats")
        for j, x in enumerate(value):
            if not is_number(x):
                raise RequestArgError(f"{field}[{j}] must be a number, got {x!r}")
        try:
            a = np.asarray(value, dtype=np.float64)
        except OverflowError:  # an integer beyond the float range: name it
            a = np.asarray([finite_float(x, f"{field}[{j}]") for j, x in enumerate(value)], dtype=np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            j = int(np.argmax(bad))
            raise RequestArgError(f"{field}[{j}] must be finite, got {value[j]!r}")
        over = np.abs(a) > F32_MAX
        if over.any():
            j = int(np.argmax(over))
            raise RequestArgError(f"{field}[{j}] = {finite_float(value[j], field)!r} is outside the float32 range")
        a32 = a.astype(np.float32)
        if not np.any(a32):
            raise RequestArgError(f"{field} is the zero vector (it has no direction); give a non-zero vector")
        return InlineVector(a32.astype("<f4").tobytes())

    def gate(self, raw: Any) -> SteeringGate:
        field = "steering.gate"
        if not isinstance(raw, dict):
            raise RequestArgError(f"{field} must be an object with keys {list(GATE_KEYS)}, got {type(raw).__name__}")
        _unknown_keys(raw, GATE_KEYS, field)
        for key in ("layer", "probe"):
            if key not in raw:
                raise RequestArgError(f"{field}.{key} is required")
        layer = self.layer(raw["layer"], f"{field}.layer")
        probe = self.vector(raw["probe"], f"{field}.probe")
        threshold = self.number(raw.get("threshold", DEFAULT_THRESHOLD), f"{field}.threshold")
        sharpness = self.number(raw.get("sharpness", DEFAULT_SHARPNESS), f"{field}.sharpness")
        if sharpness <= 0.0:
            raise RequestArgError(f"{field}.sharpness must be a finite number > 0, got {raw.get('sharpness')!r}")
        return SteeringGate(layer, probe, threshold, sharpness)

    def op(self, raw: Any, i: int, gate: SteeringGate | None) -> SteeringOp:
        field = f"steering.ops[{i}]"
        if not isinstance(raw, dict):
            raise RequestArgError(f"{field} must be an object like {{\"layer\": 5, \"op\": \"add\", \"vector\": ...}}, "
                                  f"got {type(raw).__name__}")
        if "op" not in raw:
            raise RequestArgError(f"{field}.op is required (one of {list(OPS)})")
        kind = raw["op"]
        if kind not in OPS:
            raise RequestArgError(f"{field}.op must be one of {list(OPS)}, got {kind!r}")
        _unknown_keys(raw, OP_KEYS[kind], field, f" for op {kind!r}")
        for key in ("layer", "vector"):
            if key not in raw:
                raise RequestArgError(f"{field}.{key} is required")
        layer = self.layer(raw["layer"], f"{field}.layer")
        tokens = raw.get("tokens", "all")
        if tokens not in TOKENS:
            raise RequestArgError(f"{field}.tokens must be one of {list(TOKENS)}, got {tokens!r}")
        gated = gate is not None and layer >= gate.layer
        if gated and tokens == "prompt":
            raise RequestArgError(
                f"{field}.tokens: 'prompt' at layer {layer} never applies: ops at or above the gate layer "
                f"(steering.gate.layer = {gate.layer}) act on decode tokens only; allowed here: ['all', 'decode']"
            )
        vector = self.vector(raw["vector"], f"{field}.vector")
        if kind == "cap":
            lo = None if raw.get("min") is None else self.number(raw["min"], f"{field}.min")
            hi = None if raw.get("max") is None else self.number(raw["max"], f"{field}.max")
            if lo is None and hi is None:
                raise RequestArgError(f"{field}.min/{field}.max: a cap needs at least one bound (got neither)")
            if lo is not None and hi is not None and lo > hi:
                raise RequestArgError(f"{field}.min ({lo}) must be <= {field}.max ({hi})")
            return SteeringOp(layer, kind, vector, min=lo, max=hi, tokens=tokens, gated=gated)
        scale = self.number(raw.get("scale", DEFAULT_SCALE[kind]), f"{field}.scale")
        return SteeringOp(layer, kind, vector, scale=scale, tokens=tokens, gated=gated)


def parse_steering_spec(
    raw: dict[str, Any] | str | bytes,
    *,
    hidden_size: int | None,
    num_layers: int | None,
    max_ops: int,
    max_inline_floats: int,
    resolve: Callable[[str], bool] | None = None,
) -> SteeringSpec:
    """Validate one request's steering spec.

    Args:
        raw: the spec as a dict, or as a JSON string (``vllm_xargs`` values are strings).
        hidden_size: ``H``; inline vectors must have exactly ``H`` floats. None: not checked (a caller that
            does not know the model yet; the worker re-checks).
        num_layers: layers must be in ``[0, num_layers)``. None: not checked (as above).
        max_ops: at most this many ops (the server's ``steering.max_ops_per_request``).
        max_inline_floats: the total length of all inline vectors (ops and gate probe) may not exceed it.
        resolve: ``resolve(name) -> bool``, whether a vector name is registered; None: names not checked.
    Returns:
        :class:`SteeringSpec` with ops in the order given and ``gated`` set on ops at or above the gate layer.
    Raises:
        RequestArgError: naming the field (``steering.ops[1].min``) and the allowed values.
    """
    if isinstance(raw, (str, bytes)):
        raw = loads_bounded(raw, "steering")
    if not isinstance(raw, dict):
        raise RequestArgError(
            f"steering must be a JSON object with keys {list(SPEC_KEYS)}, got {type(raw).__name__}"
        )
    _unknown_keys(raw, SPEC_KEYS, "steering")
    if "ops" not in raw:
        raise RequestArgError("steering.ops is required (a list of ops: add, cap, ablate)")
    ops = raw["ops"]
    if not isinstance(ops, list):
        raise RequestArgError(f"steering.ops must be a list of ops, got {type(ops).__name__}")
    if len(ops) > max_ops:
        raise RequestArgError(
            f"steering.ops: at most {max_ops} ops per request (the server's steering.max_ops_per_request), "
            f"got {len(ops)}"
        )
    p = _Parser(hidden_size, num_layers, max_inline_floats, resolve)
    gate = p.gate(raw["gate"]) if raw.get("gate") is not None else None
    return SteeringSpec(tuple(p.op(o, i, gate) for i, o in enumerate(ops)), gate)


def op_dose(op: SteeringOp, vector_norm: float, residual_norm: float) -> float:
    """How large an edit ``op`` can make, relative to its layer's typical residual-stream norm.

    add: ``|scale| * |v| / r``; cap: how far from 0 a bound can force the component (a positive ``min`` or a
    negative ``max``) over ``r`` (a bound on the other side only ever shrinks the stream); ablate: ``|scale - 1|``
    (the component is scaled by ``scale``, so the edit is at most ``|scale - 1| |x|``).
    """
    if op.op == "add":
        return abs(op.scale or 0.0) * vector_norm / residual_norm
    if op.op == "cap":
        push = max(op.min if op.min is not None else 0.0, -(op.max if op.max is not None else 0.0), 0.0)
        return push / residual_norm
    return abs((op.scale if op.scale is not None else 0.0) - 1.0)


def check_doses(spec: SteeringSpec, residual_norms: Sequence[float], max_dose: float,
                vector_norm: Callable[[VectorRef, int], float | None]) -> None:
    """Refuse an op whose :func:`op_dose` exceeds ``max_dose`` (``steering.max_relative_dose``).

    Args:
        residual_norms: ``[num_layers]`` typical residual-stream norm per decoder layer (the worker measures them
            at start-up); a layer without a positive finite norm is not checked.
        vector_norm: ``vector_norm(ref, layer)``, the norm of the vector an op at ``layer`` uses (None: unknown,
            the op is not checked here; the worker checks it with its own bank).
    Raises:
        RequestArgError: naming the op, its dose and the limit.
    """
    for i, op in enumerate(spec.ops):
        r = float(residual_norms[op.layer]) if 0 <= op.layer < len(residual_norms) else 0.0
        if not (r > 0.0 and np.isfinite(r)):
            continue
        vn = vector_norm(op.vector, op.layer) if op.op == "add" else 0.0
        if vn is None:
            continue
        dose = op_dose(op, vn, r)
        if dose > max_dose:
            what = {"add": "|scale| * |vector|", "cap": "the bound's distance from 0",
                    "ablate": "|scale - 1|"}[op.op]
            raise RequestArgError(
                f"steering.ops[{i}]: relative dose {dose:.4g} ({what}, over layer {op.layer}'s typical residual norm "
                f"{r:.4g}) exceeds steering.max_relative_dose = {max_dose:g}; lower its scale or bounds")


def inline_norm(ref: VectorRef) -> float | None:
    """The norm of an inline vector (None for a name)."""
    return float(np.linalg.norm(ref.numpy().astype(np.float64))) if isinstance(ref, InlineVector) else None


# ---- identity -----------------------------------------------------------------------------------------------


def fingerprint(spec: SteeringSpec, vector_hash: Callable[[VectorRef], str]) -> str:
    """A stable sha256 (hex) over the spec's ops and gate, every vector identified by its content hash.

    Args:
        spec: a parsed spec.
        vector_hash: ``vector_hash(name_or_inline) -> str``, the content hash of the vector a name stands for
            (the bank's; :func:`vector_content_hash` of its fp32 data) or of an inline vector
            (``InlineVector.content_hash``).
    """
    ops = [[op.layer, op.op, vector_hash(op.vector), op.scale, op.min, op.max, op.tokens] for op in spec.ops]
    gate = None
    if spec.gate is not None:
        g = spec.gate
        gate = [g.layer, vector_hash(g.probe), g.threshold, g.sharpness]
    canon = json.dumps({"v": 1, "ops": ops, "gate": gate}, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def salts_prompt(spec: SteeringSpec) -> bool:
    """Whether the spec edits prompt tokens (``tokens`` all/prompt and not gated): such a request must salt
    the prefix cache, since its prompt KV differs from an unsteered request's."""
    return any(op.edits_prompt for op in spec.ops)


# ---- the typed helper ---------------------------------------------------------------------------------------


def _as_ref(vector: Any) -> VectorRef:
    if isinstance(vector, (str, InlineVector)):
        return vector
    if isinstance(vector, (list, tuple, np.ndarray, torch.Tensor)):
        return InlineVector.from_values(vector)
    raise TypeError(f"a vector is a name, a list, a numpy array or a tensor, got {type(vector).__name__}")


def add(layer: int, vector: Any, scale: float = 1.0, tokens: str = "all") -> SteeringOp:
    """``x + scale * vector`` at ``layer`` (vector: a registered name, a list, an array or a tensor ``[H]``)."""
    return SteeringOp(int(layer), "add", _as_ref(vector), scale=float(scale), tokens=tokens)


def cap(layer: int, vector: Any, min: float | None = None, max: float | None = None,
        tokens: str = "all") -> SteeringOp:
    """Clamp the component along ``vector / |vector|`` into ``[min, max]`` at ``layer`` (one bound at least)."""
    return SteeringOp(int(layer), "cap", _as_ref(vector), min=None if min is None else float(min),
                      max=None if max is None else float(max), tokens=tokens)


def ablate(layer: int, vector: Any, scale: float = 0.0, tokens: str = "all") -> SteeringOp:
    """Rescale the component along ``vector / |vector|`` by ``scale`` at ``layer`` (0 removes it)."""
    return SteeringOp(int(layer), "ablate", _as_ref(vector), scale=float(scale), tokens=tokens)


def gate(layer: int, probe: Any, threshold: float = DEFAULT_THRESHOLD,
         sharpness: float = DEFAULT_SHARPNESS) -> SteeringGate:
    """Gate every op at a layer ``>= layer`` by ``sigmoid(sharpness * (x_layer · probe - threshold))``."""
    return SteeringGate(int(layer), _as_ref(probe), float(threshold), float(sharpness))


class Steering:
    """A request's steering, built in Python and sent in the shape each client wants.

    ``Steering([add(5, "calm", 4.0), cap(10, vec, -1, 1)], gate=gate(5, "anger_probe"))``; then
    ``client.chat.completions.create(..., extra_body=s.extra_body())`` or
    ``SamplingParams(extra_args=s.extra_args())``. The server validates it (:func:`parse_steering_spec`).
    """

    def __init__(self, ops: Sequence[SteeringOp], gate: SteeringGate | None = None) -> None:
        for i, op in enumerate(ops):
            if not isinstance(op, SteeringOp):
                raise TypeError(f"ops[{i}] must be built with add/cap/ablate, got {type(op).__name__}")
        if gate is not None and not isinstance(gate, SteeringGate):
            raise TypeError(f"gate must be built with gate(...), got {type(gate).__name__}")
        self.ops = tuple(ops)
        self.gate = gate

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (vectors given as arrays/tensors become lists of floats)."""
        return SteeringSpec(self.ops, self.gate).to_dict()

    def extra_body(self) -> dict[str, Any]:
        """For the OpenAI SDK: ``extra_body=steering.extra_body()``."""
        return {"steering": self.to_dict()}

    def extra_args(self) -> dict[str, Any]:
        """For offline use: ``SamplingParams(extra_args=steering.extra_args())``."""
        return {"steering": self.to_dict()}

    def vllm_xargs(self) -> dict[str, str]:
        """For ``vllm_xargs`` (string values): the spec as a JSON string."""
        return {"steering": json.dumps(self.to_dict(), separators=(",", ":"))}

    def __repr__(self) -> str:
        return f"Steering(ops={list(self.ops)!r}, gate={self.gate!r})"
