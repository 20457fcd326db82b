"""The steering engine: per-request rows, the value head on device, counters. No vLLM here.

The vLLM adapter (``value_steer.patches``) feeds this engine plain tensors and request ids in the
model runner's row order; everything that decides *what* to do lives here and in the fused ops, so it
can be tested without an engine and reused by every adapter.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from value_steer.checkpoint import HeadCheckpoint, load_value_head
from value_steer.config import RequestSteer, SteerConfig, parse_request_args
from value_steer.rows import MODE_ABSTAIN, MODE_OFF, MODE_VFD, RowTable

logger = logging.getLogger("value_steer")


@dataclass
class RequestStats:
    """What the client can read back about one request (values are the head's p)."""

    mode: str
    threshold: float
    num_candidates: int
    num_scored: int = 0
    num_interventions: int = 0
    forced_eos: bool = False
    last_value: float | None = None
    max_value: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RequestState:
    req_id: str
    steer: RequestSteer
    row: int
    eos_token_id: int | None
    stats: RequestStats


@dataclass
class EngineCounters:
    """Process-wide totals (exported as Prometheus counters)."""

    requests_steered: int = 0
    tokens_scored: int = 0
    interventions: int = 0
    forced_eos: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)


_MODE_NAMES = {MODE_OFF: "off", MODE_ABSTAIN: "abstain", MODE_VFD: "vfd"}


class SteeringEngine:
    """Owns the value head, the row table and per-request state for one model runner.

    Args:
        config: the validated server config.
        hidden_size: the backbone's hidden size (the head must match).
        max_num_seqs: concurrent requests the scheduler may run (rows = max_num_seqs + 1; row 0 off).
        device: where the head and the row table live.
    """

    def __init__(self, config: SteerConfig, hidden_size: int, max_num_seqs: int, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.hidden_size = hidden_size
        self.checkpoint: HeadCheckpoint | None = None
        self.default_threshold = 0.5
        self.weights: tuple[torch.Tensor, ...] = ()
        if config.value_head_path is not None:
            ckpt = load_value_head(config.value_head_path, hidden_size=hidden_size, device=device)
            self.checkpoint = ckpt
            thr = config.threshold if config.threshold is not None else ckpt.threshold
            if thr is None:
                raise ValueError(
                    f"{config.section}.threshold is not set and the head's sidecar "
                    f"({config.value_head_path}.meta.json) has no threshold; give one of them"
                )
            self.default_threshold = float(thr)
            self.weights = tuple(w.detach().to(device=device, dtype=torch.float32).contiguous()
                                 for w in ckpt.head.weights())
        self.rows = RowTable.empty(max_num_seqs + 1, device=device)
        self._free_rows = list(range(max_num_seqs, 0, -1))
        self.requests: dict[str, RequestState] = {}
        self.finished_stats: dict[str, RequestStats] = {}
        self._finished_order: list[str] = []
        self.max_finished_kept = 4096
        self.counters = EngineCounters()
        self._lock = threading.Lock()

    # ---- request lifecycle -------------------------------------------------------------------------
    def add_request(self, req_id: str, extra_args: dict[str, Any] | None, eos_token_id: int | None,
                    ignore_eos: bool) -> RequestState:
        """Register a request seen for the first time (idempotent)."""
        state = self.requests.get(req_id)
        if state is not None:
            return state
        steer = parse_request_args(extra_args, self.config, self.default_threshold)
        if steer.mode == MODE_ABSTAIN and (ignore_eos or eos_token_id is None):
            # The client asked never to stop on EOS: abstention has nothing it may force.
            steer = RequestSteer(MODE_OFF, steer.threshold, steer.sign, 1, steer.capture)
        row = 0
        if steer.mode != MODE_OFF:
            if not self._free_rows:
                raise RuntimeError("value_steer: row table exhausted (more live requests than max_num_seqs)")
            row = self._free_rows.pop()
            self.rows.set_row(row, mode=steer.mode, threshold=steer.threshold, sign=steer.sign,
                              num_candidates=steer.num_candidates)
            self.counters.requests_steered += 1
            name = _MODE_NAMES[steer.mode]
            self.counters.by_mode[name] = self.counters.by_mode.get(name, 0) + 1
        stats = RequestStats(mode=_MODE_NAMES[steer.mode], threshold=steer.threshold,
                             num_candidates=steer.num_candidates)
        state = RequestState(req_id, steer, row, eos_token_id, stats)
        self.requests[req_id] = state
        return state

    def finish_request(self, req_id: str) -> None:
        """Free the request's row and keep its stats for the client (bounded, oldest dropped)."""
        state = self.requests.pop(req_id, None)
        if state is None:
            return
        if state.row:
            self.rows.clear_row(state.row)
            self._free_rows.append(state.row)
        with self._lock:
            self.finished_stats[req_id] = state.stats
            self._finished_order.append(req_id)
            while len(self._finished_order) > self.max_finished_kept:
                self.finished_stats.pop(self._finished_order.pop(0), None)

    def stats_for(self, req_id: str) -> dict[str, Any] | None:
        """Stats of a live or recently finished request (matched exactly or by vLLM's internal suffix)."""
        with self._lock:
            for table in (self.finished_stats, {k: v.stats for k, v in self.requests.items()}):
                if req_id in table:
                    return table[req_id].as_dict()
                for key, st in table.items():
                    # vLLM appends a random suffix to client request ids internally ("<id>-<hex>").
                    if key.startswith(req_id + "-"):
                        return st.as_dict()
        return None

    # ---- the per-step math ---------------------------------------------------------------------------
    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[M, H]`` hidden states -> ``[M]`` fp32 values (the fused value-head op)."""
        from value_steer.kernels import ops

        return ops.value_head(hidden, *self.weights)

    def abstain(
        self, hidden: torch.Tensor, row_idx: torch.Tensor, sampled: torch.Tensor, eos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic abstention over one step's sampled rows (no host sync).

        Args:
            hidden: ``[R, H]`` the hidden states that produced this step's logits.
            row_idx: ``[R]`` int32 row per request (0 = not scored: off, prefill, ignore_eos).
            sampled: ``[R, 1]`` int sampled token ids, overwritten in place with EOS where forced.
            eos: ``[R]`` int64 EOS id per request (any value where row is 0).
        Returns:
            ``values [R]`` fp32 and ``force_eos [R]`` bool.
        """
        from value_steer.kernels import ops

        vals = self.values(hidden)
        r = vals.shape[0]
        tokens = sampled[:, :1].to(torch.int64)
        logprobs = torch.zeros((r, 1), dtype=torch.float32, device=vals.device)
        out = ops.score_and_select(vals.unsqueeze(1), tokens, logprobs, row_idx, self.rows.threshold,
                                   self.rows.sign, self.rows.mode, self.rows.num_candidates, None)
        force = out[5]
        sampled[:, 0] = torch.where(force, eos.to(sampled.dtype), sampled[:, 0])
        return vals, force

    def record(self, req_ids: list[str], rows: list[int], values: torch.Tensor, flagged: torch.Tensor,
               *, eos_forced: bool) -> None:
        """Host-side bookkeeping after a step (one device->host copy of ``[R]`` values and flags)."""
        vals = values.float().cpu().tolist()
        flags = flagged.cpu().tolist()
        for req_id, row, v, f in zip(req_ids, rows, vals, flags):
            if not row:
                continue
            st = self.requests[req_id].stats
            st.num_scored += 1
            st.last_value = v
            st.max_value = v if st.max_value is None else max(st.max_value, v)
            self.counters.tokens_scored += 1
            if f:
                st.num_interventions += 1
                self.counters.interventions += 1
                if eos_forced:
                    st.forced_eos = True
                    self.counters.forced_eos += 1
