"""What one evaluation runs: :class:`EvalPlan`, the two standard plans (``FULL``, ``--quick``) and the
runtime estimate of a plan (:func:`estimate_seconds`)."""

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
    ``activation``: also run the activation-steering rows on test (add at each suggested scale, cap,
    ablate, probe-gated add, VFD + gated add), from the committed vectors; ``gated_scale`` is the gated
    add's scale (None: the largest suggested scale of the vector's sidecar). ``logit_strengths``: the
    logit-steering rows on test (the committed generator at each request strength; empty: none).
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
    activation: bool = True
    gated_scale: float | None = None
    logit_strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    # Token-mode VFD (a Q-head; value_steer.core.qhead): its threshold sweep, run on calibration (one threshold
    # chosen by the same rule as VFD's) and on test (every threshold, the chosen one marked). Empty: no token rows.
    token_thresholds: tuple[float, ...] = ()
    # Token mode's tilt (logits - beta * q) at these betas, at the Q-head's own threshold; chosen the same way.
    token_betas: tuple[float, ...] = ()
    # The token rows' rule: 0 the mask, K >= 1 the K-candidate rule (vfd.num_candidates in token mode).
    token_k: int = 0

    def __post_init__(self) -> None:
        for name in ("n_cal", "n_test", "max_tokens", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.ks or any(k < 1 or k > MAX_NUM_CANDIDATES for k in self.ks):
            raise ValueError(f"ks must be integers in [1, {MAX_NUM_CANDIDATES}], got {self.ks!r}")
        if not self.thresholds or any(not (0.0 <= t <= 1.0) for t in self.thresholds):
            raise ValueError(f"thresholds must be values in [0, 1], got {self.thresholds!r}")
        if any(not (0.0 < b <= 100.0) for b in self.token_betas):
            raise ValueError(f"token_betas must be values in (0, 100], got {self.token_betas!r}")
        if not 0 <= self.token_k <= MAX_NUM_CANDIDATES:
            raise ValueError(f"token_k must be an integer in [0, {MAX_NUM_CANDIDATES}], got {self.token_k!r}")
        if any(not (0.0 <= t <= 1.0) for t in self.token_thresholds):
            raise ValueError(f"token_thresholds must be values in [0, 1], got {self.token_thresholds!r}")
        if any(not (0.0 < s <= 4.0) for s in self.logit_strengths):
            raise ValueError(f"logit_strengths must be values in (0, 4], got {self.logit_strengths!r}")
        if not self.max_ppl_increase >= 0:
            raise ValueError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase!r}")


# 0.40, 0.45, ..., 0.70, and 0.575 and 0.625 at the knee (where the 300-prompt calibration run of the committed
# head crossed the perplexity budget: between 0.55 and 0.65); rounded so that the report's names and the JSON keys
# read as typed.
SWEEP = tuple(sorted({round(0.40 + 0.05 * i, 2) for i in range(7)} | {0.575, 0.625}))
FULL = EvalPlan(n_cal=300, n_test=160, max_tokens=64, ks=(4, 8), thresholds=SWEEP)
QUICK = EvalPlan(n_cal=8, n_test=8, max_tokens=12, ks=(4,), thresholds=(0.3, 0.5), n_examples=2, n_boot=200,
                 logit_strengths=(1.0,))

# Generation rates (tok/s at MAX_NUM_SEQS concurrent requests, SmolLM2-135M fp32, vLLM CPU, 2 idle cores) for the
# estimate, measured by the 300-prompt run of this plan on a quiet machine (2026-11-28): base 287-290, activation
# add 287-295, VFD at t=0.4 (the sweep's slowest point) K=4 158-161 and K=8 123; rescoring (prefill of prompt +
# response with prompt logprobs) 300 x 105 tokens in 21-26 s. Rounded down.
RATES = {"base": 280.0, "activation": 280.0, "vfd4": 155.0, "vfd8": 120.0, "abstain": 270.0,
         "rescore_prefill": 1300.0}
ENGINE_START_S = 60.0
PROMPT_TOKENS = 41  # SmolLM2's chat template around one short user turn (test split mean: 41.2)


def estimate_seconds(plan: EvalPlan, n_scales: int = 4, rates: dict[str, float] | None = None) -> dict[str, float]:
    """A plan's expected wall time per phase (seconds), from token counts and :data:`RATES` (or ``rates``).

    Counts every condition the run makes: calibration (base and the whole (K, threshold) sweep), test (base,
    the first K's sweep, the other Ks' chosen point, abstention and, with ``plan.activation``, ``n_scales``
    adds, cap, ablate, gated add, VFD + gated add), the rescoring pass of every condition and two engine
    starts. Assumes full-length responses (they nearly all are at 64 tokens)."""
    r = {**RATES, **(rates or {})}
    vfd = {k: r["vfd4"] if k <= 4 else r["vfd8"] for k in plan.ks}
    cal_tok, test_tok = plan.n_cal * plan.max_tokens, plan.n_test * plan.max_tokens
    cal = cal_tok / r["base"] + sum(len(plan.thresholds) * cal_tok / vfd[k] for k in plan.ks)
    k0 = plan.ks[0]
    test = test_tok / r["base"] + len(plan.thresholds) * test_tok / vfd[k0]
    test += sum(test_tok / vfd[k] for k in plan.ks[1:]) + test_tok / r["abstain"]
    n_cal_conds = 1 + len(plan.ks) * len(plan.thresholds)
    n_test_conds = 2 + len(plan.thresholds) + len(plan.ks) - 1
    if plan.activation:
        test += (n_scales + 3) * test_tok / r["activation"] + test_tok / vfd[k0]
        n_test_conds += n_scales + 4
    test += len(plan.logit_strengths) * test_tok / r["activation"]  # one fused op per step: near base
    n_test_conds += len(plan.logit_strengths)
    # Token mode edits logits only: generation near base's rate, on both splits.
    n_token = len(plan.token_thresholds) + len(plan.token_betas)
    cal += n_token * cal_tok / r["base"]
    test += n_token * test_tok / r["base"]
    n_cal_conds += n_token
    n_test_conds += n_token
    per_prompt = PROMPT_TOKENS + plan.max_tokens
    rescore = (n_cal_conds * plan.n_cal + n_test_conds * plan.n_test) * per_prompt / r["rescore_prefill"]
    out = {"calibration": cal, "test": test, "rescoring": rescore, "engine_start": 2 * ENGINE_START_S}
    out["total"] = sum(out.values())
    return out
