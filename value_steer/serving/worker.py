"""``--worker-cls value_steer.worker.ValueSteerWorker``: vLLM's platform worker with the steering runner.

The worker validates ``--additional-config`` in its constructor (a bad config stops the engine at
start-up with the field named) and refuses the engine settings the runner cannot honour (the start-up
hook of :mod:`value_steer.serving.plugin` has refused them already in the API process; this covers an
engine built without it), builds the platform's V1 model runner with the steering mixins in front of it
(``value_steer.patches``), and attaches the steering state once the model's hidden size is known.
Everything version-specific goes through the adapter for the installed vLLM.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from value_steer.core.checkpoint import other_model
from value_steer.core.config import SteerConfig, parse_additional_config
from value_steer.core.modes import MODE_OFF
from value_steer.patches import get_adapter
from value_steer.runtime.activation import BankFullError, ReadOnlyVectorError, VectorBankError
from value_steer.runtime.capture import CaptureWriter
from value_steer.runtime.state import SteeringState

logger = logging.getLogger("value_steer")

_adapter = get_adapter()
_WorkerBase: Any = _adapter.worker_base()


class ValueSteerWorker(_WorkerBase):  # type: ignore[misc,valid-type]
    """The platform worker (``CPUWorker`` / CUDA ``Worker``) running the steering model runner."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        self.value_steer_config: SteerConfig = parse_additional_config(vllm_config.additional_config)
        # In-process engines (offline LLM, VLLM_ENABLE_V1_MULTIPROCESSING=0) share this process with the
        # request validator: give it the server config (the start-up hook does the same for the API process).
        os.environ.update(_adapter.publish_config(vllm_config.additional_config))
        _adapter.check_engine_config(vllm_config, self.value_steer_config)
        if not _adapter.has_request_validator(vllm_config):
            logger.warning("value_steer: the engine was built without value_steer's vLLM plugin (is it excluded by "
                           "VLLM_PLUGINS?): requests are not validated before they reach the worker, which ends "
                           "a request with invalid steering arguments at once with no text")
        super().__init__(vllm_config, *args, **kwargs)

    def init_device(self) -> None:
        _adapter.init_device_with_runner(self, super().init_device, _adapter.runner_mixins(self.value_steer_config))
        cfg = self.value_steer_config
        runner = self.model_runner
        device = torch.device(runner.device) if hasattr(runner, "device") else torch.device("cpu")
        state = SteeringState(
            cfg,
            hidden_size=_adapter.model_hidden_size(self.vllm_config),
            max_num_seqs=_adapter.max_num_seqs(self.vllm_config),
            device=device,
            max_batch_slots=_adapter.batch_capacity(runner),
            num_layers=_adapter.num_decoder_layers(self.vllm_config),
            max_tokens=_adapter.max_forward_tokens(runner),
            vocab_size=_adapter.model_vocab_size(self.vllm_config),
        )
        runner._vs_state = state
        if state.checkpoint is not None:
            name, config_sha = _adapter.served_model_identity(self.vllm_config)
            reason = other_model(state.checkpoint.meta, name, config_sha)
            if reason is not None:
                logger.warning("value_steer: %s.value_head_path %s may not suit this model: %s", cfg.section,
                               cfg.value_head_path, reason)
        if cfg.capture is not None:
            runner._vs_capture = CaptureWriter(cfg.capture.dir)
        mode = {MODE_OFF: "off"}.get(cfg.mode, cfg.section)
        logger.info(
            "value_steer: %s on %s (threshold %.4g, K=%d, direction=%s, default=%s, capture=%s)",
            mode, type(runner).__name__, state.default_threshold, cfg.num_candidates, cfg.direction,
            "on" if cfg.enabled_by_default else "off", cfg.capture.dir if cfg.capture else "off",
        )

    def determine_available_memory(self) -> int:
        return _adapter.kv_budget_for_scheduler(self, super().determine_available_memory())

    def compile_or_warm_up_model(self) -> Any:
        out = super().compile_or_warm_up_model()
        state: SteeringState = self.model_runner._vs_state
        steering = self.value_steer_config.steering
        if state.activation is not None and steering is not None:
            # After warm-up: the KV cache exists, and the measurement's eager forward leaves compiled graphs alone.
            # Measured with the dose guard off too: the registry reports it (what a dose is relative to).
            state.residual_norms = _adapter.measure_residual_norms(self.model_runner)
            guard = ("off" if steering.max_relative_dose is None else f"{steering.max_relative_dose:g} of it")
            logger.info("value_steer: typical residual norm per layer (steering.max_relative_dose: %s): %s",
                        guard, ", ".join(f"{x:.3g}" for x in state.residual_norms))
        return out

    # ---- RPC surface (collective_rpc from the API process / offline LLM) ------------------------------
    def value_steer_stats(self, request_id: str | None = None) -> dict[str, Any]:
        """Per-request stats (``request_id``) or the process-wide counters."""
        state: SteeringState = self.model_runner._vs_state
        if request_id is not None:
            return {"request_id": request_id, "stats": state.stats_for(request_id, _adapter.request_id_matches)}
        return {"counters": state.counters_dict()}

    def value_steer_vectors(self, action: str, name: str | None = None, data: Any = None) -> dict[str, Any]:
        """The steering-vector registry (``POST/GET/DELETE /v1/steering/vectors``; offline through
        ``LLM.collective_rpc``).

        Args:
            action: ``"list"``, ``"register"`` (``name``, ``data``: ``[H]`` or ``[num_layers][H]`` floats),
                ``"delete"`` (``name``) or ``"hashes"`` (name -> content hash, for the frontend's cache salts).
        Returns:
            The answer, or ``{"error": message, "status": 400 | 403 | 404 | 409}`` (unknown name on delete:
            404; bank full: 409; a preloaded (read-only) name: 403; bad input or no ``steering`` section: 400).
            A delete while running requests use the vector succeeds: they keep it, and its slot is freed when they
            finish.
        """
        state: SteeringState = self.model_runner._vs_state
        act = state.activation
        if act is None:
            return {"error": "steering: this server has no 'steering' section in --additional-config", "status": 400}
        bank = act.bank
        try:
            if action == "list":
                return {"vectors": bank.list(), "usage": bank.usage()}
            if action == "hashes":
                listed = bank.list()
                norms = state.residual_norms
                return {"hashes": {v["name"]: v["hash"] for v in listed},
                        "norms": {v["name"]: v["norms"] for v in listed}, "hidden_size": bank.hidden_size,
                        "num_layers": bank.num_layers,
                        "residual_norms": None if norms is None else list(norms)}
            if action == "register":
                info = bank.register(name, data)  # type: ignore[arg-type]
                entry = next(v for v in bank.list() if v["name"] == info.name)
                logger.info("value_steer: registered steering vector %r (%s, shape %s)", info.name,
                            info.content_hash[:12], list(info.shape))
                return {"vector": entry}
            if action == "delete":
                if name is None or bank.lookup(name) is None:
                    return {"error": f"name: unknown steering vector {name!r}", "status": 404}
                held = bank.delete(name)
                # held > 0: running requests keep the vector; its slot is freed when they finish.
                return {"deleted": name, "held_by_running_requests": held}
        except BankFullError as exc:
            return {"error": str(exc), "status": 409}
        except ReadOnlyVectorError as exc:
            return {"error": str(exc), "status": 403}
        except VectorBankError as exc:
            return {"error": str(exc), "status": 400}
        return {"error": f"action must be one of 'list', 'register', 'delete', 'hashes', got {action!r}",
                "status": 400}

    def value_steer_flush_capture(self) -> int:
        """Flush buffered capture rows to disk; returns the number of shards written so far."""
        runner = self.model_runner
        layers = runner.vs_flush_layer_capture()
        cap = runner._vs_capture
        if cap is None:
            return layers
        cap.flush()
        return cap.num_shards + layers
