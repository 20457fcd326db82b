"""API-process side of vLLM 0.32: request validation (HTTP 400) and the server-config hand-off.

The worker publishes ``--additional-config`` through ``VALUE_STEER_CONFIG`` for in-process engines; the
launcher sets it for the API process. One home for that protocol: :func:`publish_config` / :func:`_api_config`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from value_steer.core.config import (
    MAX_NUM_CANDIDATES,
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

    vLLM runs ``validate_params`` for every ``--logits-processors`` class when a request arrives. The
    server config is read from ``VALUE_STEER_CONFIG`` (set by ``value_steer.serving.launcher`` from
    ``--additional-config``); without it only config-independent checks run. As a logits processor it
    does nothing (argmax invariant, identity).
    """

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        cfg = _api_config()
        args = getattr(sampling_params, "extra_args", None)
        known = cfg is not None
        steer = parse_request_args(args, cfg if known else _TYPE_CHECK_ONLY, default_threshold=0.5)
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


_API_CONFIG: tuple[str, SteerConfig | None] | None = None
# Without the server config (VALUE_STEER_CONFIG unset), requests are checked for types and ranges only.
_TYPE_CHECK_ONLY = SteerConfig(mode=MODE_VFD, value_head_path=None, num_candidates=MAX_NUM_CANDIDATES)


def _api_config() -> SteerConfig | None:
    global _API_CONFIG
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    if _API_CONFIG is None or _API_CONFIG[0] != raw:
        _API_CONFIG = (raw, parse_additional_config(json.loads(raw), check_files=False))
    return _API_CONFIG[1]


