"""Every vLLM 0.32 internal the adapter binds to, and the static check ``value-steer-compat`` runs."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

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
    # API process (http.py): --middleware functions, worker RPC from the engine client.
    ("vllm.entrypoints.serve.middleware.register", "init_entrypoints_middleware", ("args", "app")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", ("self", "method", "timeout", "args")),
]



def _resolve(module: str, qualname: str) -> Any:
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


