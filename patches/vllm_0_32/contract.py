"""Every vLLM 0.32 internal the adapter binds to, and the static check ``value-steer-compat`` runs.

``CONTRACT`` is the adapter's complete list of vLLM names: every ``from vllm... import``, every runner
method a mixin overrides or calls through ``super()``, every keyword read out of ``**kwargs``, every
runner buffer, sampler internal and config field it reads. ``tests/patches/test_compat.py`` parses the
adapter's modules and fails on a name used there but missing here, so a new binding cannot slip in
unlisted; ``check_contract()`` then tells whether the installed vLLM still has each one.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from typing import Any

VLLM_VERSIONS = ("0.32.",)
SUPPORTED_RUNNERS = ("GPUModelRunner", "CPUModelRunner")

_RUNNER = "vllm.v1.worker.gpu_model_runner"
_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"
_KV = "vllm.v1.kv_cache_interface"
_SAMPLER = "vllm.v1.sample.sampler"
_TOPK_TOPP = "vllm.v1.sample.ops.topk_topp_sampler"
_LOGITSPROCS = "vllm.v1.sample.logits_processor"

# (module, qualified name, required parameters or attributes). Checked by `value-steer-compat`.
# For a function or method the names are parameters it must accept (for a method the adapter overrides,
# the keywords it reads out of **kwargs too). For a class they are attributes: fields, class attributes,
# properties, methods, or instance attributes its vLLM source assigns (`self.x = ...`).
CONTRACT: list[tuple[str, str, tuple[str, ...]]] = [
    # ---- worker (worker.py; serving/worker.py subclasses the platform worker) ----------------------------
    ("vllm.platforms", "current_platform", ("is_cpu",)),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", ("self",)),
    ("vllm.v1.worker.cpu_worker", "CPUModelRunner", ()),
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner", ("self",)),
    ("vllm.v1.worker.gpu_worker", "Worker", ("model_runner", "vllm_config", "device")),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",)),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    ("vllm.config", "VllmConfig", ("additional_config", "model_config", "scheduler_config", "parallel_config",
                                   "speculative_config", "compilation_config", "use_v2_model_runner")),
    ("vllm.config", "ModelConfig.get_hidden_size", ("self",)),
    ("vllm.config", "ModelConfig.get_vocab_size", ("self",)),
    ("vllm.config", "ModelConfig", ("seed", "logits_processors", "model", "max_model_len")),
    ("vllm.config", "SchedulerConfig", ("max_num_seqs", "max_num_batched_tokens", "async_scheduling")),
    ("vllm.config", "ParallelConfig", ("pipeline_parallel_size",)),
    ("vllm.config", "CompilationConfig", ("cudagraph_mode", "cudagraph_capture_sizes")),
    ("vllm.config", "CUDAGraphMode", ("NONE", "PIECEWISE", "has_full_cudagraphs")),
    # ---- engine start-up (worker.py: the engine-config hook adjusts EngineArgs before vLLM builds the config)
    ("vllm.engine.arg_utils", "EngineArgs", ("worker_cls", "additional_config", "speculative_config",
                                             "pipeline_parallel_size", "async_scheduling", "compilation_config",
                                             "enforce_eager", "logits_processors", "disable_hybrid_kv_cache_manager")),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self",)),
    # The runner choice is read from this variable (config/vllm.py use_v2_model_runner); the adapter sets it.
    ("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", ()),
    # ---- runner methods the mixins override or call through super() (runner.py, vfd_runner.py) ---------
    (_RUNNER, "GPUModelRunner.__init__", ("self", "vllm_config", "device")),
    (_CPU_RUNNER, "CPUModelRunner.__init__", ("self", "vllm_config", "device")),
    (_RUNNER, "GPUModelRunner.execute_model", ("self", "scheduler_output", "intermediate_tensors")),
    (_RUNNER, "GPUModelRunner.sample_tokens", ("self", "grammar_output")),
    (_RUNNER, "GPUModelRunner._sample", ("self", "logits", "spec_decode_metadata")),
    (_RUNNER, "GPUModelRunner._update_states", ("self", "scheduler_output")),
    (_RUNNER, "GPUModelRunner._prepare_inputs", ("self", "scheduler_output", "num_scheduled_tokens")),
    (_RUNNER, "GPUModelRunner._determine_batch_execution_and_padding", ("self", "num_tokens")),
    (_RUNNER, "GPUModelRunner._get_slot_mappings", ("self", "num_tokens_padded", "num_tokens_unpadded")),
    (_RUNNER, "GPUModelRunner._build_attention_metadata", ("self", "num_tokens", "num_reqs", "max_query_len",
                                                           "num_tokens_padded", "num_reqs_padded")),
    (_RUNNER, "GPUModelRunner._prepare_padding_mask", ("self", "num_tokens_unpadded", "num_tokens_padded")),
    (_RUNNER, "GPUModelRunner._preprocess", ("self", "scheduler_output", "num_input_tokens")),
    (_RUNNER, "GPUModelRunner.initialize_kv_cache", ("self", "kv_cache_config", "is_profiling",
                                                     "kv_cache_allocation_context")),
    (_CPU_RUNNER, "CPUModelRunner.initialize_kv_cache", ("self", "kv_cache_config", "is_profiling",
                                                         "kv_cache_allocation_context")),
    (_RUNNER, "GPUModelRunner.get_kv_cache_spec", ("self",)),
    (_RUNNER, "GPUModelRunner._model_forward", ("self", "input_ids", "positions", "intermediate_tensors",
                                                "inputs_embeds")),
    (_RUNNER, "GPUModelRunner._init_model_kwargs", ("self",)),
    # Activation steering wraps the decoder layers once the model is loaded (runner.py load_model).
    (_RUNNER, "GPUModelRunner.load_model", ("self",)),
    (_CPU_RUNNER, "CPUModelRunner.load_model", ("self",)),
    (_RUNNER, "GPUModelRunner.get_model", ("self",)),
    (_CPU_RUNNER, "CPUModelRunner.get_model", ("self",)),
    # The start-up residual-norm measurement (activation.measure_residual_norms): one eager dummy prefill.
    (_RUNNER, "GPUModelRunner._dummy_run", ("self", "num_tokens", "cudagraph_runtime_mode", "force_attention")),
    # ---- runner state the mixins read or write -----------------------------------------------------------
    (_RUNNER, "GPUModelRunner", ("device", "vllm_config", "requests", "input_batch", "sampler", "model",
                                 "kv_caches", "kv_cache_config", "attn_groups", "execute_model_state",
                                 "uses_mrope", "enable_prompt_embeds", "input_ids", "positions", "seq_lens",
                                 "query_start_loc", "optimistic_seq_lens_cpu", "discard_request_mask",
                                 "scheduler_config", "model_config", "max_num_tokens")),
    (_RUNNER, "ExecuteModelState", ("sample_hidden_states", "hidden_states", "logits")),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.__init__", ("self",)),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch", ("req_ids", "num_reqs", "max_num_reqs",
                                                      "num_computed_tokens_cpu", "num_prompt_tokens",
                                                      "num_tokens_no_spec", "token_ids_cpu", "block_table",
                                                      "sampling_metadata", "req_output_token_ids",
                                                      "temperature_cpu")),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState", ("sampling_params", "output_token_ids")),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable.__getitem__", ("self", "idx")),
    ("vllm.v1.worker.block_table", "BlockTable", ("block_size", "block_table", "slot_mapping",
                                                  "num_blocks_per_row")),
    ("vllm.v1.utils", "CpuGpuBuffer", ("np", "cpu", "gpu")),
    ("vllm.v1.utils", "CpuGpuBuffer.copy_to_gpu", ("self", "n")),
    ("vllm.model_executor.models.interfaces_base", "VllmModelForTextGeneration.compute_logits",
     ("self", "hidden_states")),
    # ---- scheduler output and requests -------------------------------------------------------------------
    ("vllm.v1.core.sched.output", "SchedulerOutput", ("finished_req_ids", "scheduled_new_reqs",
                                                       "scheduled_cached_reqs", "num_scheduled_tokens",
                                                       "total_num_scheduled_tokens")),
    ("vllm.v1.core.sched.output", "NewRequestData", ("req_id", "sampling_params")),
    ("vllm.v1.core.sched.output", "CachedRequestData", ("resumed_req_ids",)),
    ("vllm.sampling_params", "SamplingParams", ("extra_args", "ignore_eos", "min_tokens", "eos_token_id", "seed",
                                                "logprobs")),
    # ---- sampler internals (the abstention step's logprobs; VFD's processed distributions and draws) ----
    (_SAMPLER, "Sampler", ("logprobs_mode", "topk_topp_sampler")),
    (_SAMPLER, "Sampler.apply_logits_processors", ("self", "logits", "sampling_metadata", "predict_bonus_token")),
    (_SAMPLER, "Sampler.apply_penalties", ("logits", "sampling_metadata", "output_token_ids")),
    (_SAMPLER, "Sampler.apply_temperature", ("logits", "temp", "all_random")),
    (_SAMPLER, "SamplerOutput", ("sampled_token_ids", "logprobs_tensors")),
    ("vllm.v1.outputs", "LogprobsTensors", ("logprob_token_ids", "logprobs", "selected_token_ranks")),
    # The sampler calls whichever forward_* its platform selected: each must take (logits, generators, k, p).
    (_TOPK_TOPP, "TopKTopPSampler.forward_native", ("self", "logits", "generators", "k", "p")),
    (_TOPK_TOPP, "TopKTopPSampler.forward_cpu", ("self", "logits", "generators", "k", "p")),
    (_TOPK_TOPP, "TopKTopPSampler.forward_cuda", ("self", "logits", "generators", "k", "p")),
    (_TOPK_TOPP, "apply_top_k_top_p", ("logits", "k", "p")),
    ("vllm.v1.sample.ops.bad_words", "apply_bad_words", ("logits", "bad_words_token_ids", "past_tokens_ids")),
    ("vllm.v1.sample.metadata", "SamplingMetadata", ("temperature", "all_greedy", "all_random", "top_p", "top_k",
                                                     "generators", "max_num_logprobs", "output_token_ids",
                                                     "allowed_token_ids_mask", "bad_words_token_ids",
                                                     "logitsprocs", "thinking_budget_state_holder")),
    ("vllm.v1.sample.logits_processor.state", "LogitsProcessors", ("argmax_invariant", "non_argmax_invariant")),
    ("vllm.v1.sample.thinking_budget_state", "ThinkingBudgetStateHolder.has_tracked_requests", ("self",)),
    (f"{_LOGITSPROCS}.builtin", "MinTokensLogitsProcessor.update_state", ("self", "batch_update")),
    # ---- the first-token forward's attention plumbing (vfd_runner.py) ------------------------------------
    ("vllm.forward_context", "set_forward_context", ("attn_metadata", "vllm_config", "num_tokens",
                                                     "cudagraph_runtime_mode", "batch_descriptor", "slot_mapping",
                                                     "is_padding")),
    ("vllm.forward_context", "BatchDescriptor", ("num_tokens",)),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata", ("query_start_loc", "query_start_loc_cpu", "seq_lens",
                                                              "num_reqs", "num_actual_tokens", "max_query_len",
                                                              "max_seq_len", "block_table_tensor", "slot_mapping",
                                                              "causal", "positions", "is_prefilling",
                                                              "seq_lens_cpu_upper_bound")),
    ("vllm.v1.worker.utils", "AttentionGroup", ("layer_names", "kernel_block_size", "get_metadata_builder")),
    ("vllm.v1.worker.utils", "AttentionGroup.build_metadata", ("self", "common_attn_metadata")),
    # kv_layout.kv_views_cpu picks the K/V interior by the CPU backend's ISA (read with a "vec" default).
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", ("isa",)),
    # ---- KV cache (VFD's scratch blocks resize the runner's private config copy) ------------------------
    (_KV, "AttentionSpec", ("page_size_bytes",)),
    (_KV, "FullAttentionSpec", ("sliding_window",)),
    (_KV, "KVCacheConfig", ("num_blocks", "kv_cache_tensors", "kv_cache_groups")),
    (_KV, "KVCacheGroupSpec", ("layer_names", "kv_cache_spec")),
    (_KV, "KVCacheTensor", ("size", "layers", "layer_stride", "block_stride", "offset")),
    # ---- API process (api.py: the request validator is a logits processor; http.py: middleware, RPC) ----
    (f"{_LOGITSPROCS}.interface", "LogitsProcessor.validate_params", ("sampling_params",)),
    (f"{_LOGITSPROCS}.interface", "LogitsProcessor.__init__", ("self", "vllm_config", "device", "is_pin_memory")),
    (f"{_LOGITSPROCS}.interface", "LogitsProcessor.apply", ("self", "logits")),
    (f"{_LOGITSPROCS}.interface", "LogitsProcessor.is_argmax_invariant", ("self",)),
    (f"{_LOGITSPROCS}.interface", "LogitsProcessor.update_state", ("self", "batch_update")),
    ("vllm.entrypoints.serve.middleware.register", "init_entrypoints_middleware", ("args", "app")),
    # http.py wraps the app builder's reference to it (module global), to add the stats routes.
    ("vllm.entrypoints.launchers.app", "init_entrypoints_middleware", ("args", "app")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", ("self", "method", "timeout", "args", "kwargs")),
    # Data parallel: every engine's answer (frontend.rpc_each_engine), through the engine-core client AsyncLLM holds.
    ("vllm.v1.engine.async_llm", "AsyncLLM", ("engine_core",)),
    ("vllm.v1.engine.core_client", "AsyncMPClient.call_utility_all_async", ("self", "method")),
    ("vllm.v1.engine.core_client", "MPClient", ("core_engines",)),
    # ---- activation steering in the frontend process (frontend.py, http.py) ------------------------------
    # The salt and fingerprint go on the request process_inputs returns: it carries process_inputs' own clone
    # of the caller's SamplingParams, and EngineCoreRequest is a mutable msgspec struct. InputProcessor binds
    # process_inputs_async to self.process_inputs in __init__, so the class attribute is wrapped before the
    # engine is built (the start-up hook).
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("self", "request_id", "prompt",
                                                                         "params")),
    ("vllm.v1.engine.input_processor", "InputProcessor", ("vllm_config", "process_inputs_async")),
    ("vllm.v1.engine", "EngineCoreRequest", ("sampling_params", "cache_salt")),
    ("vllm.exceptions", "VLLMValidationError", ()),  # what a refused salt becomes (HTTP 400)
    ("vllm.exceptions", "GracefulHTTPError.__init__", ("self", "message", "http_status")),  # a worker refusal: 409
    # The vector-name mirror follows value_steer_vectors answers, offline (LLM.collective_rpc) and served.
    ("vllm.v1.engine.llm_engine", "LLMEngine.collective_rpc", ("self", "method", "timeout", "args", "kwargs")),
    # Offline engines learn the names and residual norms at init; a served refusal becomes a 409 (frontend.py).
    ("vllm.v1.engine.llm_engine", "LLMEngine.__init__", ("self", "vllm_config")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.generate", ("self", "prompt", "sampling_params", "request_id")),
    ("vllm.v1.engine.async_llm", "AsyncLLM", ("vllm_config",)),
    ("vllm.outputs", "RequestOutput", ("request_id", "outputs", "finished")),
    ("vllm.outputs", "CompletionOutput", ("token_ids", "finish_reason")),
    ("vllm.config", "ModelConfig.get_num_layers", ("self", "parallel_config")),
    # A top-level "steering" in these routes' bodies moves into vllm_xargs (http.STEERING_ROUTES): their
    # request models ignore unknown fields and pass vllm_xargs on as SamplingParams.extra_args (the batch
    # chat route forwards its extra fields to each ChatCompletionRequest).
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", ("vllm_xargs", "cache_salt")),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", ("vllm_xargs", "cache_salt")),
    ("vllm.entrypoints.openai.chat_completion.protocol", "BatchChatCompletionRequest",
     ("to_chat_completion_request",)),
    ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest", ("vllm_xargs",)),
    ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest", ("vllm_xargs",)),
    # ---- start-up (worker.py: the general plugin's hook on the engine config, before and after it is built) --
    ("vllm.plugins", "DEFAULT_PLUGINS_GROUP", ()),  # "vllm.general_plugins": our pyproject entry point's group
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self",)),
    ("vllm.engine.arg_utils", "EngineArgs", ("worker_cls", "additional_config", "speculative_config",
                                             "pipeline_parallel_size", "async_scheduling", "compilation_config",
                                             "enforce_eager", "logits_processors", "disable_hybrid_kv_cache_manager")),
    ("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", ()),
    ("vllm.envs", "disable_envs_cache", ()),
    ("vllm.platforms", "current_platform", ("is_cuda_alike",)),
    ("vllm.config", "VllmConfig", ("compilation_config",)),
    ("vllm.config", "ModelConfig", ("logits_processors",)),
    ("vllm.config", "CompilationConfig", ("cudagraph_mode", "cudagraph_capture_sizes")),
    ("vllm.config", "CUDAGraphMode", ("PIECEWISE", "has_full_cudagraphs")),
    # ---- refused requests (api.py: the worker's copy of their sampling params samples only the end token,
    # which vLLM's check_stop honours before min_tokens) ----------------------------------------------------
    ("vllm.sampling_params", "SamplingParams", ("allowed_token_ids", "stop_token_ids", "all_stop_token_ids",
                                                "logit_bias", "clone", "structured_outputs", "logprob_token_ids")),
    ("vllm.v1.core.sched.utils", "check_stop", ("request", "max_model_len")),
]


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@functools.cache
def _assigned_self_attributes(cls: type) -> frozenset[str]:
    """Names vLLM's own source assigns as ``self.<name>`` in ``cls`` or its vLLM bases.

    Instance attributes (runner buffers, sampler state) exist only once an object is built, which the
    static check cannot do; reading the assignments from the source is the static equivalent.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            while targets:
                t = targets.pop()
                if isinstance(t, (ast.Tuple, ast.List)):
                    targets.extend(t.elts)
                elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return frozenset(names)


def _attributes(obj: Any) -> set[str]:
    """What ``obj`` (a class or an instance such as ``current_platform``) is known to carry."""
    # Probe the class, not an instance: vLLM's platform object answers unknown attributes with None.
    cls = obj if isinstance(obj, type) else type(obj)
    fields = set(getattr(cls, "__dataclass_fields__", {})) | set(getattr(cls, "_fields", ()))
    fields |= set(getattr(cls, "__struct_fields__", ())) | set(dir(obj))
    for klass in cls.__mro__:  # vars(): Enum classes hide their methods from dir()
        fields |= set(vars(klass)) | set(inspect.get_annotations(klass))
    return fields


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
            fields = _attributes(obj)
            missing = [n for n in needs if n not in fields]
            if missing:
                assigned = _assigned_self_attributes(obj if isinstance(obj, type) else type(obj))
                missing = [n for n in missing if n not in assigned]
        if missing:
            problems.append(f"{module}.{qualname}: expected {list(needs)}, missing {missing}")
    return problems
