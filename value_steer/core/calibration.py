"""Split-conformal calibration of the value-head threshold (numpy only).

Labels: **0 = safe / desirable, 1 = undesirable**. The value ``p_t`` is the head's per-token
probability of "undesirable"; a trajectory (one generation) is intervened on at the first token whose
value *crosses* the threshold, i.e. ``p_t >= threshold`` (a value equal to the threshold crosses; see
:mod:`value_steer.core.selection`). So a trajectory is intervened on iff its score ``max_t p_t >= threshold``.

Guarantee. Calibrate on ``n`` safe trajectories with scores ``S_1..S_n``; let ``k = ceil((n+1)(1-tau))``
and ``q`` the ``k``-th smallest score. For a new safe trajectory exchangeable with the calibration ones,
``P(S_new <= q) >= k/(n+1) >= 1-tau``, i.e. ``P(S_new > q) <= tau`` -- with or without ties. The
intervention rule, however, is ``S >= threshold``; returning ``q`` itself would also intervene on
``S_new == q``, which for discrete (or float-quantised) scores has positive probability and can break the
bound. The thresholds returned here are therefore the **smallest float32 strictly above q**: for any
float32 score (the serving path keeps values and thresholds in fp32) ``S >= threshold`` holds exactly when
``S > q``, and for a float64 score ``S >= threshold`` still implies ``S > q``. Hence::

    P(intervene on a new safe trajectory) <= tau

and, for continuous scores, the rate is exactly ``1 - k/(n+1)`` in expectation (in ``(tau - 1/(n+1), tau]``).
When ``k > n`` (``n < 1/tau - 1``) no finite threshold has the guarantee: :func:`conformal_quantile` returns
``+inf`` (a threshold that never intervenes) and :func:`calibration_record`, the entry point
(``value-steer calibrate``), refuses.

Scores:
- ``"max"``: ``max_t p_t``.
- ``"martingale"``: ``max_t [p_t / (1 - p_t)] * [(1 - p_0) / p_0]``, the largest odds ratio of a value
  relative to the trajectory's first value (``p`` clipped into ``[eps, 1 - eps]``). Its threshold is on
  that odds-ratio scale (>= 1), not on ``p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SCORE_MODES = ("max", "martingale")
SAFE_LABEL = 0
UNDESIRABLE_LABEL = 1
DEFAULT_EPS = 1e-6

Trajectories = Sequence[np.ndarray] | np.ndarray


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must be a number in (0, 1) (the allowed false-intervention rate), got {tau!r}")
    return float(tau)


def _as_trajectory(traj: Any, index: int) -> np.ndarray:
    arr = np.asarray(traj, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"trajectory {index} must be a 1-D array of per-token values, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"trajectory {index} is empty")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"trajectory {index}: values must be finite probabilities in [0, 1]")
    return arr


def trajectory_scores(trajectories: Trajectories, mode: str = "max", eps: float = DEFAULT_EPS) -> np.ndarray:
    """One nonconformity score per trajectory.

    Args:
        trajectories: a sequence of 1-D arrays (per-token values ``p_t`` in [0, 1], any length >= 1), or a
            2-D array ``[n, T]`` of equal-length trajectories (vectorised path).
        mode: ``"max"`` (``max_t p_t``) or ``"martingale"`` (``max_t odds(p_t) / odds(p_0)``, with
            ``p`` clipped into ``[eps, 1 - eps]``).
        eps: clipping for the martingale score, in (0, 0.5).
    Returns:
        ``[n]`` float64 scores.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {list(SCORE_MODES)}, got {mode!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    if isinstance(trajectories, np.ndarray) and trajectories.ndim == 2:
        arr = trajectories.astype(np.float64, copy=False)
        if arr.shape[1] == 0:
            raise ValueError("trajectories must have at least one token each, got shape [n, 0]")
        if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
            raise ValueError("trajectory values must be finite probabilities in [0, 1]")
        rows = arr
    else:
        if isinstance(trajectories, np.ndarray) and trajectories.ndim != 1:
            raise ValueError(f"trajectories array must be 2-D [n, T], got shape {trajectories.shape}")
        rows = [_as_trajectory(t, i) for i, t in enumerate(trajectories)]
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float64)

    if mode == "max":
        if isinstance(rows, np.ndarray):
            return rows.max(axis=1)
        return np.array([r.max() for r in rows], dtype=np.float64)

    def log_odds(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, eps, 1.0 - eps)
        return np.log(p) - np.log1p(-p)

    if isinstance(rows, np.ndarray):
        lo = log_odds(rows)
        return np.exp(lo.max(axis=1) - lo[:, 0])
    return np.array([math.exp(float((lo := log_odds(r)).max() - lo[0])) for r in rows], dtype=np.float64)


def conformal_rank(n: int, tau: float) -> int:
    """``k = ceil((n + 1)(1 - tau))``: the 1-indexed rank of the conformal quantile.

    ``(n + 1)(1 - tau)`` is rounded to 9 decimals before the ceiling so that float noise (e.g.
    ``10 * (1 - 0.2)``) cannot push an exact integer up by one.
    """
    tau = _check_tau(tau)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"need at least one calibration score, got n={n!r}")
    return math.ceil(round((int(n) + 1) * (1.0 - tau), 9))


def conformal_quantile(scores: np.ndarray | Sequence[float], tau: float) -> float:
    """The ``k``-th smallest score, ``k = ceil((n+1)(1-tau))`` (1-indexed); ``+inf`` when ``k > n``.

    Args:
        scores: ``[n]`` finite calibration scores, ``n >= 1``.
        tau: target miscoverage in (0, 1).
    Returns:
        ``q`` such that a new exchangeable score satisfies ``P(S_new > q) <= tau``.
    """
    tau = _check_tau(tau)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.size < 1:
        raise ValueError("need at least one calibration score (n >= 1)")
    if not np.isfinite(s).all():
        raise ValueError("calibration scores must be finite")
    k = conformal_rank(s.size, tau)
    if k > s.size:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def strictly_above(q: float) -> float:
    """The smallest float32 value strictly greater than ``q`` (``+inf`` stays ``+inf``).

    For every float32 ``x``: ``x >= strictly_above(q)`` iff ``x > q``; for a float64 ``x`` the left side
    implies the right side. The result is exactly representable in float32.
    """
    if math.isnan(q):
        raise ValueError("q must not be NaN")
    if q == math.inf:
        return math.inf
    t = np.float32(q)  # round to nearest float32: may land below, on or above q
    if float(t) <= q:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def _safe_scores(labels: Sequence[int] | np.ndarray, trajectories: Trajectories, mode: str) -> np.ndarray:
    lab = np.asarray(labels)
    n_traj = trajectories.shape[0] if isinstance(trajectories, np.ndarray) else len(trajectories)
    if lab.ndim != 1 or lab.shape[0] != n_traj:
        raise ValueError(f"labels must be 1-D with one label per trajectory ({n_traj}), got shape {lab.shape}")
    if not np.isin(lab, (SAFE_LABEL, UNDESIRABLE_LABEL)).all():
        raise ValueError(f"labels must be {SAFE_LABEL} (safe) or {UNDESIRABLE_LABEL} (undesirable)")
    safe = lab == SAFE_LABEL
    if not safe.any():
        raise ValueError(f"no safe (label {SAFE_LABEL}) calibration trajectories")
    if isinstance(trajectories, np.ndarray) and trajectories.ndim == 2:
        chosen: Trajectories = trajectories[safe]
    else:
        chosen = [t for t, s in zip(trajectories, safe) if s]
    return trajectory_scores(chosen, mode=mode)


def calibration_record(
    labels: Sequence[int] | np.ndarray, trajectories: Trajectories, tau: float, mode: str = "max"
) -> dict[str, Any]:
    """Calibrate and return the sidecar's ``calibration`` object (JSON-ready).

    Only the safe (label 0) trajectories are scored (``mode``: see :func:`trajectory_scores`); undesirable
    ones are counted and ignored. The threshold is the smallest float32 above the conformal quantile of
    the safe scores (see the module docstring), on the score's scale: ``p`` for ``"max"``, the odds ratio
    for ``"martingale"``.

    Args:
        labels: ``[n_traj]`` 0 (safe) / 1 (undesirable), one per trajectory.
        trajectories: per-token values ``p_t`` (see :func:`trajectory_scores`).
        tau: the allowed false-intervention rate, in (0, 1).
        mode: the score, one of :data:`SCORE_MODES`.

    Returns:
        ``method`` (``"split_conformal"``), ``score`` (the score mode), ``tau``, ``n`` (safe calibration
        trajectories used), ``n_undesirable`` (ignored ones), ``rank`` (``k``), ``quantile`` (``q``),
        ``threshold`` (smallest float32 above ``q``), ``rule`` and ``safe_label``.

    Raises:
        ValueError: when no finite threshold has the guarantee (too few safe trajectories for ``tau``).
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {list(SCORE_MODES)}, got {mode!r}")
    tau = _check_tau(tau)
    scores = _safe_scores(labels, trajectories, mode)
    n = int(scores.size)
    k = conformal_rank(n, tau)
    q = conformal_quantile(scores, tau)
    if not math.isfinite(q):
        raise ValueError(
            f"{n} safe calibration trajectories are too few for tau={tau}: need at least "
            f"{math.ceil(round(1.0 / tau - 1.0, 9))} (rank {k} > n)"
        )
    lab = np.asarray(labels)
    return {
        "method": "split_conformal",
        "score": mode,
        "tau": tau,
        "n": n,
        "n_undesirable": int((lab == UNDESIRABLE_LABEL).sum()),
        "rank": k,
        "quantile": q,
        "threshold": strictly_above(q),
        "rule": "intervene when score >= threshold (threshold = smallest float32 above the quantile)",
        "safe_label": SAFE_LABEL,
    }
