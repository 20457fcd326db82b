"""Activation-steering math as torch references (add, projection cap, ablation): one home each.

The per-request activation-steering op (row-indexed, batched) is tested against these; they validate
their inputs on the host and are not meant for the hot path.
"""

from __future__ import annotations

import math
import numbers

import torch


def _check_vector(vector: torch.Tensor, hidden: int, field: str = "vector") -> torch.Tensor:
    if vector.dim() != 1 or vector.shape[0] != hidden:
        raise ValueError(f"{field} must have shape [{hidden}], got {list(vector.shape)}")
    v = vector.float()
    if not torch.isfinite(v).all():
        raise ValueError(f"{field} must be finite (got NaN or inf entries)")
    if float(v.norm()) == 0.0:
        raise ValueError(f"{field} must be non-zero")
    return v


def _check_scale(scale: float, field: str = "scale") -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"{field} must be a finite number, got {scale!r}")
    return float(scale)


def add(h: torch.Tensor, vector: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Additive steering ``h + scale * vector``.

    Args:
        h: ``[..., H]`` activations (any float dtype; result in ``h.dtype``).
        vector: ``[H]`` steering direction (used as given, not normalised).
        scale: finite float.
    """
    v = _check_vector(vector, h.shape[-1])
    s = _check_scale(scale)
    return (h.float() + s * v).to(h.dtype)


def projection_cap(
    h: torch.Tensor, vector: torch.Tensor, min: float | None = None, max: float | None = None
) -> torch.Tensor:
    """Clamp the component of ``h`` along the unit direction ``u = vector / |vector|`` to ``[min, max]``.

    ``h + (clamp(h·u, min, max) - h·u) · u``. At least one bound is required; ``min <= max``.
    """
    if min is None and max is None:
        raise ValueError("projection_cap needs at least one of min, max")
    lo = -math.inf if min is None else _check_scale(min, "min")
    hi = math.inf if max is None else _check_scale(max, "max")
    if lo > hi:
        raise ValueError(f"projection_cap: min ({lo}) must be <= max ({hi})")
    u = _check_vector(vector, h.shape[-1])
    u = u / u.norm()
    hf = h.float()
    proj = hf @ u
    capped = proj.clamp(min=lo, max=hi)
    return (hf + (capped - proj).unsqueeze(-1) * u).to(h.dtype)


def ablate(h: torch.Tensor, vector: torch.Tensor, scale: float = 0.0) -> torch.Tensor:
    """Rescale the component of ``h`` along unit ``u``: ``h + (scale - 1)(h·u)u`` (scale 0 removes it)."""
    u = _check_vector(vector, h.shape[-1])
    u = u / u.norm()
    s = _check_scale(scale)
    hf = h.float()
    return (hf + (s - 1.0) * (hf @ u).unsqueeze(-1) * u).to(h.dtype)
