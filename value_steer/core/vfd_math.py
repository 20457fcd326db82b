"""Value-filtered decoding (VFD): the pure parts, no vLLM.

VFD runs with a one-step lookahead. At the end of step ``t-1`` the runner draws a request's ``K``
candidates for position ``q`` from the processed distribution of the token it just committed. At step
``t`` the candidates are forwarded as 1-token attention sequences at ``q``. Each candidate ``k`` writes its
KV into a private *scratch block* ``S_k`` that mirrors the request's logical block ``q // bs``. The value
head scores the candidates' hidden states and ``score_and_select`` picks the winner. Its token is step
``t``'s output. Its logits give the distribution for ``q + 1``, from which the next candidates are drawn.
At step ``t+1`` the winner's KV at ``q`` is *committed*: copied from ``S_w`` into the real slot ``q``, and
into the other candidates' scratch blocks when ``q + 1`` stays in the same logical block.

This module holds the bookkeeping and the math that can be tested without an engine:
:class:`ScratchAllocator`, the slot planning (:func:`commit_slots`, :func:`mirror_slots`,
:func:`candidate_block_row`), the runner capacity (:func:`runner_capacity`,
:func:`scratch_blocks_needed`), the candidate draw (:func:`draw_candidates`), the logprob bookkeeping
(:func:`candidate_logprobs`) and the per-request state (:class:`VFDRequestState`). The vLLM adapter is
``value_steer.patches.vllm_0_32.vfd_runner``; the per-request state is ``value_steer.runtime.vfd_state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CandidateLogprobs",
    "candidate_block_row",
    "candidate_logprobs",
    "commit_slots",
    "draw_candidates",
    "mirror_slots",
    "runner_capacity",
    "scratch_blocks_needed",
    "slot_of",
]


# --------------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------------


def scratch_blocks_needed(num_candidates: int, max_num_seqs: int, slack: int | None = None) -> int:
    """Scratch blocks the runner adds beyond the scheduler's: ``K`` per live request, plus ``slack``.

    ``slack`` defaults to ``K`` (one request's worth).
    """
    _check_pos_int(num_candidates, "num_candidates")
    _check_pos_int(max_num_seqs, "max_num_seqs")
    extra = num_candidates if slack is None else int(slack)
    if extra < 0:
        raise ValueError(f"slack must be >= 0, got {slack!r}")
    return num_candidates * max_num_seqs + extra


def runner_capacity(max_num_seqs: int, max_num_batched_tokens: int, num_candidates: int) -> tuple[int, int]:
    """``(max_num_seqs, max_num_batched_tokens)`` that the runner's buffers need.

    In the steady state each steered decode row is replaced by candidate 0, and ``K - 1`` one-token
    sequences are appended for the other candidates. The first-token forward uses its own buffers.
    """
    _check_pos_int(max_num_seqs, "max_num_seqs")
    _check_pos_int(max_num_batched_tokens, "max_num_batched_tokens")
    _check_pos_int(num_candidates, "num_candidates")
    extra = (num_candidates - 1) * max_num_seqs
    return max_num_seqs + extra, max_num_batched_tokens + extra


def _check_pos_int(x: int, name: str) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")


# --------------------------------------------------------------------------------------------------
# Slot planning
# --------------------------------------------------------------------------------------------------


def slot_of(block: int, position: int, block_size: int) -> int:
    """Slot of ``position`` when its logical block is the physical ``block``."""
    return int(block) * block_size + position % block_size


def candidate_block_row(real_blocks: Sequence[int], position: int, block_size: int, scratch_block: int) -> list[int]:
    """Block-table row of a candidate sequence whose query is at ``position``.

    The request's own blocks serve every logical block before ``position // bs``. The scratch block
    stands for logical block ``position // bs``: it mirrors the real tail for positions before
    ``position``, or starts a new logical block when ``position % bs == 0``.
    """
    idx = position // block_size
    if len(real_blocks) < idx:
        raise ValueError(f"request has {len(real_blocks)} blocks; position {position} needs {idx} before it")
    return [int(b) for b in real_blocks[:idx]] + [int(scratch_block)]


def commit_slots(
    position: int, winner_block: int, real_block: int, scratch_blocks: Sequence[int], block_size: int
) -> tuple[list[int], list[int]]:
    """Slot copies that commit the token at ``position`` (last step's winner, KV in ``winner_block``).

    Returns ``(src, dst)``. The first pair copies to the request's real slot. When ``position + 1``
    stays in the same logical block, the other scratch blocks get the slot too, so every candidate
    block keeps mirroring the real block up to ``position``.
    """
    src = slot_of(winner_block, position, block_size)
    srcs, dsts = [src], [slot_of(real_block, position, block_size)]
    if (position + 1) // block_size == position // block_size:
        for b in scratch_blocks:
            if b != winner_block:
                srcs.append(src)
                dsts.append(slot_of(b, position, block_size))
    return srcs, dsts


def mirror_slots(
    real_block: int, scratch_blocks: Sequence[int], position: int, block_size: int
) -> tuple[list[int], list[int]]:
    """Slot copies that make every scratch block mirror logical block ``position // bs`` before ``position``.

    ``real_block`` is the request's physical block for that logical block. When ``position % bs == 0``
    the candidates start a fresh block and there is nothing to copy.
    """
    start = position - position % block_size
    offs = list(range(position - start))
    srcs: list[int] = []
    dsts: list[int] = []
    for b in scratch_blocks:
        srcs.extend(real_block * block_size + o for o in offs)
        dsts.extend(b * block_size + o for o in offs)
    return srcs, dsts


# --------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------


def draw_candidates(
    processed: torch.Tensor,
    greedy: torch.Tensor | Sequence[bool],
    k: int,
    first: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    groups: Sequence[tuple[torch.Generator | None, np.ndarray]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` candidates per row from processed logits.

    Random rows take ``k`` independent draws (with replacement) from ``softmax(processed)``. With VFD's
    rule (the first safe candidate in draw order, else the safest) this is rejection sampling: the
    committed token is a draw from the request's own distribution restricted to safe tokens whenever
    one of the ``k`` draws is safe, so steering moves the distribution no more than it must. (Drawing
    distinct candidates instead would force low-probability tokens into every step.) Greedy rows take
    the top-``k`` distinct tokens in order, so greedy decoding is steerable.

    Args:
        processed: ``[R, V]`` the distribution the sampler draws from. Random rows hold processed
            logits after temperature, top-k/top-p and min-p. Greedy rows hold logits after the logits
            processors. ``-inf`` means "never drawn".
        greedy: ``[R]`` bool: a host numpy array (no device read: the hot path) or a tensor / sequence.
        k: candidates per row (``>= 1``).
        first: optional ``[R]`` int, column 0 as already drawn by the engine's sampler (the natural
            sample). Random rows draw columns ``1..k-1`` independently of it; greedy rows take the
            best ``k-1`` tokens other than it.
        generators: optional per-row generators for the random draws. Rows sharing one generator
            draw together.
        groups: instead of ``generators``, the random rows already grouped on the host:
            ``(generator, rows)`` pairs, ``rows`` an int numpy array (the hot path: no per-row Python).
    Returns:
        ``tokens [R, k] int64`` and ``num_valid [R] int64``. Random rows: ``num_valid = k``. Greedy
        rows: columns ``>= num_valid`` fall outside the support (fewer than ``k`` finite logits) and
        repeat column 0.
    """
    if processed.dim() != 2:
        raise ValueError(f"processed must be [R, V], got {list(processed.shape)}")
    _check_pos_int(k, "k")
    r, v = processed.shape
    x = processed.float()
    greedy_np = np.asarray(greedy.cpu() if isinstance(greedy, torch.Tensor) else greedy, dtype=bool).reshape(-1)
    if greedy_np.shape[0] != r:
        raise ValueError(f"greedy must have {r} entries, got {greedy_np.shape[0]}")
    if generators is not None and len(generators) != r:
        raise ValueError(f"generators must have {r} entries, got {len(generators)}")
    if first is not None:
        first = first.to(device=x.device, dtype=torch.long).reshape(-1)
        if first.shape[0] != r:
            raise ValueError(f"first must have {r} entries, got {first.shape[0]}")

    # Greedy rows (and the layout every row starts from): top-k distinct, column 0 = first if given.
    finite = torch.isfinite(x).sum(dim=-1)
    if first is not None:
        rest = min(k - 1, v - 1)
        scores = x.scatter(1, first.unsqueeze(1), float("-inf"))
        others = torch.topk(scores, rest, dim=-1).indices if rest > 0 else first.new_empty((r, 0))
        tokens = torch.cat([first.unsqueeze(1), others], dim=1)
        first_finite = torch.isfinite(x.gather(1, first.unsqueeze(1))).squeeze(1)
        num_valid = 1 + (finite - first_finite.long()).clamp(min=0).clamp(max=rest)
    else:
        n = min(k, v)
        tokens = torch.topk(x, n, dim=-1).indices
        num_valid = finite.clamp(min=1, max=n)
    if tokens.shape[1] < k:
        tokens = torch.cat([tokens, tokens[:, :1].expand(r, k - tokens.shape[1])], dim=1)
    cols = torch.arange(k, device=x.device).unsqueeze(0)
    tokens = torch.where(cols < num_valid.unsqueeze(1), tokens, tokens[:, :1]).long()
    num_valid = num_valid.long()

    random_rows = np.flatnonzero(~greedy_np)
    if groups is None and random_rows.size:
        by_gen: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for i in random_rows.tolist():
            g = generators[i] if generators is not None else None
            by_gen.setdefault(id(g), (g, []))[1].append(i)
        groups = [(g, np.asarray(rows, dtype=np.int64)) for g, rows in by_gen.values()]
    elif groups is not None:
        grouped = np.sort(np.concatenate([np.asarray(rows, dtype=np.int64) for _, rows in groups] or [np.zeros(0)]))
        if not np.array_equal(grouped, random_rows):
            raise ValueError("groups must cover exactly the random (non-greedy) rows, each once")
    if random_rows.size:
        start = 0 if first is None else 1
        for g, rows in groups:  # type: ignore[union-attr]
            if not len(rows):
                continue
            idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(x.device, non_blocking=True)
            if k > start:
                probs = torch.softmax(x.index_select(0, idx), dim=-1)
                draws = torch.multinomial(probs, k - start, replacement=True, generator=g)
                tokens[idx, start:] = draws
            if first is not None:
                tokens[idx, 0] = first.index_select(0, idx)
            num_valid[idx] = k
    return tokens, num_valid


@dataclass
class CandidateLogprobs:
    """What the client's logprobs need for whichever candidate gets committed.

    token_logprobs / ranks: ``[K]`` each candidate's logprob and rank (vLLM's rank: the number of
    tokens whose logprob is ``>=`` it). top_ids / top_logprobs: ``[n]`` the distribution's top-``n``.
    """

    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[int]
    top_logprobs: list[float]


def candidate_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, num_top: Sequence[int]) -> list[CandidateLogprobs]:
    """Per-row logprob bookkeeping of the candidates, drawn from the ``[R, V]`` log-distribution ``logprobs``.

    Args:
        logprobs: ``[R, V]`` the values vLLM reports (raw logprobs by default).
        tokens: ``[R, K]`` candidate ids.
        num_top: per row, how many top logprobs the client asked for (``>= 0``).
    """
    if logprobs.dim() != 2 or tokens.dim() != 2 or tokens.shape[0] != logprobs.shape[0]:
        raise ValueError(f"logprobs [R, V] and tokens [R, K] expected, got {list(logprobs.shape)} {list(tokens.shape)}")
    lp = logprobs.float()
    tok_lp = lp.gather(1, tokens.long())
    # Column by column: [R, V] at a time instead of an [R, K, V] comparison tensor.
    ranks = torch.stack([(lp >= tok_lp[:, j : j + 1]).sum(-1) for j in range(tok_lp.shape[1])], dim=1)
    n_max = max([0, *num_top])
    if n_max:
        top_lp, top_ids = torch.topk(lp, min(n_max, lp.shape[1]), dim=-1)
    out = []
    tok_lp_l, ranks_l = tok_lp.tolist(), ranks.tolist()
    for i, n in enumerate(num_top):
        ids = top_ids[i, :n].tolist() if n else []
        lps = top_lp[i, :n].tolist() if n else []
        out.append(CandidateLogprobs(tok_lp_l[i], ranks_l[i], ids, lps))
    return out
