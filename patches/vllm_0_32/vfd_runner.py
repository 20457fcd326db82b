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

Per-request pipeline state lives in :class:`~value_steer.runtime.vfd_state.VFDPipelines` (tables indexed by
steering row; the pending candidates stay on the device). A steady step (no first-token rows, no request
asking for logprobs, no debug) reads the device once: the winners ``[2, R]``, which vLLM's host-side
output lists need anyway. First-token steps (a request's first token, or after a preemption) are
lifecycle steps and may read more.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from value_steer.core.config import parse_additional_config
from value_steer.core.modes import MODE_VFD
from value_steer.core.vfd_math import (
    candidate_block_row,
    candidate_logprobs,
    draw_candidates,
    mirror_slots,
    runner_capacity,
    scratch_blocks_needed,
    slot_of,
)
from value_steer.runtime.staging import PackedStaging
from value_steer.runtime.vfd_schedule import ScheduleModel
from value_steer.runtime.vfd_state import ScratchAllocator, SteadyLayout, VFDPipelines
from value_steer.runtime.vfd_step import Winners, advance, select_winners

logger = logging.getLogger("value_steer")

DEBUG_ENV = "VALUE_STEER_DEBUG"
_DEBUG_MAX_STEPS = 4096
_DEBUG_MAX_REQUESTS = 1024
_SAMPLING_EPS = 1e-5


@dataclass
class _StepPlan:
    """One step's VFD work, built in ``_prepare_inputs`` and consumed in ``_sample``.

    Steady rows (``S``) continue their pipeline; first-token rows (``F``) draw and forward their candidates
    in ``_sample``. ``*_batch`` are batch indices, ``*_rows`` steering rows, ``*_pos`` the position of the
    token committed this step.
    """

    num_scheduled_tokens: int
    num_reqs: int
    steady_batch: np.ndarray
    steady_rows: np.ndarray
    steady_pos: np.ndarray
    first_batch: np.ndarray
    first_rows: np.ndarray
    first_pos: np.ndarray
    layout: SteadyLayout | None = None
    cand_index: torch.Tensor | None = None  # [S * k_max] token indices of the steady candidates (device)
    steady_hidden: torch.Tensor | None = None  # [S * k_max, H]
    extra_tokens: int = 0
    extra_reqs: int = 0
    extra_positions: torch.Tensor | None = None
    forward_active: bool = False
    two_phase: bool = False  # steady rows forward candidate 0 only; alternatives in a second forward


class VFDRunnerMixin:
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
        self._vfd_plan: _StepPlan | None = None
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

    # ---- KV cache with scratch blocks --------------------------------------------------------------
    def initialize_kv_cache(
        self, kv_cache_config: Any, is_profiling: bool = False, kv_cache_allocation_context: Any = None
    ) -> None:
        n = int(kv_cache_config.num_blocks)
        s = scratch_blocks_needed(self._vfd_k, self._vfd_sched_max_seqs)
        kc = copy.deepcopy(kv_cache_config)
        if len(kc.kv_cache_groups) != 1:
            raise RuntimeError("value_steer VFD needs one KV cache group; this engine has "
                               f"{len(kc.kv_cache_groups)} (vLLM's hybrid KV cache manager is on: start it with "
                               "--disable-hybrid-kv-cache-manager)")
        kc.num_blocks = n + s
        tensors = []
        for t in kc.kv_cache_tensors:
            if t.size % n:
                raise RuntimeError(f"value_steer VFD: KV cache tensor size {t.size} is not a multiple of {n} blocks")
            layer_outer = len(t.layers) > 1 and t.layer_stride >= t.block_stride * n
            repl: dict[str, int] = {"size": t.size // n * (n + s)}
            if layer_outer:
                repl["layer_stride"] = t.layer_stride // n * (n + s)
                repl["offset"] = t.offset // n * (n + s)
            tensors.append(dataclasses.replace(t, **repl))
        kc.kv_cache_tensors = tensors
        super().initialize_kv_cache(kc, is_profiling, kv_cache_allocation_context)  # type: ignore[misc]
        self._vfd_check_kv(n + s)
        self._vfd_scratch = ScratchAllocator(n, s)
        self._vfd_kv_views = None
        self._vfd_live.clear()
        self._vfd_pipes = None
        logger.info("value_steer VFD: K=%d, %d scratch KV blocks beyond the scheduler's %d", self._vfd_k, s, n)

    def vfd_scratch_bytes(self) -> int:
        """KV bytes of the scratch blocks; the worker takes them out of the scheduler's KV budget."""
        specs = self.get_kv_cache_spec()  # type: ignore[attr-defined]
        per_block = sum(int(spec.page_size_bytes) for spec in specs.values())
        return scratch_blocks_needed(self._vfd_k, self._vfd_sched_max_seqs) * per_block

    def _vfd_check_kv(self, num_blocks: int) -> None:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        group = self.kv_cache_config.kv_cache_groups[0]  # type: ignore[attr-defined]
        spec = group.kv_cache_spec
        # A FullAttentionSpec with a sliding_window is a sliding-window layer promoted to full-length KV (the hybrid
        # KV cache manager off): its attention applies the window on positions, so candidates' rows see exactly
        # the keys their natural sample would.
        if not isinstance(spec, FullAttentionSpec):
            raise RuntimeError(f"value_steer VFD supports full-length KV caches only, got {type(spec).__name__}")
        for ag in self.attn_groups[0]:  # type: ignore[attr-defined]
            if getattr(ag, "kernel_block_size", None) is not None:
                raise RuntimeError(
                    "value_steer VFD: kernel block size differs from the KV block size; "
                    "set --block-size to a size the attention backend supports natively"
                )
        for kv in self.kv_caches:  # type: ignore[attr-defined]
            if kv.shape[0] != num_blocks:
                raise RuntimeError(f"value_steer VFD: KV cache view has {kv.shape[0]} blocks, expected {num_blocks}")

    def _vfd_views(self) -> list[torch.Tensor]:
        """Per-layer K and V views ``[nb, bs, kvh, d]`` through the backend's own layout."""
        if self._vfd_kv_views is None:
            from value_steer.patches.vllm_0_32.kv_layout import kv_views_cpu, kv_views_fa

            views: list[torch.Tensor] = []
            if torch.device(self.device).type == "cpu":  # type: ignore[attr-defined]
                isa = getattr(self.attn_groups[0][0].get_metadata_builder(), "isa", "vec")  # type: ignore[attr-defined]
                for kv in self.kv_caches:  # type: ignore[attr-defined]
                    views.extend(kv_views_cpu(kv, isa))
            else:
                for kv in self.kv_caches:  # type: ignore[attr-defined]
                    views.extend(kv_views_fa(kv))
            self._vfd_kv_views = views
        return self._vfd_kv_views

    def _vfd_stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """One host->device copy of every index array a step needs (device views, valid until the next call)."""
        if self._vfd_staging is None:
            self._vfd_staging = PackedStaging(torch.device(self.device))  # type: ignore[attr-defined]
        return self._vfd_staging.stage(arrays)

    def _vfd_copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy KV slots ``src[i] -> dst[i]`` (device int64) in every layer (one op call)."""
        if not src.numel():
            return
        from value_steer.kernels import copy_kv_slots

        copy_kv_slots(self._vfd_views(), src, dst)
        self._vfd_counters["committed_slots"] += int(src.numel())

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

    # ---- the forward: post-prepare rewrite ------------------------------------------------------------
    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        self._vfd_plan = None
        self._vfd_release_stale(scheduler_output)
        sched = self._vfd_schedule
        t_start = time.perf_counter()
        try:
            out = super().execute_model(scheduler_output, intermediate_tensors)  # type: ignore[misc]
        except BaseException:
            self._vfd_restore()
            self._vfd_plan = None
            raise
        self._vfd_restore()
        plan = self._vfd_plan
        state = getattr(self, "execute_model_state", None)
        if sched.timed and state is not None:
            extra = plan.extra_tokens if plan is not None else 0
            tokens = int(scheduler_output.total_num_scheduled_tokens) + extra
            sched.observe_forward(tokens, (time.perf_counter() - t_start) * 1e3)
        if plan is not None:
            if state is None:
                self._vfd_plan = None
            elif plan.cand_index is not None:
                plan.steady_hidden = state.hidden_states.index_select(0, plan.cand_index)
        return out

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        self._vfd_plan = None
        st = self._vs_state
        if st is None or self._vfd_scratch is None:
            return out
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        # Steered rows that sample this step (a partial prefill chunk samples nothing), vectorised.
        discard = self.discard_request_mask.np[:n].astype(bool)  # type: ignore[attr-defined]
        batch_idx = np.flatnonzero((st.slot_row[:n] > 0) & ~discard)
        if not batch_idx.size:
            return out
        rows = st.slot_row[batch_idx].astype(np.int64)
        self._vfd_open(batch_idx, rows)
        pipes = self._vfd_pipelines()
        c = ib.num_computed_tokens_cpu[batch_idx].astype(np.int64)
        ns = np.asarray(num_scheduled_tokens)[batch_idx].astype(np.int64)
        decode = (ns == 1) & (c >= ib.num_prompt_tokens[batch_idx])
        tok_c = ib.token_ids_cpu[batch_idx, np.minimum(c, ib.token_ids_cpu.shape[1] - 1)]
        steady = decode & pipes.steady_mask(rows, c, tok_c)
        first = ~steady
        pipes.reset(rows[first])
        plan = _StepPlan(
            num_scheduled_tokens=int(scheduler_output.total_num_scheduled_tokens),
            num_reqs=n,
            steady_batch=batch_idx[steady],
            steady_rows=rows[steady],
            steady_pos=c[steady] + 1,
            first_batch=batch_idx[first],
            first_rows=rows[first],
            first_pos=(c + ns)[first],
        )
        self._vfd_plan = plan
        if plan.steady_batch.size:
            choice = self._vfd_schedule.choose(plan.num_scheduled_tokens, int(plan.steady_batch.size), self._vfd_k)
            plan.two_phase = choice == "two_phase"
            self._vfd_rewrite(plan)
        return out

    def _vfd_rewrite(self, plan: _StepPlan) -> None:
        """Commit last step's winners and lay the candidates out as attention sequences (vectorised).

        Host: vLLM's numpy buffers (block table, query starts, per-row counts). Device: one staged copy
        of the indices, then gathers/scatters into vLLM's device buffers and one ``copy_kv_slots``.
        """
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        bs = int(bt.block_size)
        tab = bt.block_table.np
        r0, t0 = plan.num_reqs, plan.num_scheduled_tokens
        qsl = self.query_start_loc  # type: ignore[attr-defined]
        i = plan.steady_batch
        q = plan.steady_pos
        lay = self._vfd_pipelines().plan_steady(
            plan.steady_rows, q, qsl.np[i].astype(np.int64), tab, i, bs, r0, t0, alternatives=not plan.two_phase
        )
        plan.layout = lay
        e = lay.num_extra
        # Candidate 0 borrows block `col` of its own row; appended sequences copy the parent's row.
        tab[i, lay.block_col] = lay.block_new
        seq_rows, seq_vals = i, q + 1
        if e:
            parent_batch = i[lay.extra_parent]
            tab[lay.extra_rows] = tab[parent_batch]
            tab[lay.extra_rows, lay.block_col[lay.extra_parent]] = lay.extra_block
            qsl.np[lay.extra_rows + 1] = lay.extra_tokens + 1
            qsl.np[r0 + e + 1 :] = t0 + e
            ib.num_computed_tokens_cpu[lay.extra_rows] = q[lay.extra_parent]
            ib.num_prompt_tokens[lay.extra_rows] = ib.num_prompt_tokens[parent_batch]
            seq_rows = np.concatenate([i, lay.extra_rows])
            seq_vals = np.concatenate([q, q[lay.extra_parent]]) + 1
            if self._vs_act_staged:
                # The appended candidates are their parent's decode tokens: its activation-steering row.
                self._vs_state.activation.extend_tokens(self._vs_state.slot_act_row[parent_batch])
        self.optimistic_seq_lens_cpu.numpy()[seq_rows] = seq_vals  # type: ignore[attr-defined]
        w_tok, w_row, w_col, w_pos, w_slot, c_src, c_dst, s_rows, s_vals, cand = self._vfd_stage(
            [lay.write_token, lay.write_row, lay.write_col, lay.write_pos, lay.write_slot,
             lay.commit_src, lay.commit_dst, seq_rows, seq_vals, lay.cand_index]
        )  # fmt: skip
        input_ids = self.input_ids.gpu  # type: ignore[attr-defined]
        pending = self._vfd_pipelines().pending_tokens
        input_ids.index_put_((w_tok,), pending[w_row, w_col].to(input_ids.dtype))
        positions = self.positions  # type: ignore[attr-defined]
        positions.index_put_((w_tok,), w_pos.to(positions.dtype))
        slot_map = bt.slot_mapping.gpu
        slot_map.index_put_((w_tok,), w_slot.to(slot_map.dtype))
        seq_lens = self.seq_lens  # type: ignore[attr-defined]
        seq_lens.index_put_((s_rows,), s_vals.to(seq_lens.dtype))
        # The commit must land before the forward: candidates at C+1 read C through their scratch
        # blocks, and any request in this batch may read the real block.
        self._vfd_copy_slots(c_src, c_dst)
        if e:
            qsl.copy_to_gpu()
        bt.block_table.copy_to_gpu(r0 + e)
        # input_ids.cpu is not refreshed: vLLM 0.32 reads only input_ids.gpu after _prepare_inputs.
        plan.cand_index = cand
        plan.extra_tokens = e
        plan.extra_reqs = e
        plan.extra_positions = positions[t0 : t0 + e].clone()
        plan.forward_active = True
        self._vfd_counters["steady_rows"] += int(i.size)

    def _vfd_restore(self) -> None:
        """Give back the block-table entries and rows the forward borrowed."""
        plan = self._vfd_plan
        if plan is None or not plan.forward_active or plan.layout is None:
            return
        plan.forward_active = False
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        tab = bt.block_table.np
        tab[plan.steady_batch, plan.layout.block_col] = plan.layout.block_old
        r0, e = plan.num_reqs, plan.extra_reqs
        if e:
            tab[r0 : r0 + e] = 0
            ib.num_computed_tokens_cpu[r0 : r0 + e] = 0
            ib.num_prompt_tokens[r0 : r0 + e] = 0
            self.optimistic_seq_lens_cpu[r0 : r0 + e] = 0  # type: ignore[attr-defined]
        if bt.block_table.gpu is not bt.block_table.cpu:
            bt.block_table.copy_to_gpu(r0 + e)

    def _vfd_fwd(self) -> _StepPlan | None:
        p = self._vfd_plan
        return p if p is not None and p.forward_active and p.extra_tokens else None

    def _determine_batch_execution_and_padding(self, *args: Any, **kwargs: Any) -> Any:
        p = self._vfd_fwd()
        if p is not None:
            kwargs["num_tokens"] = kwargs["num_tokens"] + p.extra_tokens
        return super()._determine_batch_execution_and_padding(*args, **kwargs)  # type: ignore[misc]

    def _get_slot_mappings(self, *args: Any, **kwargs: Any) -> Any:
        p = self._vfd_fwd()
        if p is not None:
            kwargs["num_tokens_unpadded"] = kwargs["num_tokens_unpadded"] + p.extra_tokens
            kwargs["num_tokens_padded"] = max(kwargs["num_tokens_padded"], kwargs["num_tokens_unpadded"])
        return super()._get_slot_mappings(*args, **kwargs)  # type: ignore[misc]

    def _build_attention_metadata(self, *args: Any, **kwargs: Any) -> Any:
        p = self._vfd_fwd()
        if p is not None:
            if kwargs.get("num_tokens_padded") is not None or kwargs.get("num_reqs_padded") is not None:
                raise RuntimeError("value_steer VFD does not support padded attention (full CUDA graphs)")
            kwargs["num_tokens"] = kwargs["num_tokens"] + p.extra_tokens
            kwargs["num_reqs"] = kwargs["num_reqs"] + p.extra_reqs
            kwargs["max_query_len"] = max(int(kwargs["max_query_len"]), 1)
        return super()._build_attention_metadata(*args, **kwargs)  # type: ignore[misc]

    def _prepare_padding_mask(self, num_tokens_unpadded: int, num_tokens_padded: int) -> Any:
        p = self._vfd_fwd()
        if p is not None:
            num_tokens_unpadded += p.extra_tokens
        return super()._prepare_padding_mask(num_tokens_unpadded, num_tokens_padded)  # type: ignore[misc]

    def _preprocess(self, scheduler_output: Any, num_input_tokens: int, *args: Any, **kwargs: Any) -> Any:
        out = super()._preprocess(scheduler_output, num_input_tokens, *args, **kwargs)  # type: ignore[misc]
        p = self._vfd_fwd()
        if p is not None:
            t0 = p.num_scheduled_tokens
            self.positions[t0 : t0 + p.extra_tokens] = p.extra_positions  # type: ignore[attr-defined]
        return out

    # ---- the first-token forward ----------------------------------------------------------------------
    def _vfd_forward(self, input_ids: torch.Tensor, positions: np.ndarray, block_rows: np.ndarray,
                     slots: np.ndarray, batch_rows: np.ndarray) -> torch.Tensor:
        """One forward over ``E`` one-token attention sequences; returns their final hidden states ``[E, H]``.

        Args:
            input_ids: ``[E]`` device token ids; positions / slots: ``[E]`` int64 numpy;
            block_rows: ``[E, max_blocks]`` numpy block-table rows (one staged host->device copy for all).
            batch_rows: ``[E]`` the batch index of each sequence's request (its activation-steering row).
        """
        act = self._vs_state.activation
        if act is not None and act.active:
            # Candidates are decode tokens of their request: steered as its own decode tokens are.
            act.stage_decode_tokens(self._vs_state.slot_act_row[batch_rows])
            act.publish_tokens()
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import BatchDescriptor, set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        dev = self.device  # type: ignore[attr-defined]
        e = int(positions.shape[0])
        seq_lens = positions.astype(np.int64) + 1
        qsl = np.arange(e + 1, dtype=np.int64)
        pos_d, slot_d, table_d, seq_d, qsl_d = self._vfd_stage([positions, slots, block_rows, seq_lens, qsl])
        cm = CommonAttentionMetadata(
            query_start_loc=qsl_d.to(torch.int32),
            query_start_loc_cpu=torch.from_numpy(qsl.astype(np.int32)),
            seq_lens=seq_d.to(torch.int32),
            num_reqs=e,
            num_actual_tokens=e,
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=table_d.view(e, -1).to(torch.int32),
            slot_mapping=slot_d,
            causal=True,
            positions=pos_d,
            is_prefilling=torch.zeros(e, dtype=torch.bool),
            seq_lens_cpu_upper_bound=torch.from_numpy(seq_lens.astype(np.int32)),
        )
        group = self.kv_cache_config.kv_cache_groups[0]  # type: ignore[attr-defined]
        attn_metadata: dict[str, Any] = {}
        for ag in self.attn_groups[0]:  # type: ignore[attr-defined]
            md = ag.build_metadata(cm)
            for name in ag.layer_names:
                attn_metadata[name] = md
        slot_by_layer = {name: slot_d for name in group.layer_names}
        with set_forward_context(
            attn_metadata,
            self.vllm_config,  # type: ignore[attr-defined]
            num_tokens=e,
            cudagraph_runtime_mode=CUDAGraphMode.NONE,
            batch_descriptor=BatchDescriptor(num_tokens=e),
            slot_mapping=slot_by_layer,
            is_padding=torch.zeros(e, dtype=torch.bool, device=dev),
        ):
            hidden = self._model_forward(  # type: ignore[attr-defined]
                input_ids=input_ids.to(self.input_ids.gpu.dtype),  # type: ignore[attr-defined]
                positions=pos_d,
                intermediate_tensors=None,
                inputs_embeds=None,
                **self._init_model_kwargs(),  # type: ignore[attr-defined]
            )
        return hidden[:e]

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
        greedy = sm.temperature.index_select(0, rows) < _SAMPLING_EPS
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
        return self.input_batch.temperature_cpu[batch_rows] < _SAMPLING_EPS  # type: ignore[attr-defined]

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
    def _vfd_first_token(self, plan: _StepPlan, logits: torch.Tensor, f_batch_t: torch.Tensor,
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

    # ---- two-phase VFD: alternatives only for the rows whose natural sample is unsafe ---------------------
    def _vfd_second_phase(self, plan: _StepPlan, rows_t: torch.Tensor, tokens: torch.Tensor, nvalid: torch.Tensor,
                          hidden: torch.Tensor, k_r: torch.Tensor
                          ) -> tuple[Winners | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score every steady row's natural sample (candidate 0, forwarded in the main forward); forward the
        alternatives ``1..k-1`` of the unsafe rows in a second forward at the same position (their scratch
        blocks mirror the real block, as in eager VFD).

        Returns ``(winners, num_valid [S], hidden [S * k_max, H], values [S, k_max])``: only the forwarded
        candidates are scored (values NaN elsewhere). ``winners`` is set when every natural
        sample is safe (candidate 0 wins everywhere: no second forward, no second device read; the caller
        records the stats); otherwise
        the alternatives' states are placed into ``hidden`` and rows without alternatives keep one valid
        candidate, so the common selection commits exactly what eager VFD would.
        """
        st = self._vs_state
        pipes = self._vfd_pipelines()
        kmax = self._vfd_k
        s = int(rows_t.shape[0])
        h0 = hidden.view(s, kmax, -1)[:, 0]
        v0 = st.values(h0, rows_t)
        values = torch.full((s, kmax), float("nan"), dtype=v0.dtype, device=v0.device)
        values[:, 0] = v0
        rt = st.rows
        signed = rt.sign.index_select(0, rows_t) * (v0 - rt.threshold.index_select(0, rows_t))
        unsafe = ~(signed < 0) & (k_r > 1)  # NaN is never safe; a row with K=1 has no alternative
        flags_h, tok0_h = torch.stack([unsafe.long(), tokens[:, 0]]).cpu().numpy()
        alt = np.flatnonzero(flags_h)
        self._vfd_schedule.observe(s, int(alt.size))
        if not alt.size:
            zeros = torch.zeros(s, dtype=torch.bool, device=v0.device)
            won = Winners(np.zeros(s, dtype=np.int64), tok0_h, tokens[:, 0], v0, zeros, h0)
            return won, torch.ones_like(nvalid), hidden, values
        bt = self.input_batch.block_table[0]  # type: ignore[attr-defined]
        bs = int(bt.block_size)
        srows = plan.steady_rows[alt]
        n_alt = pipes.k[srows] - 1
        parent = np.repeat(alt, n_alt)
        cols = np.arange(int(n_alt.sum())) - np.repeat(np.cumsum(n_alt) - n_alt, n_alt) + 1
        q = plan.steady_pos[parent]
        scratch = pipes.scratch[plan.steady_rows[parent], cols]
        block_rows = bt.block_table.np[plan.steady_batch[parent]].astype(np.int64)
        block_rows[np.arange(parent.size), q // bs] = scratch
        row_d, col_d, dest_d = self._vfd_stage([plan.steady_rows[parent], cols, parent * kmax + cols])
        ids = pipes.pending_tokens[row_d, col_d]
        t_start = time.perf_counter()
        hidden_alt = self._vfd_forward(ids, q, block_rows, scratch * bs + q % bs, plan.steady_batch[parent])
        if self._vfd_schedule.timed:
            self._vfd_schedule.observe_forward(int(parent.size), (time.perf_counter() - t_start) * 1e3, second=True)
        self._vfd_schedule.counters["second_forwards"] += 1
        self._vfd_schedule.counters["second_forward_rows"] += int(parent.size)
        hidden = hidden.index_copy(0, dest_d, hidden_alt.to(hidden.dtype))
        alt_rows = rows_t.repeat_interleave(kmax).index_select(0, dest_d)  # each alternative's request row
        values.view(-1).index_copy_(0, dest_d, st.values(hidden_alt, alt_rows))
        return None, torch.where(unsafe, nvalid, torch.ones_like(nvalid)), hidden, values

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
            del steps[:-_DEBUG_MAX_STEPS]
        while len(dbg) > _DEBUG_MAX_REQUESTS:
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
