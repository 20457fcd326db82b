"""The token-level value head (Q-head): every next token's predicted value from the current state, in one matmul.

Exact VFD forwards K candidates and scores each with the value head. A Q-head predicts, from the state ``h_t`` that
produced the step's logits, the value the value head would give the state after each vocabulary entry (the prefix
scorer of controlled decoding, CD-Q / FUDGE; GenARM's token-level reward)::

    q(h) = W_up W_down (h + pos) + bias          W_down [R, H], pos [H], W_up [V, R], bias [V]   -> [V]
    value(h_{t+1} | token v) ~= sigmoid(q(h_t)[v])                          (q is on the logit scale)

so value filtering becomes an edit of the step's logits (:func:`token_filter_rows`): no extra rows, no scratch KV,
no second forward.

**Checkpoint** (``value_steer.qhead/v1``): a safetensors file with exactly the fp32 tensors of :data:`TENSOR_KEYS`
and a JSON sidecar ``<path>.meta.json``::

    {"format": "value_steer.qhead/v1", "hidden_size": 576, "vocab_size": 49152, "rank": 16,
     "threshold": 0.6, "direction": "above", "training": {...}, "command": "value-steer train-qhead ..."}

``threshold`` / ``direction`` are the operating point the Q-head was distilled for (the value head's: a token is
undesirable when its predicted value is on the ``direction`` side of ``threshold``). Loading reads the safetensors
header first and checks every tensor's name, dtype and shape against the sidecar and the model before any data is
read; a pickle is never loaded. Errors name the file and field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from value_steer.core.checkpoint import CheckpointError, read_strict_sidecar, sidecar_path
from value_steer.core.modes import DIRECTION_SIGN

FORMAT = "value_steer.qhead/v1"
TENSOR_KEYS: tuple[str, ...] = ("w_down", "pos", "w_up", "bias")
SIDECAR_KEYS = ("format", "hidden_size", "vocab_size", "rank", "threshold", "direction", "training", "command")
_REQUIRED = ("format", "hidden_size", "vocab_size", "rank", "threshold", "direction")
# Mask mode: when the tokens predicted safe hold less than this probability mass, the step takes the token with the
# safest predicted value instead (exact VFD's "first safe, else the safest", in distribution form).
MIN_SAFE_MASS = 1e-4


class QHeadCheckpointError(CheckpointError):
    """A Q-head checkpoint, its sidecar, or its fit to the model is invalid (names the file and field)."""


def expected_shapes(hidden_size: int, vocab_size: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a Q-head over ``H = hidden_size``, ``V = vocab_size``, rank ``R``."""
    return {"w_down": (rank, hidden_size), "pos": (hidden_size,), "w_up": (vocab_size, rank), "bias": (vocab_size,)}


def qhead_rows(hidden: torch.Tensor, w_down: torch.Tensor, pos: torch.Tensor, w_up: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """``q(h)`` per row: ``hidden [B, H]`` (any float dtype) -> ``[B, V]`` fp32 (logit scale)."""
    z = torch.nn.functional.linear(hidden.float() + pos.float(), w_down.float())
    return torch.nn.functional.linear(z, w_up.float(), bias.float())


def k_emulation_factors(u: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log multipliers of the K-candidate rule for unsafe mass ``u [B]`` and ``k [B]`` (>= 1), fp32.

    Exact VFD draws up to K candidates and commits the first safe one. With ``u`` the probability that one draw is
    unsafe, a safe token ``v`` is committed with probability ``p(v) (1 + u + ... + u^(K-1))``; when all K draws are
    unsafe (probability ``u^K``) the step keeps the first draw, so an unsafe ``v`` has ``p(v) u^(K-1)``. Returns
    ``(log_safe, log_unsafe)``, the log factors on safe and unsafe tokens (0 where ``u`` is 0 or 1: nothing to
    move)."""
    u = u.float().clamp(0.0, 1.0)
    kf = k.float()
    # 1 + u + ... + u^(K-1), stable near u = 1 (where it tends to K).
    near_one = u > 1.0 - 1e-6
    series = torch.where(near_one, kf, (1.0 - u.pow(kf)) / (1.0 - u).clamp_min(1e-12))
    log_safe = torch.log(series.clamp_min(1.0))
    # u within float rounding of 1 (every token unsafe, the softmax's sum a few ulps short): nothing to move.
    log_unsafe = torch.where((u > 0) & ~near_one, (kf - 1.0) * torch.log(u.clamp_min(1e-30)), torch.zeros_like(u))
    return log_safe, log_unsafe


def token_filter_rows(logits: torch.Tensor, q: torch.Tensor, threshold: torch.Tensor, sign: torch.Tensor,
                      beta: torch.Tensor, on: torch.Tensor, min_safe_mass: float = MIN_SAFE_MASS,
                      k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value filtering of one step's logits by predicted token values (the semantics every implementation follows).

    Args:
        logits: ``[B, V']`` the step's logits (any float dtype), ``V' >= V``; columns ``V..`` are left as they are.
        q: ``[B, V]`` fp32, :func:`qhead_rows` of the states that produced ``logits``.
        threshold: ``[B]`` fp32, the value threshold in (0, 1) of each row.
        sign: ``[B]`` fp32, +1 when values above the threshold are undesirable, -1 below.
        beta: ``[B]`` fp32; 0: mask (remove the tokens on the undesirable side), > 0: tilt
            (``logits - beta * sign * q``, every token shifted by its predicted value).
        on: ``[B]`` bool; rows that are off come back bitwise.
        min_safe_mass: in mask mode, when the tokens predicted safe hold less than this mass of the row's
            distribution (softmax of ``logits``), only the token with the safest predicted value is kept.
        k: ``[B]`` int, or None (all 0). Where ``beta`` is 0 and ``k >= 1``, the K-candidate rule replaces the mask:
            the distribution exact VFD with K candidates commits from, with the Q-head in place of the value head
            (:func:`k_emulation_factors`).
    Returns:
        ``(logits' [B, V'] logits' dtype, changed [B] bool, mass_removed [B] fp32)``: ``changed`` where the row's
        distribution was edited; ``mass_removed`` the probability the edit took from the row's original
        distribution (mask: the removed tokens' mass; tilt and the K-candidate rule: the total-variation distance).
    """
    v = q.shape[1]
    lf = logits[:, :v].float()
    probs = torch.softmax(lf, dim=-1)
    side = sign.float().unsqueeze(1) * (torch.sigmoid(q) - threshold.float().unsqueeze(1))
    unsafe = side > 0
    safe_mass = (probs * (~unsafe)).sum(dim=-1)
    fallback = safe_mass < min_safe_mass
    safest = (sign.float().unsqueeze(1) * q).argmin(dim=-1, keepdim=True)
    keep_only_safest = torch.ones_like(unsafe).scatter_(1, safest, False)
    removed = torch.where(fallback.unsqueeze(1), keep_only_safest, unsafe)
    masked = lf.masked_fill(removed, float("-inf"))
    tilted = lf - (beta.float() * sign.float()).unsqueeze(1) * q
    tilt = beta > 0
    kk = torch.zeros_like(beta, dtype=torch.int64) if k is None else k.long()
    use_k = ~tilt & (kk >= 1)
    u = (probs * unsafe).sum(dim=-1)
    log_safe, log_unsafe = k_emulation_factors(u, kk.clamp_min(1))
    k_edit = lf + torch.where(unsafe, log_unsafe.unsqueeze(1), log_safe.unsqueeze(1))
    new = torch.where(tilt.unsqueeze(1), tilted, torch.where(use_k.unsqueeze(1), k_edit, masked))
    mass_mask = (probs * removed).sum(dim=-1)
    mass_tilt = 0.5 * (torch.softmax(tilted, dim=-1) - probs).abs().sum(dim=-1)
    mass_k = u - u * torch.exp(log_unsafe)  # the unsafe tokens' mass moved to the safe ones
    mass = torch.where(tilt, mass_tilt, torch.where(use_k, mass_k, mass_mask))
    changed = on & torch.where(tilt, mass_tilt > 0, torch.where(use_k, mass_k > 0, removed.any(dim=-1)))
    out = logits.clone()
    out[:, :v] = torch.where(on.unsqueeze(1), new.to(logits.dtype), logits[:, :v])
    return out, changed, torch.where(on, mass, torch.zeros_like(mass))


class QHead(nn.Module):
    """The trainable Q-head (fp32 parameters named as in the checkpoint). ``W_up`` and ``bias`` start at zero (every
    token predicted at value 0.5); ``W_down`` ~ N(0, 1/H)."""

    def __init__(self, hidden_size: int, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size, self.rank = hidden_size, vocab_size, rank
        self.w_down = nn.Parameter(torch.randn(rank, hidden_size) / math.sqrt(hidden_size))
        self.pos = nn.Parameter(torch.zeros(hidden_size))
        self.w_up = nn.Parameter(torch.zeros(vocab_size, rank))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H] -> [B, V]`` fp32 logits of the predicted values."""
        return qhead_rows(hidden, self.w_down, self.pos, self.w_up, self.bias)

    def gather(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``q(h)[token]`` per row without the ``[B, V]`` product: ``hidden [B, H]``, ``tokens [B, C]`` -> ``[B, C]``
        fp32 (training reads a few entries per state)."""
        z = torch.nn.functional.linear(hidden.float() + self.pos, self.w_down)  # [B, R]
        return (self.w_up[tokens] * z.unsqueeze(1)).sum(-1) + self.bias[tokens]

    def weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, k) for k in TENSOR_KEYS)


@dataclass
class QHeadCheckpoint:
    """A loaded Q-head with its sidecar's operating point (``threshold``, ``direction``) and training record."""

    head: QHead
    threshold: float
    direction: str
    training: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    path: str = ""

    @property
    def sign(self) -> float:
        return DIRECTION_SIGN[self.direction]


def _check_int(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QHeadCheckpointError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _read_sidecar(path: str) -> dict[str, Any]:
    raw = read_strict_sidecar(path, fmt=FORMAT, keys=SIDECAR_KEYS, required=_REQUIRED, what="a Q-head",
                              err=QHeadCheckpointError)
    side = sidecar_path(path)
    for key in ("hidden_size", "vocab_size", "rank"):
        _check_int(raw, key, side)
    t = raw["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
        raise QHeadCheckpointError(f"{side}: threshold must be a number in (0, 1), got {t!r}")
    if raw["direction"] not in DIRECTION_SIGN:
        raise QHeadCheckpointError(f"{side}: direction must be one of {sorted(DIRECTION_SIGN)}, got "
                                   f"{raw['direction']!r}")
    return raw


def load_qhead(path: str | os.PathLike[str], *, hidden_size: int | None = None, vocab_size: int | None = None,
               device: torch.device | str = "cpu") -> QHeadCheckpoint:
    """Load a Q-head (safetensors + sidecar), strictly validated, never unpickling anything.

    Args:
        path: a ``.safetensors`` file with its ``<path>.meta.json`` sidecar.
        hidden_size: the model's hidden size (``H`` must equal it).
        vocab_size: the width of the logits it filters (``V`` must equal it).
    """
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise QHeadCheckpointError(f"{path}: a Q-head must be a .safetensors file")
    if not os.path.isfile(path):
        raise QHeadCheckpointError(f"{path}: not found")
    raw = _read_sidecar(path)
    h, v, r = raw["hidden_size"], raw["vocab_size"], raw["rank"]
    if hidden_size is not None and h != hidden_size:
        raise QHeadCheckpointError(f"{path}: hidden_size {h} does not match the model's {hidden_size}")
    if vocab_size is not None and v != vocab_size:
        raise QHeadCheckpointError(f"{path}: vocab_size {v} does not match the model's logits ({vocab_size})")
    from safetensors import safe_open

    want = expected_shapes(h, v, r)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(TENSOR_KEYS):
                raise QHeadCheckpointError(f"{path}: tensors must be exactly {list(TENSOR_KEYS)}, got {sorted(keys)}")
            tensors = {}
            for key in TENSOR_KEYS:
                sl = f.get_slice(key)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                if dtype != "F32" or shape != want[key]:
                    raise QHeadCheckpointError(f"{path}: {key} must be F32 {list(want[key])}, got {dtype} "
                                               f"{list(shape)}")
                tensors[key] = f.get_tensor(key)
    except QHeadCheckpointError:
        raise
    except Exception as exc:  # a corrupt or truncated file: name it
        raise QHeadCheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise QHeadCheckpointError(f"{path}: {key} has non-finite values")
    head = QHead(h, v, r)
    with torch.no_grad():
        for key in TENSOR_KEYS:
            getattr(head, key).copy_(tensors[key])
    head = head.to(device).eval()
    return QHeadCheckpoint(head, float(raw["threshold"]), raw["direction"], dict(raw.get("training", {})),
                           raw.get("command"), path)


def save_qhead(path: str | os.PathLike[str], head: QHead, *, threshold: float, direction: str = "above",
               training: Mapping[str, Any] | None = None, command: str | None = None) -> None:
    """Write ``head`` as safetensors (contiguous fp32) plus its sidecar, both atomically; round-trips exactly."""
    from safetensors.torch import save_file

    from value_steer.core.checkpoint import _atomic_write

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise QHeadCheckpointError(f"{path}: save_qhead writes safetensors; the path must end in .safetensors")
    if not 0.0 < float(threshold) < 1.0 or direction not in DIRECTION_SIGN:
        raise QHeadCheckpointError(f"save_qhead({path}): threshold must be in (0, 1) and direction one of "
                                   f"{sorted(DIRECTION_SIGN)}")
    state = {k: getattr(head, k).detach().to("cpu", torch.float32).contiguous() for k in TENSOR_KEYS}
    for key, t in state.items():
        if not torch.isfinite(t).all():
            raise QHeadCheckpointError(f"save_qhead({path}): {key} has non-finite values")
    sidecar = {"format": FORMAT, "hidden_size": head.hidden_size, "vocab_size": head.vocab_size, "rank": head.rank,
               "threshold": float(threshold), "direction": direction, "training": dict(training or {}),
               "command": command}
    try:
        text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise QHeadCheckpointError(f"sidecar for {path} is not JSON-serialisable (no NaN/inf): {exc}") from None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
