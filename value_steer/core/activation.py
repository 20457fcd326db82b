"""Activation-steering math as torch references (add, projection cap, ablation): one home each.

The per-request activation-steering op (row-indexed, batched) is tested against these; they validate
their inputs on the host and are not meant for the hot path. The ``*_rows`` forms at the end are the
same formulas with one vector per row (no validation), which the op's torch reference is built on, and
the ``OP_*`` / ``FLAG_*`` constants are the op's table encoding.
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


# ---------------------------------------------------------------------------------------------------
# The batched op's encoding and per-row (vectorised) forms of the formulas above.
#
# ``torch.ops.value_steer.steer_activations`` applies a different vector, scale and bound to every token;
# these helpers are the same formulas with one vector per row (``x [N, H]``, ``v [N, H]``, ``[N]``
# parameters), in fp32, with no host-side validation (the request spec validates once, at admission).
# ---------------------------------------------------------------------------------------------------

OP_NONE = 0  # ends a row's op list
OP_ADD = 1  # a = scale
OP_CAP = 2  # a = min, b = max (-inf / +inf: no bound)
OP_ABLATE = 3  # a = scale
FLAG_PROMPT = 1  # the op edits prompt tokens
FLAG_DECODE = 2  # the op edits decode tokens
FLAG_GATED = 4  # x <- x + gate * (op(x) - x)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    return v / v.norm(dim=-1, keepdim=True)


def add_rows(x: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``add`` per row: ``x[i] + scale[i] * v[i]`` in fp32 (x, v ``[N, H]``; scale ``[N]``)."""
    return x.float() + scale.float().unsqueeze(-1) * v.float()


def projection_cap_rows(x: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``projection_cap`` per row in fp32: ``x + (min(max(x·u, lo), hi) - x·u) u`` with ``u = v / |v|``.

    ``lo``/``hi`` are ``[N]`` fp32 with ``-inf``/``+inf`` for "no bound" (both infinite: the identity).
    """
    u = _unit_rows(v)
    xf = x.float()
    proj = (xf * u).sum(-1)
    capped = torch.minimum(torch.maximum(proj, lo.float()), hi.float())
    return xf + (capped - proj).unsqueeze(-1) * u


def ablate_rows(x: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``ablate`` per row in fp32: ``x + (scale - 1)(x·u) u`` with ``u = v / |v|``."""
    u = _unit_rows(v)
    xf = x.float()
    return xf + ((scale.float() - 1.0) * (xf * u).sum(-1)).unsqueeze(-1) * u


def gate_rows(x: torch.Tensor, probe: torch.Tensor, threshold: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """The steering gate per row: ``sigmoid(sharpness * (x·probe - threshold))`` in fp32 (probe not normalised)."""
    return torch.sigmoid(sharpness.float() * ((x.float() * probe.float()).sum(-1) - threshold.float()))
