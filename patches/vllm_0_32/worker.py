"""Start-up and worker-side wiring for vLLM 0.32: the engine-config hook, start-up refusals, the platform
worker base, the runner subclass, the KV budget and model facts.

Start-up runs in two places, both before any engine starts:

- :func:`install_startup_hook` (called by value_steer's ``vllm.general_plugins`` entry point in every vLLM
  process) wraps ``EngineArgs.create_engine_config``. When ``--worker-cls`` names ``ValueSteerWorker`` it
  runs :func:`prepare_engine_args` *before* the config is built (V1 runner, VFD's scheduling and CUDA-graph
  defaults, the request validator, the API-side stats routes) and :func:`check_engine_config` after. With
  any other worker it only calls through.
- ``ValueSteerWorker.__init__`` runs :func:`check_engine_config` again, so an engine built without the hook
  (the plugin excluded by ``VLLM_PLUGINS``) still refuses what the runner cannot honour.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Collection
from typing import Any

from value_steer.core.config import SteerConfig, parse_additional_config
from value_steer.core.modes import MODE_TOKEN, MODE_VFD
from value_steer.patches.vllm_0_32.api import publish_config
from value_steer.patches.vllm_0_32.contract import SUPPORTED_RUNNERS
from value_steer.patches.vllm_0_32.runner import SteeringRunnerMixin

logger = logging.getLogger("value_steer")

# The request validator as vLLM's --logits-processors takes it (also what offline engines pass).
REQUEST_VALIDATOR = "value_steer.patches.vllm_0_32:RequestArgsValidator"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# What fixes each refusal, named in the message.
_FIX_V2 = f"set {V2_RUNNER_ENV}=0 (value_steer's vLLM plugin sets it when it is loaded: check VLLM_PLUGINS)"
_FIX_ASYNC = "pass --no-async-scheduling (EngineArgs/LLM: async_scheduling=False)"
_FIX_GRAPHS = ("pass --compilation-config '{\"cudagraph_mode\": \"PIECEWISE\"}' (or --enforce-eager; LLM: "
               "compilation_config={\"cudagraph_mode\": \"PIECEWISE\"})")
_FIX_SPEC = "remove --speculative-config"
_FIX_PP = "use --pipeline-parallel-size 1 (tensor parallelism is supported)"


class StartupError(RuntimeError):
    """An engine setting value_steer's runner cannot honour, found at start-up (one line per setting)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("value_steer cannot run with this engine configuration:\n- " + "\n- ".join(problems))


def is_steering_worker(worker_cls: Any, worker_paths: Collection[str]) -> bool:
    """Whether ``--worker-cls`` (a dotted path or a class) is value_steer's worker."""
    if isinstance(worker_cls, type):
        return f"{worker_cls.__module__}.{worker_cls.__qualname__}" in worker_paths or any(
            f"{k.__module__}.{k.__qualname__}" in worker_paths for k in worker_cls.__mro__)
    return isinstance(worker_cls, str) and worker_cls in worker_paths


def _runs_cuda_graphs() -> bool:
    from vllm.platforms import current_platform

    # CPU builds keep a cudagraph_mode but capture nothing (cudagraph_capture_sizes is emptied).
    return bool(current_platform.is_cuda_alike())


def prepare_engine_args(engine_args: Any, *, cuda_graphs: bool | None = None) -> SteerConfig:
    """Before vLLM builds the engine config for ``ValueSteerWorker``: validate ``--additional-config``,
    select the V1 runner, set VFD's scheduling and CUDA-graph defaults, add the request validator and
    publish the server config to this (API) process. Explicit settings the runner cannot honour are
    refused, all in one :class:`StartupError`; defaults are adjusted and logged. Returns the parsed config.

    Args:
        engine_args: vLLM's ``EngineArgs`` (``vllm serve``'s parsed flags, or ``LLM(**kwargs)``).
        cuda_graphs: whether the platform captures CUDA graphs (default: the current platform's answer).
    """
    cfg = parse_additional_config(engine_args.additional_config)  # ConfigError names the field
    problems: list[str] = []
    # The runner is chosen from the environment in every process (config/vllm.py use_v2_model_runner) and
    # the API process picks the validator's interface from it too, so it is set here, before the config
    # exists and before any engine process is spawned (they inherit it).
    chosen = os.environ.get(V2_RUNNER_ENV, "").strip()
    if not chosen:
        os.environ[V2_RUNNER_ENV] = "0"
        # An engine started earlier in this process (offline LLM) may have frozen vLLM's environment cache;
        # vLLM's own reset lets this config read the new value (the next engine core freezes it again).
        from vllm.envs import disable_envs_cache

        disable_envs_cache()
        logger.info("value_steer: %s=0 (vLLM's V1 model runner; Model Runner V2 is not supported)", V2_RUNNER_ENV)
    elif chosen != "0":
        problems.append(f"{V2_RUNNER_ENV}={chosen} selects Model Runner V2, which value_steer does not support; "
                        f"unset it or {_FIX_V2}")
    if engine_args.speculative_config is not None:
        problems.append(f"speculative decoding is not supported with steering; {_FIX_SPEC}")
    if int(engine_args.pipeline_parallel_size) != 1:
        problems.append(f"--pipeline-parallel-size {engine_args.pipeline_parallel_size}: pipeline parallelism is "
                        f"not supported; {_FIX_PP}")
    if cfg.mode == MODE_VFD:
        # VFD's next step depends on this step's winner; async scheduling (vLLM's default on CUDA) would
        # schedule that step before the winner is known.
        if engine_args.async_scheduling is None:
            engine_args.async_scheduling = False
            logger.info("value_steer: vfd runs with synchronous scheduling (async scheduling is off)")
        elif engine_args.async_scheduling:
            problems.append(f"--async-scheduling: vfd needs synchronous scheduling (the next step's candidates "
                            f"depend on this step's winner); {_FIX_ASYNC}")
        # VFD's scratch KV and commit copies address one block table. Models that mix sliding-window and
        # full-attention layers (Gemma 2/3, ...) get one KV cache group with vLLM's hybrid KV cache manager off:
        # every layer keeps full-length KV, and attention still applies each layer's window, so decoding is exact.
        hybrid = getattr(engine_args, "disable_hybrid_kv_cache_manager", None)
        if hybrid is None:
            engine_args.disable_hybrid_kv_cache_manager = True
        elif hybrid is False:
            problems.append("--no-disable-hybrid-kv-cache-manager: vfd needs one KV cache group (sliding-window "
                            "layers keep full-length KV); drop the flag")
        if cuda_graphs is None:
            cuda_graphs = _runs_cuda_graphs()
        cc = engine_args.compilation_config
        mode = getattr(cc, "cudagraph_mode", None)
        if cuda_graphs and not engine_args.enforce_eager:
            if mode is None:
                # vLLM's default (-O2: FULL_AND_PIECEWISE) captures decode batches padded to graph sizes; VFD's
                # candidate rows change every decode batch's shape.
                from vllm.config import CUDAGraphMode

                cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
                logger.info("value_steer: vfd runs with cudagraph_mode PIECEWISE (no full CUDA graphs)")
            elif mode.has_full_cudagraphs():
                problems.append(f"cudagraph_mode {mode.name}: vfd cannot run in full CUDA graphs (its candidate "
                                f"rows change the decode batch); {_FIX_GRAPHS}")
    if problems:
        raise StartupError(problems)
    # The API process validates requests with this logits processor (HTTP 400 naming the field).
    procs = list(engine_args.logits_processors or [])
    if not any(_is_validator(p) for p in procs):
        engine_args.logits_processors = [*procs, REQUEST_VALIDATOR]
    os.environ.update(publish_config(engine_args.additional_config))
    return cfg


def _is_validator(proc: Any) -> bool:
    if isinstance(proc, str):
        return proc == REQUEST_VALIDATOR
    from value_steer.patches.vllm_0_32.api import RequestArgsValidator

    return isinstance(proc, type) and issubclass(proc, RequestArgsValidator)


def has_request_validator(vllm_config: Any) -> bool:
    """Whether the engine's logits processors include the request validator (the start-up hook ran)."""
    return any(_is_validator(p) for p in (vllm_config.model_config.logits_processors or ()))


def install_startup_hook(worker_paths: Collection[str]) -> None:
    """Wrap ``EngineArgs.create_engine_config`` (once per process) so that engines configured with
    value_steer's worker (``worker_paths``) get :func:`prepare_engine_args` before the config is built and
    :func:`check_engine_config` after; in an API server process, also the stats routes and ``/metrics``.
    Every other engine calls straight through."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_value_steer_hook", False):
        return
    paths = frozenset(worker_paths)

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_steering_worker(self.worker_cls, paths):
            return original(self, *args, **kwargs)
        cfg = prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        check_engine_config(vllm_config, cfg)
        # Every frontend process (API server, offline LLM), before vLLM builds its InputProcessor: steering
        # requests get their prefix-cache salt and fingerprint; the validator learns the model's sizes.
        from value_steer.patches.vllm_0_32.frontend import install_frontend_hooks, remember_model

        remember_model(vllm_config)
        install_frontend_hooks()
        # Only an API server process has imported vLLM's app builder; offline engines have no routes.
        if "vllm.entrypoints.launchers.app" in sys.modules:
            from value_steer.patches.vllm_0_32.http import install_routes

            install_routes()
        logger.info("value_steer: engine config ready for %s (%s)", self.worker_cls,
                    json.dumps(self.additional_config))
        return vllm_config

    create_engine_config._value_steer_hook = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def worker_base() -> type:
    """The platform's worker class (CPU build: ``CPUWorker``; CUDA: ``Worker``)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


def check_engine_config(vllm_config: Any, config: SteerConfig | None = None) -> None:
    """Refuse, at start-up, every engine setting the steering runner cannot honour: one
    :class:`StartupError` naming each setting and the flag that fixes it."""
    cfg = config if config is not None else parse_additional_config(vllm_config.additional_config,
                                                                    check_files=False)
    problems: list[str] = []
    if vllm_config.use_v2_model_runner:
        problems.append(f"this engine selected Model Runner V2; value_steer supports vLLM's V1 model runner only: "
                        f"{_FIX_V2}")
    if vllm_config.speculative_config is not None:
        problems.append(f"speculative decoding is not supported with steering; {_FIX_SPEC}")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append(f"--pipeline-parallel-size {vllm_config.parallel_config.pipeline_parallel_size}: pipeline "
                        f"parallelism is not supported; {_FIX_PP}")
    if cfg.mode == MODE_VFD:
        if vllm_config.scheduler_config.async_scheduling:
            problems.append(f"async scheduling: vfd needs synchronous scheduling (the next step's candidates "
                            f"depend on this step's winner); {_FIX_ASYNC}")
        cc = vllm_config.compilation_config
        mode = cc.cudagraph_mode
        # Graphs are captured only for the capture sizes; CPU builds empty them.
        if mode is not None and mode.has_full_cudagraphs() and cc.cudagraph_capture_sizes:
            problems.append(f"cudagraph_mode {mode.name}: vfd cannot run in full CUDA graphs (its candidate "
                            f"rows change the decode batch); {_FIX_GRAPHS}")
    if cfg.heads and cfg.mode != MODE_TOKEN:
        # Before any engine starts: every value head must fit this model's hidden size (each file is small).
        from value_steer.core.checkpoint import load_value_head

        for head in cfg.heads:
            try:
                load_value_head(head.path, hidden_size=model_hidden_size(vllm_config))
            except (OSError, ValueError) as exc:
                problems.append(f"{head.field}: {exc}")
    if cfg.logit_steering is not None:
        # Before any engine starts: the generator must fit this model (its file is small; loading it checks all).
        from value_steer.core.logit_steer import load_logit_steer

        for gen in cfg.logit_steering.generators:
            try:
                load_logit_steer(gen.checkpoint, hidden_size=model_hidden_size(vllm_config),
                                 vocab_size=model_vocab_size(vllm_config))
            except (OSError, ValueError) as exc:
                problems.append(f"{gen.field}: {exc}")
    if cfg.mode == MODE_TOKEN:
        # Token mode: every Q-head must fit this model's hidden size and logits.
        from value_steer.core.qhead import load_qhead

        for head in cfg.heads:
            try:
                load_qhead(head.path, hidden_size=model_hidden_size(vllm_config),
                           vocab_size=model_vocab_size(vllm_config))
            except (OSError, ValueError) as exc:
                problems.append(f"{head.field}: {exc}")
    if problems:
        raise StartupError(problems)


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


def model_vocab_size(vllm_config: Any) -> int:
    """The width of the logits vLLM 0.32 hands the sampler: the model config's vocabulary (``LogitsProcessor``
    strips the lm_head's own padding to ``org_vocab_size``; the config's may still exceed the tokenizer's)."""
    return int(vllm_config.model_config.get_vocab_size())


def served_model_identity(vllm_config: Any) -> tuple[str, str | None]:
    """``(folder name, sha256 of its config.json)`` of the served model (the hash None when the model is not a
    local folder)."""
    import hashlib

    path = str(vllm_config.model_config.model)
    name = os.path.basename(os.path.normpath(path))
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            return name, hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return name, None


def max_num_seqs(vllm_config: Any) -> int:
    return int(vllm_config.scheduler_config.max_num_seqs)


def runner_mixins(config: SteerConfig) -> tuple[type, ...]:
    """Extra runner mixins a config needs in front of :class:`SteeringRunnerMixin` (VFD adds its own)."""
    if config.mode == MODE_VFD:
        from value_steer.patches.vllm_0_32.vfd_runner import VFDRunnerMixin

        return (VFDRunnerMixin,)
    return ()
