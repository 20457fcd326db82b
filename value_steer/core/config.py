"""The ``--additional-config`` schema and per-request overrides (``SamplingParams.extra_args``).

Server config (one section, never both)::

    {"vfd":     {"value_head_path": "...", "threshold": 0.3, "num_candidates": 4,
                 "direction": "above", "enabled_by_default": true}}
    {"abstain": {"value_head_path": "...", "threshold": 0.3, "direction": "above",
                 "enabled_by_default": true}}

plus an optional ``{"capture": {"dir": "...", "enabled_by_default": false}}`` section (decode-matched
hidden-state capture) and an optional activation-steering section, alone or beside either of them::

    {"steering": {"vectors": "/path/to/dir", "max_vectors": 64, "max_ops_per_request": 8,
                  "max_inline_floats": 32768}}

(``{"steering": {}}`` enables steering with no preloaded vectors), and an optional generative logit-steering
section (``docs/logit-steering.md``), alone or beside any of the others::

    {"logit_steering": {"checkpoint": "/path/to/generator.safetensors"}}
 Every violation raises
:class:`ConfigError` naming the field and the allowed values; the worker raises it at start-up, so a bad
config never reaches the first request.

Per request (OpenAI ``vllm_xargs`` / ``SamplingParams.extra_args``): ``value_steer`` (on/off),
``threshold`` (float in [0, 1]), ``num_candidates`` (int, 1..configured K). A bad value raises
:class:`RequestArgError` (a ``ValueError``: the OpenAI server answers 400). ``extra_args`` is shared
with vLLM (``kv_transfer_params``, ...) and other plugins, so a key that is not ours is left alone,
unless it looks like a misspelling of ours (see :func:`misspelled_request_keys`). ``steering`` (an
activation-steering spec, :mod:`value_steer.core.steering_spec`; a dict, or a JSON string in ``vllm_xargs``)
is accepted only when the server has a ``steering`` section; it is independent of ``value_steer``.
``logit_steering`` (a strength multiplier in ``[0, MAX_LOGIT_STRENGTH]``; 0 or false: off, the default; true: 1)
asks for logit steering, which needs a ``logit_steering`` section; it too is independent of the others.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from value_steer.core.modes import DIRECTION_SIGN, MODE_ABSTAIN, MODE_OFF, MODE_TOKEN, MODE_VFD
from value_steer.core.safe_json import finite_float, loads_bounded, short_repr
from value_steer.core.steering_spec import RequestArgError, SteeringSpec, VectorRef, check_doses, parse_steering_spec

MAX_NUM_CANDIDATES = 64
DEFAULT_NUM_CANDIDATES = 4
STEER_SECTIONS = ("vfd", "abstain")
TOP_LEVEL_KEYS = (*STEER_SECTIONS, "capture", "steering", "logit_steering")
_SECTION_KEYS = {
    "vfd": ("value_head_path", "threshold", "num_candidates", "direction", "enabled_by_default", "schedule", "mode",
            "qhead_path", "beta", "heads", "default_head"),
    "abstain": ("value_head_path", "threshold", "direction", "enabled_by_default", "heads", "default_head"),
    "capture": ("dir", "enabled_by_default"),
    "steering": ("vectors", "max_vectors", "max_ops_per_request", "max_inline_floats", "max_relative_dose",
                 "max_body_bytes", "admin_key"),
    "logit_steering": ("checkpoint", "generators", "default_generator"),
}
# Activation steering (the "steering" section): bank size, per-request op count (the op tables' M) and the
# total length of a request's inline vectors.
DEFAULT_MAX_VECTORS = 64
DEFAULT_MAX_OPS_PER_REQUEST = 8
MAX_OPS_PER_REQUEST = 64
DEFAULT_MAX_INLINE_FLOATS = 8 * 4096
# The largest edit a request may make at a layer, relative to that layer's typical residual-stream norm (measured
# by the worker at start-up): add |scale * v| / r_L, cap the bound's distance from 0 / r_L, ablate |scale - 1|.
# Far above any useful steering (collapse sets in near 2, hotwire-vllm's measurements), far below what overflows
# fp16/bf16/fp32 activations; null in the config turns the check off.
DEFAULT_MAX_RELATIVE_DOSE = 100.0
# Bytes of one HTTP body the steering middleware and the registry read (413 beyond): a per-layer vector of a
# large model ([80][8192] floats as JSON) is about 13 MB.
DEFAULT_MAX_BODY_BYTES = 32 << 20
MIN_BODY_BYTES = 1 << 10
# How VFD forwards its candidates: "eager" (all K in the main forward), "two_phase" (natural sample first,
# alternatives only for unsafe rows, in a second forward), "auto" (a per-step cost model chooses).
VFD_SCHEDULES = ("auto", "eager", "two_phase")
REQUEST_KEYS = ("value_steer", "threshold", "num_candidates", "value_steer_capture", "capture_layers",
                "capture_prompt_from", "token_beta", "head", "generator")
# Several value heads in one server (``"heads": {name: {...}}``): a head entry's keys, the most a server loads, and
# the names allowed (they appear in URLs' query strings, stats and logs).
HEAD_KEYS = ("path", "threshold", "direction")
MAX_HEADS = 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The name of the head given by the single-path form (``value_head_path``).
SINGLE_HEAD_NAME = "default"
# vfd.mode: "exact" forwards K candidates and scores them with the value head; "token" filters the step's logits by
# a Q-head's predicted token values (value_steer.core.qhead).
VFD_MODES = ("exact", "token")
# The largest tilt (token mode's beta): logits - beta * q, q on the logit scale.
MAX_BETA = 100.0
# The activation-steering spec's key. Kept out of REQUEST_KEYS (the value-head switches, listed in messages as
# they are) but known to every check on our keys: ALL_REQUEST_KEYS.
STEERING_KEY = "steering"
# The logit-steering strength multiplier (kept out of REQUEST_KEYS for the same reason). Bounded: the generator was
# trained at 1; far past it the added term swamps the model's own logits.
LOGIT_STEERING_KEY = "logit_steering"
MAX_LOGIT_STRENGTH = 4.0
ALL_REQUEST_KEYS = (*REQUEST_KEYS, STEERING_KEY, LOGIT_STEERING_KEY)
# The keys a request body may carry at its top level (the OpenAI SDK's extra_body); the server moves them into
# vllm_xargs. The others belong in vllm_xargs.
TOP_LEVEL_REQUEST_KEYS = (STEERING_KEY, LOGIT_STEERING_KEY)
# How close (difflib ratio, case and "-"/"_" folded) a foreign key must be to one of REQUEST_KEYS to be
# taken for a misspelling of it: "treshold", "Threshold", "num-candidates", "thresh" are; vLLM's own
# extra_args keys (kv_transfer_params, ec_transfer_params, kv_cache_report_mode) are far from all of them.
_MISSPELLING_CUTOFF = 0.8
# "steering" is a plain word other plugins may use in near forms ("string", "seeding", "tiering" are 0.8-0.86
# from it): only a closer key counts ("stearing", "steerng", "Steering").
_STEERING_CUTOFF = 0.87


class ConfigError(ValueError):
    """Invalid ``--additional-config`` for value_steer (raised at start-up)."""


# RequestArgError (invalid per-request extra_args: HTTP 400) is defined in steering_spec, which sits below this
# module so that the request parser here can validate steering specs (no import cycle); import it from here.


@dataclass(frozen=True)
class CaptureConfig:
    """Decode-matched capture: write every generated token's scored hidden state under ``dir``."""

    dir: str
    enabled_by_default: bool = False


@dataclass(frozen=True)
class SteeringConfig:
    """Activation steering (``docs/activation-steering.md``).

    vectors: a directory of ``.safetensors`` files loaded into the vector bank at start-up (each holds one
    tensor, ``[H]`` or ``[num_layers, H]``; the file stem is the vector's name), or None.
    max_vectors: bank slots (``[max_vectors, H]`` fp32 on the device; a per-layer file takes one per row).
    max_ops_per_request: ops per request (the op tables' ``M``).
    max_inline_floats: total floats of one request's inline vectors.
    max_relative_dose: the largest edit an op may make relative to its layer's typical residual norm (None:
        unbounded); a request beyond it is refused naming the op.
    max_body_bytes: bytes of one HTTP body the steering middleware and the vector registry accept (413 beyond).
    admin_key: when set, registering and deleting vectors over HTTP needs it (header ``X-Steering-Admin-Key``).
    """

    vectors: str | None = None
    max_vectors: int = DEFAULT_MAX_VECTORS
    max_ops_per_request: int = DEFAULT_MAX_OPS_PER_REQUEST
    max_inline_floats: int = DEFAULT_MAX_INLINE_FLOATS
    max_relative_dose: float | None = DEFAULT_MAX_RELATIVE_DOSE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    admin_key: str | None = None

    def __repr__(self) -> str:  # the admin key stays out of logs
        key = None if self.admin_key is None else "***"
        return (f"SteeringConfig(vectors={self.vectors!r}, max_vectors={self.max_vectors}, max_ops_per_request="
                f"{self.max_ops_per_request}, max_inline_floats={self.max_inline_floats}, max_relative_dose="
                f"{self.max_relative_dose}, max_body_bytes={self.max_body_bytes}, admin_key={key})")


@dataclass(frozen=True)
class GeneratorConfig:
    """One named logit-steering generator: its ``.safetensors`` file (with its ``.meta.json`` sidecar) and the
    config field that named it (for messages)."""

    name: str
    checkpoint: str
    field: str = "logit_steering.checkpoint"


@dataclass(frozen=True)
class LogitSteeringConfig:
    """Generative logit steering (``docs/logit-steering.md``): ``checkpoint``, the default generator's
    ``.safetensors`` file (with its ``.meta.json`` sidecar), and every generator a request may choose by name
    (``generators``; the single-checkpoint form is one named :data:`SINGLE_HEAD_NAME`). Sizes are checked against the
    model at start-up."""

    checkpoint: str
    generators: tuple[GeneratorConfig, ...] = ()
    default_generator: int = 0

    def generator_index(self, name: str) -> int | None:
        for i, g in enumerate(self.generators):
            if g.name == name:
                return i
        return None


@dataclass(frozen=True)
class HeadConfig:
    """One named value head of a server: its checkpoint, its threshold (None: the sidecar's) and direction."""

    name: str
    path: str
    threshold: float | None = None
    direction: str = "above"
    field: str = "vfd.value_head_path"  # the config field that named it (for messages)

    @property
    def sign(self) -> float:
        return DIRECTION_SIGN[self.direction]


@dataclass(frozen=True)
class SteerConfig:
    """Resolved server-side steering config.

    mode: ``MODE_VFD`` / ``MODE_ABSTAIN`` / ``MODE_OFF`` (no vfd/abstain section: capture only, activation
    steering only, or plain).
    threshold: None means "take the sidecar's" (resolved when the head is loaded).
    steering: the activation-steering section, None when absent (requests with ``steering`` are refused).
    logit_steering: the logit-steering section, None when absent (requests asking for it are refused).
    """

    mode: int
    value_head_path: str | None = None
    threshold: float | None = None
    num_candidates: int = 1
    direction: str = "above"
    enabled_by_default: bool = True
    capture: CaptureConfig | None = None
    schedule: str = "auto"  # vfd only: how candidates are forwarded (value_steer.runtime.vfd_schedule)
    steering: SteeringConfig | None = None
    logit_steering: LogitSteeringConfig | None = None
    qhead_path: str | None = None  # token mode: the Q-head (its sidecar gives the threshold and direction)
    beta: float = 0.0  # token mode: 0 masks the predicted-undesirable tokens, > 0 tilts every token by its value
    token_k: int = 0  # token mode: K >= 1 applies the K-candidate rule instead of the mask (vfd.num_candidates)
    # The value heads a request may choose by name (``head``); ``value_head_path``/``threshold``/``direction`` above
    # are the default head's. The single-path form is one head named SINGLE_HEAD_NAME.
    heads: tuple[HeadConfig, ...] = ()
    default_head: int = 0

    def head_index(self, name: str) -> int | None:
        """The index of the head named ``name``, or None."""
        for i, h in enumerate(self.heads):
            if h.name == name:
                return i
        return None

    @property
    def sign(self) -> float:
        return DIRECTION_SIGN[self.direction]

    @property
    def section(self) -> str:
        return {MODE_VFD: "vfd", MODE_TOKEN: "vfd", MODE_ABSTAIN: "abstain", MODE_OFF: "none"}[self.mode]


def _check_threshold(value: Any, field: str, err: type[ValueError]) -> float:
    bad = f"{field} must be a number in [0, 1] (a value-head probability), got "
    try:
        v = finite_float(value, field)
    except RequestArgError:
        raise err(bad + short_repr(value)) from None
    if not 0.0 <= v <= 1.0:
        raise err(bad + short_repr(value))
    return v


def _check_bool(value: Any, field: str, err: type[ValueError]) -> bool:
    if not isinstance(value, bool):
        raise err(f"{field} must be true or false, got {value!r}")
    return value


def _check_section(sec: Any, name: str) -> None:
    """A section of ``--additional-config``: a JSON object holding only its own keys (``_SECTION_KEYS``)."""
    if not isinstance(sec, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(sec).__name__}")
    allowed = _SECTION_KEYS[name]
    bad = sorted(set(sec) - set(allowed))
    if bad:
        raise ConfigError(f"{name}: unknown key(s) {bad}; allowed: {list(allowed)}")


def parse_additional_config(raw: dict[str, Any] | None, *, check_files: bool = True) -> SteerConfig:
    """Validate vLLM's ``additional_config`` dict and return the resolved :class:`SteerConfig`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"additional_config must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"additional_config: unknown key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)} "
            "(value_steer owns additional_config when its worker is used)"
        )
    present = [s for s in STEER_SECTIONS if s in raw]
    if len(present) > 1:
        raise ConfigError("additional_config: 'vfd' and 'abstain' are exclusive; give one of them")
    capture = _parse_capture(raw["capture"]) if "capture" in raw else None
    steering = _parse_steering(raw["steering"], check_files) if "steering" in raw else None
    logit = _parse_logit_steering(raw["logit_steering"], check_files) if "logit_steering" in raw else None
    if not present:
        return SteerConfig(mode=MODE_OFF, capture=capture, enabled_by_default=False, steering=steering,
                           logit_steering=logit)
    name = present[0]
    sec = raw[name]
    _check_section(sec, name)
    if name == "vfd" and sec.get("mode", "exact") == "token":
        return _parse_token_mode(sec, check_files, capture, steering, logit)
    if name == "vfd" and sec.get("mode", "exact") != "exact":
        raise ConfigError(f"vfd.mode must be one of {list(VFD_MODES)}, got {short_repr(sec.get('mode'))}")
    for key in ("qhead_path", "beta"):
        if key in sec:
            raise ConfigError(f"{name}.{key} belongs to token mode (\"vfd\": {{\"mode\": \"token\", ...}})")
    heads, default_head = _parse_heads(sec, name, check_files)
    head = heads[default_head]
    path, threshold, direction = head.path, head.threshold, head.direction
    enabled = _check_bool(sec.get("enabled_by_default", True), f"{name}.enabled_by_default", ConfigError)
    k = 1
    schedule = "auto"
    if name == "vfd":
        k = sec.get("num_candidates", DEFAULT_NUM_CANDIDATES)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_NUM_CANDIDATES:
            raise ConfigError(f"vfd.num_candidates must be an integer in [1, {MAX_NUM_CANDIDATES}], got {k!r}")
        schedule = sec.get("schedule", "auto")
        if schedule not in VFD_SCHEDULES:
            raise ConfigError(f"vfd.schedule must be one of {list(VFD_SCHEDULES)}, got {schedule!r}")
    return SteerConfig(
        mode=MODE_VFD if name == "vfd" else MODE_ABSTAIN,
        value_head_path=path,
        threshold=threshold,
        num_candidates=k,
        direction=direction,
        enabled_by_default=enabled,
        capture=capture,
        schedule=schedule,
        steering=steering,
        logit_steering=logit,
        heads=heads,
        default_head=default_head,
    )


def _check_path(value: Any, field: str, check_files: bool, what: str = "a value-head checkpoint") -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty string (path to {what}), got {short_repr(value)}")
    path = os.path.expanduser(value)
    if check_files and not os.path.isfile(path):
        raise ConfigError(f"{field}: no such file: {path}")
    return path


def _check_direction(value: Any, field: str) -> str:
    if value not in DIRECTION_SIGN:
        raise ConfigError(f"{field} must be one of {list(DIRECTION_SIGN)}, got {short_repr(value)}")
    return value


def _parse_heads(sec: dict[str, Any], name: str, check_files: bool, what: str = "a value-head checkpoint"
                 ) -> tuple[tuple[HeadConfig, ...], int]:
    """The section's value heads: ``value_head_path`` (one head, named :data:`SINGLE_HEAD_NAME`) or ``heads``
    (``{name: {"path": ..., "threshold"?: ..., "direction"?: ...}}``) with ``default_head``; returns the heads and
    the default's index."""
    if "heads" not in sec:
        if "default_head" in sec:
            raise ConfigError(f"{name}.default_head needs {name}.heads (named value heads)")
        if "value_head_path" not in sec:
            raise ConfigError(f"{name}.value_head_path is required (path to a value-head checkpoint), or {name}.heads "
                              "for several named heads")
        threshold = None
        if sec.get("threshold") is not None:
            threshold = _check_threshold(sec["threshold"], f"{name}.threshold", ConfigError)
        head = HeadConfig(SINGLE_HEAD_NAME, _check_path(sec["value_head_path"], f"{name}.value_head_path", check_files),
                          threshold, _check_direction(sec.get("direction", "above"), f"{name}.direction"),
                          f"{name}.value_head_path")
        return (head,), 0
    for key in ("value_head_path", "threshold", "direction"):
        if key in sec:
            raise ConfigError(f"{name}.{key} cannot be given beside {name}.heads; set it per head "
                              f"({name}.heads.<name>.{'path' if key == 'value_head_path' else key})")
    raw = sec["heads"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{name}.heads must be a non-empty JSON object {{name: {{\"path\": ...}}}}, got "
                          f"{short_repr(raw)}")
    if len(raw) > MAX_HEADS:
        raise ConfigError(f"{name}.heads: at most {MAX_HEADS} heads, got {len(raw)}")
    heads = []
    for hname, entry in raw.items():
        if not _NAME_RE.match(hname):
            raise ConfigError(f"{name}.heads: head name {short_repr(hname)} must be 1-64 characters of letters, "
                              "digits, '_', '.', '-' (starting with a letter or digit)")
        where = f"{name}.heads.{hname}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a JSON object with keys {list(HEAD_KEYS)}, got {short_repr(entry)}")
        bad = sorted(str(k) for k in entry if k not in HEAD_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; allowed: {list(HEAD_KEYS)}")
        if "path" not in entry:
            raise ConfigError(f"{where}.path is required (path to {what})")
        threshold = None
        if entry.get("threshold") is not None:
            threshold = _check_threshold(entry["threshold"], f"{where}.threshold", ConfigError)
        heads.append(HeadConfig(hname, _check_path(entry["path"], f"{where}.path", check_files, what), threshold,
                                _check_direction(entry.get("direction", "above"), f"{where}.direction"), where))
    names = [h.name for h in heads]
    if "default_head" in sec:
        default = sec["default_head"]
        if default not in names:
            raise ConfigError(f"{name}.default_head must be one of {names}, got {short_repr(default)}")
    elif len(heads) == 1:
        default = names[0]
    else:
        raise ConfigError(f"{name}.default_head is required with several heads; one of {names}")
    return tuple(heads), names.index(default)


def _parse_token_mode(sec: dict[str, Any], check_files: bool, capture: CaptureConfig | None,
                      steering: SteeringConfig | None, logit: LogitSteeringConfig | None) -> SteerConfig:
    """``"vfd": {"mode": "token", "qhead_path": ..., "threshold"?, "beta"?, "enabled_by_default"?}``."""
    for key in ("schedule", "direction", "value_head_path"):
        if key in sec:
            raise ConfigError(f"vfd.{key} is not used in token mode (a Q-head scores every token in one matmul; its "
                              "sidecar gives the direction)")
    heads: tuple[HeadConfig, ...] = ()
    default_head = 0
    if "heads" in sec:  # several named Q-heads, a request picks one with "head"
        if "qhead_path" in sec:
            raise ConfigError("vfd.qhead_path cannot be given beside vfd.heads; name it there "
                              "(vfd.heads.<name>.path)")
        raw = sec["heads"]
        for hname, entry in (raw.items() if isinstance(raw, dict) else ()):
            if isinstance(entry, dict) and "direction" in entry:
                raise ConfigError(f"vfd.heads.{hname}.direction is not used in token mode (the Q-head's sidecar gives "
                                  "it)")
        heads, default_head = _parse_heads(sec, "vfd", check_files, what="a Q-head checkpoint")
        sec = {**{k: v for k, v in sec.items() if k not in ("heads", "default_head")},
               "qhead_path": heads[default_head].path}
    elif "default_head" in sec:
        raise ConfigError("vfd.default_head needs vfd.heads (named Q-heads)")
    token_k = 0  # the mask rule
    if "num_candidates" in sec:  # the K-candidate rule (value_steer.core.qhead.k_emulation_factors)
        token_k = sec["num_candidates"]
        if not isinstance(token_k, int) or isinstance(token_k, bool) or not 1 <= token_k <= MAX_NUM_CANDIDATES:
            raise ConfigError(f"vfd.num_candidates must be an integer in [1, {MAX_NUM_CANDIDATES}], got "
                              f"{short_repr(token_k)}")
    path = sec.get("qhead_path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"vfd.qhead_path is required in token mode (a Q-head checkpoint, value-steer train-qhead; "
                          f"or vfd.heads for several named Q-heads), got {short_repr(path)}")
    path = os.path.expanduser(path)
    if check_files and not os.path.isfile(path):
        raise ConfigError(f"vfd.qhead_path: no such file: {path}")
    threshold = None
    if sec.get("threshold") is not None:
        threshold = _check_threshold(sec["threshold"], "vfd.threshold", ConfigError)
    beta = _check_beta(sec.get("beta", 0.0), "vfd.beta", ConfigError)
    enabled = _check_bool(sec.get("enabled_by_default", True), "vfd.enabled_by_default", ConfigError)
    if not heads:
        heads = (HeadConfig(SINGLE_HEAD_NAME, path, threshold, field="vfd.qhead_path"),)
    return SteerConfig(mode=MODE_TOKEN, threshold=heads[default_head].threshold, enabled_by_default=enabled,
                       capture=capture, steering=steering, logit_steering=logit, qhead_path=path, beta=beta,
                       num_candidates=max(token_k, 1), token_k=token_k, heads=heads, default_head=default_head)


def _check_beta(value: Any, field: str, err: type[ValueError]) -> float:
    bad = f"{field} must be a number in [0, {MAX_BETA:g}] (0: mask, > 0: tilt), got "
    try:
        v = finite_float(value, field, strings=err is RequestArgError)
    except RequestArgError:
        raise err(bad + short_repr(value)) from None
    if not 0.0 <= v <= MAX_BETA:
        raise err(bad + short_repr(value))
    return v


def _parse_capture(sec: Any) -> CaptureConfig:
    _check_section(sec, "capture")
    d = sec.get("dir")
    if not isinstance(d, str) or not d:
        raise ConfigError(f"capture.dir must be a non-empty string (output directory), got {d!r}")
    enabled = _check_bool(sec.get("enabled_by_default", False), "capture.enabled_by_default", ConfigError)
    return CaptureConfig(dir=os.path.expanduser(d), enabled_by_default=enabled)


def _check_int(sec: dict[str, Any], key: str, default: int, lo: int, hi: int | None) -> int:
    v = sec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"steering.{key} must be an integer {allowed}, got {v!r}")
    return v


def _parse_steering(sec: Any, check_files: bool) -> SteeringConfig:
    _check_section(sec, "steering")
    vectors = sec.get("vectors")
    if vectors is not None:
        if not isinstance(vectors, str) or not vectors:
            raise ConfigError(
                f"steering.vectors must be a non-empty string (a directory of .safetensors vectors), got {vectors!r}"
            )
        vectors = os.path.expanduser(vectors)
        if check_files and not os.path.isdir(vectors):
            raise ConfigError(f"steering.vectors: no such directory: {vectors}")
    dose = sec.get("max_relative_dose", DEFAULT_MAX_RELATIVE_DOSE)
    if dose is not None:
        bad = f"steering.max_relative_dose must be a finite number > 0 (or null: no limit), got {short_repr(dose)}"
        try:
            dose = finite_float(dose, "steering.max_relative_dose")
        except RequestArgError:
            raise ConfigError(bad) from None
        if dose <= 0.0:
            raise ConfigError(bad)
    admin_key = sec.get("admin_key")
    if admin_key is not None and (not isinstance(admin_key, str) or len(admin_key) < 8):
        raise ConfigError("steering.admin_key must be a string of at least 8 characters (or null: registry open to "
                          "every client the server's --api-key admits)")
    return SteeringConfig(
        vectors=vectors,
        max_vectors=_check_int(sec, "max_vectors", DEFAULT_MAX_VECTORS, 1, None),
        max_ops_per_request=_check_int(sec, "max_ops_per_request", DEFAULT_MAX_OPS_PER_REQUEST, 1,
                                       MAX_OPS_PER_REQUEST),
        max_inline_floats=_check_int(sec, "max_inline_floats", DEFAULT_MAX_INLINE_FLOATS, 0, None),
        max_relative_dose=dose,
        max_body_bytes=_check_int(sec, "max_body_bytes", DEFAULT_MAX_BODY_BYTES, MIN_BODY_BYTES, None),
        admin_key=admin_key,
    )


def _parse_logit_steering(sec: Any, check_files: bool) -> LogitSteeringConfig:
    """``{"checkpoint": path}`` or ``{"generators": {name: {"checkpoint": path}}, "default_generator"?: name}``."""
    _check_section(sec, "logit_steering")
    if "generators" not in sec:
        if "default_generator" in sec:
            raise ConfigError("logit_steering.default_generator needs logit_steering.generators (named generators)")
        path = _check_generator_path(sec.get("checkpoint"), "logit_steering.checkpoint", check_files)
        return LogitSteeringConfig(checkpoint=path, generators=(GeneratorConfig(SINGLE_HEAD_NAME, path),))
    if "checkpoint" in sec:
        raise ConfigError("logit_steering.checkpoint cannot be given beside logit_steering.generators; name it there "
                          "(logit_steering.generators.<name>.checkpoint)")
    raw = sec["generators"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"logit_steering.generators must be a non-empty JSON object {{name: {{\"checkpoint\": "
                          f"...}}}}, got {short_repr(raw)}")
    if len(raw) > MAX_HEADS:
        raise ConfigError(f"logit_steering.generators: at most {MAX_HEADS} generators, got {len(raw)}")
    gens = []
    for gname, entry in raw.items():
        if not _NAME_RE.match(gname):
            raise ConfigError(f"logit_steering.generators: generator name {short_repr(gname)} must be 1-64 characters "
                              "of letters, digits, '_', '.', '-' (starting with a letter or digit)")
        where = f"logit_steering.generators.{gname}"
        if not isinstance(entry, dict) or set(entry) != {"checkpoint"}:
            raise ConfigError(f"{where} must be a JSON object with exactly the key 'checkpoint', got "
                              f"{short_repr(entry)}")
        gens.append(GeneratorConfig(gname, _check_generator_path(entry["checkpoint"], f"{where}.checkpoint",
                                                                 check_files), f"{where}.checkpoint"))
    names = [g.name for g in gens]
    if "default_generator" in sec:
        default = sec["default_generator"]
        if default not in names:
            raise ConfigError(f"logit_steering.default_generator must be one of {names}, got {short_repr(default)}")
    elif len(gens) == 1:
        default = names[0]
    else:
        raise ConfigError(f"logit_steering.default_generator is required with several generators; one of {names}")
    i = names.index(default)
    return LogitSteeringConfig(checkpoint=gens[i].checkpoint, generators=tuple(gens), default_generator=i)


def _check_generator_path(path: Any, field: str, check_files: bool) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{field} must be a non-empty string (a generator .safetensors file), got {path!r}")
    path = os.path.expanduser(path)
    if not path.lower().endswith(".safetensors"):
        raise ConfigError(f"{field} must be a .safetensors file (pickles are never loaded), got {path!r}")
    if check_files:
        if not os.path.isfile(path):
            raise ConfigError(f"{field}: no such file: {path}")
        if not os.path.isfile(path + ".meta.json"):
            raise ConfigError(f"{field}: no sidecar {path}.meta.json beside it (it holds the generator's sizes and "
                              "max_strength)")
    return path


@dataclass(frozen=True)
class RequestSteer:
    """What one request asks for, resolved against the server config.

    mode: ``MODE_OFF`` when the request (or the default) turns steering off.
    steering: the request's activation-steering spec (None: none), independent of ``mode``.
    """

    mode: int
    threshold: float
    sign: float
    num_candidates: int
    capture: bool = False
    steering: SteeringSpec | None = None
    capture_layers: tuple[int, ...] = ()  # residual-stream capture at these decoder layers (sorted, distinct)
    logit_strength: float = 0.0  # the logit-steering multiplier (0: off)
    # Capture the value head's input at prompt positions >= this too (-1: decode tokens only): the replay of a
    # given response as part of the prompt (prefill only), so labelled responses make features like samples do.
    capture_prompt_from: int = -1
    beta: float = 0.0  # token mode: 0 masks, > 0 tilts (the server's vfd.beta unless the request sets one)
    head: int = 0  # the index of the value head it is scored by (SteerConfig.heads; the request's "head" by name)
    generator: int = 0  # the index of its logit-steering generator (LogitSteeringConfig.generators; "generator")


_TRUE = {"on", "true", "1", "yes"}
_FALSE = {"off", "false", "0", "no"}


def _parse_switch(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestArgError(f"{field} must be true/false (or 'on'/'off', 1/0), got {value!r}")


def _coerce_number(value: Any, field: str) -> float:
    # vllm_xargs values may arrive as strings from some clients; inf, nan and huge integers name the field too.
    return finite_float(value, field, strings=True)


def _fold(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def misspelled_request_keys(extra_args: dict[str, Any]) -> dict[str, str | None]:
    """Keys of ``extra_args`` that are not value_steer's but look meant for it: ``{key: closest of ours}``.

    A key counts when it starts with ``value_steer`` / ``value-steer`` (our namespace; closest may then be
    None), is within :data:`_MISSPELLING_CUTOFF` of one of :data:`REQUEST_KEYS` or within
    :data:`_STEERING_CUTOFF` of ``steering``. Other keys belong to vLLM or other plugins and are not ours to
    refuse.
    """
    folded = {_fold(k): k for k in (*REQUEST_KEYS, LOGIT_STEERING_KEY)}
    found: dict[str, str | None] = {}
    for key in extra_args:
        if not isinstance(key, str) or key in ALL_REQUEST_KEYS:
            continue
        fk = _fold(key)
        close = difflib.get_close_matches(fk, folded, n=1, cutoff=_MISSPELLING_CUTOFF)
        if close:
            found[key] = folded[close[0]]
        elif difflib.get_close_matches(fk, [STEERING_KEY], n=1, cutoff=_STEERING_CUTOFF):
            found[key] = STEERING_KEY
        elif fk.startswith("value_steer"):
            found[key] = None
    return found


def misspelled_top_level_key(key: str) -> str | None:
    """The value_steer key a top-level body key was probably meant to be (``Steering``, ``steer``,
    ``steering_spec``, ``logit-steering``, ``logitSteering``, ``value_steer_x``), or None for a key that is not
    ours (vLLM's own fields are far from all of them).

    Case and ``-``/``_`` are folded; a key counts when it equals one of :data:`TOP_LEVEL_REQUEST_KEYS` after
    folding, starts with ``steer`` / ``logit_steer`` / ``logitsteer`` / ``value_steer``, or is within
    :data:`_STEERING_CUTOFF` of ``steering`` or :data:`_MISSPELLING_CUTOFF` of ``logit_steering``.
    """
    if not isinstance(key, str) or key in TOP_LEVEL_REQUEST_KEYS:
        return None
    fk = _fold(key)
    if fk.startswith(("logit_steer", "logitsteer")) or difflib.get_close_matches(
            fk, [LOGIT_STEERING_KEY], n=1, cutoff=_MISSPELLING_CUTOFF):
        return LOGIT_STEERING_KEY
    if fk.startswith(("steer", "value_steer", "valuesteer")) or difflib.get_close_matches(
            fk, [STEERING_KEY], n=1, cutoff=_STEERING_CUTOFF):
        return STEERING_KEY
    return None


def parse_request_args(
    extra_args: dict[str, Any] | None,
    cfg: SteerConfig,
    default_threshold: float,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    resolve: Callable[[str], bool] | None = None,
    residual_norms: Sequence[float] | None = None,
    vector_norm: Callable[[VectorRef, int], float | None] | None = None,
    head_thresholds: Sequence[float] | None = None,
) -> RequestSteer:
    """Resolve one request's ``extra_args`` against the server config.

    Args:
        extra_args: ``SamplingParams.extra_args`` (may hold other plugins' keys: only ours are read).
        cfg: the server's :class:`SteerConfig`.
        default_threshold: the server threshold (config value, else the head sidecar's).
        hidden_size, num_layers: the model's, to check a ``steering`` spec's vector lengths and layers
            (None: that check is left to the worker).
        resolve: ``resolve(name) -> bool`` for the spec's vector names (None: names not checked here).
        residual_norms, vector_norm: the layers' typical residual norms and ``vector_norm(ref, layer)``, for the
            ``steering.max_relative_dose`` check (:func:`~value_steer.core.steering_spec.check_doses`); either None:
            not checked here.
        head_thresholds: each head's resolved threshold (``cfg.heads`` order; config value, else its sidecar's): a
            request's default threshold is its head's (None: ``default_threshold`` for every head).
    Raises:
        RequestArgError: naming the field and the allowed values.
    """
    args = extra_args or {}
    if not isinstance(args, dict):
        raise RequestArgError(f"extra_args must be an object, got {type(args).__name__}")
    misspelled = misspelled_request_keys(args)
    if misspelled:
        key, near = next(iter(misspelled.items()))
        hint = f" (did you mean {near!r}?)" if near else ""
        raise RequestArgError(
            f"unknown value_steer key {key!r} in vllm_xargs / extra_args{hint}; value_steer's keys are "
            f"{list(REQUEST_KEYS)}, {STEERING_KEY!r} for activation steering and {LOGIT_STEERING_KEY!r} for logit "
            "steering"
        )
    steering_configured = cfg.mode != MODE_OFF
    on = cfg.enabled_by_default and steering_configured
    if "value_steer" in args:
        on = _parse_switch(args["value_steer"], "value_steer")
        if on and not steering_configured:
            raise RequestArgError(
                "value_steer=true, but the server has no 'vfd' or 'abstain' section in --additional-config"
            )
    head = cfg.default_head
    if args.get("head") is not None:
        head = _parse_head(args["head"], cfg)
    threshold = default_threshold if head_thresholds is None else float(head_thresholds[head])
    if args.get("threshold") is not None:
        t = _coerce_number(args["threshold"], "threshold")
        threshold = _check_threshold(t, "threshold", RequestArgError)
    k = cfg.num_candidates
    if args.get("num_candidates") is not None:
        if cfg.mode != MODE_VFD and not (cfg.mode == MODE_TOKEN and cfg.token_k):
            why = (" or in token mode with vfd.num_candidates (the K-candidate rule)" if cfg.mode == MODE_TOKEN
                   else "")
            raise RequestArgError(f"num_candidates is only valid when the server runs 'vfd' in exact mode{why}")
        bad = (f"num_candidates must be an integer in [1, {cfg.num_candidates}] (the server's vfd.num_candidates), "
               f"got {short_repr(args['num_candidates'])}")
        try:
            kv = _coerce_number(args["num_candidates"], "num_candidates")
        except RequestArgError:
            raise RequestArgError(bad) from None
        if kv != int(kv) or not 1 <= int(kv) <= cfg.num_candidates:
            raise RequestArgError(bad)
        k = int(kv)
    beta = cfg.beta
    if args.get("token_beta") is not None:
        if cfg.mode != MODE_TOKEN:
            raise RequestArgError("token_beta is only valid when the server runs vfd in token mode")
        beta = _check_beta(args["token_beta"], "token_beta", RequestArgError)
    capture = cfg.capture.enabled_by_default if cfg.capture else False
    if "value_steer_capture" in args:
        capture = _parse_switch(args["value_steer_capture"], "value_steer_capture")
        if capture and cfg.capture is None:
            raise RequestArgError("value_steer_capture=true, but the server has no 'capture' section")
    capture_prompt_from = -1
    if args.get("capture_prompt_from") is not None:
        capture_prompt_from = _parse_prompt_from(args["capture_prompt_from"], cfg)
        capture = True
    capture_layers = _parse_capture_layers(args.get("capture_layers"), cfg, num_layers)
    if capture_layers and on and cfg.mode == MODE_VFD:
        raise RequestArgError("capture_layers: not supported on a vfd request (its forwards hold rejected candidates); "
                              "send value_steer=false to capture it unfiltered")
    spec = None
    if args.get(STEERING_KEY) is not None:
        if cfg.steering is None:
            raise RequestArgError(
                "steering: this server has no 'steering' section in --additional-config (start it with "
                "--additional-config '{\"steering\": {}}' to accept activation-steering requests)"
            )
        spec = parse_steering_spec(
            args[STEERING_KEY],
            hidden_size=hidden_size,
            num_layers=num_layers,
            max_ops=cfg.steering.max_ops_per_request,
            max_inline_floats=cfg.steering.max_inline_floats,
            resolve=resolve,
        )
        if vector_norm is not None:
            for fld, ref, layer in spec.vector_refs():
                if vector_norm(ref, layer) == 0.0:  # a per-layer vector's row left zero (made for other layers)
                    raise RequestArgError(f"{fld}: vector {ref!r} has no direction at layer {layer} (its row for "
                                          "that layer is zero)")
        dose = cfg.steering.max_relative_dose
        if dose is not None and residual_norms is not None and vector_norm is not None:
            check_doses(spec, residual_norms, dose, vector_norm)
    logit_strength = 0.0
    if args.get(LOGIT_STEERING_KEY) is not None:
        logit_strength = parse_logit_strength(args[LOGIT_STEERING_KEY])
        if logit_strength > 0.0 and cfg.logit_steering is None:
            raise RequestArgError(
                f"{LOGIT_STEERING_KEY}: this server has no 'logit_steering' section in --additional-config (start it "
                "with --additional-config '{\"logit_steering\": {\"checkpoint\": \"generator.safetensors\"}}' to "
                "accept logit-steering requests)"
            )
    generator = cfg.logit_steering.default_generator if cfg.logit_steering is not None else 0
    if args.get("generator") is not None:
        generator = _parse_generator(args["generator"], cfg, logit_strength)
    return RequestSteer(
        mode=cfg.mode if on else MODE_OFF,
        threshold=threshold,
        sign=cfg.heads[head].sign if cfg.heads else cfg.sign,
        num_candidates=k if on else 1,
        capture=capture,
        steering=spec,
        capture_layers=capture_layers,
        logit_strength=logit_strength,
        capture_prompt_from=capture_prompt_from,
        beta=beta,
        head=head,
        generator=generator,
    )


def _parse_generator(value: Any, cfg: SteerConfig, strength: float) -> int:
    """``generator``: the name of one of the server's logit-steering generators; it goes with ``logit_steering``."""
    ls = cfg.logit_steering
    if ls is None:
        raise RequestArgError("generator: this server has no 'logit_steering' section in --additional-config")
    names = [g.name for g in ls.generators]
    if not names:  # a type-only check (the API process without the server config): the worker checks the name
        if not isinstance(value, str) or not value:
            raise RequestArgError(f"generator must be the name of one of the server's logit-steering generators, got "
                                  f"{short_repr(value)}")
        idx = 0
    else:
        idx = ls.generator_index(value) if isinstance(value, str) else None
        if idx is None:
            raise RequestArgError(f"generator must be one of {names} (the server's logit-steering generators), got "
                                  f"{short_repr(value)}")
    if strength <= 0.0:
        raise RequestArgError(f"generator: send {LOGIT_STEERING_KEY} (a strength > 0) with it; without one the request "
                              "is not logit-steered")
    return idx


def _parse_head(value: Any, cfg: SteerConfig) -> int:
    """``head``: the name of one of the server's value heads (``vfd.heads`` / ``abstain.heads``)."""
    names = [h.name for h in cfg.heads]
    if not names and cfg.mode == MODE_VFD and cfg.value_head_path is None:
        # A type-only check (the API process without the server config): the worker checks the name.
        if not isinstance(value, str) or not value:
            raise RequestArgError(f"head must be the name of one of the server's value heads, got {short_repr(value)}")
        return 0
    if not names:
        raise RequestArgError("head: this server has no value heads (no 'vfd' or 'abstain' section with a value head "
                              "in --additional-config)")
    idx = cfg.head_index(value) if isinstance(value, str) else None
    if idx is None:
        raise RequestArgError(f"head must be one of {names} (the server's value heads), got {short_repr(value)}")
    return idx


def _parse_prompt_from(value: Any, cfg: SteerConfig) -> int:
    """``capture_prompt_from``: a prompt position (int >= 0; ``vllm_xargs`` may send it as a string) from which the
    request's prefill rows are captured too. Needs the server's ``capture`` section."""
    field = "capture_prompt_from"
    bad = f"{field} must be a prompt position (an integer >= 0), got {short_repr(value)}"
    if isinstance(value, bool):
        raise RequestArgError(bad)
    try:
        v = _coerce_number(value, field)
    except RequestArgError:
        raise RequestArgError(bad) from None
    if v != int(v) or v < 0:
        raise RequestArgError(bad)
    if cfg.capture is None:
        raise RequestArgError(f"{field}: the server has no 'capture' section in --additional-config")
    return int(v)


def parse_logit_strength(value: Any) -> float:
    """The ``logit_steering`` request value as a multiplier in ``[0, MAX_LOGIT_STRENGTH]``: a number (``vllm_xargs``
    may send it as a string), or a switch (false / "off": 0, true / "on": 1, the trained operating point)."""
    field = LOGIT_STEERING_KEY
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str) and value.strip().lower() in (_TRUE | _FALSE) - {"0", "1"}:  # words; digits: numbers
        return 1.0 if value.strip().lower() in _TRUE else 0.0
    bad = (f"{field} must be a strength multiplier in [0, {MAX_LOGIT_STRENGTH:g}] (0 or false: off), got "
           f"{short_repr(value)}")
    try:
        s = _coerce_number(value, field)
    except RequestArgError:
        raise RequestArgError(bad) from None
    if not math.isfinite(s) or not 0.0 <= s <= MAX_LOGIT_STRENGTH:
        raise RequestArgError(bad)
    return s


def _parse_capture_layers(value: Any, cfg: SteerConfig, num_layers: int | None) -> tuple[int, ...]:
    """``capture_layers``: decoder layers whose residual stream (prompt and decode tokens) the request writes
    to ``<capture.dir>/layer-LL``. A list of ints, or (``vllm_xargs``) a JSON list / comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = loads_bounded(text, "capture_layers")
        else:
            try:
                value = [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise RequestArgError(
                    f"capture_layers must be a list of layer indices, got {short_repr(value)}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise RequestArgError(f"capture_layers must be a list of integer layer indices, got {short_repr(value)}")
    if not value:
        return ()
    if cfg.capture is None or cfg.steering is None:
        raise RequestArgError("capture_layers: the server needs both a 'capture' and a 'steering' section in "
                              "--additional-config")
    hi = num_layers if num_layers is not None else None
    for i, layer in enumerate(value):
        if layer < 0 or (hi is not None and layer >= hi):
            allowed = f"[0, {hi})" if hi is not None else ">= 0"
            raise RequestArgError(f"capture_layers[{i}] must be a decoder layer in {allowed}, got {short_repr(layer)}")
    return tuple(sorted(set(value)))


def vfd_unsupported_reason(sampling_params: Any) -> str | None:
    """Why a request cannot be value-filtered (None if it can). One home for the validator and the runner.

    Reads public ``SamplingParams`` fields only (``structured_outputs``, ``logprobs``, ``logprob_token_ids``).
    """
    if getattr(sampling_params, "structured_outputs", None) is not None:
        return "structured outputs"
    lp = getattr(sampling_params, "logprobs", None)
    if lp is not None and lp < 0:
        return "logprobs=-1 (full vocabulary)"
    if getattr(sampling_params, "logprob_token_ids", None):
        return "logprob_token_ids"
    return None
