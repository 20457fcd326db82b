"""Per-request steering statistics accumulated on the device; read only when someone asks.

A step records its scored rows with a handful of device ops (``index_add_`` / ``index_put_`` /
``scatter_reduce_`` through the per-row index, row 0 a sink). Nothing is copied to the host per step:
:meth:`DeviceStats.snapshot` clones a row at finish (device op), and :meth:`DeviceStats.read` /
:meth:`DeviceStats.totals_dict` synchronise only when the stats route or an RPC asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Columns of the per-row stats table.
SCORED, INTERVENTIONS, FORCED_EOS, LAST_VALUE, MAX_VALUE = range(5)
NUM_COLUMNS = 5


@dataclass
class RequestInfo:
    """Host facts of one request, known at admission (what the stats route reports besides the counts)."""

    mode: str
    threshold: float
    num_candidates: int
    error: str | None = None
    activation_ops: int = 0  # activation-steering ops of the request's spec (0: none)
    activation_gated: bool = False
    gate_counts: Any = None  # finished gated requests: [2] fp64 device tensor (gate tokens, gate open)
    logit_strength: float = 0.0  # the logit-steering multiplier (0: none)
    logit_generator: str | None = None  # logit-steered requests: the generator's name
    logit_counts: Any = None  # logit-steered requests: [3] fp64 device tensor (distributions, gate sum, gate max)
    beta: float | None = None  # token mode: the request's beta (0: mask, > 0: tilt)
    token_mass: Any = None  # token mode: [1] fp64 device tensor, the probability mass its edits removed
    head: str | None = None  # abstention / exact VFD: the name of the value head that scored it


@dataclass
class SteeringCounters:
    """Process-wide lifecycle totals kept on the host (exported as Prometheus counters)."""

    requests_steered: int = 0
    requests_refused: int = 0  # steering asked for but refused in the worker: ended with no text
    by_mode: dict[str, int] = field(default_factory=dict)


class DeviceStats:
    """``table [num_rows, 5]`` fp64 on the device (scored, interventions, forced EOS, last value, max value)
    and ``totals [3]`` fp64 (tokens scored, interventions, forced EOS over the process).

    Rows are reset when (re)admitted: :meth:`stage_reset` marks them, :meth:`flush` applies every mark of
    the step with one index copy (lifecycle steps only).
    """

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.table = torch.zeros((num_rows, NUM_COLUMNS), dtype=torch.float64, device=device)
        self.table[:, LAST_VALUE] = math.nan
        self.table[:, MAX_VALUE] = -math.inf
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self._reset = np.zeros(num_rows, dtype=bool)
        self.empty_row = self.table[0].clone()  # the stats of a request never scored (also the reset value)

    def stage_reset(self, row: int) -> None:
        self._reset[row] = True

    def flush(self) -> None:
        if not self._reset.any():
            return
        idx = torch.from_numpy(np.flatnonzero(self._reset)).to(self.table.device, non_blocking=True)
        self.table.index_copy_(0, idx, self.empty_row.expand(idx.shape[0], NUM_COLUMNS))
        self._reset[:] = False

    def record(self, row_idx: torch.Tensor, values: torch.Tensor, flagged: torch.Tensor, *, eos_forced: bool) -> None:
        """Accumulate one step on the device (no host synchronisation).

        Args:
            row_idx: ``[R]`` int row per scored entry (0 = not a steered request: goes to the sink row).
            values: ``[R]`` fp32 the head's value of the committed token.
            flagged: ``[R]`` bool an intervention (VFD replacement / abstention's forced EOS).
            eos_forced: whether ``flagged`` means a forced EOS (abstention) rather than a replacement.
        """
        idx = row_idx.long()
        live = (idx > 0).to(torch.float64)
        hit = flagged.to(torch.float64) * live
        upd = torch.stack([live, hit, hit if eos_forced else torch.zeros_like(hit)], dim=1)
        self.table[:, :3].index_add_(0, idx, upd)
        v = values.to(torch.float64)
        self.table[:, LAST_VALUE].index_put_((idx,), v)
        self.table[:, MAX_VALUE].scatter_reduce_(0, idx, v, reduce="amax")
        self.totals.add_(upd.sum(dim=0))

    def snapshot(self, row: int) -> torch.Tensor:
        """A device copy of ``row``'s stats (taken at finish, before the row is reused)."""
        return self.table[row].clone()

    @staticmethod
    def read(stats_row: torch.Tensor, info: RequestInfo) -> dict[str, Any]:
        """The client's view of one request (synchronises: called by the stats route, not per step)."""
        scored, interv, forced, last, mx = stats_row.tolist()
        seen = scored > 0
        return {
            "mode": info.mode,
            "head": info.head,
            "threshold": info.threshold,
            "num_candidates": info.num_candidates,
            "num_scored": int(scored),
            "num_interventions": int(interv),
            "forced_eos": forced > 0,
            "last_value": last if seen else None,
            "max_value": mx if seen else None,
            "error": info.error,
            "activation_steering": DeviceStats._activation(info),
            "logit_steering": DeviceStats._logit(info),
            **DeviceStats._token(info, int(scored), int(interv)),
        }

    @staticmethod
    def _token(info: RequestInfo, scored: int, changed: int) -> dict[str, Any]:
        """Token mode: the distributions it filtered (``num_scored``), those it changed (``num_interventions``;
        ``last_value`` / ``max_value``: the sampled tokens' predicted values) and the mass removed, mean per step."""
        if info.beta is None:
            return {}
        mass = float(info.token_mass.sum().item()) if info.token_mass is not None else 0.0
        return {"beta": info.beta, "mass_removed": mass / scored if scored else None}

    @staticmethod
    def _logit(info: RequestInfo) -> dict[str, Any] | None:
        """The multiplier, the number of steered sampling distributions and the mean / max gate strength
        ``strength(h)`` over them (``value_steer.runtime.logit_steer``)."""
        if not info.logit_strength:
            return None
        steps, total, mx = info.logit_counts.tolist() if info.logit_counts is not None else (0.0, 0.0, 0.0)
        return {"strength": info.logit_strength, "generator": info.logit_generator, "num_steered": int(steps),
                "mean_gate_strength": total / steps if steps else None,
                "max_gate_strength": mx if steps else None}

    @staticmethod
    def _activation(info: RequestInfo) -> dict[str, Any] | None:
        if not info.activation_ops:
            return None
        out: dict[str, Any] = {"ops": info.activation_ops, "gated": info.activation_gated,
                               "gate_tokens": 0, "gate_open_rate": None}
        if info.gate_counts is not None:
            tokens, opened = info.gate_counts.tolist()
            out["gate_tokens"] = int(tokens)
            out["gate_open_rate"] = opened / tokens if tokens else None
        return out

    def totals_dict(self) -> dict[str, int]:
        tokens, interv, forced = self.totals.tolist()
        return {"tokens_scored": int(tokens), "interventions": int(interv), "forced_eos": int(forced)}
