"""The vLLM 0.32 adapter (V1 model runner: ``GPUModelRunner`` and its ``CPUModelRunner`` subclass).

Everything value_steer needs from vLLM's internals is in this package and listed in ``CONTRACT``:

- ``worker``: the start-up hook on ``EngineArgs.create_engine_config`` (installed by value_steer's
  ``vllm.general_plugins`` entry point: V1 runner, VFD's scheduling and CUDA-graph defaults, the request
  validator, the stats routes) and the start-up refusals; the platform worker base; the runner is built by
  ``CPUWorker.init_device`` from the module global ``cpu_worker.CPUModelRunner`` (GPU:
  ``Worker._make_model_runner``), and we substitute a subclass for the duration of ``init_device``; the KV
  budget;
- ``runner``: ``SteeringRunnerMixin`` (abstention, capture). The step is ``execute_model(scheduler_output)``
  -> ``ExecuteModelState`` -> ``sample_tokens`` -> ``_sample(logits, spec_decode_metadata) ->
  SamplerOutput``; tokens substituted in ``_sample`` flow through the runner's own bookkeeping
  (``_bookkeeping_sync``) to the scheduler unchanged;
- ``vfd_runner``: ``VFDRunnerMixin`` (value-filtered decoding);
- ``kv_layout``: the KV-cache layouts as logical views;
- ``api`` / ``http``: the request policy (validator in the API process, refusal in the worker) and the
  API server's stats routes and ``/metrics``;
- ``contract``: the static contract ``value-steer-compat`` checks.

Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``) is deselected at start-up
(``VLLM_USE_V2_MODEL_RUNNER=0``) and refused where it is selected anyway.
"""

from __future__ import annotations

from value_steer.patches.vllm_0_32.activation import max_forward_tokens, measure_residual_norms, num_decoder_layers
from value_steer.patches.vllm_0_32.api import CONFIG_ENV, RequestArgsValidator, publish_config
from value_steer.patches.vllm_0_32.contract import CONTRACT, SUPPORTED_RUNNERS, VLLM_VERSIONS, check_contract
from value_steer.patches.vllm_0_32.runner import client_request_id, request_id_matches
from value_steer.patches.vllm_0_32.worker import (
    REQUEST_VALIDATOR,
    StartupError,
    batch_capacity,
    check_engine_config,
    has_request_validator,
    init_device_with_runner,
    install_startup_hook,
    kv_budget_for_scheduler,
    max_num_seqs,
    model_hidden_size,
    model_vocab_size,
    prepare_engine_args,
    runner_class,
    runner_mixins,
    served_model_identity,
    worker_base,
)

__all__ = [
    "CONFIG_ENV",
    "CONTRACT",
    "REQUEST_VALIDATOR",
    "SUPPORTED_RUNNERS",
    "VLLM_VERSIONS",
    "RequestArgsValidator",
    "StartupError",
    "batch_capacity",
    "check_contract",
    "check_engine_config",
    "client_request_id",
    "has_request_validator",
    "init_device_with_runner",
    "install_startup_hook",
    "kv_budget_for_scheduler",
    "max_forward_tokens",
    "max_num_seqs",
    "measure_residual_norms",
    "model_hidden_size",
    "model_vocab_size",
    "num_decoder_layers",
    "prepare_engine_args",
    "publish_config",
    "request_id_matches",
    "runner_class",
    "runner_mixins",
    "served_model_identity",
    "worker_base",
]
