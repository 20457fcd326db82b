"""Value-filtered decoding inside vLLM 0.32's V1 model runner (fork-free runner mixin).

``VFDRunnerMixin`` goes in front of ``SteeringRunnerMixin`` (``vllm_0_32.runner_mixins``). The design
is in docs/vfd-design.md and the pure parts are in ``value_steer.core.vfd_math``. A short map of the hooks:

- ``__init__``: the runner gets a shallow-copied ``VllmConfig`` whose ``scheduler_config`` copy holds
  ``K`` times the sequences (and ``(K-1) * max_num_seqs`` more tokens), to make room for the candidate
  rows. The shared config is never mutated.
- ``initialize_kv_cache``: the runner's private ``kv_cache_config`` copy grows by
  ``K * max_num_seqs + K`` scratch blocks. The scheduler never hands out ids ``>= num_blocks``.
- ``execute_model`` (start): ends the pipelines of finished, unscheduled (preempted) and resumed requests.
- ``_prepare_inputs`` (post-prepare rewrite, docs/vllm-0.32-internals.md §3.3): for every steered decode
  row whose last token was last step's VFD winner (vectorised over the batch), commit that token's KV
  (scratch -> real slot and sibling scratch blocks), put candidate 0 at ``C+1`` in the row, and append
  ``K-1`` one-token sequences for the other candidates: numpy over vLLM's host buffers, then ONE
  host->device copy of every index the step's device writes need.
  ``_determine_batch_execution_and_padding``, ``_get_slot_mappings``, ``_build_attention_metadata``,
  ``_prepare_padding_mask`` and ``_preprocess`` are widened by the extra tokens and sequences.
- ``execute_model`` (end): gathers the candidates' hidden states and restores the block table rows it
  borrowed.
- ``_sample``: logit-steers the step's logits (requests with ``logit_steering``), runs the first-token forward
  (requests with no candidates yet), scores all candidates (fused value head + ``score_and_select``), replaces
  each steered row's logits with the winner's (logit-steered from the winner's hidden state), lets vLLM's sampler
  draw candidate 0 of the next step, draws the other candidates, and outputs the winner token with the logprobs
  of the distribution it was drawn from.

The mixin is split by phase, one module each: ``vfd_kv`` (scratch blocks, slot copies), ``vfd_forward`` (the
post-prepare rewrite, the hooks it widens, the candidates' own forward), ``vfd_first_token`` (processed
distributions, the natural sample, the first-token step), ``vfd_two_phase`` (the second phase) and ``vfd_common``
(the step plan); this module composes them and holds the lifecycle, ``_sample`` (the per-step decision) and the
debug surface.

Per-request pipeline state lives in :class:`~value_steer.runtime.vfd_state.VFDPipelines` (tables indexed by
steering row; the pending candidates stay on the device). A steady step (no first-token rows, no request
asking for logprobs, no debug) reads the device once: the winners ``[2, R]``, which vLLM's host-side
output lists need anyway. First-token steps (a request's first token, or after a preemption) are
lifecycle steps and may read more.
"""

from __future__ import annotations

import copy
import operator
import os
from collections import deque
from typing import Any

import numpy as np
import torch

from value_steer.core.config import parse_additional_config
from value_steer.core.modes import MODE_VFD
from value_steer.core.vfd_math import (
    candidate_logprobs,
    runner_capacity,
)
from value_steer.patches.vllm_0_32.vfd_common import (
    DEBUG_ENV,
    DEBUG_MAX_REQUESTS,
    DEBUG_MAX_STEPS,
    StepPlan,
)
from value_steer.patches.vllm_0_32.vfd_first_token import VFDFirstTokenMixin
from value_steer.patches.vllm_0_32.vfd_forward import VFDForwardMixin
from value_steer.patches.vllm_0_32.vfd_kv import VFDKVCacheMixin
from value_steer.patches.vllm_0_32.vfd_two_phase import VFDTwoPhaseMixin
from value_steer.runtime.staging import PackedStaging
from value_steer.runtime.vfd_schedule import ScheduleModel
from value_steer.runtime.vfd_state import ScratchAllocator, VFDPipelines
from value_steer.runtime.vfd_step import Winners, advance, select_winners


class VFDRunnerMixin(VFDForwardMixin, VFDKVCacheMixin, VFDFirstTokenMixin, VFDTwoPhaseMixin):
    """Value-filtered decoding for the V1 runner. Needs ``SteeringRunnerMixin`` (``_vs_state``) behind it."""

    _vs_state: Any

    def __init__(self, vllm_config: Any, device: Any) -> None:
        cfg = parse_additional_config(vllm_config.additional_config, check_files=False)
        if cfg.mode != MODE_VFD:
            raise RuntimeError("VFDRunnerMixin needs a 'vfd' section in --additional-config")
        k = int(cfg.num_candidates)
        sc = vllm_config.scheduler_config
        if getattr(sc, "async_scheduling", False):
            raise RuntimeError(
                "value_steer VFD needs synchronous scheduling (the next step's candidates depend on this "
                "step's winner); run with --no-async-scheduling"
            )
        seqs, toks = runner_capacity(int(sc.max_num_seqs), int(sc.max_num_batched_tokens), k)
        sc2 = copy.copy(sc)
        object.__setattr__(sc2, "max_num_seqs", seqs)
        object.__setattr__(sc2, "max_num_batched_tokens", toks)
        cfg2 = copy.copy(vllm_config)
        object.__setattr__(cfg2, "scheduler_config", sc2)
        self._vfd_k = k
        self._vfd_sched_max_seqs = int(sc.max_num_seqs)
        self._vfd_pipes: VFDPipelines | None = None
        self._vfd_live: dict[str, int] = {}  # request id -> steering row, for requests with a pipeline
        self._vfd_staging: PackedStaging | None = None
        self._vfd_plan: StepPlan | None = None
        self._vfd_scratch: ScratchAllocator | None = None
        self._vfd_kv_views: list[torch.Tensor] | None = None
        self._vfd_debug: dict[str, list[dict[str, Any]]] | None = {} if os.environ.get(DEBUG_ENV) == "1" else None
        self._vfd_counters = {
            "steps": 0,
            "steady_rows": 0,
            "first_token_rows": 0,
            "first_token_forwards": 0,
            "committed_slots": 0,
            "restarts": 0,
        }
        super().__init__(cfg2, device)  # type: ignore[call-arg]
        seed = getattr(vllm_config.model_config, "seed", None)
        self._vfd_capture_armed = False
        self._vfd_sampled_logits: torch.Tensor | None = None
        self._vfd_wrap_sampler()
        self._vfd_schedule = ScheduleModel(
            mode=getattr(cfg, "schedule", "auto"), device_kind=torch.device(self.device).type  # type: ignore[attr-defined]
        )
        self._vfd_generator = torch.Generator(device=self.device)  # type: ignore[attr-defined]
        self._vfd_generator.manual_seed(int(seed) if seed is not None else 0)
        if getattr(self, "uses_mrope", False):
            raise RuntimeError("value_steer VFD does not support M-RoPE models")
        if getattr(self, "enable_prompt_embeds", False):
            raise RuntimeError("value_steer VFD does not support prompt embeddings (--enable-prompt-embeds)")

    def _vfd_wrap_sampler(self) -> None:
        """Let the VFD step read the sampler's processed logits instead of recomputing them.

        vLLM's ``TopKTopPSampler`` applies top-k/top-p and then samples. When armed, the wrapper applies
        top-k/top-p itself, keeps the result, and hands it to the original with ``k = p = None`` (so top-k/top-p
        is a no-op there): the same logits are sampled with the same random draws as unwrapped.
        """
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        op = self.sampler.topk_topp_sampler  # type: ignore[attr-defined]
        original = op.forward
        runner = self

        def forward(logits: torch.Tensor, generators: Any, k: Any, p: Any) -> Any:
            if runner._vfd_capture_armed:
                logits = apply_top_k_top_p(logits, k, p)
                runner._vfd_sampled_logits = logits
                k = p = None
            return original(logits, generators, k, p)

        op.forward = forward

    # ---- request lifecycle ---------------------------------------------------------------------------
    def _vfd_pipelines(self) -> VFDPipelines:
        if self._vfd_pipes is None:
            self._vfd_pipes = VFDPipelines(
                self._vs_state.rows.num_rows, self._vfd_k, torch.device(self.device)  # type: ignore[attr-defined]
            )
        return self._vfd_pipes

    def _vfd_release(self, req_id: str) -> None:
        row = self._vfd_live.pop(req_id, None)
        if row is not None and self._vfd_scratch is not None:
            self._vfd_scratch.free(self._vfd_pipelines().close(row))

    def _vfd_release_stale(self, scheduler_output: Any) -> None:
        """End the pipelines of finished, unscheduled (preempted) and resumed requests: set operations,
        no loop over the live requests. Runs before the steering state frees finished rows."""
        live = self._vfd_live
        if not live:
            return
        so = scheduler_output
        resumed = getattr(so.scheduled_cached_reqs, "resumed_req_ids", None) or ()
        finished = live.keys() & so.finished_req_ids
        stale = (live.keys() - so.num_scheduled_tokens.keys()) | (live.keys() & set(resumed)) | finished
        for rid in stale:
            # Preempted, resumed, or not scheduled this step: the pipeline restarts with a first-token step.
            self._vfd_release(rid)
            if rid not in finished:
                self._vfd_counters["restarts"] += 1

    def _vfd_open(self, batch_idx: np.ndarray, rows: np.ndarray) -> None:
        """Give first-seen steered rows a pipeline: scratch blocks and, for seeded requests, a private
        generator (lifecycle work, once per request)."""
        pipes = self._vfd_pipelines()
        new = np.flatnonzero(pipes.k[rows] == 0)
        if not new.size:
            return
        req_ids = self.input_batch.req_ids  # type: ignore[attr-defined]
        for j in new.tolist():
            rid = req_ids[int(batch_idx[j])]
            row = int(rows[j])
            k_r = min(int(self._vs_state.requests[rid].steer.num_candidates), self._vfd_k)
            sp = self.requests[rid].sampling_params  # type: ignore[attr-defined]
            gen = None
            if sp.seed is not None:
                # Columns 1..K-1 of a seeded request come from a private stream derived from its seed (Knuth's
                # multiplicative hash 2654435761 ~ 2^32/phi, plus an odd constant), so they are reproducible and
                # independent of the request's own sampling stream, which draws column 0.
                gen = torch.Generator(device=self.device)  # type: ignore[attr-defined]
                gen.manual_seed((int(sp.seed) * 2654435761 + 0x5F3759DF) % (2**63))
            pipes.open(row, self._vfd_scratch.alloc(k_r), gen)  # type: ignore[union-attr]
            self._vfd_live[rid] = row

    # ---- the per-step decision --------------------------------------------------------------------------
    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        plan, self._vfd_plan = self._vfd_plan, None
        if plan is None or logits is None or spec_decode_metadata is not None:
            return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        st = self._vs_state
        pipes = self._vfd_pipelines()
        dev = logits.device
        ib = self.input_batch  # type: ignore[attr-defined]
        kmax = self._vfd_k
        self._vfd_counters["steps"] += 1

        # 0. Logit steering, before any draw: the first-token rows' candidates below, the sampler's natural sample
        #    and the next candidates are all drawn from steered distributions. A row whose logits are replaced by
        #    its winner's (3.) is steered again there, from the winner's hidden state; the mixin behind must not
        #    steer a second time.
        lsteer = self._vs_steer_logits(logits)  # type: ignore[attr-defined]
        self._vs_logits_steered = True
        if lsteer is not None:
            logits, l_gs, l_rows = lsteer

        # Rows in a fixed order: steady rows, then first-token rows.
        batch_rows = np.concatenate([plan.steady_batch, plan.first_batch])
        rows = np.concatenate([plan.steady_rows, plan.first_rows])
        positions = np.concatenate([plan.steady_pos, plan.first_pos])
        n_steady, n_rows = int(plan.steady_batch.size), int(batch_rows.size)
        want_lp = st.slot_logprobs[batch_rows]
        any_lp = bool(want_lp.any())
        batch_t, rows_t = self._vfd_stage([batch_rows, rows])
        # They outlive the step's other staged copies (first-token, second forward, redo): own them.
        batch_t, rows_t = batch_t.clone(), rows_t.clone()

        # 1. Candidates, their valid counts and hidden states: steady rows from the pending table and the
        #    forward; first-token rows drawn and forwarded now.
        k_r = st.rows.num_candidates.index_select(0, rows_t).clamp(max=kmax).long()
        tok_parts, nv_parts, hid_parts, val_parts = [], [], [], []
        drawn_nv: list[torch.Tensor] = []
        # Logprob bookkeeping of the candidates, for rows whose request asked for logprobs only.
        lp_of: dict[int, Any] = {
            j: pipes.pending_logprobs.get(int(plan.steady_rows[j])) for j in np.flatnonzero(want_lp[:n_steady]).tolist()
        }
        won: Winners | None = None
        if n_steady:
            s_rows_t = rows_t[:n_steady]
            tok_s = pipes.pending_tokens.index_select(0, s_rows_t)
            nv_s = pipes.pending_nvalid.index_select(0, s_rows_t)
            hid_s = plan.steady_hidden
            drawn_nv.append(nv_s)  # what was drawn (debug records list every drawn candidate)
            if plan.two_phase:
                won, nv_s, hid_s, val_s = self._vfd_second_phase(plan, s_rows_t, tok_s, nv_s, hid_s,
                                                                 k_r[:n_steady])
                if won is not None and plan.first_batch.size:
                    won = None  # first-token rows join the common selection below (candidate 0 still wins)
                elif won is not None:
                    st.stats.record(s_rows_t, won.value, won.intervened, eos_forced=False)
            else:
                val_s = st.values(hid_s, s_rows_t.repeat_interleave(kmax)).view(n_steady, kmax)
            tok_parts.append(tok_s)
            nv_parts.append(nv_s)
            hid_parts.append(hid_s)
            val_parts.append(val_s)
        if plan.first_batch.size:
            toks_f, nv_f, hid_f, f_lp = self._vfd_first_token(plan, logits, batch_t[n_steady:], want_lp[n_steady:])
            tok_parts.append(toks_f)
            nv_parts.append(nv_f)
            drawn_nv.append(nv_f)
            hid_parts.append(hid_f)
            val_parts.append(st.values(hid_f, rows_t[n_steady:].repeat_interleave(kmax)).view(-1, kmax))
            lp_of.update({n_steady + j: info for j, info in enumerate(f_lp) if info is not None})
        tokens = torch.cat(tok_parts) if len(tok_parts) > 1 else tok_parts[0]
        nvalid = torch.minimum(torch.cat(nv_parts) if len(nv_parts) > 1 else nv_parts[0], k_r)
        hidden_all = torch.cat(hid_parts) if len(hid_parts) > 1 else hid_parts[0]
        values_all = torch.cat(val_parts) if len(val_parts) > 1 else val_parts[0]

        # 2. Score and select; the step's one device->host read (vLLM's host-side output lists need the winners).
        #    A two-phase step whose natural samples were all safe already has them (candidate 0 everywhere).
        if won is None:
            won = select_winners(st, rows_t, tokens, nvalid, hidden_all, values_all)
            if n_steady and not plan.two_phase:
                self._vfd_schedule.observe(n_steady, int((won.col[:n_steady] != 0).sum()))
        win_col_h, win_tok_h, win_hidden = won.col, won.token, won.hidden

        # 3. The steered rows continue from the winner: its logits replace the row's.
        redo = np.flatnonzero((np.arange(n_rows) >= n_steady) | (win_col_h != 0))
        if redo.size:
            (sel,) = self._vfd_stage([redo])
            redo_hidden = win_hidden.index_select(0, sel)
            dst = batch_t.index_select(0, sel)
            new_logits = self.model.compute_logits(redo_hidden)  # type: ignore[attr-defined]
            if lsteer is not None:
                # The winner's distribution, steered from the winner's own hidden state (the row's request row).
                redo_rows = l_rows.index_select(0, dst)
                new_logits, redo_gs = st.logit.apply(redo_hidden, new_logits, redo_rows)
            logits.index_copy_(0, dst, new_logits.to(logits.dtype))
        if lsteer is not None:
            # Telemetry counts the distributions drawn from: every row's first one except a steady row's whose winner
            # replaced it before any draw (candidate 0's), then the winners' replacements.
            rec_rows = l_rows
            replaced = batch_rows[redo[redo < n_steady]]
            if replaced.size:
                (rep_t,) = self._vfd_stage([replaced])
                rec_rows = l_rows.index_fill(0, rep_t, 0)
            st.logit.record(rec_rows, l_gs)
            if redo.size:
                st.logit.record(redo_rows, redo_gs)

        # 4. vLLM's sampler draws the natural sample of the next position, with the winner in the history
        #    (penalties, bad words). The winner is appended for the sampler only; bookkeeping appends it for real.
        outs = operator.itemgetter(*batch_rows.tolist())(ib.req_output_token_ids)
        outs = (outs,) if n_rows == 1 else outs
        win_tok_l = win_tok_h.tolist()
        deque(map(list.append, outs, win_tok_l), maxlen=0)  # C-level loop over vLLM's Python lists
        elsewhere = np.zeros(ib.num_reqs, dtype=bool)
        elsewhere[batch_rows] = True
        # The batch rows hold candidate 0; capture records the winner below instead.
        self._vs_capture_elsewhere = elsewhere
        try:
            if st.slot_min_tokens[batch_rows].any():
                self._vfd_refresh_min_tokens()
            greedy_h = self._vfd_greedy_host(batch_rows)
            # The next candidates are drawn from the distribution the sampler draws the natural sample from.
            # When every steered row samples randomly, the sampler's own processed logits (captured after its
            # top-k/top-p) are that distribution: no second pass over [B, V]. Greedy rows need the logits
            # before temperature and top-k/top-p, recomputed on a copy.
            proc2 = self._vfd_processed(logits, batch_t)[0] if greedy_h.any() else None
            raw2 = logits.index_select(0, batch_t).clone() if any_lp else None
            self._vfd_sampled_logits = None
            self._vfd_capture_armed = proc2 is None
            try:
                out = super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
            finally:
                self._vfd_capture_armed = False
            if proc2 is None:
                captured, self._vfd_sampled_logits = self._vfd_sampled_logits, None
                if captured is None:
                    raise RuntimeError("value_steer VFD: the sampler did not run top-k/top-p sampling on random rows")
                proc2 = captured.index_select(0, batch_t)
        finally:
            self._vs_capture_elsewhere = None
            deque(map(list.pop, outs), maxlen=0)
        if self._vs_capture is not None and st.any_capture:  # type: ignore[attr-defined]
            # Decode-matched: the committed token's own hidden state, the one the head scored to pick it.
            self._vs_capture_rows(None, positions, win_hidden, batch_rows=batch_rows)  # type: ignore[attr-defined]

        # 5. The next candidates: column 0 is the sampler's draw; the rest are drawn on the device.
        natural = out.sampled_token_ids.index_select(0, batch_t)[:, 0].long()
        groups = self._vfd_groups(rows, greedy_h)
        next_toks, _ = advance(pipes, rows, rows_t, positions, won, proc2, greedy_h, natural, groups)

        # 6. Logprobs (only rows that asked): the winner's from the distribution it was drawn from, and the
        #    next candidates' for the next step.
        lpt = out.logprobs_tensors
        if any_lp:
            lp_rows = np.flatnonzero(want_lp)
            sel = torch.from_numpy(lp_rows).to(dev)
            dist = self._vfd_logprob_dist(raw2.index_select(0, sel), proc2.index_select(0, sel))  # type: ignore[union-attr]
            nums = [self.requests[ib.req_ids[int(batch_rows[j])]].sampling_params.logprobs  # type: ignore[attr-defined]
                    for j in lp_rows.tolist()]
            for j, info in zip(lp_rows.tolist(), candidate_logprobs(dist, next_toks.index_select(0, sel), nums)):
                pipes.pending_logprobs[int(rows[j])] = info
            if lpt is not None and lpt.logprob_token_ids.numel():
                for j in lp_rows.tolist():
                    info = lp_of.get(j)
                    if info is None:
                        continue
                    i, w = int(batch_rows[j]), int(win_col_h[j])
                    n = min(len(info.top_ids), lpt.logprob_token_ids.shape[1] - 1)
                    lpt.logprob_token_ids[i, 0] = win_tok_l[j]
                    lpt.logprobs[i, 0] = info.token_logprobs[w]
                    lpt.selected_token_ranks[i] = info.ranks[w]
                    if n:
                        ids_t = torch.tensor(info.top_ids[:n], dtype=lpt.logprob_token_ids.dtype)
                        lpt.logprob_token_ids[i, 1 : n + 1] = ids_t
                        lpt.logprobs[i, 1 : n + 1] = torch.tensor(info.top_logprobs[:n], dtype=lpt.logprobs.dtype)
        out.sampled_token_ids.index_put_(
            (batch_t, torch.zeros_like(batch_t)), won.token_t.to(out.sampled_token_ids.dtype)
        )
        if self._vfd_debug is not None:
            req_ids = [ib.req_ids[int(b)] for b in batch_rows]
            nv_h = torch.minimum(torch.cat(drawn_nv), k_r).tolist()
            cands = [t[:nv] for t, nv in zip(tokens.tolist(), nv_h)]
            self._vfd_record_debug(req_ids, positions.tolist(), cands, values_all, win_col_h.tolist(), win_tok_l)
        return out

    # ---- test/debug surface --------------------------------------------------------------------------
    def _vfd_record_debug(
        self,
        req_ids: list[str],
        positions: list[int],
        cands: list[list[int]],
        values: torch.Tensor,
        win_col: list[int],
        win_tok: list[int],
    ) -> None:
        dbg = self._vfd_debug
        assert dbg is not None
        vals = values.float().cpu().tolist()
        for j, rid in enumerate(req_ids):
            steps = dbg.setdefault(rid, [])
            n = len(cands[j])
            steps.append(
                {
                    "position": positions[j],
                    "candidates": list(cands[j]),
                    "values": vals[j][:n],
                    "winner_col": win_col[j],
                    "winner_token": win_tok[j],
                }
            )
            del steps[:-DEBUG_MAX_STEPS]
        while len(dbg) > DEBUG_MAX_REQUESTS:
            dbg.pop(next(iter(dbg)))

    def vfd_debug_state(self) -> dict[str, Any]:
        """Scratch occupancy, live pipeline states, counters and (with VALUE_STEER_DEBUG=1) per-step records."""
        sc = self._vfd_scratch
        return {
            "scratch_capacity": sc.capacity if sc else 0,
            "scratch_free": sc.num_free if sc else 0,
            "live": sorted(self._vfd_live),
            "counters": {**self._vfd_counters, **self._vfd_schedule.counters},
            "unsafe_rate": self._vfd_schedule.rate,
            "cost_ms": dict(self._vfd_schedule.coef),
            "steps": copy.deepcopy(self._vfd_debug) if self._vfd_debug is not None else None,
        }
