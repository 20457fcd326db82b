"""Worker-side wiring for vLLM 0.32: the platform worker base, start-up refusals, the runner subclass,
the KV budget and model facts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from value_steer.core.config import SteerConfig
from value_steer.core.modes import MODE_VFD
from value_steer.patches.vllm_0_32.contract import SUPPORTED_RUNNERS
from value_steer.patches.vllm_0_32.runner import SteeringRunnerMixin

logger = logging.getLogger("value_steer")


def worker_base() -> type:
    """The platform's worker class (CPU build: ``CPUWorker``; CUDA: ``Worker``)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def check_engine_config(vllm_config: Any) -> None:
    """Refuse configurations the adapter does not support, at start-up, naming the setting."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise RuntimeError(
            "value_steer supports vLLM's V1 model runner only; this engine selected Model Runner V2. "
            "Set VLLM_USE_V2_MODEL_RUNNER=0."
        )
    if vllm_config.speculative_config is not None:
        raise RuntimeError("value_steer: speculative decoding is not supported with steering (--speculative-config)")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise RuntimeError("value_steer: pipeline parallelism is not supported (--pipeline-parallel-size must be 1)")


_RUNNER_CLASSES: dict[tuple[type, tuple[type, ...]], type] = {}


def runner_class(base: type, mixins: tuple[type, ...] = ()) -> type:
    """``ValueSteer<Base>``: the steering mixins in front of a supported V1 runner class."""
    if base.__name__ not in SUPPORTED_RUNNERS:
        raise RuntimeError(f"value_steer: unsupported model runner {base.__qualname__}; supported: {SUPPORTED_RUNNERS}")
    key = (base, mixins)
    if key not in _RUNNER_CLASSES:
        _RUNNER_CLASSES[key] = type(f"ValueSteer{base.__name__}", (*mixins, SteeringRunnerMixin, base), {})
    return _RUNNER_CLASSES[key]


def init_device_with_runner(worker: Any, super_init_device: Callable[[], None], mixins: tuple[type, ...] = ()) -> None:
    """Run the platform worker's ``init_device`` so that it builds our runner subclass."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        import vllm.v1.worker.cpu_worker as cw

        original = cw.CPUModelRunner
        cw.CPUModelRunner = runner_class(original, mixins)
        try:
            super_init_device()
        finally:
            cw.CPUModelRunner = original
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        cls = runner_class(GPUModelRunner, mixins)
        worker._make_model_runner = lambda: cls(worker.vllm_config, worker.device)
        super_init_device()
    runner = worker.model_runner
    if not isinstance(runner, SteeringRunnerMixin):
        raise RuntimeError(f"value_steer: the worker built {type(runner).__qualname__}, not the steering runner")


def kv_budget_for_scheduler(worker: Any, available: int) -> int:
    """The KV bytes the scheduler may plan with: ``available`` less what the steering runner keeps
    for itself (VFD's scratch blocks), so the total stays inside the configured KV budget."""
    runner = worker.model_runner
    scratch = int(runner.vfd_scratch_bytes()) if hasattr(runner, "vfd_scratch_bytes") else 0
    if scratch and available - scratch <= 0:
        mib = 1 << 20
        raise RuntimeError(
            f"value_steer VFD: the candidates' scratch KV needs {scratch / mib:.1f} MiB (vfd.num_candidates x "
            f"--max-num-seqs blocks) but the whole KV budget is {available / mib:.1f} MiB; lower "
            "vfd.num_candidates or --max-num-seqs, or raise VLLM_CPU_KVCACHE_SPACE / --gpu-memory-utilization"
        )
    if scratch:
        logger.info("value_steer VFD: %.1f MiB of the %.1f MiB KV budget held back for candidate scratch blocks",
                    scratch / (1 << 20), available / (1 << 20))
    return available - scratch


def batch_capacity(runner: Any) -> int:
    """How many requests the runner's persistent batch holds (the batch-slot tables' size)."""
    return int(runner.input_batch.max_num_reqs)


def model_hidden_size(vllm_config: Any) -> int:
    return int(vllm_config.model_config.get_hidden_size())


def max_num_seqs(vllm_config: Any) -> int:
    return int(vllm_config.scheduler_config.max_num_seqs)


def runner_mixins(config: SteerConfig) -> tuple[type, ...]:
    """Extra runner mixins a config needs in front of :class:`SteeringRunnerMixin` (VFD adds its own)."""
    if config.mode == MODE_VFD:
        from value_steer.patches.vllm_0_32.vfd_runner import VFDRunnerMixin

        return (VFDRunnerMixin,)
    return ()
