"""Facts the offline tools share, one home each: the committed head, the sampling, the vLLM CPU environment.

Imported by the CLI, the pipeline, the evaluation, the offline engine constructor, the benchmarks and the
tests; it imports nothing heavier than the standard library (no torch, no vLLM).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# The committed value head for the default task (SmolLM2-135M-Instruct, negative sentiment).
DEFAULT_HEAD = "smollm2-135m-sentiment.safetensors"

# Sampling used for capture, evaluation and the README example: the model's own distribution.
TEMPERATURE = 0.8
TOP_P = 0.95

# KV cache (GiB) per use on these 2-core CPU machines: tests run tiny models, serving and evaluation
# keep up to 64 requests of SmolLM2 plus VFD's scratch blocks.
KV_CACHE_GIB = {"test": 1, "serve": 2, "eval": 3, "bench": 4}


def default_head_path() -> Path:
    """Path of the committed value head (inside the installed package)."""
    return Path(str(resources.files("value_steer") / "data" / "heads" / DEFAULT_HEAD))


def default_extra_heads() -> dict[str, Path]:
    """The second concept ``make serve`` loads beside the built-in head: the bring-your-own walkthrough's no-prices
    head (``examples/no-prices``, in a source checkout; an installed wheel has no examples and serves one head)."""
    root = Path(str(resources.files("value_steer"))).parent
    return {"no-prices": root / "examples" / "no-prices" / "no-prices.safetensors"}


def default_qhead_path() -> Path:
    """The committed Q-head of the committed value head (``value-steer train-qhead``; token-mode VFD)."""
    return Path(str(resources.files("value_steer") / "data" / "qheads" / "smollm2-135m-sentiment-q.safetensors"))


def default_logit_checkpoint() -> Path:
    """The committed logit-steering generator (``value-steer train-logit``)."""
    return Path(str(resources.files("value_steer") / "data" / "logit" / "smollm2-135m-positive.safetensors"))


def default_vectors_dir() -> Path:
    """The committed steering vectors (``make serve`` preloads them; each ``<name>.safetensors``)."""
    return Path(str(resources.files("value_steer") / "data" / "vectors"))


def vllm_cpu_env(use: str = "test", *, in_process: bool = True) -> dict[str, str]:
    """The environment vLLM 0.32 needs on these CPU machines (offline, all cores, no usage stats).

    Args:
        use: a key of :data:`KV_CACHE_GIB` (sizes ``VLLM_CPU_KVCACHE_SPACE``).
        in_process: run the engine core in this process (offline ``LLM``; faster start, one process).
    """
    if use not in KV_CACHE_GIB:
        raise ValueError(f"use must be one of {sorted(KV_CACHE_GIB)}, got {use!r}")
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB[use]),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def apply_vllm_cpu_env(use: str = "test", *, in_process: bool = True) -> None:
    """``os.environ.setdefault`` for every :func:`vllm_cpu_env` entry (values already set win)."""
    for key, value in vllm_cpu_env(use, in_process=in_process).items():
        os.environ.setdefault(key, value)
