"""Request policy for vLLM 0.32: validation in the API process (HTTP 400), the server-config hand-off, and
how the worker ends a request whose steering arguments it refuses.

The start-up hook (``worker.prepare_engine_args``) publishes ``--additional-config`` through
``VALUE_STEER_CONFIG`` for the API process; the worker does the same for in-process engines. One home for
that protocol: :func:`publish_config` / :func:`_api_config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

from value_steer.core.config import (
    MAX_NUM_CANDIDATES,
    STEERING_KEY,
    LogitSteeringConfig,
    RequestArgError,
    SteerConfig,
    parse_additional_config,
    parse_request_args,
    vfd_unsupported_reason,
)
from value_steer.core.modes import MODE_VFD

CONFIG_ENV = "VALUE_STEER_CONFIG"


def publish_config(additional_config: dict[str, Any] | None) -> dict[str, str]:
    """The environment entry that hands ``--additional-config`` to the request validator."""
    return {CONFIG_ENV: json.dumps(additional_config or {})}


try:  # the validator class needs vLLM's base class; keep the module importable for static checks
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover
    _LogitsProcessorBase = object  # type: ignore[assignment,misc]


class RequestArgsValidator(_LogitsProcessorBase):  # type: ignore[misc,valid-type]
    """Validates value_steer's ``extra_args`` in the API process, so a bad value is an HTTP 400.

    vLLM runs ``validate_params`` for every ``--logits-processors`` class when a request arrives; the
    start-up hook adds this class to the engine's logits processors whenever ``ValueSteerWorker`` is
    configured. The server config is read from ``VALUE_STEER_CONFIG`` (published by the same hook from
    ``--additional-config``); without it only config-independent checks run. A ``steering`` spec is also
    checked against the model (hidden size, layer count) and the vector names this process knows, once
    the frontend hooks have installed them (:func:`set_steering_context`). As a logits processor it does
    nothing (argmax invariant, identity).
    """

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        cfg = _api_config()
        args = getattr(sampling_params, "extra_args", None)
        known = cfg is not None
        model: dict[str, Any] = {}
        if (_STEERING_CONTEXT is not None and known and cfg.steering is not None and isinstance(args, dict)
                and args.get(STEERING_KEY) is not None):
            model = _STEERING_CONTEXT()
        steer = parse_request_args(args, cfg if known else _TYPE_CHECK_ONLY, default_threshold=0.5, **model)
        if known and steer.mode == MODE_VFD:
            reason = vfd_unsupported_reason(sampling_params)
            if reason is not None:
                # Never emit an unfiltered token for a steered request: refuse instead (HTTP 400).
                raise RequestArgError(
                    f"value_steer: vfd cannot steer a request with {reason}; send value_steer=false to serve it "
                    "unsteered"
                )

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None


def is_request_validator(proc: Any) -> bool:
    """Whether a ``--logits-processors`` entry (a class, or its ``module:Class`` / ``module.Class`` path; the
    package path the start-up hook adds, or this module's) is the request validator."""
    if isinstance(proc, str):
        module, _, name = proc.rpartition(":") if ":" in proc else proc.rpartition(".")
        return name == RequestArgsValidator.__name__ and module in _VALIDATOR_MODULES
    return isinstance(proc, type) and issubclass(proc, RequestArgsValidator)


_VALIDATOR_MODULES = (RequestArgsValidator.__module__, RequestArgsValidator.__module__.rpartition(".")[0])

# What the validator adds to parse_request_args for a steering spec: hidden_size, num_layers, resolve.
# frontend.install_frontend_hooks installs it (the frontend imports this module, so this one cannot import
# the frontend without a cycle).
SteeringContext = Callable[[], dict[str, Any]]
_STEERING_CONTEXT: SteeringContext | None = None


def set_steering_context(context: SteeringContext | None) -> None:
    """Install ``context() -> {"hidden_size", "num_layers", "resolve"}``, the model facts and the vector-name
    lookup the validator checks a steering spec against (None: type and range checks only)."""
    global _STEERING_CONTEXT
    _STEERING_CONTEXT = context


def end_token(sampling_params: Any) -> int | None:
    """The token id that ends this request at once in vLLM 0.32's scheduler (``check_stop``), or None.

    The scheduler stops on the request's EOS (``eos_token_id``; None under ``ignore_eos``) and on its
    ``stop_token_ids``, both before it looks at ``min_tokens``. Without either, any EOS id the engine knows
    (``all_stop_token_ids``) still yields no text when detokenised (a special token), but the request then
    runs to ``max_tokens``.
    """
    if sampling_params.eos_token_id is not None:
        return int(sampling_params.eos_token_id)
    if sampling_params.stop_token_ids:
        return int(sampling_params.stop_token_ids[0])
    known = sampling_params.all_stop_token_ids
    return min(known) if known else None


def refused_sampling_params(sampling_params: Any) -> Any | None:
    """The worker's copy of a refused request's ``SamplingParams``: the only token it can sample is its end
    token (:func:`end_token`), so it ends at its first decode step with no text (finish reason ``stop``).

    Returns None when the request has no token that could end it. Only the worker's copy changes: the
    scheduler keeps the client's parameters, so stop checks, ``max_tokens`` and the response are vLLM's own.
    """
    end = end_token(sampling_params)
    if end is None:
        return None
    sp = sampling_params.clone()
    sp.allowed_token_ids = [end]
    # The processors that could mask the end token: min_tokens masks stop tokens (the scheduler checks
    # EOS and stop_token_ids before min_tokens, so ending at once is still what it honours), a logit bias
    # could push it to -inf.
    sp.min_tokens = 0
    sp.logit_bias = None
    return sp


_API_CONFIG: tuple[str, SteerConfig | None] | None = None
# Without the server config (VALUE_STEER_CONFIG unset), requests are checked for types and ranges only.
_TYPE_CHECK_ONLY = SteerConfig(mode=MODE_VFD, value_head_path=None, num_candidates=MAX_NUM_CANDIDATES,
                               logit_steering=LogitSteeringConfig(checkpoint=""))


def _api_config() -> SteerConfig | None:
    global _API_CONFIG
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    if _API_CONFIG is None or _API_CONFIG[0] != raw:
        _API_CONFIG = (raw, parse_additional_config(json.loads(raw), check_files=False))
    return _API_CONFIG[1]


