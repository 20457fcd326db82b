"""What one evaluation runs: :class:`EvalPlan` and the two standard plans (``FULL``, ``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass

from value_steer.core.config import MAX_NUM_CANDIDATES

# Every condition runs as one batch of this many concurrent requests (the engines' --max-num-seqs); the
# report's tok/s is measured at it.
MAX_NUM_SEQS = 64


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation runs. Sizes are prompts per split; one response per prompt.

    ``ks`` are the VFD candidate counts, ``thresholds`` the VFD sweep on P(undesirable), and
    ``max_ppl_increase`` the perplexity budget of the threshold selection (relative to base).
    """

    n_cal: int
    n_test: int
    max_tokens: int
    ks: tuple[int, ...]
    thresholds: tuple[float, ...]
    max_ppl_increase: float = 0.10
    n_examples: int = 4
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_cal", "n_test", "max_tokens", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.ks or any(k < 1 or k > MAX_NUM_CANDIDATES for k in self.ks):
            raise ValueError(f"ks must be integers in [1, {MAX_NUM_CANDIDATES}], got {self.ks!r}")
        if not self.thresholds or any(not (0.0 <= t <= 1.0) for t in self.thresholds):
            raise ValueError(f"thresholds must be values in [0, 1], got {self.thresholds!r}")
        if not self.max_ppl_increase >= 0:
            raise ValueError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase!r}")


# Sized for about 30 minutes on 2 CPU cores (base ~145 tok/s, VFD K=4 ~55, K=8 ~40).
FULL = EvalPlan(n_cal=80, n_test=160, max_tokens=64, ks=(4, 8), thresholds=(0.5, 0.6, 0.7))
QUICK = EvalPlan(n_cal=8, n_test=8, max_tokens=12, ks=(4,), thresholds=(0.3, 0.5), n_examples=2, n_boot=200)
