"""Adapter for vLLM 0.32 (V1 model runner: ``GPUModelRunner`` and its ``CPUModelRunner`` subclass).

Everything value_steer needs from vLLM's internals is named here and in ``CONTRACT``:
- the runner is built by ``CPUWorker.init_device`` from the module global ``cpu_worker.CPUModelRunner``
  (GPU: ``Worker._make_model_runner``); we substitute a subclass for the duration of ``init_device``;
- the step is ``execute_model(scheduler_output)`` -> ``ExecuteModelState`` -> ``sample_tokens`` ->
  ``_sample(logits, spec_decode_metadata) -> SamplerOutput``; tokens substituted in ``_sample`` flow
  through the runner's own bookkeeping (``_bookkeeping_sync``) to the scheduler unchanged;
- per-request state: ``runner.requests[req_id]`` (``CachedRequestState``: ``sampling_params``,
  ``output_token_ids``), batch order ``input_batch.req_ids``, ``input_batch.num_computed_tokens_cpu``,
  ``input_batch.num_prompt_tokens``; finished/aborted ids arrive in ``scheduler_output.finished_req_ids``.
The Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``) is refused at start-up.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from value_steer.config import RequestArgError, SteerConfig, parse_additional_config, parse_request_args
from value_steer.rows import MODE_ABSTAIN, MODE_VFD

logger = logging.getLogger("value_steer")

VLLM_VERSIONS = ("0.32.",)
SUPPORTED_RUNNERS = ("GPUModelRunner", "CPUModelRunner")

# (module, qualified name, required parameters or attributes). Checked by `value-steer-compat`.
CONTRACT: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", ("self",)),
    ("vllm.v1.worker.cpu_worker", "CPUModelRunner", ()),
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner", ("self",)),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",)),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec", ("self",)),
    ("vllm.v1.kv_cache_interface", "AttentionSpec", ("page_size_bytes",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens", ("self", "grammar_output")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample", ("self", "logits", "spec_decode_metadata")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_model_runner", "ExecuteModelState", ("sample_hidden_states", "hidden_states", "logits")),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.__init__", ("self",)),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState", ("sampling_params", "output_token_ids")),
    ("vllm.v1.sample.logits_processor.interface", "LogitsProcessor.validate_params", ("sampling_params",)),
    ("vllm.v1.core.sched.output", "SchedulerOutput", ("finished_req_ids", "scheduled_new_reqs",
                                                       "num_scheduled_tokens")),
    ("vllm.sampling_params", "SamplingParams", ("extra_args", "ignore_eos", "min_tokens", "eos_token_id")),
    # API process (vllm_0_32_server): --middleware functions, worker RPC from the engine client.
    ("vllm.entrypoints.serve.middleware.register", "init_entrypoints_middleware", ("args", "app")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", ("self", "method", "timeout", "args")),
]

# What the serve launcher (value_steer.vllm_cli) adds to `vllm serve` when ValueSteerWorker runs.
REQUEST_VALIDATOR = "value_steer.patches.vllm_0_32:RequestArgsValidator"
HTTP_MIDDLEWARE = "value_steer.patches.vllm_0_32_server.value_steer_http"


def _resolve(module: str, qualname: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check_contract() -> list[str]:
    """Static check of every internal this adapter binds to; returns the problems found (empty = ok)."""
    problems = []
    for module, qualname, needs in CONTRACT:
        try:
            obj = _resolve(module, qualname)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{qualname}: missing ({exc})")
            continue
        if not needs:
            continue
        if callable(obj) and not isinstance(obj, type):
            params = set(inspect.signature(obj).parameters)
            missing = [n for n in needs if n not in params]
        else:
            fields = set(getattr(obj, "__dataclass_fields__", {})) | set(getattr(obj, "_fields", ()))
            fields |= set(getattr(obj, "__struct_fields__", ())) | set(dir(obj))
            missing = [n for n in needs if n not in fields]
        if missing:
            problems.append(f"{module}.{qualname}: expected {list(needs)}, missing {missing}")
    return problems


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


class SteeringRunnerMixin:
    """Mixed in front of the platform's V1 runner. The steering engine is attached as ``_vs_engine``."""

    _vs_engine: Any = None
    _vs_capture: Any = None
    _vs_step: dict[str, Any] | None = None
    # Requests whose capture row a runner mixin writes itself this step (VFD: the winner, not the row).
    _vs_capture_elsewhere: frozenset[str] = frozenset()

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _vs_sync_requests(self, scheduler_output: Any) -> None:
        eng = self._vs_engine
        for req_id in scheduler_output.finished_req_ids:
            eng.finish_request(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            if sp is None:  # pooling request
                continue
            try:
                eng.add_request(new.req_id, sp.extra_args, sp.eos_token_id, sp.ignore_eos)
            except RequestArgError as exc:
                # Requests are validated in the API process (RequestArgsValidator -> HTTP 400); one that got
                # here unvalidated (validator not installed) must not take the engine down.
                logger.error("value_steer: request %s has invalid extra_args (%s); serving it unsteered",
                             new.req_id, exc)
                eng.add_request(new.req_id, {"value_steer": False}, sp.eos_token_id, sp.ignore_eos)
                eng.requests[new.req_id].stats.error = str(exc)

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        if self._vs_engine is not None:
            self._vs_sync_requests(scheduler_output)
        out = super().execute_model(scheduler_output, intermediate_tensors)  # type: ignore[misc]
        state = getattr(self, "execute_model_state", None)
        self._vs_step = None
        if self._vs_engine is not None and state is not None and state.sample_hidden_states is not None:
            self._vs_step = {"hidden": state.sample_hidden_states}
        return out

    # ---- the per-step decision ---------------------------------------------------------------------
    def _vs_decode_rows(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Batch order req ids, whether each row is a decode row, its position, and its steering row."""
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        req_ids = list(ib.req_ids[:n])
        computed = ib.num_computed_tokens_cpu[:n]
        prompt = ib.num_prompt_tokens[:n]
        is_decode = computed >= prompt
        rows = np.zeros(n, dtype=np.int32)
        eng = self._vs_engine
        for i, rid in enumerate(req_ids):
            st = eng.requests.get(rid)
            if st is None or not st.row or not is_decode[i]:
                continue
            req = self.requests[rid]  # type: ignore[attr-defined]
            if len(req.output_token_ids) < req.sampling_params.min_tokens:
                continue  # forcing EOS now would violate min_tokens (vLLM checks EOS before min_tokens)
            rows[i] = st.row
        return req_ids, is_decode, computed.copy(), rows

    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        eng = self._vs_engine
        raw_for_logprobs = None
        ib = self.input_batch  # type: ignore[attr-defined]
        if (eng is not None and eng.config.mode == MODE_ABSTAIN and logits is not None and self._vs_step is not None
                and ib.sampling_metadata.max_num_logprobs is not None):
            # A forced EOS must come back with its own logprob: keep the raw logits of the rows that asked
            # for logprobs (the sampler may scale logits in place). Steps where nobody asked skip this.
            want = [i for i, r in enumerate(ib.req_ids[: ib.num_reqs])
                    if self.requests[r].sampling_params is not None  # type: ignore[attr-defined]
                    and self.requests[r].sampling_params.logprobs is not None]  # type: ignore[attr-defined]
            if want:
                idx = torch.tensor(want, dtype=torch.long, device=logits.device)
                raw_for_logprobs = (want, logits.index_select(0, idx).float())
        out = super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        step, self._vs_step = self._vs_step, None
        if eng is None or step is None or spec_decode_metadata is not None:
            return out
        req_ids, is_decode, positions, rows = self._vs_decode_rows()
        hidden = step["hidden"][: len(req_ids)]
        if self._vs_capture is not None:
            self._vs_capture_rows(req_ids, is_decode, positions, hidden)
        if eng.config.mode == MODE_ABSTAIN and rows.any():
            device = hidden.device
            eos = torch.tensor([eng.requests[r].eos_token_id or 0 if rows[i] else 0 for i, r in enumerate(req_ids)],
                               dtype=torch.int64, device=device)
            row_idx = torch.from_numpy(rows).to(device)
            vals, force = eng.abstain(hidden, row_idx, out.sampled_token_ids, eos)
            eng.record(req_ids, rows.tolist(), vals, force, eos_forced=True)
            if raw_for_logprobs is not None and out.logprobs_tensors is not None:
                self._vs_forced_eos_logprobs(out.logprobs_tensors, force, eos, *raw_for_logprobs)
        return out

    def _vs_forced_eos_logprobs(self, lpt: Any, force: torch.Tensor, eos: torch.Tensor, rows: list[int],
                                raw: torch.Tensor) -> None:
        """Report the forced EOS (not the sample it replaced) in the row's logprobs, from the raw logits."""
        forced = set(force.nonzero().flatten().tolist())
        mode = getattr(getattr(self, "sampler", None), "logprobs_mode", "raw_logprobs")
        if forced & set(rows) and mode not in ("raw_logprobs", "raw_logits"):
            logger.warning("value_steer: forced-EOS logprobs are reported as logprobs of the raw logits "
                           "(logprobs mode %s)", mode)
        for j, i in enumerate(rows):
            if i not in forced:
                continue
            dist = raw[j] if mode == "raw_logits" else raw[j].log_softmax(dim=-1)
            tok = int(eos[i])
            lpt.logprob_token_ids[i, 0] = tok
            lpt.logprobs[i, 0] = dist[tok]
            lpt.selected_token_ranks[i] = int((dist >= dist[tok]).sum())

    def _vs_capture_rows(self, req_ids: list[str], is_decode: np.ndarray | None, positions: Any,
                         hidden: torch.Tensor) -> None:
        """Capture ``hidden[i]`` (the state after the token at ``positions[i]``) for capturing requests."""
        eng = self._vs_engine
        skip = self._vs_capture_elsewhere
        keep = [
            i for i, r in enumerate(req_ids)
            if (is_decode is None or is_decode[i]) and r not in skip and r in eng.requests
            and eng.requests[r].steer.capture
        ]
        if keep:
            idx = torch.tensor(keep, dtype=torch.long, device=hidden.device)
            self._vs_capture.add([req_ids[i] for i in keep], [int(positions[i]) for i in keep],
                                 hidden.index_select(0, idx))


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


def model_hidden_size(vllm_config: Any) -> int:
    return int(vllm_config.model_config.get_hidden_size())


def max_num_seqs(vllm_config: Any) -> int:
    return int(vllm_config.scheduler_config.max_num_seqs)


try:  # the validator class needs vLLM's base class; keep the module importable for static checks
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover
    _LogitsProcessorBase = object  # type: ignore[assignment,misc]


def vfd_unsupported_reason(sampling_params: Any) -> str | None:
    """Why a request cannot be value-filtered (None if it can). One home for the validator and the runner."""
    if getattr(sampling_params, "structured_outputs", None) is not None:
        return "structured outputs"
    lp = getattr(sampling_params, "logprobs", None)
    if lp is not None and lp < 0:
        return "logprobs=-1 (full vocabulary)"
    if getattr(sampling_params, "logprob_token_ids", None):
        return "logprob_token_ids"
    return None


class RequestArgsValidator(_LogitsProcessorBase):  # type: ignore[misc,valid-type]
    """Validates value_steer's ``extra_args`` in the API process, so a bad value is an HTTP 400.

    vLLM runs ``validate_params`` for every ``--logits-processors`` class when a request arrives. The
    server config is read from ``VALUE_STEER_CONFIG`` (set by ``value_steer.vllm_cli`` from
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
_TYPE_CHECK_ONLY = SteerConfig(mode=MODE_VFD, value_head_path=None, num_candidates=64)


def _api_config() -> SteerConfig | None:
    global _API_CONFIG
    raw = os.environ.get("VALUE_STEER_CONFIG")
    if not raw:
        return None
    if _API_CONFIG is None or _API_CONFIG[0] != raw:
        import json

        _API_CONFIG = (raw, parse_additional_config(json.loads(raw), check_files=False))
    return _API_CONFIG[1]


def runner_mixins(config: SteerConfig) -> tuple[type, ...]:
    """Extra runner mixins a config needs in front of :class:`SteeringRunnerMixin` (VFD adds its own)."""
    if config.mode == MODE_VFD:
        from value_steer.patches.vllm_0_32_vfd import VFDRunnerMixin

        return (VFDRunnerMixin,)
    return ()
