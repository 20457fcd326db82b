"""VFD's runtime state: scratch-block allocation and the per-row lookahead pipelines (no vLLM).

:class:`VFDPipelines` keeps every steered request's pipeline in tables indexed by its steering row
(``value_steer.core.row_table``): host numpy mirrors for what the host plans with (scratch blocks, the
committed token, the pending position) and device tables for what only kernels read (the pending
candidate tokens). A steady step plans all its rows with vectorised numpy (:meth:`VFDPipelines.plan_steady`)
and updates the tables from the step's one device->host read (the winners), with no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ScratchAllocator", "ScratchExhausted", "SteadyLayout", "VFDPipelines"]


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


# --------------------------------------------------------------------------------------------------
# Per-row pipelines
# --------------------------------------------------------------------------------------------------


@dataclass
class SteadyLayout:
    """One steady step's candidate layout over ``S`` steady rows and ``E = sum(k_r - 1)`` appended sequences.

    Candidate 0 of steady row ``s`` replaces the scheduler's token of batch row ``batch_idx[s]`` (index
    ``token_index[s]``); candidates ``1..k_r-1`` are appended as one-token sequences at batch rows
    ``extra_rows`` and token indices ``extra_tokens``. All arrays are int64 numpy.

    Attributes:
        cand_index: ``[S, k_max]`` token index of each candidate in the forward (columns ``>= k_r``
            repeat column 0, so gathers stay rectangular).
        commit_src / commit_dst: ``[P]`` KV slot copies that commit last step's winners (scratch -> real
            slot, and into the sibling scratch blocks while the block continues).
        block_col: ``[S]`` the logical block of the candidates' position; ``block_old``: ``[S]`` the real
            block there (restored after the forward); ``block_new``: ``[S]`` candidate 0's scratch block.
        extra_parent: ``[E]`` steady-row index of each appended sequence; ``extra_block``: ``[E]`` its
            scratch block; ``extra_rows`` / ``extra_tokens``: ``[E]`` its batch row and token index.
        write_token / write_row / write_col / write_pos / write_slot: ``[S + E]`` per forwarded candidate:
            token index, steering row and column of its token in the pending table, position, KV slot.
    """

    cand_index: np.ndarray
    commit_src: np.ndarray
    commit_dst: np.ndarray
    block_col: np.ndarray
    block_old: np.ndarray
    block_new: np.ndarray
    extra_parent: np.ndarray
    extra_block: np.ndarray
    extra_rows: np.ndarray
    extra_tokens: np.ndarray
    write_token: np.ndarray
    write_row: np.ndarray
    write_col: np.ndarray
    write_pos: np.ndarray
    write_slot: np.ndarray

    @property
    def num_extra(self) -> int:
        return int(self.extra_rows.shape[0])


class VFDPipelines:
    """Every VFD-steered request's lookahead pipeline, in tables indexed by steering row.

    Host (numpy; written at admission, at a first-token step, or from the step's winners):
        k ``[rows]``: the row's number of candidates ``K_r`` (0 = no pipeline).
        scratch ``[rows, k_max]``: its scratch KV blocks (-1 = none).
        committed_pos / committed_col / committed_tok ``[rows]``: the last output token, whose KV still
            lives only in ``scratch[committed_col]`` (the real slot gets it at the next step); -1 = none.
        pending_pos ``[rows]``: the position the pending candidates were drawn for (-1 = none).
    Device:
        pending_tokens ``[rows, k_max]`` int64 and pending_nvalid ``[rows]`` int64: the drawn candidates
        (column 0 = the natural sample) and how many are valid.
    Host, only where needed: ``pending_logprobs`` (rows whose request asked for logprobs) and
    ``generators`` (seeded requests' private generators for columns ``1..k-1``).
    """

    def __init__(self, num_rows: int, k_max: int, device: torch.device) -> None:
        if num_rows < 1 or k_max < 1:
            raise ValueError(f"num_rows and k_max must be >= 1, got {num_rows}, {k_max}")
        self.k_max = int(k_max)
        self.k = np.zeros(num_rows, dtype=np.int64)
        self.scratch = np.full((num_rows, k_max), -1, dtype=np.int64)
        self.committed_pos = np.full(num_rows, -1, dtype=np.int64)
        self.committed_col = np.zeros(num_rows, dtype=np.int64)
        self.committed_tok = np.full(num_rows, -1, dtype=np.int64)
        self.pending_pos = np.full(num_rows, -1, dtype=np.int64)
        self.pending_tokens = torch.zeros((num_rows, k_max), dtype=torch.int64, device=device)
        self.pending_nvalid = torch.ones(num_rows, dtype=torch.int64, device=device)
        self.pending_logprobs: dict[int, object] = {}
        self.generators: dict[int, torch.Generator] = {}

    # ---- lifecycle ------------------------------------------------------------------------------------
    def open(self, row: int, scratch_blocks: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Give ``row`` a pipeline with ``len(scratch_blocks)`` candidates."""
        k = len(scratch_blocks)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"a pipeline needs 1..{self.k_max} scratch blocks, got {k}")
        if self.k[row]:
            raise ValueError(f"row {row} already has a pipeline")
        self.k[row] = k
        self.scratch[row] = -1
        self.scratch[row, :k] = scratch_blocks
        self.reset(np.array([row]))
        if generator is not None:
            self.generators[row] = generator

    def close(self, row: int) -> list[int]:
        """End ``row``'s pipeline; returns its scratch blocks (for the allocator)."""
        k = int(self.k[row])
        blocks = self.scratch[row, :k].tolist()
        self.k[row] = 0
        self.scratch[row] = -1
        self.reset(np.array([row]))
        self.generators.pop(row, None)
        return blocks

    def reset(self, rows: np.ndarray) -> None:
        """Restart the pipelines of ``rows`` (their next step is a first-token step); scratch is kept."""
        self.committed_pos[rows] = -1
        self.committed_tok[rows] = -1
        self.committed_col[rows] = 0
        self.pending_pos[rows] = -1
        for r in rows[np.isin(rows, list(self.pending_logprobs))] if self.pending_logprobs else ():
            self.pending_logprobs.pop(int(r), None)

    # ---- the steady step -----------------------------------------------------------------------------
    def steady_mask(self, rows: np.ndarray, computed: np.ndarray, token_at_computed: np.ndarray) -> np.ndarray:
        """Which rows continue their pipeline: the scheduled token at ``computed`` is the committed winner
        and the pending candidates are for ``computed + 1`` (vectorised ``[S]`` bool)."""
        return (
            (self.k[rows] > 0)
            & (self.committed_pos[rows] == computed)
            & (self.committed_tok[rows] == token_at_computed)
            & (self.pending_pos[rows] == computed + 1)
        )

    def plan_steady(self, rows: np.ndarray, positions: np.ndarray, token_index: np.ndarray,
                    block_table: np.ndarray, batch_idx: np.ndarray, block_size: int, first_extra_row: int,
                    first_extra_token: int, alternatives: bool = True) -> SteadyLayout:
        """Lay out the steady rows' candidates and last step's commits (vectorised numpy).

        Args:
            rows: ``[S]`` steering rows; positions: ``[S]`` the candidates' position ``q`` (= computed + 1).
            token_index: ``[S]`` each row's scheduled token index in the forward.
            block_table: the runner's ``[max_reqs, max_blocks]`` block ids; batch_idx: ``[S]`` batch rows.
            block_size: KV block size; first_extra_row / first_extra_token: where appended sequences start.
            alternatives: lay out candidates ``1..k-1`` as appended sequences (eager VFD). False (two-phase
                VFD): only candidate 0 rides in the main forward; the commits still mirror into every
                scratch block, so a second forward can run the alternatives.
        """
        bs = int(block_size)
        s = rows.shape[0]
        ar = np.arange(s)
        k = self.k[rows]
        scr = self.scratch[rows]
        q = positions.astype(np.int64)
        c = q - 1
        # Commit last step's winner at c: scratch[w] -> the real slot, and -> sibling scratch blocks while
        # q stays in c's block (each candidate block must mirror the real block up to q).
        w = self.committed_col[rows]
        src0 = scr[ar, w] * bs + c % bs
        dst0 = block_table[batch_idx, c // bs].astype(np.int64) * bs + c % bs
        cols = np.arange(self.k_max)[None, :]
        mirror = ((q // bs) == (c // bs))[:, None] & (cols < k[:, None]) & (cols != w[:, None])
        mrow, mcol = np.nonzero(mirror)
        commit_src = np.concatenate([src0, src0[mrow]])
        commit_dst = np.concatenate([dst0, scr[mrow, mcol] * bs + c[mrow] % bs])
        # Candidate 0 takes the scheduler's row; 1..k-1 are appended one-token sequences.
        col = q // bs
        block_old = block_table[batch_idx, col].astype(np.int64)
        n_extra = k - 1 if alternatives else np.zeros_like(k)
        e = int(n_extra.sum())
        parent = np.repeat(ar, n_extra)
        starts = np.cumsum(n_extra) - n_extra
        kidx = np.arange(e) - np.repeat(starts, n_extra) + 1
        extra_rows = first_extra_row + np.arange(e, dtype=np.int64)
        extra_tokens = first_extra_token + np.arange(e, dtype=np.int64)
        cand_index = np.repeat(token_index.astype(np.int64)[:, None], self.k_max, axis=1)
        cand_index[parent, kidx] = extra_tokens
        return SteadyLayout(
            cand_index=cand_index,
            commit_src=commit_src,
            commit_dst=commit_dst,
            block_col=col,
            block_old=block_old,
            block_new=scr[:, 0].copy(),
            extra_parent=parent,
            extra_block=scr[parent, kidx],
            extra_rows=extra_rows,
            extra_tokens=extra_tokens,
            write_token=np.concatenate([token_index.astype(np.int64), extra_tokens]),
            write_row=np.concatenate([rows.astype(np.int64), rows[parent].astype(np.int64)]),
            write_col=np.concatenate([np.zeros(s, dtype=np.int64), kidx]),
            write_pos=np.concatenate([q, q[parent]]),
            write_slot=np.concatenate([scr[:, 0] * bs + q % bs, scr[parent, kidx] * bs + q[parent] % bs]),
        )

    def commit(self, rows: np.ndarray, positions: np.ndarray, win_col: np.ndarray, win_tok: np.ndarray) -> None:
        """Record the step's winners (host values from the step's one device->host read)."""
        self.committed_pos[rows] = positions
        self.committed_col[rows] = win_col
        self.committed_tok[rows] = win_tok
        self.pending_pos[rows] = positions + 1

    def store_candidates(self, rows: torch.Tensor, tokens: torch.Tensor, num_valid: torch.Tensor) -> None:
        """Keep the next step's candidates on the device (``rows [R]``, ``tokens [R, k_max]``, ``num_valid [R]``)."""
        self.pending_tokens.index_copy_(0, rows, tokens)
        self.pending_nvalid.index_copy_(0, rows, num_valid)
