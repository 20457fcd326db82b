"""``SteeringRunnerMixin``: abstention, logit steering and capture in front of vLLM 0.32's V1 model runner.

The hooks: ``execute_model`` (request lifecycle from the scheduler output), ``_update_states`` (after
vLLM's batch update: the batch-slot tables when the batch composition changed, then the staged table
writes; all lifecycle work, none per steady step) and ``_sample`` (logit steering of the step's logits,
vLLM's sampler, then the abstention step over the sampled tokens, capture).
The per-step rows come from vLLM's numpy batch arrays, vectorised; the one host->device copy per step
is the row index (``SteeringState.upload_step_rows``).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np
import torch

from value_steer.core.config import RequestArgError, parse_request_args, vfd_unsupported_reason
from value_steer.core.modes import MODE_ABSTAIN, MODE_VFD
from value_steer.patches.vllm_0_32.activation import wrap_decoder_layers
from value_steer.patches.vllm_0_32.api import refused_sampling_params
from value_steer.patches.vllm_0_32.frontend import FINGERPRINT_KEY, PINS_KEY

logger = logging.getLogger("value_steer")


def client_request_id(internal_id: str) -> str:
    """The client's request id of a vLLM 0.32 internal id (vLLM appends ``-<hex>`` to client ids)."""
    return internal_id.rsplit("-", 1)[0]


# vLLM 0.32's request ids: the API server's id (``cmpl-<hex>`` / ``chatcmpl-<hex>``, or the client's
# X-Request-Id), ``-<prompt index>`` per prompt of a completion, ``<choice>_`` per choice when n > 1
# (``ParentRequest``), then ``-<8 random characters>`` (``InputProcessor.assign_request_id``).
_RANDOM_SUFFIX = re.compile(r"-[0-9A-Za-z]{8}$")
_CHOICE_PREFIX = re.compile(r"^(\d+)_(.+)$")
_PROMPT_INDEX = re.compile(r"^(.+)-(\d+)$")


def request_id_matches(internal_id: str, client_id: str) -> tuple[int, int] | None:
    """Whether vLLM's ``internal_id`` belongs to the client's ``client_id``; its ``(prompt index, choice index)``
    when it does (the order of the response's choices), else None.

    Exact ids only: the internal id itself, the id vLLM was given (without its random suffix), or the response's
    ``id`` once vLLM's per-prompt and per-choice decorations are taken off; never a prefix (``cmpl`` is no
    request's id).
    """
    if internal_id == client_id:
        return (0, 0)
    external = _RANDOM_SUFFIX.sub("", internal_id)
    choice = _CHOICE_PREFIX.match(external)
    parent, c = (choice.group(2), int(choice.group(1))) if choice else (external, 0)
    if client_id in (external, parent):
        return (0, c)
    prompt = _PROMPT_INDEX.match(parent)
    if prompt is not None and prompt.group(1) == client_id:
        return (int(prompt.group(2)), c)
    return None


class SteeringRunnerMixin:
    """Mixed in front of the platform's V1 runner. The steering state is attached as ``_vs_state``."""

    _vs_state: Any = None
    _vs_capture: Any = None
    _vs_step: dict[str, Any] | None = None
    # Batch rows whose capture a runner mixin writes itself this step (VFD: the winner, not the row).
    _vs_capture_elsewhere: np.ndarray | None = None
    _vs_prompt_capture: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    _vs_warned_logprobs_mode = False
    _vs_act_staged = False  # this step's per-token steering rows are staged, not yet published
    # This step's logits are logit-steered already: a mixin in front (VFD) steers them itself, at its own points.
    _vs_logits_steered = False

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _vs_sync_requests(self, scheduler_output: Any) -> None:
        """Register new requests and release finished ones, before vLLM's own batch update.

        Fail closed: a request whose steering arguments are invalid (the API-side validator absent) or that
        VFD cannot filter (checked here too, so a VFD row never holds one) is never decoded unsteered. It is
        registered as refused (stats ``error``, ``requests_refused``) and its worker-side sampling params are
        replaced so that its first sampled token is its end token: it ends at once with no text.
        """
        st = self._vs_state
        for req_id in scheduler_output.finished_req_ids:
            st.finish_request(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            if sp is None:  # pooling request
                continue
            known = st.requests.get(new.req_id)
            if known is None:
                try:
                    reason = vfd_unsupported_reason(sp) if st.config.mode == MODE_VFD else None
                    if reason is not None and parse_request_args(
                            sp.extra_args, st.config, st.default_threshold).mode == MODE_VFD:
                        error = (f"vfd cannot steer a request with {reason}; send value_steer=false to serve "
                                 "it unsteered")
                    else:
                        args = sp.extra_args or {}
                        salted = args.get(FINGERPRINT_KEY)
                        if args.get("steering") is not None and salted is None:
                            # The frontend salts every steering request's prefix cache; one that was not
                            # salted could share KV blocks with unsteered requests.
                            raise RequestArgError("steering: the request reached the engine without its "
                                                  "prefix-cache salt (is value_steer's vLLM plugin loaded in "
                                                  "the frontend process? check VLLM_PLUGINS)")
                        st.add_request(new.req_id, sp.extra_args, sp.eos_token_id, sp.ignore_eos, sp.min_tokens,
                                       sp.logprobs is not None, expected_fingerprint=salted,
                                       pins=args.get(PINS_KEY))
                        continue
                except RequestArgError as exc:
                    error = str(exc)
                # Reaching here means the request skipped RequestArgsValidator (HTTP 400 in the API process).
                logger.error("value_steer: request %s refused, ending it with no text: %s", new.req_id, error)
                st.add_refused(new.req_id, f"value_steer refused the request: {error}")
            elif known.info.error is None:
                continue  # re-sent (streaming input) and accepted before
            # A refused request, new or re-sent by the scheduler: the worker's copy may sample only its end token.
            ended = refused_sampling_params(sp)
            if ended is None:
                raise RuntimeError(f"value_steer: request {new.req_id} was refused but has no EOS or stop token "
                                   "to end it with; refusing to decode it unsteered")
            new.sampling_params = ended

    def _vs_begin_step(self) -> None:
        """After vLLM's batch update (``_update_states``): refresh the slot tables if the batch composition
        changed, and flush the staged table writes (both no-ops on a steady step)."""
        ib = self.input_batch  # type: ignore[attr-defined]
        st = self._vs_state
        st.update_batch(ib.req_ids[: ib.num_reqs])
        st.flush()

    # ---- activation steering (patches/vllm_0_32/activation.py) ------------------------------------------
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        st = self._vs_state
        if st is not None and st.activation is not None:
            # Before the first forward: vLLM compiles the model (and captures graphs) on its warm-up runs.
            wrapped = wrap_decoder_layers(self.get_model(), st.activation)  # type: ignore[attr-defined]
            logger.info("value_steer: activation steering on %d decoder layers", wrapped)

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        st = self._vs_state
        self._vs_act_staged = st is not None and st.activation is not None and st.activation.active
        if self._vs_act_staged:
            # Spans from the scheduled token counts of the batch as updated (vLLM's own token order), never
            # from prompt lengths (peers' chunked-prefill bug). VFD appends its candidates' tokens after this.
            ib = self.input_batch  # type: ignore[attr-defined]
            n = ib.num_reqs
            st.activation.stage_tokens(st.slot_act_row[:n], num_scheduled_tokens[:n],
                                       ib.num_computed_tokens_cpu[:n], ib.num_prompt_tokens[:n])
        self._vs_prompt_capture = None
        if st is not None and self._vs_capture is not None and st.any_prompt_capture:
            self._vs_prompt_capture = self._vs_prompt_capture_tokens(num_scheduled_tokens)
        return out

    def _vs_prompt_capture_tokens(self, num_scheduled_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray] | None:
        """``(token index [m], batch index [m], position [m])`` of this step's prompt tokens at positions >= their
        request's ``capture_prompt_from`` (labelled-response replay), from the scheduled token counts of the batch
        as updated (vLLM's token order: requests in batch order, each its scheduled span). Offline capture only."""
        st = self._vs_state
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        sched = np.asarray(num_scheduled_tokens[:n], dtype=np.int64)
        req = np.repeat(np.arange(n), sched)
        tok = np.arange(req.shape[0])
        starts = np.cumsum(sched) - sched
        pos = ib.num_computed_tokens_cpu[:n].astype(np.int64)[req] + tok - starts[req]
        start = st.slot_capture_from[:n][req]
        keep = (start >= 0) & (pos >= start) & (pos < ib.num_prompt_tokens[:n].astype(np.int64)[req])
        if not keep.any():
            return None
        return tok[keep], req[keep], pos[keep]

    def _vs_capture_prompt_rows(self, hidden: torch.Tensor) -> None:
        """Write the staged prompt rows (:meth:`_vs_prompt_capture_tokens`) of this step's final hidden states
        ``hidden`` ``[num_tokens, H]`` (the value head's input: the model's output after its final norm)."""
        tok, req, pos = self._vs_prompt_capture
        self._vs_prompt_capture = None
        ib = self.input_batch  # type: ignore[attr-defined]
        idx = torch.from_numpy(tok).to(hidden.device)
        self._vs_capture.add([ib.req_ids[int(b)] for b in req], pos.tolist(), hidden.index_select(0, idx))

    def _preprocess(self, scheduler_output: Any, num_input_tokens: int, *args: Any, **kwargs: Any) -> Any:
        if self._vs_act_staged:
            self._vs_act_staged = False
            self._vs_state.activation.publish_tokens(num_input_tokens)  # the step's one per-token copy
        return super()._preprocess(scheduler_output, num_input_tokens, *args, **kwargs)  # type: ignore[misc]

    def _update_states(self, scheduler_output: Any) -> Any:
        out = super()._update_states(scheduler_output)  # type: ignore[misc]
        if self._vs_state is not None:
            self._vs_begin_step()
        return out

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        if self._vs_state is not None:
            self._vs_sync_requests(scheduler_output)
        out = super().execute_model(scheduler_output, intermediate_tensors)  # type: ignore[misc]
        act = self._vs_state.activation if self._vs_state is not None else None
        if act is not None and act.active:
            if act.gate_use.any():
                act.record_gates()
            self._vs_capture_layers()
            act.end_forward()
        state = getattr(self, "execute_model_state", None)
        if self._vs_prompt_capture is not None and state is not None:
            self._vs_capture_prompt_rows(state.hidden_states)
        self._vs_step = None
        self._vs_logits_steered = False
        if self._vs_state is not None and state is not None and state.sample_hidden_states is not None:
            self._vs_step = {"hidden": state.sample_hidden_states}
        return out

    # ---- the per-step decision ---------------------------------------------------------------------
    def _vs_decode_rows(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(n, is_decode [n], positions [n], rows [n])`` in batch order, vectorised over vLLM's arrays.

        ``rows[i]`` is the steering row of a request that is decoding and past its ``min_tokens`` (forcing
        EOS earlier would violate min_tokens: vLLM checks EOS first), else 0.
        """
        ib = self.input_batch  # type: ignore[attr-defined]
        st = self._vs_state
        n = ib.num_reqs
        computed = ib.num_computed_tokens_cpu[:n]
        prompt = ib.num_prompt_tokens[:n]
        is_decode = computed >= prompt
        num_output = ib.num_tokens_no_spec[:n] - prompt
        rows = np.where(is_decode & (num_output >= st.slot_min_tokens[:n]), st.slot_row[:n], 0).astype(np.int32)
        return n, is_decode, computed.copy(), rows

    def _vs_steer_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Logit steering of this step's logits (``[B, V']``, one row per batch slot) from the hidden states that
        produced them (``_vs_step["hidden"]``): one fused op over the batch, rows from the batch-slot table, no host
        read. Returns ``(logits', gate_strength [B], row_idx [B])``, or None when no request of the batch asks.

        Before vLLM's sampler, so penalties, top-k/top-p, the sample and its logprobs all see the steered logits.
        Rows that sample nothing this step (partial prefill chunks) are left alone.
        """
        st = self._vs_state
        step = self._vs_step
        if st is None or st.logit is None or step is None or not st.logit.batch_active:
            return None
        skip = self.discard_request_mask.np[: logits.shape[0]].astype(bool)  # type: ignore[attr-defined]
        return st.steer_logits(step["hidden"], logits, skip)

    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        st = self._vs_state
        step = self._vs_step
        if st is None or step is None or logits is None or spec_decode_metadata is not None:
            self._vs_step = None
            self._vs_logits_steered = False
            return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        if not self._vs_logits_steered:
            steered = self._vs_steer_logits(logits)
            if steered is not None:
                logits, gate_strength, logit_rows = steered
                st.logit.record(logit_rows, gate_strength)
        self._vs_logits_steered = False
        filtered = self._vs_token_filter(logits, step["hidden"])
        if filtered is not None:
            logits = filtered[0]
        n, is_decode, positions, rows = self._vs_decode_rows()
        abstain = st.config.mode == MODE_ABSTAIN and bool(rows.any())
        keep_raw = None
        if abstain and self.input_batch.sampling_metadata.max_num_logprobs is not None:  # type: ignore[attr-defined]
            # A forced EOS must come back with its own logprob: keep the raw logits of the scored rows that
            # asked for logprobs (the sampler may scale logits in place). Steps where nobody asked skip this.
            want = np.flatnonzero(st.slot_logprobs[:n] & (rows > 0))
            if want.size:
                idx = torch.from_numpy(want).to(logits.device, non_blocking=True)
                keep_raw = (idx, logits.index_select(0, idx).float())
        out = super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        self._vs_step = None
        if filtered is not None:
            _, changed, row_idx = filtered
            # Stats: each filtered distribution is scored, a changed one is an intervention; the value is the
            # sampled token's predicted value.
            tok = out.sampled_token_ids[:, 0].to(torch.int64)
            st.stats.record(row_idx, torch.sigmoid(st.token.sampled_values(tok)), changed, eos_forced=False)
        hidden = step["hidden"][:n]
        if self._vs_capture is not None and st.any_capture:
            self._vs_capture_rows(is_decode, positions, hidden)
        if abstain:
            row_idx = st.upload_step_rows(rows)
            eos = st.slot_eos.device[:n]
            _, force = st.abstain(hidden, row_idx, out.sampled_token_ids, eos)
            if keep_raw is not None and out.logprobs_tensors is not None:
                self._vs_forced_eos_logprobs(out.logprobs_tensors, force, eos, *keep_raw)
        return out

    def _vs_token_filter(self, logits: torch.Tensor, hidden: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Token-mode VFD of this step's logits ``[B, V']`` from the states that produced them (``hidden``), before
        vLLM's sampler: ``(logits', changed [B], row_idx [B])``, or None when no request of the batch is in
        token mode. Every sampled row is filtered, the first token included; rows that sample nothing this step
        (partial prefill chunks) and rows of other requests are left bitwise. One H2D copy (the row index)."""
        st = self._vs_state
        token = st.token
        if token is None:
            return None
        n = logits.shape[0]
        rows = st.slot_row[:n]
        if not rows.any():
            return None
        skip = self.discard_request_mask.np[:n].astype(bool)  # type: ignore[attr-defined]
        row_idx = st.upload_step_rows(np.where(skip, 0, rows).astype(np.int32))
        t = st.rows
        out, changed = token.filter(hidden[:n], logits, row_idx, t.threshold, t.sign, t.mode, t.head)
        return out, changed, row_idx

    def _vs_forced_eos_logprobs(self, lpt: Any, force: torch.Tensor, eos: torch.Tensor, idx: torch.Tensor,
                                raw: torch.Tensor) -> None:
        """Report a forced EOS (not the sample it replaced) in its row's logprobs, from the raw logits.

        Vectorised over the rows that asked for logprobs; rows not forced keep what the sampler wrote.
        """
        mode = getattr(getattr(self, "sampler", None), "logprobs_mode", "raw_logprobs")
        if mode not in ("raw_logprobs", "raw_logits") and not self._vs_warned_logprobs_mode:
            self._vs_warned_logprobs_mode = True
            logger.warning("value_steer: forced-EOS logprobs are reported as logprobs of the raw logits "
                           "(logprobs mode %s)", mode)
        dist = raw if mode == "raw_logits" else raw.log_softmax(dim=-1)
        eos_i = eos.index_select(0, idx)
        eos_lp = dist.gather(1, eos_i.unsqueeze(1)).squeeze(1)
        rank = (dist >= eos_lp.unsqueeze(1)).sum(dim=1)
        forced = force.index_select(0, idx)
        ids0 = lpt.logprob_token_ids[:, 0]
        lp0 = lpt.logprobs[:, 0]
        ids0.index_copy_(0, idx, torch.where(forced, eos_i.to(ids0.dtype), ids0.index_select(0, idx)))
        lp0.index_copy_(0, idx, torch.where(forced, eos_lp.to(lp0.dtype), lp0.index_select(0, idx)))
        ranks = lpt.selected_token_ranks
        ranks.index_copy_(0, idx, torch.where(forced, rank.to(ranks.dtype), ranks.index_select(0, idx)))

    def _vs_capture_layers(self) -> None:
        """After the forward: write the residual streams of requests that asked for ``capture_layers`` (one
        writer per layer, ``<capture.dir>/layer-LL``). Capture steps only (reads the device)."""
        act = self._vs_state.activation
        found = act.take_capture_tokens()
        if found is None:
            return
        tok, req, pos = found
        rows = act.staged_rows(tok)
        ib = self.input_batch  # type: ignore[attr-defined]
        req_ids = [ib.req_ids[int(r)] for r in req]
        for layer in np.flatnonzero(act.capture_use).tolist():
            sel = np.flatnonzero(act.capture_rows_at(layer, rows))
            if not sel.size:
                continue
            idx = torch.from_numpy(tok[sel]).to(act.capture_buf.device)
            self._vs_layer_writer(layer).add([req_ids[j] for j in sel], pos[sel].tolist(),
                                             act.capture_buf[layer].index_select(0, idx))

    def _vs_layer_writer(self, layer: int) -> Any:
        from value_steer.runtime.capture import CaptureWriter

        writers = self.__dict__.setdefault("_vs_layer_writers", {})
        if layer not in writers:
            writers[layer] = CaptureWriter(os.path.join(self._vs_state.config.capture.dir, f"layer-{layer:02d}"))
        return writers[layer]

    def vs_flush_layer_capture(self) -> int:
        """Flush the per-layer capture writers; returns their shard count."""
        writers = self.__dict__.get("_vs_layer_writers", {})
        for w in writers.values():
            w.flush()
        return sum(w.num_shards for w in writers.values())

    def _vs_capture_rows(self, is_decode: np.ndarray | None, positions: np.ndarray, hidden: torch.Tensor,
                         batch_rows: np.ndarray | None = None) -> None:
        """Capture ``hidden[j]`` (the state after the token at ``positions[j]``) of capturing requests.

        ``batch_rows[j]`` is the batch index of ``hidden[j]`` (default: ``j``). Offline capture only.
        """
        st = self._vs_state
        ib = self.input_batch  # type: ignore[attr-defined]
        b = np.arange(hidden.shape[0]) if batch_rows is None else batch_rows
        keep = st.slot_capture[b].copy()
        if is_decode is not None:
            keep &= is_decode
        if self._vs_capture_elsewhere is not None and batch_rows is None:
            keep &= ~self._vs_capture_elsewhere[b]
        sel = np.flatnonzero(keep)
        if sel.size:
            idx = torch.from_numpy(sel).to(hidden.device)
            req_ids = ib.req_ids
            self._vs_capture.add([req_ids[int(b[j])] for j in sel], positions[sel].tolist(),
                                 hidden.index_select(0, idx))
