"""VFD's per-request runtime state: scratch-block allocation and the lookahead pipeline (no vLLM)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from value_steer.core.vfd_math import CandidateLogprobs

__all__ = ["Candidates", "ScratchAllocator", "ScratchExhausted", "VFDRequestState"]


# --------------------------------------------------------------------------------------------------
# Scratch blocks
# --------------------------------------------------------------------------------------------------


class ScratchExhausted(RuntimeError):
    """More scratch blocks were asked for than the runner reserved (a capacity bug, never expected)."""


class ScratchAllocator:
    """Free list over the scratch block ids ``[first, first + count)`` (beyond the scheduler's blocks)."""

    def __init__(self, first: int, count: int) -> None:
        if first < 0 or count < 0:
            raise ValueError(f"first and count must be >= 0, got {first}, {count}")
        self.first = int(first)
        self.capacity = int(count)
        # Pop from the end; hand out low ids first.
        self._free = list(range(first + count - 1, first - 1, -1))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    def owns(self, block: int) -> bool:
        return self.first <= block < self.first + self.capacity

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise ScratchExhausted(
                f"VFD scratch blocks exhausted: asked {n}, {len(self._free)} free of {self.capacity}"
            )
        out = [self._free.pop() for _ in range(n)]
        self._in_use.update(out)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if b not in self._in_use:
                raise ValueError(f"scratch block {b} is not allocated")
            self._in_use.remove(b)
            self._free.append(b)


# --------------------------------------------------------------------------------------------------
# Per-request state
# --------------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Candidates drawn for ``position`` (not yet forwarded). ``tokens[0]`` is the natural sample."""

    position: int
    tokens: list[int]
    logprobs: CandidateLogprobs | None = None


@dataclass
class VFDRequestState:
    """A steered request's VFD state inside the runner.

    scratch: its ``K`` scratch blocks (empty until its first VFD step). committed: ``(position, column,
    token)`` of the last output token, whose KV still lives only in ``scratch[column]`` (the real slot
    gets it at the next step). pending: the candidates for ``position + 1``.
    """

    req_id: str
    num_candidates: int
    scratch: list[int] = field(default_factory=list)
    committed: tuple[int, int, int] | None = None
    pending: Candidates | None = None
    generator: torch.Generator | None = None  # private RNG of a seeded request (candidates 1..K-1)

    def steady_at(self, position: int, token: int) -> bool:
        """True when the row scheduled with ``token`` at ``position`` continues the pipeline."""
        c = self.committed
        return (
            c is not None
            and self.pending is not None
            and bool(self.scratch)
            and c[0] == position
            and c[2] == token
            and self.pending.position == position + 1
        )

    def reset(self) -> None:
        self.committed = None
        self.pending = None
