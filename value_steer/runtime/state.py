"""The steering state of one model runner: rows, the value head on device, batch-slot tables, stats.

No vLLM here. The adapter (``value_steer.patches``) calls the lifecycle methods when the scheduler adds
or finishes requests and when the runner's batch composition changes, and the step methods with plain
tensors and numpy arrays in the runner's batch order. Everything that decides *what* to do lives here
and in the fused ops, so it runs (and is tested) without an engine and is reused by every adapter.

Hot-path discipline (tested by ``tests/runtime/test_host_sync.py``):
- per-request data the kernels read lives in persistent device tables written through host mirrors and
  flushed once per step, only when something changed (:class:`~value_steer.core.row_table.RowTable`,
  :class:`~value_steer.runtime.stats.DeviceStats`, the batch-slot tables here);
- per step, the only host->device transfer is the per-request row index (one non-blocking copy from a
  pinned buffer); nothing is read back from the device; no Python loop over requests.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from value_steer.core.checkpoint import HeadCheckpoint, load_value_head
from value_steer.core.config import RequestSteer, SteerConfig, parse_request_args
from value_steer.core.logit_steer import load_logit_steer
from value_steer.core.modes import MODE_ABSTAIN, MODE_NAMES, MODE_OFF, MODE_TOKEN
from value_steer.core.qhead import load_qhead
from value_steer.core.row_table import RowTable
from value_steer.core.steering_spec import RequestArgError, VectorRef, fingerprint, inline_norm
from value_steer.runtime.activation import ActivationTables, VectorBank
from value_steer.runtime.logit_steer import LogitSteerTables
from value_steer.runtime.staging import HostDeviceBuffer
from value_steer.runtime.stats import DeviceStats, RequestInfo, SteeringCounters
from value_steer.runtime.token_filter import TokenFilterTables

logger = logging.getLogger("value_steer")

MAX_FINISHED_KEPT = 4096


@dataclass
class RequestState:
    """Host facts of a live request (set at admission, never per step)."""

    req_id: str
    steer: RequestSteer
    row: int
    eos_token_id: int | None
    min_tokens: int
    info: RequestInfo
    wants_logprobs: bool = False
    act_row: int = 0  # activation-steering row (0: none), independent of ``row``
    logit_row: int = 0  # logit-steering row (0: none), independent of both


class SteeringState:
    """Owns the value head, the row table, the batch-slot tables and per-request state for one runner.

    Args:
        config: the validated server config.
        hidden_size: the backbone's hidden size (the head must match).
        max_num_seqs: concurrent requests the scheduler may run (rows = max_num_seqs + 1; row 0 off).
        device: where the head and the tables live.
        max_batch_slots: the runner's batch capacity (``max_num_reqs``; default ``max_num_seqs``).
        num_layers: the model's decoder layers (activation steering; required with a ``steering`` section).
        max_tokens: tokens one forward may carry (the per-token buffers' length; required with ``steering``).
        vocab_size: the width ``V'`` of the logits the sampler sees (vLLM: the model config's vocabulary); with a
            ``logit_steering`` section the generator must cover exactly that many columns.
    """

    def __init__(self, config: SteerConfig, hidden_size: int, max_num_seqs: int, device: torch.device,
                 max_batch_slots: int | None = None, num_layers: int | None = None,
                 max_tokens: int | None = None, vocab_size: int | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.hidden_size = hidden_size
        self.checkpoint: HeadCheckpoint | None = None
        self.default_threshold = 0.5
        self.weights: tuple[torch.Tensor, ...] = ()
        self.grouped_weights: tuple[torch.Tensor, ...] | None = None
        # Named value heads (config.heads; the single-path form is one). One head: the value_head op; several: the
        # grouped op over their stacked weights, each row scored by its request's head (the row table's head
        # column).
        self.head_names: tuple[str, ...] = tuple(h.name for h in config.heads)
        self.head_thresholds: tuple[float, ...] = ()
        self.head_checkpoints: tuple[HeadCheckpoint, ...] = ()
        if config.heads and config.mode != MODE_TOKEN:
            ckpts, thresholds = [], []
            for hc in config.heads:
                try:
                    ck = load_value_head(hc.path, hidden_size=hidden_size, device=self.device)
                except (FileNotFoundError, ValueError) as exc:
                    raise ValueError(f"{hc.field}: {exc}") from exc
                thr = hc.threshold if hc.threshold is not None else ck.threshold
                if thr is None:
                    raise ValueError(f"{hc.field.replace('.value_head_path', '')}.threshold is not set and the "
                                     f"head's sidecar ({hc.path}.meta.json) has no threshold; give one of them")
                if ckpts and ck.feature_spec != ckpts[0].feature_spec:
                    raise ValueError(f"{hc.field}: its feature spec differs from head {config.heads[0].name!r}'s; "
                                     "heads of one server must score the same features")
                ckpts.append(ck)
                thresholds.append(float(thr))
            self.head_checkpoints = tuple(ckpts)
            self.head_thresholds = tuple(thresholds)
            self.checkpoint = ckpts[config.default_head]
            self.default_threshold = thresholds[config.default_head]
            per_head = [tuple(w.detach().to(device=self.device, dtype=torch.float32).contiguous()
                              for w in ck.head.weights()) for ck in ckpts]
            self.weights = per_head[config.default_head]
            if len(ckpts) > 1:
                from value_steer.kernels import prepare_value_head_grouped_weights

                self.grouped_weights = prepare_value_head_grouped_weights(per_head, torch.float32)
                logger.info("value_steer: %d value heads (%s), default %r", len(ckpts),
                            ", ".join(f"{n} t={t:.4g}" for n, t in zip(self.head_names, thresholds)),
                            self.head_names[config.default_head])
        # Token mode (value_steer.runtime.token_filter): the Q-heads (one per named head), each with its operating
        # point from its sidecar unless the config sets the threshold.
        self.token: TokenFilterTables | None = None
        if config.mode == MODE_TOKEN:
            if vocab_size is None:
                raise ValueError("token mode needs the width of the model's logits (vocab_size)")
            qcks, thresholds = [], []
            for hc in config.heads:
                try:
                    qck = load_qhead(hc.path, hidden_size=hidden_size, vocab_size=vocab_size)
                except (FileNotFoundError, ValueError) as exc:
                    raise ValueError(f"{hc.field}: {exc}") from exc
                qcks.append(qck)
                thresholds.append(float(hc.threshold if hc.threshold is not None else qck.threshold))
                logger.info("value_steer: token-mode VFD with Q-head %r: %s (rank %d, threshold %g, direction %s, "
                            "beta %g)", hc.name, hc.path, qck.head.rank, thresholds[-1], qck.direction, config.beta)
            self.head_thresholds = tuple(thresholds)
            self.default_threshold = thresholds[config.default_head]
            self.token = TokenFilterTables(qcks, max_num_seqs + 1, self.device)
        num_rows = max_num_seqs + 1
        self.rows = RowTable.empty(num_rows, device=self.device)
        self.stats = DeviceStats(num_rows, self.device)
        self._free_rows = list(range(max_num_seqs, 0, -1))
        self.requests: dict[str, RequestState] = {}
        self.finished: OrderedDict[str, tuple[torch.Tensor, RequestInfo]] = OrderedDict()
        self.counters = SteeringCounters()
        self._lock = threading.Lock()
        # Batch-slot tables (index = the runner's batch index), rebuilt when the batch composition changes.
        slots = max_batch_slots or max_num_seqs
        self.slot_row = np.zeros(slots, dtype=np.int32)
        self.slot_min_tokens = np.zeros(slots, dtype=np.int64)
        self.slot_capture = np.zeros(slots, dtype=bool)
        # Prompt position from which a request's prefill rows are captured too (-1: none; labelled-response replay).
        self.slot_capture_from = np.full(slots, -1, dtype=np.int64)
        self.slot_logprobs = np.zeros(slots, dtype=bool)
        self.slot_eos = HostDeviceBuffer(slots, torch.int64, self.device)
        self._slot_req_ids: list[str | None] = []
        self.any_capture = False
        self.any_prompt_capture = False
        # The per-step row index (host mirror + device buffer).
        self.step_rows = HostDeviceBuffer(slots, torch.int32, self.device)
        # Activation steering (docs/activation-steering.md): its own rows, so a request may have it with or
        # without value steering.
        self.activation: ActivationTables | None = None
        self.slot_act_row = np.zeros(slots, dtype=np.int32)
        self._free_act_rows = list(range(max_num_seqs, 0, -1))
        self.num_layers = num_layers
        # [num_layers] typical residual-stream norm per decoder layer, measured by the adapter at start-up (None:
        # not measured; the steering.max_relative_dose check then waits for it).
        self.residual_norms: tuple[float, ...] | None = None
        if config.steering is not None:
            if num_layers is None or max_tokens is None:
                raise ValueError("activation steering needs the model's num_layers and the forward's max_tokens")
            # Each request row owns a private slot per vector its spec may use (ops and the gate probe).
            bank = VectorBank(config.steering.max_vectors, hidden_size, num_layers, self.device,
                              private_rows=num_rows, private_per_row=config.steering.max_ops_per_request + 1)
            if config.steering.vectors is not None:
                loaded = bank.load_dir(config.steering.vectors)
                logger.info("value_steer: loaded %d steering vector(s) from %s: %s", len(loaded),
                            config.steering.vectors, ", ".join(v.name for v in loaded) or "-")
            self.activation = ActivationTables(bank, num_rows, config.steering.max_ops_per_request, max_tokens,
                                               self.device, capture=config.capture is not None)
        # Logit steering (docs/logit-steering.md): its own rows too.
        self.logit: LogitSteerTables | None = None
        self.slot_logit_row = np.zeros(slots, dtype=np.int32)
        if config.logit_steering is not None:
            if vocab_size is None:
                raise ValueError("logit steering needs the width of the model's logits (vocab_size)")
            gens = []
            for gc in config.logit_steering.generators:
                try:
                    # Loaded on the host; LogitSteerTables places the op's copy of the weights on the device.
                    ckpt = load_logit_steer(gc.checkpoint, hidden_size=hidden_size, vocab_size=vocab_size)
                except (FileNotFoundError, ValueError) as exc:
                    raise ValueError(f"{gc.field}: {exc}") from exc
                gens.append(ckpt)
                logger.info("value_steer: logit steering generator %r: %s (rank %d, gate %d, max_strength %g, %d "
                            "parameters)", gc.name, gc.checkpoint, ckpt.generator.rank, ckpt.generator.gate_hidden,
                            ckpt.max_strength, ckpt.generator.num_parameters())
            self.logit = LogitSteerTables(gens, num_rows, slots, self.device,
                                          names=[g.name for g in config.logit_steering.generators])

    # ---- request lifecycle -------------------------------------------------------------------------
    def add_request(self, req_id: str, extra_args: dict[str, Any] | None, eos_token_id: int | None,
                    ignore_eos: bool, min_tokens: int = 0, wants_logprobs: bool = False,
                    expected_fingerprint: str | None = None, pins: dict[str, str] | None = None) -> RequestState:
        """Register a request seen for the first time (idempotent). Raises ``RequestArgError`` on bad args.

        ``expected_fingerprint``: the steering fingerprint the frontend salted the prefix cache with; when
        given, the spec's fingerprint must equal it. ``pins``: ``{name: content hash}`` the frontend admitted the
        spec's names with: the request runs with those versions (a name re-registered or deleted between admission
        and scheduling does not change what it runs with, nor its cache salt).
        """
        state = self.requests.get(req_id)
        if state is not None:
            return state
        act = self.activation
        pinned = pins if isinstance(pins, dict) else {}
        resolve = None
        if act is not None:
            bank = act.bank
            resolve = lambda name: name in pinned or bank.resolve(name)
        steer = parse_request_args(extra_args, self.config, self.default_threshold, hidden_size=self.hidden_size,
                                   num_layers=self.num_layers, resolve=resolve,
                                   residual_norms=self.residual_norms, vector_norm=self._vector_norm(pinned),
                                   head_thresholds=self.head_thresholds or None)
        act_row = 0
        if steer.steering is not None or steer.capture_layers:
            # parse_request_args refuses both without a steering section.
            assert act is not None
            if steer.steering is not None and expected_fingerprint is not None:
                try:
                    got = fingerprint(steer.steering, lambda ref: pinned[ref] if isinstance(ref, str) and ref in pinned
                                      else act.bank.vector_hash(ref))
                except ValueError as exc:
                    raise RequestArgError(f"steering: {exc}") from None
                if got != expected_fingerprint:
                    raise RequestArgError("steering: the spec's fingerprint does not match the vectors it was admitted "
                                          "with (its prefix-cache salt); send the request again")
            if not self._free_act_rows:
                raise RuntimeError("value_steer: activation row table exhausted (more live requests than max_num_seqs)")
            act_row = self._free_act_rows.pop()
            try:
                act.add_request(act_row, steer.steering, steer.capture_layers, pins=pinned)
            except BaseException:
                self._free_act_rows.append(act_row)
                raise
        logit_row = 0
        if steer.logit_strength > 0.0:
            assert self.logit is not None  # parse_request_args refuses it without a logit_steering section
            logit_row = self.logit.add_request(steer.logit_strength, steer.generator)
        if steer.mode == MODE_ABSTAIN and (ignore_eos or eos_token_id is None):
            # The client asked never to stop on EOS: abstention has nothing it may force.
            steer = replace(steer, mode=MODE_OFF, num_candidates=1)
        row = 0
        if steer.mode != MODE_OFF:
            if not self._free_rows:
                raise RuntimeError("value_steer: row table exhausted (more live requests than max_num_seqs)")
            row = self._free_rows.pop()
            sign = steer.sign
            if steer.mode == MODE_TOKEN:
                assert self.token is not None  # MODE_TOKEN comes from a config with a Q-head
                sign = self.token.checkpoints[steer.head].sign  # the Q-head was distilled for its sidecar's direction
                self.token.stage_row(row, steer.beta, steer.num_candidates if self.config.token_k else 0, steer.head)
            self.rows.stage_row(row, mode=steer.mode, threshold=steer.threshold, sign=sign,
                                num_candidates=steer.num_candidates, head=steer.head)
            self.stats.stage_reset(row)
            self.counters.requests_steered += 1
            name = MODE_NAMES[steer.mode]
            self.counters.by_mode[name] = self.counters.by_mode.get(name, 0) + 1
        info = RequestInfo(mode=MODE_NAMES[steer.mode], threshold=steer.threshold, num_candidates=steer.num_candidates)
        if steer.mode != MODE_OFF:
            info.head = self.head_names[steer.head]
        if steer.mode == MODE_TOKEN:
            info.beta = steer.beta
        if steer.steering is not None:
            info.activation_ops = len(steer.steering.ops)
            info.activation_gated = steer.steering.gate is not None
        info.logit_strength = steer.logit_strength
        if steer.logit_strength > 0.0 and self.logit is not None:
            info.logit_generator = self.logit.names[steer.generator]
        state = RequestState(req_id, steer, row, eos_token_id, int(min_tokens or 0), info, wants_logprobs, act_row,
                             logit_row)
        self.requests[req_id] = state
        return state

    def _vector_norm(self, pins: dict[str, str]) -> Callable[[VectorRef, int], float | None]:
        """``vector_norm(ref, layer)`` for the dose check: an inline vector's norm, or the row norm of the version a
        name was admitted with (``pins``) or holds now."""
        bank = self.activation.bank if self.activation is not None else None

        def norm(ref: VectorRef, layer: int) -> float | None:
            if not isinstance(ref, str):
                return inline_norm(ref)
            if bank is None:
                return None
            info = bank.lookup(ref)
            rows = None
            if ref in pins and (info is None or info.content_hash != pins[ref]):
                rows = bank.version_rows(pins[ref])
            if rows is not None:
                return float(np.linalg.norm(rows[layer if rows.shape[0] > 1 else 0].astype(np.float64)))
            if info is None:
                return None
            return info.norms[layer] if info.per_layer else info.norms[0]

        return norm

    def add_refused(self, req_id: str, error: str) -> None:
        """Register a request whose steering arguments were refused: never scored (the adapter ends it at
        once), ``error`` kept for its stats, counted in ``requests_refused``."""
        self.requests[req_id] = RequestState(
            req_id, RequestSteer(MODE_OFF, 0.0, 1.0, 1), 0, None, 0, RequestInfo("refused", 0.0, 1, error=error)
        )
        self.counters.requests_refused += 1

    def finish_request(self, req_id: str) -> None:
        """Free the request's row and keep its stats for the client (bounded, oldest dropped)."""
        state = self.requests.pop(req_id, None)
        if state is None:
            return
        if state.row:
            snap = self.stats.snapshot(state.row)
            if state.info.beta is not None and self.token is not None:
                state.info.token_mass = self.token.mass[state.row:state.row + 1].clone()
                self.token.clear_row(state.row)
            self.rows.clear_row(state.row)
            self._free_rows.append(state.row)
        else:
            snap = self.stats.empty_row
        if state.act_row:
            assert self.activation is not None
            if state.info.activation_gated:
                state.info.gate_counts = self.activation.gate_counts(state.act_row)
            self.activation.remove_request(state.act_row)
            self._free_act_rows.append(state.act_row)
        if state.logit_row:
            assert self.logit is not None
            state.info.logit_counts = self.logit.snapshot(state.logit_row)
            self.logit.remove_request(state.logit_row)
        with self._lock:
            self.finished[req_id] = (snap, state.info)
            while len(self.finished) > MAX_FINISHED_KEPT:
                self.finished.popitem(last=False)

    def flush(self) -> None:
        """Publish this step's staged lifecycle writes (no-op on a steady step)."""
        self.rows.flush()
        self.stats.flush()
        if self.activation is not None:
            self.activation.flush()
        if self.logit is not None:
            self.logit.flush()
        if self.token is not None:
            self.token.flush()

    def _live_stats(self, state: RequestState) -> tuple[torch.Tensor, RequestInfo]:
        info = state.info
        if state.row and info.beta is not None and self.token is not None:
            info = replace(info, token_mass=self.token.mass[state.row:state.row + 1])
        if state.act_row and info.activation_gated and self.activation is not None:
            info = replace(info, gate_counts=self.activation.gate_counts(state.act_row))
        if state.logit_row and self.logit is not None:
            info = replace(info, logit_counts=self.logit.live_stats(state.logit_row))
        return (self.stats.table[state.row] if state.row else self.stats.empty_row, info)

    def stats_for(self, req_id: str, matches: Callable[[str, str], Any] | None = None) -> dict[str, Any] | None:
        """Stats of a live or recently finished request (reads the device; for the stats route only).

        ``matches(internal_id, req_id)`` lets the adapter match its engine's internal ids to a client id: None when
        they do not match, else a sort key (the order of the response's choices). When several requests match (a
        response with several choices), the first one's stats are returned with ``choices``: every match's
        ``{"request_id", "stats"}`` in that order.
        """
        with self._lock:
            found = self.finished.get(req_id)
            if found is None and req_id in self.requests:
                found = self._live_stats(self.requests[req_id])
            if found is not None:
                return DeviceStats.read(*found)
            if matches is None:
                return None
            hits = []
            for k, v in self.finished.items():
                key = matches(k, req_id)
                if key is not None:
                    hits.append((key, k, v))
            for k, s in self.requests.items():
                key = matches(k, req_id)
                if key is not None:
                    hits.append((key, k, self._live_stats(s)))
        if not hits:
            return None
        hits.sort(key=lambda h: (h[0], h[1]))
        first = DeviceStats.read(*hits[0][2])
        if len(hits) > 1:
            first["choices"] = [{"request_id": k, "stats": DeviceStats.read(*v)} for _, k, v in hits]
        return first

    def counters_dict(self) -> dict[str, Any]:
        """Process-wide counters (reads the device totals; for the stats route and /metrics)."""
        return {"requests_steered": self.counters.requests_steered,
                "requests_refused": self.counters.requests_refused, **self.stats.totals_dict(),
                "by_mode": dict(self.counters.by_mode)}

    # ---- batch-slot tables (vLLM's InputBatch pattern) ---------------------------------------------------
    def update_batch(self, req_ids: Sequence[str | None]) -> bool:
        """Refresh the batch-slot tables when the runner's batch order changed (requests added, removed,
        moved). ``req_ids[i]`` is the request at batch index ``i``. Returns whether anything changed.

        The comparison is one C-level list compare; the rebuild runs only on lifecycle steps.
        """
        if req_ids == self._slot_req_ids:
            return False
        self._slot_req_ids = list(req_ids)
        n = len(req_ids)
        reqs = self.requests
        states = [reqs.get(r) if r is not None else None for r in req_ids]
        self.slot_row[:n] = [s.row if s is not None else 0 for s in states]
        self.slot_min_tokens[:n] = [s.min_tokens if s is not None else 0 for s in states]
        self.slot_capture[:n] = [bool(s is not None and s.steer.capture) for s in states]
        self.slot_capture_from[:n] = [s.steer.capture_prompt_from if s is not None else -1 for s in states]
        self.slot_eos.np[:n] = [(s.eos_token_id or 0) if s is not None and s.row else 0 for s in states]
        self.slot_logprobs[:n] = [bool(s is not None and s.wants_logprobs) for s in states]
        self.slot_act_row[:n] = [s.act_row if s is not None else 0 for s in states]
        if self.logit is not None:
            self.slot_logit_row[:n] = [s.logit_row if s is not None else 0 for s in states]
            self.logit.update_batch(self.slot_logit_row[:n])
        self.slot_eos.copy_to_device(n)
        self.any_capture = bool(self.slot_capture[:n].any())
        self.any_prompt_capture = bool((self.slot_capture_from[:n] >= 0).any())
        return True

    def upload_step_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Copy this step's per-request row index ``[n]`` to the device (the step's one H2D copy)."""
        n = rows.shape[0]
        self.step_rows.np[:n] = rows
        return self.step_rows.copy_to_device(n)

    # ---- the per-step math ---------------------------------------------------------------------------
    def steer_logits(self, hidden: torch.Tensor, logits: torch.Tensor, skip: np.ndarray | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Logit steering of one step's logits (one row per batch slot), or None when no request of the batch asks.

        Args:
            hidden: ``[>= B, H]`` the hidden states that produced the logits (the step's sampled rows, batch order).
            logits: ``[B, V']`` the step's logits.
            skip: ``[B]`` bool, rows that sample nothing this step (left untouched, not counted).
        Returns:
            ``(logits' [B, V'], gate_strength [B] fp32, row_idx [B] int32)``: one fused op, no host synchronisation.
            The caller records (:meth:`LogitSteerTables.record`) the gate strengths of the distributions it samples.
        """
        lt = self.logit
        if lt is None or not lt.batch_active:
            return None
        b = logits.shape[0]
        rows = lt.step_rows(b, skip)
        out, gs = lt.apply(hidden[:b], logits, rows)
        return out, gs, rows

    def values(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[M, H]`` hidden states -> ``[M]`` fp32 values (one fused op, no host sync).

        Args:
            hidden: ``[M, H]`` the states to score.
            rows: ``[M]`` int the value-steering row each state belongs to: with several heads, each state is scored
                by its row's head (row 0: the default head); with one head it is not read.
        """
        if self.grouped_weights is None:
            from value_steer.kernels import value_head

            return value_head(hidden, *self.weights)
        from value_steer.kernels import value_head_grouped

        return value_head_grouped(hidden, self.rows.head.index_select(0, rows.long()), *self.grouped_weights)

    def abstain(self, hidden: torch.Tensor, row_idx: torch.Tensor, sampled: torch.Tensor,
                eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic abstention over one step's sampled rows, stats included (no host sync).

        Args:
            hidden: ``[R, H]`` the hidden states that produced this step's logits.
            row_idx: ``[R]`` int32 row per request (0 = not scored: off, prefill, ignore_eos, min_tokens).
            sampled: ``[R, 1]`` int sampled token ids, overwritten in place with EOS where forced.
            eos: ``[R]`` int64 EOS id per request (any value where row is 0).
        Returns:
            ``values [R]`` fp32 and ``force_eos [R]`` bool.
        """
        from value_steer.kernels import score_and_select

        vals = self.values(hidden, row_idx)
        r = vals.shape[0]
        tokens = sampled[:, :1].to(torch.int64)
        logprobs = torch.zeros((r, 1), dtype=torch.float32, device=vals.device)
        out = score_and_select(vals.unsqueeze(1), tokens, logprobs, row_idx, self.rows.threshold,
                               self.rows.sign, self.rows.mode, self.rows.num_candidates, None)
        force = out[5]
        sampled[:, 0] = torch.where(force, eos.to(sampled.dtype), sampled[:, 0])
        self.stats.record(row_idx, vals, force, eos_forced=True)
        return vals, force
