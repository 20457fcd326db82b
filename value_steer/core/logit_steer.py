"""Generative logit steering (GenSteer / CALM): the generator's math and its checkpoint format.

A frozen base model's final post-norm hidden state ``h [H]`` (the state the value head reads: the one that
produced the step's logits) drives a low-rank generator whose output is added to the logits::

    z(h)        = W_down (h + pos)                                  W_down [R, H], pos [H]   -> [R]
    v(h)        = W_up z(h)                                         W_up [V, R]              -> [V]
    strength(h) = max_strength * sigmoid(w2 . tanh(W1 h + b1) + b2) W1 [G, H], b1 [G], w2 [G], b2 [1]
    logits'     = logits + s_req * strength(h) * v(h)               s_req: the request's multiplier

``W_up`` starts at zero, so an untrained generator is the identity on the logits. Everything is fp32 (the
logits are cast back to their own dtype). ``s_req = 0`` leaves the logits bitwise as they are.

**Vocabulary.** ``V`` (the sidecar's ``vocab_size``, the rows of ``W_up``) is the width of the logits the
generator was trained on: the rows of the base model's ``lm_head``. vLLM hands the sampler logits of width
``V'`` = the model config's ``vocab_size`` (it strips the ``lm_head``'s own padding to a multiple of 64, but
the config's vocabulary may already exceed the tokenizer's: Qwen2 has 151936 logit columns for 151665
tokens). :func:`logit_steer_rows` adds ``v`` to the first ``V`` columns and leaves columns ``V..V'-1`` bitwise
(ids no tokenizer produces); :func:`load_logit_steer` states which ``V`` a model accepts (``vocab_size`` /
``min_vocab_size``: the serving worker requires ``V == V'``).

**Checkpoint** (``value_steer.logit_steer/v1``): a safetensors file with exactly the fp32 tensors of
:data:`TENSOR_KEYS` (shapes in :func:`expected_shapes`) and a JSON sidecar ``<path>.meta.json``::

    {"format": "value_steer.logit_steer/v1", "hidden_size": 576, "vocab_size": 49152, "rank": 8,
     "gate_hidden": 32, "max_strength": 2.0,
     "training": {...free-form: data, loss, history...}, "command": "value-steer train-logit ..."}

The sidecar is required (``max_strength`` lives there). Loading reads the safetensors header first and checks
every tensor's name, dtype and shape against the sidecar, and the sidecar against the model, before any data
is read; a pickle is never loaded (only ``.safetensors`` files are accepted). Errors name the file and field.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from value_steer.core.checkpoint import CheckpointError, read_strict_sidecar, sidecar_path

FORMAT = "value_steer.logit_steer/v1"
TENSOR_KEYS: tuple[str, ...] = ("w_down", "pos", "w_up", "gate_w1", "gate_b1", "gate_w2", "gate_b2")
SIDECAR_KEYS = ("format", "hidden_size", "vocab_size", "rank", "gate_hidden", "max_strength", "training",
                "command")
_REQUIRED_SIDECAR_KEYS = ("format", "hidden_size", "vocab_size", "rank", "gate_hidden", "max_strength")
# A generator's output is bounded by max_strength * |v|; a strength past this is a units mistake, not a choice.
MAX_MAX_STRENGTH = 100.0


class LogitSteerCheckpointError(CheckpointError):
    """A logit-steering checkpoint, its sidecar, or its fit to the model is invalid (names file and field)."""


def expected_shapes(hidden_size: int, vocab_size: int, rank: int, gate_hidden: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a generator over ``H = hidden_size``, ``V = vocab_size``, rank ``R``, gate
    width ``G``."""
    h, v, r, g = hidden_size, vocab_size, rank, gate_hidden
    return {"w_down": (r, h), "pos": (h,), "w_up": (v, r), "gate_w1": (g, h), "gate_b1": (g,), "gate_w2": (g,),
            "gate_b2": (1,)}


# --------------------------------------------------------------------------------------------------
# The math (one home: the module, the op's references and the kernels are tested against these)


def gate_strength_rows(hidden: torch.Tensor, gate_w1: torch.Tensor, gate_b1: torch.Tensor, gate_w2: torch.Tensor,
                       gate_b2: torch.Tensor, max_strength: float) -> torch.Tensor:
    """``strength(h) = max_strength * sigmoid(w2 . tanh(W1 h + b1) + b2)`` per row.

    Args:
        hidden: ``[B, H]`` any float dtype (computed in fp32).
        gate_w1: ``[G, H]``; gate_b1: ``[G]``; gate_w2: ``[G]``; gate_b2: ``[1]`` (fp32).
        max_strength: the sidecar's bound.
    Returns:
        ``[B]`` fp32 in ``[0, max_strength]``.
    """
    a = torch.tanh(torch.nn.functional.linear(hidden.float(), gate_w1.float(), gate_b1.float()))
    return max_strength * torch.sigmoid(a @ gate_w2.float() + gate_b2.float().reshape(()))


def direction_rows(hidden: torch.Tensor, w_down: torch.Tensor, pos: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``v(h) = W_up W_down (h + pos)`` per row: ``[B, H] -> [B, V]`` fp32."""
    z = torch.nn.functional.linear(hidden.float() + pos.float(), w_down.float())
    return z @ w_up.float().t()


def logit_steer_rows(hidden: torch.Tensor, logits: torch.Tensor, strength: torch.Tensor, w_down: torch.Tensor,
                     pos: torch.Tensor, w_up: torch.Tensor, gate_w1: torch.Tensor, gate_b1: torch.Tensor,
                     gate_w2: torch.Tensor, gate_b2: torch.Tensor, max_strength: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steer a batch of logit rows (the semantics every implementation follows).

    Args:
        hidden: ``[B, H]`` fp32/bf16/fp16, the final post-norm hidden state that produced each row's logits.
        logits: ``[B, V']`` fp32/bf16/fp16 with ``V' >= V``.
        strength: ``[B]`` fp32, the request multiplier ``s_req`` per row (0: untouched).
        w_down, pos, w_up, gate_w1, gate_b1, gate_w2, gate_b2: the generator (see the module doc), ``W_up [V, R]``.
        max_strength: the gate's bound.
    Returns:
        ``(logits' [B, V'] logits' dtype, gate_strength [B] fp32)``. Rows with ``strength == 0`` are ``logits``
        bitwise with gate strength 0; the others get ``logits + s_req * strength(h) * v(h)`` on the first ``V``
        columns, in fp32, cast back (columns ``V..V'-1`` bitwise).
    """
    v = w_up.shape[0]
    on = strength != 0
    g = gate_strength_rows(hidden, gate_w1, gate_b1, gate_w2, gate_b2, max_strength)
    coef = strength.float() * g
    steered = (logits[:, :v].float() + coef.unsqueeze(1) * direction_rows(hidden, w_down, pos, w_up))
    out = logits.clone()
    out[:, :v] = torch.where(on.unsqueeze(1), steered.to(logits.dtype), logits[:, :v])
    return out, torch.where(on, g, torch.zeros_like(g))


def logit_steer_row(hidden: torch.Tensor, logits: torch.Tensor, strength: float, gen: LogitSteerGenerator
                    ) -> tuple[torch.Tensor, float]:
    """One row: ``hidden [H]``, ``logits [V']`` -> ``(logits' [V'], gate strength)`` (``strength`` = ``s_req``)."""
    out, g = logit_steer_rows(hidden.unsqueeze(0), logits.unsqueeze(0), torch.tensor([float(strength)]),
                              *gen.weights(), gen.max_strength)
    return out[0], float(g[0])


class LogitSteerGenerator(nn.Module):
    """The trainable generator (fp32 parameters named as in the checkpoint: :data:`TENSOR_KEYS`).

    Initialisation (``torch.manual_seed`` first for a reproducible one): ``W_down`` and ``W1`` ~ N(0, 1/H),
    ``w2`` ~ N(0, 1/G), ``pos``, ``b1``, ``b2`` and ``W_up`` zero (an untrained generator adds nothing; the
    gate starts at ``max_strength / 2``).
    """

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, gate_hidden: int = 32,
                 max_strength: float = 2.0) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size), ("rank", rank),
                            ("gate_hidden", gate_hidden)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        _check_max_strength(max_strength, "max_strength", ValueError)
        h, g = hidden_size, gate_hidden
        self.hidden_size, self.vocab_size, self.rank, self.gate_hidden = hidden_size, vocab_size, rank, gate_hidden
        self.max_strength = float(max_strength)
        self.w_down = nn.Parameter(torch.randn(rank, h) / math.sqrt(h))
        self.pos = nn.Parameter(torch.zeros(h))
        self.w_up = nn.Parameter(torch.zeros(vocab_size, rank))
        self.gate_w1 = nn.Parameter(torch.randn(g, h) / math.sqrt(h))
        self.gate_b1 = nn.Parameter(torch.zeros(g))
        self.gate_w2 = nn.Parameter(torch.randn(g) / math.sqrt(g))
        self.gate_b2 = nn.Parameter(torch.zeros(1))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """The tensors in :data:`TENSOR_KEYS` order (the op's argument order)."""
        return tuple(getattr(self, k) for k in TENSOR_KEYS)

    def strength(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H] -> [B]`` fp32 gate strength."""
        return gate_strength_rows(hidden, self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2, self.max_strength)

    def direction(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H] -> [B, V]`` fp32 ``v(h)``."""
        return direction_rows(hidden, self.w_down, self.pos, self.w_up)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """Differentiable steered logits ``[B, V']`` fp32 for every row at one multiplier (training)."""
        add = (strength * self.strength(hidden)).unsqueeze(1) * self.direction(hidden)
        v = self.vocab_size
        if logits.shape[1] == v:
            return logits.float() + add
        return torch.cat([logits[:, :v].float() + add, logits[:, v:].float()], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------------
# Checkpoint IO


@dataclass
class LogitSteerCheckpoint:
    """A loaded generator with its sidecar: ``generator`` (fp32, ``eval()``), ``training`` / ``command`` (the
    sidecar's record of how it was trained and how to reproduce it), ``path``."""

    generator: LogitSteerGenerator
    training: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    path: str = ""

    @property
    def hidden_size(self) -> int:
        return self.generator.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.generator.vocab_size

    @property
    def max_strength(self) -> float:
        return self.generator.max_strength


def _check_max_strength(value: Any, where: str, err: type[ValueError]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or not 0.0 < float(value) <= MAX_MAX_STRENGTH:
        raise err(f"{where} must be a number in (0, {MAX_MAX_STRENGTH:g}], got {value!r}")
    return float(value)


def _check_pos_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LogitSteerCheckpointError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def _read_sidecar(path: str) -> dict[str, Any]:
    raw = read_strict_sidecar(path, fmt=FORMAT, keys=SIDECAR_KEYS, required=_REQUIRED_SIDECAR_KEYS,
                              what="a logit-steering checkpoint", err=LogitSteerCheckpointError)
    side = sidecar_path(path)
    for key in ("hidden_size", "vocab_size", "rank", "gate_hidden"):
        _check_pos_int(raw[key], f"{side}: {key}")
    _check_max_strength(raw["max_strength"], f"{side}: max_strength", LogitSteerCheckpointError)
    return raw


def load_logit_steer(path: str | os.PathLike[str], *, hidden_size: int | None = None, vocab_size: int | None = None,
                     min_vocab_size: int | None = None, device: torch.device | str = "cpu") -> LogitSteerCheckpoint:
    """Load a generator (safetensors + sidecar), strictly validated, never unpickling anything.

    Args:
        path: a ``.safetensors`` file with its ``<path>.meta.json`` sidecar.
        hidden_size: the model's hidden size; the generator's ``H`` must equal it.
        vocab_size: the width ``V'`` of the logits it will steer (vLLM: the model config's ``vocab_size``); the
            generator's ``V`` must not exceed it.
        min_vocab_size: the fewest columns the generator must cover (default ``vocab_size``: ``V == V'``). A
            generator trained on the tokenizer's vocabulary may steer padded logits when this is the tokenizer's
            size: columns past ``V`` are then left as they are.
        device: where the fp32 generator is placed.
    Raises:
        FileNotFoundError: no file at ``path``.
        LogitSteerCheckpointError: not a ``.safetensors`` file (pickles are refused by name), unreadable, a tensor
            missing / unexpected / of the wrong dtype or shape, non-finite values, a malformed sidecar, or a
            ``hidden_size`` / ``vocab_size`` that does not fit the model (the message names the field).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"logit-steering checkpoint not found: {path}")
    if not path.lower().endswith(".safetensors"):
        raise LogitSteerCheckpointError(f"{path}: a logit-steering checkpoint must be a .safetensors file; pickles "
                                        "(.pt/.bin/.pth) are never loaded")
    meta = _read_sidecar(path)
    h, v, r, g = (int(meta[k]) for k in ("hidden_size", "vocab_size", "rank", "gate_hidden"))
    if hidden_size is not None and h != int(hidden_size):
        raise LogitSteerCheckpointError(f"{path}: hidden_size: the generator was trained on hidden size {h} but the "
                                        f"model's hidden size is {hidden_size}")
    if vocab_size is not None:
        lo = int(vocab_size if min_vocab_size is None else min_vocab_size)
        if v > int(vocab_size):
            raise LogitSteerCheckpointError(f"{path}: vocab_size: the generator covers {v} logit columns but the "
                                            f"model's logits have {vocab_size}")
        if v < lo:
            raise LogitSteerCheckpointError(f"{path}: vocab_size: the generator covers {v} logit columns but the model "
                                            f"needs {lo} (its logits have {vocab_size}; was it trained on another "
                                            "model?)")
    from safetensors import SafetensorError, safe_open

    shapes = expected_shapes(h, v, r, g)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = [k for k in TENSOR_KEYS if k not in keys]
            unexpected = sorted(keys - set(TENSOR_KEYS))
            if missing or unexpected:
                parts = ([f"missing tensor(s) {missing}"] if missing else []) + (
                    [f"unexpected tensor(s) {unexpected}"] if unexpected else [])
                raise LogitSteerCheckpointError(f"{path}: {'; '.join(parts)}; expected exactly {list(TENSOR_KEYS)}")
            # Header checks first: a wrong shape is refused before its data is read.
            for key in TENSOR_KEYS:
                sl = f.get_slice(key)
                found = tuple(sl.get_shape())
                if found != shapes[key]:
                    raise LogitSteerCheckpointError(
                        f"{path}: {key}: expected shape {shapes[key]} (hidden_size {h}, vocab_size {v}, rank {r}, "
                        f"gate_hidden {g} from the sidecar), found {found}")
                if sl.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                    raise LogitSteerCheckpointError(f"{path}: {key} must be a float tensor, got {sl.get_dtype()}")
            for key in TENSOR_KEYS:
                tensors[key] = f.get_tensor(key).to(torch.float32).contiguous()
    except LogitSteerCheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LogitSteerCheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") \
            from exc
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise LogitSteerCheckpointError(f"{path}: {key} has {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    gen = LogitSteerGenerator(h, v, r, g, float(meta["max_strength"]))
    with torch.no_grad():
        for key in TENSOR_KEYS:
            getattr(gen, key).copy_(tensors[key])
    gen.to(device).eval()
    return LogitSteerCheckpoint(generator=gen, training=dict(meta.get("training") or {}),
                                command=meta.get("command"), path=path)


def save_logit_steer(path: str | os.PathLike[str], gen: LogitSteerGenerator, *,
                     training: Mapping[str, Any] | None = None, command: str | None = None) -> None:
    """Write ``gen`` as safetensors (contiguous fp32) plus its sidecar; both atomically. Round-trips exactly
    through :func:`load_logit_steer`.

    Args:
        path: destination ending in ``.safetensors``.
        gen: the generator (finite parameters).
        training: JSON-serialisable record of how it was trained (data, loss, history, runtime).
        command: the exact command that reproduces it.
    """
    from value_steer.core.checkpoint import _atomic_write

    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise LogitSteerCheckpointError(f"{path}: save_logit_steer writes safetensors; the path must end in "
                                        ".safetensors")
    state = {k: getattr(gen, k).detach().to("cpu", torch.float32).contiguous() for k in TENSOR_KEYS}
    for key, t in state.items():
        if not torch.isfinite(t).all():
            raise LogitSteerCheckpointError(f"save_logit_steer({path}): {key} has non-finite values")
    sidecar: dict[str, Any] = {"format": FORMAT, "hidden_size": gen.hidden_size, "vocab_size": gen.vocab_size,
                               "rank": gen.rank, "gate_hidden": gen.gate_hidden, "max_strength": gen.max_strength,
                               "training": dict(training or {}), "command": command}
    try:
        text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LogitSteerCheckpointError(f"sidecar for {path} is not JSON-serialisable (no NaN/inf): {exc}") from exc
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
