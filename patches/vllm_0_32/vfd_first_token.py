"""VFD's sampling distributions and its first-token step: the processed distributions the candidates are drawn
from (the sampler's own processors), the natural sample, greedy rows, random-generator groups, and the first
token of a request (drawn and forwarded inside ``_sample``; a lifecycle step, host reads allowed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from value_steer.core.vfd_math import (
    candidate_block_row,
    candidate_logprobs,
    draw_candidates,
    mirror_slots,
    slot_of,
)
from value_steer.patches.vllm_0_32.vfd_common import (
    SAMPLING_EPS,
    StepPlan,
)


class VFDFirstTokenMixin:
    """Processed distributions, the natural sample and the first-token step."""

    _vs_state: Any

    # ---- processed distributions ------------------------------------------------------------------------
    def _vfd_processed(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's processed logits for ``rows`` (docs/vllm-0.32-internals.md §4) and which rows are greedy.

        Computed on a copy of the full batch (the logits processors' state is indexed by batch row).
        """
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
        from vllm.v1.sample.sampler import Sampler

        sm = self.input_batch.sampling_metadata  # type: ignore[attr-defined]
        sampler = self.sampler  # type: ignore[attr-defined]
        x = logits.to(torch.float32, copy=True)
        holder = getattr(sm, "thinking_budget_state_holder", None)
        if holder is None or not holder.has_tracked_requests():
            x = sampler.apply_logits_processors(x, sm, False)
        else:  # the holder's state is stepped by the real sampler only: replicate without it
            from vllm.v1.sample.ops.bad_words import apply_bad_words

            if sm.allowed_token_ids_mask is not None:
                x.masked_fill_(sm.allowed_token_ids_mask, float("-inf"))
            if sm.bad_words_token_ids:
                apply_bad_words(x, sm.bad_words_token_ids, sm.output_token_ids)
            for proc in sm.logitsprocs.non_argmax_invariant:
                x = proc.apply(x)
            x = sampler.apply_penalties(x, sm, sm.output_token_ids)
        greedy_x = x.index_select(0, rows)
        if sm.all_greedy:
            return greedy_x, torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        x = Sampler.apply_temperature(x, sm.temperature, sm.all_random)
        for proc in sm.logitsprocs.argmax_invariant:
            x = proc.apply(x)
        x = apply_top_k_top_p(x, sm.top_k, sm.top_p)
        rand_x = x.index_select(0, rows)
        if sm.all_random:
            return rand_x, torch.zeros(rows.shape[0], dtype=torch.bool, device=x.device)
        greedy = sm.temperature.index_select(0, rows) < SAMPLING_EPS
        return torch.where(greedy.unsqueeze(1), greedy_x, rand_x), greedy

    def _vfd_natural_sample(self, proc: torch.Tensor, greedy: torch.Tensor, batch_rows: list[int]) -> torch.Tensor:
        """Column 0 of first-token rows, drawn as the engine's sampler draws this position: its own
        sampling op, with the request's generator for seeded requests (one draw, as base consumes).

        ``proc`` is ``[n, V]`` from :meth:`_vfd_processed` (top-k/top-p already applied, so the sampler op
        runs with ``k = p = None``); ``batch_rows`` are the rows' batch indices. Returns ``[n] int64``.
        Every later position's column 0 is the sampler's own draw too, so a seeded steered request that
        never intervenes reproduces the unsteered text.
        """
        natural = proc.argmax(dim=-1)
        rand = (~greedy).nonzero().flatten()
        if rand.numel() == 0:
            return natural
        batch_gens = self.input_batch.sampling_metadata.generators  # type: ignore[attr-defined]
        # Unseeded rows draw from the runner's private generator, and the op's own use of the global RNG
        # is rolled back: unsteered rows must see the global stream exactly as in base.
        gens = {j: batch_gens.get(batch_rows[i], self._vfd_generator) for j, i in enumerate(rand.tolist())}
        cuda = [proc.device.index or 0] if proc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            sampled, _ = self.sampler.topk_topp_sampler(  # type: ignore[attr-defined]
                proc.index_select(0, rand).float(), gens, None, None
            )
        return natural.index_copy(0, rand, sampled.to(natural.dtype).reshape(-1))

    def _vfd_refresh_min_tokens(self) -> None:
        """Let min_tokens see the winner: the next distribution is for one output index later.

        ``MinTokensLogitsProcessor`` decides its stop-token mask in ``update_state``, at the start of the
        step, from the output length then. ``update_state(None)`` re-reads the lengths (the winner is
        appended for the sampler) and drops the requests that now have their minimum. That drop would
        happen at the next step anyway.
        """
        from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

        sm = self.input_batch.sampling_metadata  # type: ignore[attr-defined]
        for proc in sm.logitsprocs.non_argmax_invariant:
            if isinstance(proc, MinTokensLogitsProcessor):
                proc.update_state(None)

    def _vfd_logprob_dist(self, raw: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
        """The ``[S, V]`` values vLLM reports as logprobs (per ``--logprobs-mode``)."""
        mode = getattr(self.sampler, "logprobs_mode", "raw_logprobs")  # type: ignore[attr-defined]
        if mode == "raw_logits":
            return raw.float()
        if mode == "processed_logits":
            return processed.float()
        if mode == "processed_logprobs":
            return processed.log_softmax(dim=-1, dtype=torch.float32)
        return raw.log_softmax(dim=-1, dtype=torch.float32)

    def _vfd_greedy_host(self, batch_rows: np.ndarray) -> np.ndarray:
        """Which rows sample greedily, from vLLM's host mirror of the temperatures (no device read)."""
        sm = self.input_batch.sampling_metadata  # type: ignore[attr-defined]
        if sm.all_greedy:
            return np.ones(batch_rows.shape[0], dtype=bool)
        if sm.all_random:
            return np.zeros(batch_rows.shape[0], dtype=bool)
        return self.input_batch.temperature_cpu[batch_rows] < SAMPLING_EPS  # type: ignore[attr-defined]

    def _vfd_groups(self, rows: np.ndarray, greedy: np.ndarray) -> list[tuple[torch.Generator, np.ndarray]]:
        """Random rows grouped by the generator of their columns 1..K-1: unseeded rows share the runner's
        private generator; a seeded request draws from its own (one group each)."""
        rand = np.flatnonzero(~greedy)
        gens = self._vfd_pipelines().generators
        if not gens:
            return [(self._vfd_generator, rand)]
        seeded = np.isin(rows[rand], np.fromiter(gens, dtype=np.int64))
        groups = [(self._vfd_generator, rand[~seeded])]
        groups += [(gens[int(rows[j])], np.array([j])) for j in rand[seeded].tolist()]
        return groups

    # ---- the first-token step (lifecycle: host reads allowed) -------------------------------------------
    def _vfd_first_token(self, plan: StepPlan, logits: torch.Tensor, f_batch_t: torch.Tensor,
                         want_lp: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]:
        """Draw the first-token rows' candidates from this step's distribution and forward them.

        Returns ``tokens [F, k_max]``, ``num_valid [F]``, ``hidden [F * k_max, H]`` (columns past a row's
        valid candidates repeat column 0) and each row's candidate logprobs (or None).
        """
        pipes = self._vfd_pipelines()
        kmax = self._vfd_k
        dev = logits.device
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        bs = int(bt.block_size)
        n_first = plan.first_batch.size
        self._vfd_counters["first_token_rows"] += n_first
        proc, greedy = self._vfd_processed(logits, f_batch_t)
        natural = self._vfd_natural_sample(proc, greedy, plan.first_batch.tolist())
        greedy_h = self._vfd_greedy_host(plan.first_batch)
        toks, nval = draw_candidates(proc, greedy_h, kmax, natural, groups=self._vfd_groups(plan.first_rows, greedy_h))
        toks_l, nval_l = toks.tolist(), nval.tolist()
        f_lp: list[Any] = [None] * n_first
        lp_idx = np.flatnonzero(want_lp)
        if lp_idx.size:
            sel = torch.from_numpy(lp_idx).to(dev)
            raw = logits.index_select(0, f_batch_t.index_select(0, sel))
            dist = self._vfd_logprob_dist(raw, proc.index_select(0, sel))
            nums = [self.requests[ib.req_ids[int(plan.first_batch[j])]].sampling_params.logprobs  # type: ignore[attr-defined]
                    for j in lp_idx.tolist()]
            for j, info in zip(lp_idx.tolist(), candidate_logprobs(dist, toks.index_select(0, sel), nums)):
                f_lp[j] = info
        width = int(bt.block_table.np.shape[1])
        seq_tok: list[int] = []
        seq_pos: list[int] = []
        seq_rows: list[list[int]] = []
        seq_slots: list[int] = []
        seq_batch: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        flat = np.zeros((n_first, kmax), dtype=np.int64)
        nvalid = np.zeros(n_first, dtype=np.int64)
        for j in range(n_first):
            b, row, q = int(plan.first_batch[j]), int(plan.first_rows[j]), int(plan.first_pos[j])
            k_r = int(pipes.k[row])
            nv = min(int(nval_l[j]), k_r)
            scratch = pipes.scratch[row, :k_r].tolist()
            nb = int(bt.num_blocks_per_row[b])
            real = [int(x) for x in bt.block_table.np[b, :nb]]
            if q % bs:
                s, d = mirror_slots(real[q // bs], scratch, q, bs)
                src += s
                dst += d
            flat[j, :nv] = len(seq_tok) + np.arange(nv)
            flat[j, nv:] = len(seq_tok)
            nvalid[j] = nv
            for k, tok in enumerate(toks_l[j][:nv]):
                seq_tok.append(tok)
                seq_pos.append(q)
                seq_rows.append(candidate_block_row(real, q, bs, scratch[k]))
                seq_slots.append(slot_of(scratch[k], q, bs))
                seq_batch.append(b)
        if src:
            s_t, d_t = self._vfd_stage([np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)])
            self._vfd_copy_slots(s_t, d_t)
        table = np.zeros((len(seq_rows), width), dtype=np.int64)
        for j, r in enumerate(seq_rows):
            table[j, : len(r)] = r
        ids = torch.tensor(seq_tok, dtype=torch.int64).to(dev, non_blocking=True)
        pos_np, slots_np = np.asarray(seq_pos, dtype=np.int64), np.asarray(seq_slots, dtype=np.int64)
        hidden = self._vfd_forward(ids, pos_np, table, slots_np, np.asarray(seq_batch, dtype=np.int64))
        self._vfd_counters["first_token_forwards"] += 1
        flat_t, nvalid_t = self._vfd_stage([flat, nvalid])
        return toks, nvalid_t.clone(), hidden.index_select(0, flat_t), f_lp
