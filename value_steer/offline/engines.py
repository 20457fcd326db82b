"""The offline engine constructor: one home for ``vllm.LLM(...)`` with value_steer's worker.

Every offline run (capture, evaluation, ``value-steer-compat --behavioral``, the engine tests and
benchmarks) builds its engine here, so each gets the same worker (the plugin adds the request validator) and
the CPU environment of :mod:`value_steer.offline.assets`. Public vLLM API only.
"""

from __future__ import annotations

import os
from typing import Any

from value_steer.offline.assets import KV_CACHE_GIB, apply_vllm_cpu_env
from value_steer.serving import WORKER_CLS


def offline_llm(model: str, additional_config: dict[str, Any] | None = None, *, steering: bool = True,
                kv_use: str = "test", **kwargs: Any) -> Any:
    """A ``vllm.LLM`` on this machine's CPU defaults (fp32, eager, seed 0).

    Args:
        model: an HF model folder.
        additional_config: value_steer's ``--additional-config`` (``None``: ``{}``).
        steering: run ``ValueSteerWorker`` and the request validator (False: plain vLLM).
        kv_use: which :data:`value_steer.offline.assets.KV_CACHE_GIB` entry sizes the KV cache.
        kwargs: any other ``LLM`` argument; overrides the defaults.
    """
    apply_vllm_cpu_env(kv_use)
    # The KV size is the use's (VALUE_STEER_KVCACHE_GIB overrides): an inherited shell value must not win.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VALUE_STEER_KVCACHE_GIB", str(KV_CACHE_GIB[kv_use]))
    from vllm import LLM

    args: dict[str, Any] = dict(model=str(model), dtype="float32", enforce_eager=True, seed=0)
    if steering:
        # The plugin (value_steer.serving.plugin) adds the request validator and the start-up checks.
        args.update(worker_cls=WORKER_CLS, additional_config=additional_config or {})
    args.update(kwargs)
    return LLM(**args)
