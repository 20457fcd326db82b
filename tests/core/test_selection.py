"""steering: the torch references checked against hand / numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from value_steer.core.activation import ablate, add, projection_cap
from value_steer.core.selection import force_eos, vfd_select

NAN = math.nan


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# --------------------------------------------------------------------------------------------------
# add


def test_add_matches_hand_computation() -> None:
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    v = torch.tensor([0.5, 0.0, -2.0])
    out = add(h, v, 2.0)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, -1.0], [1.0, -1.0, -3.5]]))
    # not normalised: scaling the vector scales the shift
    assert torch.allclose(add(h, 3 * v, 1.0) - h, 3 * v.expand_as(h))
    assert torch.equal(add(h, v, 0.0), h)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_keeps_dtype(dtype: torch.dtype) -> None:
    h = torch.randn(4, 8).to(dtype)
    v = torch.randn(8)
    out = add(h, v, 0.5)
    assert out.dtype == dtype
    assert torch.equal(out, (h.float() + 0.5 * v).to(dtype))


def test_add_validation() -> None:
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match="vector"):
        add(h, torch.zeros(4))
    with pytest.raises(ValueError, match="vector"):
        add(h, torch.randn(5))
    with pytest.raises(ValueError, match="vector"):
        add(h, torch.tensor([1.0, NAN, 0.0, 0.0]))
    with pytest.raises(ValueError, match="scale"):
        add(h, torch.ones(4), math.inf)


# --------------------------------------------------------------------------------------------------
# projection_cap


def _decompose(h: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proj = h @ u
    return proj, h - np.outer(proj, u)


@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 1.0), (None, 0.3), (-0.2, None), (0.7, 0.7)])
def test_projection_cap_invariant(lo: float | None, hi: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g, dtype=torch.float64).float() * 2
    v = torch.randn(16, generator=g) * 3.0
    out = projection_cap(h, v, min=lo, max=hi).double().numpy()
    u = _unit(v.double()).numpy()
    proj_in, orth_in = _decompose(h.double().numpy(), u)
    proj_out, orth_out = _decompose(out, u)
    lo_ = -np.inf if lo is None else lo
    hi_ = np.inf if hi is None else hi
    # the component along u lands in [min, max] and equals the clamp of the input's component
    assert (proj_out >= lo_ - 1e-5).all() and (proj_out <= hi_ + 1e-5).all()
    np.testing.assert_allclose(proj_out, np.clip(proj_in, lo_, hi_), atol=1e-5)
    # the orthogonal part is unchanged
    np.testing.assert_allclose(orth_out, orth_in, atol=1e-5)
    # rows already inside the bounds are untouched
    inside = (proj_in >= lo_) & (proj_in <= hi_)
    np.testing.assert_allclose(out[inside], h.double().numpy()[inside], atol=1e-5)
    # the test data does exercise the clamping
    assert (~inside).any()


def test_projection_cap_hand_example() -> None:
    h = torch.tensor([[3.0, 4.0], [-5.0, 1.0], [0.5, 2.0]])
    v = torch.tensor([2.0, 0.0])  # u = e0, not normalised on input
    out = projection_cap(h, v, min=-1.0, max=1.0)
    assert torch.equal(out, torch.tensor([[1.0, 4.0], [-1.0, 1.0], [0.5, 2.0]]))


def test_projection_cap_vector_sign() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(32, 8, generator=g) * 3
    v = torch.randn(8, generator=g)
    # symmetric bounds: -v and v define the same constraint |h·u| <= c
    assert torch.allclose(projection_cap(h, v, min=-0.5, max=0.5), projection_cap(h, -v, min=-0.5, max=0.5), atol=1e-6)
    # asymmetric bounds are relative to the signed direction: capping along -v with [lo, hi] is capping along
    # v with [-hi, -lo], and differs from capping along v with [lo, hi]
    a = projection_cap(h, -v, min=0.0, max=1.0)
    assert torch.allclose(a, projection_cap(h, v, min=-1.0, max=0.0), atol=1e-6)
    assert not torch.allclose(a, projection_cap(h, v, min=0.0, max=1.0), atol=1e-3)
    # only the direction matters, not the norm
    assert torch.allclose(projection_cap(h, v, max=0.2), projection_cap(h, 7 * v, max=0.2), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_cap_keeps_dtype(dtype: torch.dtype) -> None:
    h = torch.randn(4, 8).to(dtype)
    out = projection_cap(h, torch.ones(8), max=0.0)
    assert out.dtype == dtype


def test_projection_cap_validation() -> None:
    h = torch.randn(2, 4)
    v = torch.ones(4)
    with pytest.raises(ValueError, match=r"min.*max"):
        projection_cap(h, v)
    with pytest.raises(ValueError, match=r"min \(1\.0\) must be <= max \(0\.0\)"):
        projection_cap(h, v, min=1.0, max=0.0)
    with pytest.raises(ValueError, match="vector"):
        projection_cap(h, torch.zeros(4), max=1.0)
    with pytest.raises(ValueError, match="vector"):
        projection_cap(h, torch.tensor([1.0, math.inf, 0.0, 0.0]), max=1.0)
    with pytest.raises(ValueError, match="min"):
        projection_cap(h, v, min=NAN)
    with pytest.raises(ValueError, match="max"):
        projection_cap(h, v, max=math.inf)


# --------------------------------------------------------------------------------------------------
# ablate


def test_ablate_scales_the_component() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(16, 8, generator=g, dtype=torch.float64).float()
    v = torch.randn(8, generator=g)
    u = _unit(v.double()).numpy()
    proj_in, orth_in = _decompose(h.double().numpy(), u)
    for scale, expected in ((0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (-1.0, -1.0), (0.5, 0.5)):
        proj, orth = _decompose(ablate(h, v, scale).double().numpy(), u)
        np.testing.assert_allclose(proj, expected * proj_in, atol=1e-5)
        np.testing.assert_allclose(orth, orth_in, atol=1e-5)
    assert torch.allclose(ablate(h, v, 1.0), h, atol=1e-6)
    # default removes the component
    assert np.abs(ablate(h, v).double().numpy() @ u).max() < 1e-5


def test_ablate_hand_example_and_validation() -> None:
    h = torch.tensor([[3.0, 4.0]])
    v = torch.tensor([0.0, -2.0])
    assert torch.equal(ablate(h, v, 0.0), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(ablate(h, v, 2.0), torch.tensor([[3.0, 8.0]]))
    with pytest.raises(ValueError, match="vector"):
        ablate(h, torch.zeros(2))
    with pytest.raises(ValueError, match="scale"):
        ablate(h, v, NAN)


# --------------------------------------------------------------------------------------------------
# vfd_select


def _vfd(values, threshold, sign, n=None):
    v = torch.tensor(values, dtype=torch.float32)
    r = v.shape[0]
    t = torch.tensor(threshold if isinstance(threshold, list) else [threshold] * r, dtype=torch.float32)
    s = torch.tensor(sign if isinstance(sign, list) else [sign] * r, dtype=torch.float32)
    nc = None if n is None else torch.tensor(n, dtype=torch.int64)
    winner, intervened = vfd_select(v, t, s, nc)
    assert winner.dtype == torch.int64 and intervened.dtype == torch.bool
    assert torch.equal(intervened, winner != 0)
    return winner.tolist()


def test_vfd_first_safe_wins() -> None:
    # col 0 safe -> 0; col 0 unsafe, col 1 safe (even though col 3 is safer) -> 1
    assert _vfd([[0.1, 0.0, 0.9, 0.9], [0.8, 0.4, 0.9, 0.0]], 0.5, 1.0) == [0, 1]


def test_vfd_none_safe_picks_safest_lowest_column_on_ties() -> None:
    assert _vfd([[0.9, 0.7, 0.8, 0.95]], 0.5, 1.0) == [1]
    assert _vfd([[0.9, 0.7, 0.7, 0.95]], 0.5, 1.0) == [1]
    assert _vfd([[0.7, 0.7]], 0.5, 1.0) == [0]


def test_vfd_equal_to_threshold_is_not_safe() -> None:
    # 0.5 == threshold is not safe: col 1 (0.5) is skipped in favour of col 2 (0.49)
    assert _vfd([[0.9, 0.5, 0.49]], 0.5, 1.0) == [2]
    # all equal: none safe, safest is the first
    assert _vfd([[0.5, 0.5]], 0.5, 1.0) == [0]
    # below: equal is not safe either
    assert _vfd([[0.1, 0.5, 0.51]], 0.5, -1.0) == [2]


def test_vfd_direction_below_flips() -> None:
    vals = [[0.2, 0.8, 0.1], [0.1, 0.3, 0.4]]
    assert _vfd(vals, 0.5, -1.0) == [1, 2]  # safe means > threshold; none safe in row 1 -> largest
    assert _vfd(vals, 0.5, 1.0) == [0, 0]
    # mixed per-row signs
    assert _vfd([[0.9, 0.2], [0.9, 0.2]], [0.5, 0.5], [1.0, -1.0]) == [1, 0]


def test_vfd_nan_handling() -> None:
    assert _vfd([[NAN, 0.9, 0.8]], 0.5, 1.0) == [2]  # NaN never selected; safest finite
    assert _vfd([[NAN, 0.2, 0.1]], 0.5, 1.0) == [1]  # first safe finite
    assert _vfd([[0.9, NAN, 0.95]], 0.5, 1.0) == [0]  # NaN is not "safest"
    assert _vfd([[NAN, NAN, NAN]], 0.5, 1.0) == [0]  # all NaN -> column 0
    assert _vfd([[NAN, NAN, 0.9]], 0.5, 1.0, n=[2]) == [0]  # only NaN among the valid columns


def test_vfd_num_candidates_limits_columns() -> None:
    vals = [[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.1]]
    assert _vfd(vals, 0.5, 1.0, n=[1, 2, 3]) == [0, 1, 2]
    assert _vfd(vals, 0.5, 1.0) == [2, 2, 2]


def test_vfd_validation() -> None:
    t = torch.full((2,), 0.5)
    s = torch.ones(2)
    with pytest.raises(ValueError, match="K"):
        vfd_select(torch.zeros(2, 0), t, s)
    with pytest.raises(ValueError, match="num_candidates"):
        vfd_select(torch.zeros(2, 3), t, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_candidates"):
        vfd_select(torch.zeros(2, 3), t, s, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"\[R, K\]"):
        vfd_select(torch.zeros(3), t, s)


def test_vfd_empty_batch() -> None:
    winner, intervened = vfd_select(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))
    assert winner.shape == (0,) and intervened.shape == (0,)


def test_vfd_matches_python_loop_on_random_data() -> None:
    rng = np.random.default_rng(3)
    r, k = 300, 5
    values = rng.random((r, k)).astype(np.float32)
    values[rng.random((r, k)) < 0.1] = np.nan
    values[rng.random((r, k)) < 0.1] = 0.5  # exact ties with the threshold
    thr = np.full(r, 0.5, dtype=np.float32)
    sign = rng.choice([1.0, -1.0], size=r).astype(np.float32)
    n = rng.integers(1, k + 1, size=r)
    expected = []
    for i in range(r):
        signed = [sign[i] * (values[i, j] - thr[i]) for j in range(n[i])]
        safe = [j for j, s in enumerate(signed) if np.isfinite(s) and s < 0]
        finite = [j for j, s in enumerate(signed) if np.isfinite(s)]
        if safe:
            expected.append(safe[0])
        elif finite:
            expected.append(min(finite, key=lambda j: (signed[j], j)))
        else:
            expected.append(0)
    winner, _ = vfd_select(torch.from_numpy(values), torch.from_numpy(thr), torch.from_numpy(sign), torch.from_numpy(n))
    assert winner.tolist() == expected


# --------------------------------------------------------------------------------------------------
# force_eos


def test_force_eos() -> None:
    values = torch.tensor([0.4, 0.5, 0.6, NAN, 0.5, 0.4, 0.6, NAN])
    thr = torch.full((8,), 0.5)
    sign = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    # above: >= crosses (equal crosses); below: <= crosses; NaN never
    assert force_eos(values, thr, sign).tolist() == [False, True, True, False, True, True, False, False]
    enabled = torch.tensor([True, False, True, True, True, True, True, True])
    assert force_eos(values, thr, sign, enabled).tolist() == [False, False, True, False, True, True, False, False]
    # enabled may be any dtype convertible to bool
    assert (
        force_eos(values, thr, sign, enabled.to(torch.int32)).tolist() == force_eos(values, thr, sign, enabled).tolist()
    )


def test_force_eos_just_below_threshold_does_not_cross() -> None:
    t = torch.tensor([0.5])
    below = torch.nextafter(t, torch.tensor([0.0]))
    assert force_eos(below, t, torch.ones(1)).tolist() == [False]
    assert force_eos(t.clone(), t, torch.ones(1)).tolist() == [True]
