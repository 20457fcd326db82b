"""Choosing, per step, how VFD forwards its candidates: eager-K or two-phase (no vLLM).

- **eager**: every steered row's ``K`` candidates ride in the main forward (``R * K`` extra rows). Best
  when a forward costs about the same whatever its row count (memory-bound: a GPU at small batch).
- **two-phase**: the main forward carries only each row's natural sample (candidate 0), as base decoding
  does; the rows whose natural sample is unsafe get their alternatives in a second, small forward at the
  same position. Best when a forward's cost grows with its rows (compute-bound: CPU, large batches).

Both commit the same winner given the same candidates: the rule (first safe in draw order, else the
lowest value over all ``K``) sees the same values, and candidate 0 needs no alternatives when it is safe.

The choice uses a linear cost model of a forward, ``fixed + per_token * tokens``, and the recent rate
``rho`` at which candidate 0 is unsafe (an exponential moving average over steered rows):

    eager     = fixed + per_token * (T + R * (K - 1))
    two-phase = fixed + per_token * T + P(any unsafe) * (second_fixed + per_token * rho * R * (K - 1))

with ``T`` the step's other tokens, ``R`` steered rows and ``P(any unsafe) = 1 - (1 - rho)^R``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from value_steer.core.config import VFD_SCHEDULES as SCHEDULES

# Starting coefficients (ms) per device kind. CPU: SmolLM2-135M fp32 on this project's 2-core machines
# (a forward is mostly per-layer overhead: ~25 ms for one row, ~1 ms per extra row; a bare second forward
# ~20 ms); refined online from the forwards the runner times (CPU work is synchronous, so wall time is
# the cost). CUDA: a decode step is memory-bound up to hundreds of rows (cost nearly flat in rows), so eager
# wins unless R * K is large; not timed online (it would need a device sync).
COST_MS = {
    "cpu": {"fixed": 25.0, "per_token": 1.0, "second_fixed": 20.0},
    "cuda": {"fixed": 8.0, "per_token": 0.01, "second_fixed": 4.0},
}


@dataclass
class ScheduleModel:
    """Per-step choice (``choose``) and the running rate of unsafe natural samples (``observe``)."""

    mode: str = "auto"
    device_kind: str = "cpu"
    rate: float = 0.3  # prior for the unsafe rate of candidate 0 until steps are observed
    decay: float = 0.95
    counters: dict[str, int] = field(default_factory=lambda: {"eager_steps": 0, "two_phase_steps": 0,
                                                              "second_forwards": 0, "second_forward_rows": 0})

    coef: dict[str, float] = field(default_factory=dict)
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5)  # decayed sums: n, x, y, xx, xy

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise ValueError(f"vfd schedule must be one of {list(SCHEDULES)}, got {self.mode!r}")
        self.coef = dict(COST_MS.get(self.device_kind, COST_MS["cuda"]))

    @property
    def timed(self) -> bool:
        """Whether forwards are timed to refine the coefficients (CPU only: no device sync needed)."""
        return self.device_kind == "cpu"

    def observe_forward(self, tokens: int, ms: float, *, second: bool = False) -> None:
        """Fold one timed forward into the cost model: main forwards refit ``fixed`` and ``per_token`` by
        decayed least squares over (tokens, ms); second forwards update ``second_fixed`` (an average of
        what is left after the per-token part)."""
        if second:
            rest = max(ms - self.coef["per_token"] * tokens, 0.0)
            self.coef["second_fixed"] = 0.9 * self.coef["second_fixed"] + 0.1 * rest
            return
        s = self._fit
        d = 0.98
        for i, v in enumerate((1.0, tokens, ms, tokens * tokens, tokens * ms)):
            s[i] = d * s[i] + v
        n, x, y, xx, xy = s
        var = n * xx - x * x
        if n >= 8 and var > 1e-6 * max(n * xx, 1.0):
            slope = (n * xy - x * y) / var
            if slope > 0:
                self.coef["per_token"] = slope
                self.coef["fixed"] = max((y - slope * x) / n, 0.0)

    def costs(self, other_tokens: int, rows: int, k: int) -> dict[str, float]:
        c = self.coef
        alt = rows * max(k - 1, 0)
        p_any = 1.0 - (1.0 - self.rate) ** rows
        return {
            "eager": c["fixed"] + c["per_token"] * (other_tokens + alt),
            "two_phase": c["fixed"] + c["per_token"] * other_tokens
            + p_any * (c["second_fixed"] + c["per_token"] * self.rate * alt),
        }

    def choose(self, other_tokens: int, rows: int, k: int) -> str:
        """``"eager"`` or ``"two_phase"`` for a step with ``rows`` steady steered rows of ``k`` candidates."""
        if self.mode != "auto":
            choice = self.mode
        else:
            cost = self.costs(other_tokens, rows, k)
            choice = "two_phase" if cost["two_phase"] < cost["eager"] else "eager"
        self.counters[f"{choice}_steps"] += 1
        return choice

    def observe(self, rows: int, unsafe: int) -> None:
        """Fold one step's count of unsafe natural samples into the running rate."""
        if rows <= 0:
            return
        w = self.decay ** rows
        self.rate = w * self.rate + (1.0 - w) * (unsafe / rows)
