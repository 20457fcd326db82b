"""The value head: a small fp32 MLP scoring the backbone's final post-norm hidden state per token.

Architecture (the published seed checkpoints): ``Linear(H, H) -> Tanh -> Linear(H, H) -> ReLU ->
Linear(H, 1)``; ``sigmoid`` of the output is the value ``p`` (by default P(undesirable)). The module
is an ``nn.Sequential`` so its state_dict keys are exactly ``0.weight, 0.bias, 2.weight, 2.bias,
4.weight, 4.bias``.

``value_head_reference`` is the one home of the head's math as a plain function over tensors; the
module, the Triton kernel and the C++ CPU kernel are all tested against it.
"""

from __future__ import annotations

import torch
from torch import nn

STATE_DICT_KEYS: tuple[str, ...] = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")


def expected_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """State-dict key -> expected shape for a head over hidden size ``hidden_size``."""
    h = hidden_size
    return {
        "0.weight": (h, h),
        "0.bias": (h,),
        "2.weight": (h, h),
        "2.bias": (h,),
        "4.weight": (1, h),
        "4.bias": (1,),
    }


def value_head_logit_reference(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Pre-sigmoid value of each row.

    Args:
        x: ``[M, H]`` hidden states, any float dtype (cast to fp32).
        w0, w2: ``[H, H]``; b0, b2: ``[H]``; w4: ``[1, H]`` (or ``[H]``); b4: ``[1]``. Weights are
            used in fp32 whatever their storage dtype.
    Returns:
        ``[M]`` fp32 logits: ``w4 · relu(w2 · tanh(w0 · x + b0) + b2) + b4``.
    """
    x = x.float()
    h1 = torch.tanh(torch.nn.functional.linear(x, w0.float(), b0.float()))
    h2 = torch.relu(torch.nn.functional.linear(h1, w2.float(), b2.float()))
    return h2 @ w4.float().reshape(-1) + b4.float().reshape(())


def value_head_reference(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
) -> torch.Tensor:
    """Value ``p = sigmoid(logit)`` of each row: ``[M, H]`` -> ``[M]`` fp32 (see the logit reference)."""
    return torch.sigmoid(value_head_logit_reference(x, w0, b0, w2, b2, w4, b4))


class ValueHead(nn.Sequential):
    """fp32 MLP ``H -> H -> H -> 1`` (Linear, Tanh, Linear, ReLU, Linear).

    ``forward``/``logit`` return the pre-sigmoid score ``[...]`` (the trailing 1 is squeezed),
    ``p`` returns ``sigmoid(logit)``. Inputs of any float dtype are cast to fp32.
    """

    def __init__(self, hidden_size: int) -> None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        super().__init__(
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )
        self.hidden_size = hidden_size
        self.float()

    def weights(self) -> tuple[torch.Tensor, ...]:
        """``(w0, b0, w2, b2, w4, b4)`` in the order the kernels take them."""
        return (self[0].weight, self[0].bias, self[2].weight, self[2].bias, self[4].weight, self[4].bias)

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[...]`` fp32 pre-sigmoid values."""
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"value head expects hidden size {self.hidden_size}, got input [..., {h.shape[-1]}]")
        flat = h.reshape(-1, self.hidden_size)
        return value_head_logit_reference(flat, *self.weights()).reshape(h.shape[:-1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.logit(h)

    def p(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[...]`` fp32 values in (0, 1)."""
        return torch.sigmoid(self.logit(h))
