"""calibration: exact conformal ranks, the strict-inequality threshold, and the coverage guarantee."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from value_steer.core.calibration import (
    calibration_record,
    conformal_quantile,
    conformal_rank,
    strictly_above,
    trajectory_scores,
)
from value_steer.core.checkpoint import load_value_head, save_value_head
from value_steer.core.selection import force_eos
from value_steer.core.value_head import ValueHead


def threshold(labels, trajectories, tau: float, mode: str = "max") -> float:
    """The calibrated threshold, through the one entry point (``calibration_record``)."""
    return calibration_record(labels, trajectories, tau, mode)["threshold"]

# --------------------------------------------------------------------------------------------------
# conformal_quantile: exact ranks


def test_conformal_quantile_hand_example() -> None:
    # n = 9, tau = 0.2 -> k = ceil(10 * 0.8) = 8 -> the 8th smallest (0.8); k-1 would give 0.7, k+1 0.9
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]
    assert conformal_rank(9, 0.2) == 8
    assert conformal_quantile(scores, 0.2) == 0.8
    # n = 19, tau = 0.1 -> k = 18
    perm = np.random.default_rng(0).permutation(np.arange(1, 20, dtype=float))
    assert conformal_rank(19, 0.1) == 18
    assert conformal_quantile(perm, 0.1) == 18.0
    # n = 4, tau = 0.5 -> k = ceil(2.5) = 3
    assert conformal_quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 3.0


def test_conformal_rank_is_not_fooled_by_float_noise() -> None:
    # (n+1)(1-tau) is an exact integer here but evaluates to 3.0000000000000004 / 55.00000000000001 in floats
    assert (9 + 1) * (1 - 0.7) > 3
    assert conformal_rank(9, 0.7) == 3
    assert conformal_quantile(np.arange(1.0, 10.0), 0.7) == 3.0
    assert conformal_rank(99, 0.45) == 55


def test_conformal_quantile_with_ties() -> None:
    assert conformal_quantile([0.5] * 9, 0.2) == 0.5
    assert conformal_quantile([0.1, 0.5, 0.5, 0.5, 0.9], 0.4) == 0.5  # k = ceil(3.6) = 4


def test_conformal_quantile_k_greater_than_n_is_inf() -> None:
    # k <= n iff n >= 1/tau - 1: n = 9 is the smallest n for tau = 0.1
    assert conformal_rank(9, 0.1) == 9
    assert conformal_quantile(np.arange(9.0), 0.1) == 8.0  # the maximum
    assert conformal_rank(8, 0.1) == 9
    assert conformal_quantile(np.arange(8.0), 0.1) == math.inf
    assert conformal_quantile([0.3], 0.4) == math.inf  # n = 1: k = ceil(1.2) = 2
    assert conformal_quantile([0.3], 0.5) == 0.3  # k = 1


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5, math.nan, True, "0.1"])
def test_conformal_quantile_bad_tau(tau: object) -> None:
    with pytest.raises(ValueError, match="tau"):
        conformal_quantile([0.1, 0.2], tau)  # type: ignore[arg-type]


def test_conformal_quantile_bad_scores() -> None:
    with pytest.raises(ValueError, match="at least one"):
        conformal_quantile([], 0.1)
    with pytest.raises(ValueError, match="finite"):
        conformal_quantile([0.1, math.nan], 0.1)
    with pytest.raises(ValueError, match="finite"):
        conformal_quantile([0.1, math.inf], 0.1)
    with pytest.raises(ValueError, match="1-D"):
        conformal_quantile(np.zeros((2, 2)), 0.1)


# --------------------------------------------------------------------------------------------------
# strictly_above


def test_strictly_above_is_the_float32_successor() -> None:
    assert strictly_above(0.5) == float(np.nextafter(np.float32(0.5), np.float32(1)))
    assert strictly_above(0.5) > 0.5
    # 0.1 is not a float32: float32(0.1) is already above it and is the answer
    assert strictly_above(0.1) == float(np.float32(0.1)) > 0.1
    assert strictly_above(math.inf) == math.inf
    assert strictly_above(1.0) == float(np.nextafter(np.float32(1.0), np.float32(2)))
    with pytest.raises(ValueError):
        strictly_above(math.nan)
    rng = np.random.default_rng(1)
    for q in np.concatenate([rng.random(200), rng.random(50).astype(np.float32).astype(np.float64), [0.0, -0.25]]):
        t = strictly_above(float(q))
        t32 = np.float32(t)
        assert float(t32) == t  # exactly representable in float32
        assert t > q
        assert float(np.nextafter(t32, np.float32(-np.inf))) <= q  # no float32 strictly between q and t


def test_threshold_equal_value_does_not_cross_in_fp32() -> None:
    """The intervention rule is ``value >= threshold``: a safe score equal to q must not trigger it."""
    p = np.float32(0.7)
    trajectories = np.full((9, 3), 0.2, dtype=np.float32)
    trajectories[:, 1] = p  # all nine safe trajectories peak at exactly 0.7
    t = threshold(np.zeros(9, dtype=int), trajectories, 0.2)
    assert t > float(p)
    thr = torch.tensor([t, t], dtype=torch.float32)
    assert float(thr[0]) == t
    values = torch.tensor([float(p), float(np.nextafter(np.float32(t), np.float32(0)))], dtype=torch.float32)
    assert force_eos(values, thr, torch.ones(2)).tolist() == [False, False]
    # ... while anything at or above the threshold (the next float32 above q) crosses
    assert force_eos(torch.tensor([t, 0.9]), thr, torch.ones(2)).tolist() == [True, True]


# --------------------------------------------------------------------------------------------------
# trajectory scores


def test_trajectory_scores_hand_computed() -> None:
    trajs = [np.array([0.2, 0.5, 0.1]), np.array([0.6]), np.array([0.5, 0.25, 0.9])]
    np.testing.assert_array_equal(trajectory_scores(trajs, "max"), [0.5, 0.6, 0.9])
    # odds(0.2) = 0.25, odds(0.5) = 1 -> 4; single token -> 1; odds(0.9)/odds(0.5) = 9
    np.testing.assert_allclose(trajectory_scores(trajs, "martingale"), [4.0, 1.0, 9.0], rtol=1e-12)
    # a trajectory that only decreases scores 1 (its start)
    assert trajectory_scores([np.array([0.8, 0.3, 0.1])], "martingale")[0] == pytest.approx(1.0)


def test_martingale_clips_probabilities() -> None:
    eps = 1e-6
    s = trajectory_scores([np.array([0.0, 1.0])], "martingale", eps=eps)[0]
    assert math.isfinite(s)
    assert s == pytest.approx(((1 - eps) / eps) ** 2, rel=1e-6)
    s = trajectory_scores([np.array([0.0, 0.5])], "martingale", eps=1e-3)[0]
    assert s == pytest.approx((1 - 1e-3) / 1e-3, rel=1e-9)


def test_trajectory_scores_array_and_list_agree() -> None:
    arr = np.random.default_rng(2).random((20, 7))
    for mode in ("max", "martingale"):
        np.testing.assert_allclose(trajectory_scores(arr, mode), trajectory_scores(list(arr), mode), rtol=1e-12)


def test_trajectory_scores_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        trajectory_scores([np.array([0.1])], "mean")
    with pytest.raises(ValueError, match="empty"):
        trajectory_scores([np.array([0.1]), np.array([])])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        trajectory_scores([np.array([0.1, 1.2])])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        trajectory_scores([np.array([0.1, np.nan])])
    with pytest.raises(ValueError, match="1-D"):
        trajectory_scores([np.zeros((2, 2))])
    assert trajectory_scores([]).shape == (0,)


# --------------------------------------------------------------------------------------------------
# thresholds


def test_threshold_uses_only_safe_trajectories() -> None:
    safe = [np.array([0.1, 0.3]), np.array([0.2]), np.array([0.5, 0.4]), np.array([0.35])]
    labels = [0, 0, 0, 0, 1, 1]
    bad_a = [np.array([0.99]), np.array([0.95, 0.97])]
    bad_b = [np.array([0.01]), np.array([0.02])]
    t_a = threshold(labels, safe + bad_a, 0.4)
    t_b = threshold(labels, safe + bad_b, 0.4)
    # safe maxes 0.3, 0.2, 0.5, 0.35; n = 4, tau = 0.4 -> k = ceil(3) = 3 -> 0.35
    assert t_a == t_b == strictly_above(0.35)
    with pytest.raises(ValueError, match="safe"):
        threshold([1, 1], bad_a, 0.4)
    with pytest.raises(ValueError, match="labels"):
        threshold([0, 2], bad_a, 0.4)
    with pytest.raises(ValueError, match="one label per trajectory"):
        threshold([0], bad_a, 0.4)


def test_martingale_threshold_hand_example() -> None:
    trajs = [np.array([0.2, 0.5]), np.array([0.5, 0.9]), np.array([0.5]), np.array([0.1, 0.9])]
    # safe scores: 4, 9, 1; n = 3, tau = 0.5 -> k = 2 -> 4
    t = threshold([0, 0, 0, 1], trajs, 0.5, "martingale")
    assert t == strictly_above(4.0)


def test_too_few_safe_trajectories_have_no_threshold() -> None:
    trajs = np.random.default_rng(3).random((8, 4))
    # n = 8 < 1/0.1 - 1: the quantile is +inf, a threshold that never intervenes, and calibration refuses
    assert strictly_above(conformal_quantile(trajectory_scores(trajs), 0.1)) == math.inf
    assert force_eos(torch.tensor([1.0]), torch.tensor([math.inf]), torch.ones(1)).tolist() == [False]
    with pytest.raises(ValueError, match="too few"):
        threshold(np.zeros(8, dtype=int), trajs, 0.1)
    assert threshold(np.zeros(8, dtype=int), trajs, 0.2) < math.inf


def _coverage_rates(n: int, m: int, tau: float, splits: int, seed: int, mode: str = "max") -> np.ndarray:
    """False-intervention rate on ``m`` fresh safe trajectories, one per calibration split."""
    rng = np.random.default_rng(seed)
    T = 6

    def safe(size: int) -> np.ndarray:
        # per-trajectory level + per-token noise -> continuous, non-identical per-token distributions
        logits = rng.normal(-1.0, 1.0, size=(splits, size, 1)) + rng.normal(0.0, 0.7, size=(splits, size, T))
        return 1.0 / (1.0 + np.exp(-logits))

    cal, test = safe(n), safe(m)
    n_bad = 20
    bad = rng.uniform(0.6, 1.0, size=(splits, n_bad, T))
    labels = np.concatenate([np.zeros(n, dtype=int), np.ones(n_bad, dtype=int)])
    rates = np.empty(splits)
    for i in range(splits):
        thr = threshold(labels, np.concatenate([cal[i], bad[i]]), tau, mode)
        rates[i] = np.mean(trajectory_scores(test[i], mode) >= thr)
    return rates


@pytest.mark.parametrize(("n", "tau"), [(100, 0.1), (150, 0.1), (200, 0.05)])
def test_coverage_is_valid_and_tight(n: int, tau: float) -> None:
    splits, m = 4000, 200
    rates = _coverage_rates(n, m, tau, splits, seed=n)
    k = math.ceil((n + 1) * (1 - tau))
    expected = 1.0 - k / (n + 1)  # exact expectation for continuous scores: in (tau - 1/(n+1), tau]
    sem = rates.std(ddof=1) / math.sqrt(splits)
    assert sem < 0.001
    mean = rates.mean()
    # valid: at most tau up to sampling error; tight: not far below it
    assert mean <= tau + 4 * sem
    assert tau - 0.02 <= mean
    # exact: matches rank k, and is distinguishable from an off-by-one rank (1/(n+1) away)
    assert abs(mean - expected) < 4 * sem
    assert 1.0 / (n + 1) > 8 * sem


def test_coverage_martingale() -> None:
    n, tau, splits = 120, 0.1, 800
    rates = _coverage_rates(n, 100, tau, splits, seed=7, mode="martingale")
    k = math.ceil((n + 1) * (1 - tau))
    sem = rates.std(ddof=1) / math.sqrt(splits)
    assert abs(rates.mean() - (1.0 - k / (n + 1))) < 4 * sem
    assert rates.mean() <= tau + 4 * sem


def test_coverage_holds_for_discrete_scores_and_would_fail_without_strict_threshold() -> None:
    """With ties, ``score >= q`` can intervene far more than tau; ``score >= strictly_above(q)`` cannot."""
    rng = np.random.default_rng(11)
    levels = np.float32(np.arange(1, 11) / 11.0)  # 10 float32 values
    n, m, tau, splits = 60, 200, 0.1, 500
    ours, naive = np.empty(splits), np.empty(splits)
    for i in range(splits):
        cal = levels[rng.integers(0, 10, size=(n, 3))]
        test = levels[rng.integers(0, 10, size=(m, 3))]
        thr = threshold(np.zeros(n, dtype=int), cal, tau)
        q = conformal_quantile(trajectory_scores(cal), tau)
        s = trajectory_scores(test)
        ours[i] = np.mean(s >= thr)
        naive[i] = np.mean(s >= q)
    assert ours.mean() <= tau
    assert naive.mean() > tau + 0.1  # the tie mass makes the non-strict rule invalid


# --------------------------------------------------------------------------------------------------
# calibration_record


def test_calibration_record_and_sidecar_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    trajs = [rng.random(rng.integers(3, 9)) * 0.8 for _ in range(60)]
    labels = np.array([0] * 50 + [1] * 10)
    rec = calibration_record(labels, trajs, 0.1)
    assert rec["method"] == "split_conformal" and rec["score"] == "max"
    assert rec["tau"] == 0.1 and rec["n"] == 50 and rec["n_undesirable"] == 10
    assert rec["rank"] == math.ceil(51 * 0.9) == 46
    safe = [t for t, y in zip(trajs, labels) if y == 0]
    assert rec["quantile"] == conformal_quantile(trajectory_scores(safe), 0.1)
    assert rec["threshold"] == strictly_above(rec["quantile"])
    assert rec["safe_label"] == 0
    json.dumps(rec, allow_nan=False)  # JSON-ready
    path = tmp_path / "head.safetensors"
    save_value_head(path, ValueHead(4), threshold=rec["threshold"], calibration=rec)
    ck = load_value_head(path)
    assert ck.calibration == rec and ck.threshold == rec["threshold"]

    mrec = calibration_record(labels, trajs, 0.1, mode="martingale")
    assert mrec["score"] == "martingale"
    assert mrec["threshold"] == strictly_above(conformal_quantile(trajectory_scores(safe, "martingale"), 0.1))


def test_calibration_record_refuses_unguaranteed() -> None:
    trajs = np.random.default_rng(6).random((5, 3))
    with pytest.raises(ValueError, match="too few"):
        calibration_record(np.zeros(5, dtype=int), trajs, 0.1)
    with pytest.raises(ValueError, match="mode"):
        calibration_record(np.zeros(5, dtype=int), trajs, 0.5, mode="avg")
