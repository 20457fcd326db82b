"""The steady VFD step's device work over plain tensors: select the winners, then advance the pipelines.

Runner-agnostic (no vLLM): the adapter lays the candidates out and forwards them, then calls
:func:`select_winners` (score every candidate, pick per row, ONE device->host read of the winners) and,
after its sampler drew the next natural samples, :func:`advance` (draw the other candidates on the
device, keep them there, record the winners on the host tables). ``tests/runtime/test_host_sync.py``
runs both on a stand-in device and holds them to that budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from value_steer.core.vfd_math import draw_candidates
from value_steer.runtime.state import SteeringState
from value_steer.runtime.vfd_state import VFDPipelines


@dataclass
class Winners:
    """One step's selection over ``R`` steered rows.

    col / token: ``[R]`` int64 on the HOST (numpy): the winner's column and token.
    token_t: ``[R]`` int64, value: ``[R]`` fp32, intervened: ``[R]`` bool, hidden: ``[R, H]`` on the device.
    """

    col: np.ndarray
    token: np.ndarray
    token_t: torch.Tensor
    value: torch.Tensor
    intervened: torch.Tensor
    hidden: torch.Tensor


def select_winners(state: SteeringState, rows: torch.Tensor, tokens: torch.Tensor, num_valid: torch.Tensor,
                   hidden: torch.Tensor, values: torch.Tensor | None = None) -> Winners:
    """Score the candidates (fused value head) and select per row (``score_and_select`` over the row table).

    Args:
        rows: ``[R]`` int64 steering rows (device).
        tokens: ``[R, K]`` int64 candidate tokens (column 0 = the natural sample).
        num_valid: ``[R]`` int64 valid candidates per row (columns past it are never selected).
        hidden: ``[R * K, H]`` the candidates' final hidden states, row-major.
        values: optional ``[R, K]`` fp32 values already scored (the value head is batch invariant, so a
            caller that scored parts of the batch passes them instead of scoring every row again).
    Returns:
        :class:`Winners`; the only device->host read is the stacked ``[2, R]`` winner columns and tokens.
    """
    from value_steer.kernels import score_and_select

    r, k = tokens.shape
    valid = torch.arange(k, device=tokens.device).unsqueeze(0) < num_valid.unsqueeze(1)
    if values is None:
        values = state.values(hidden, rows.repeat_interleave(k)).view(r, k)
    values = values.masked_fill(~valid, float("nan"))
    rt = state.rows
    col, tok, val, _, interv, _, win_hidden = score_and_select(
        values, tokens, torch.zeros((r, k), dtype=torch.float32, device=tokens.device), rows,
        rt.threshold, rt.sign, rt.mode, rt.num_candidates, hidden,
    )  # fmt: skip
    col_h, tok_h = torch.stack([col, tok]).cpu().numpy()
    state.stats.record(rows, val, interv, eos_forced=False)
    return Winners(col_h, tok_h, tok, val, interv, win_hidden)


def advance(pipes: VFDPipelines, rows: np.ndarray, rows_t: torch.Tensor, positions: np.ndarray, winners: Winners,
            processed: torch.Tensor, greedy: np.ndarray, natural: torch.Tensor,
            groups: list[tuple[torch.Generator | None, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the next step's candidates (column 0 = ``natural``, the engine sampler's draw) and keep them on
    the device; record the winners on the host tables.

    Args:
        rows / rows_t: ``[R]`` steering rows (host numpy / device int64); positions: ``[R]`` the winners'.
        processed: ``[R, V]`` the distribution after the winner (the sampler's processed logits).
        greedy: ``[R]`` host bool; natural: ``[R]`` int64 device; groups: random rows per generator.
    Returns:
        the drawn ``tokens [R, K]`` and ``num_valid [R]`` (device), for logprob bookkeeping.
    """
    tokens, num_valid = draw_candidates(processed, greedy, pipes.k_max, natural, groups=groups)
    pipes.store_candidates(rows_t, tokens, num_valid)
    pipes.commit(rows, positions, winners.col, winners.token)
    return tokens, num_valid
