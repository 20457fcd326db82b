"""value_steer: inference-time value steering for vLLM, as a fork-free plugin.

Layers, each importing only itself and the layers before it (``tests/test_layering.py``):

- ``value_steer.core``: math and formats (value head, checkpoints, calibration, selection rules, the row
  table, the config schema, the feature format, VFD math); torch / numpy / safetensors only.
- ``value_steer.kernels`` (source folder ``kernels/``): the fused ops, ``torch.ops.value_steer.*``.
- ``value_steer.runtime``: per-request steering state and step logic in the worker process; no vLLM.
- ``value_steer.patches`` (source folder ``patches/``): the only code that imports vLLM internals, one
  adapter per vLLM version.
- ``value_steer.serving``: the worker vLLM loads and the launcher. ``value_steer.worker`` and
  ``value_steer.vllm_cli`` keep the documented entry-point paths (``--worker-cls``, ``python -m``).
- ``value_steer.offline``: models, tasks, the capture/train/calibrate/eval pipeline and the CLIs
  (``value-steer``, ``value-steer-compat``); public vLLM API only.

This module holds the version and the C++ extension probe (``value_steer._C``; the ops fall back to
their torch references without it). Importing it imports torch, never vLLM.
"""

from __future__ import annotations

from value_steer._ext import extension, has_extension, require_extension

__version__ = "0.3.0.dev0"

__all__ = ["__version__", "extension", "has_extension", "require_extension"]
