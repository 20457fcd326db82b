"""Value-filtered decoding inside vLLM 0.32's V1 model runner (fork-free runner mixin).

``VFDRunnerMixin`` goes in front of ``SteeringRunnerMixin`` (``vllm_0_32.runner_mixins``). The design
is in docs/vfd-design.md and the pure parts are in ``value_steer.core.vfd_math``. A short map of the hooks:

- ``__init__``: the runner gets a shallow-copied ``VllmConfig`` whose ``scheduler_config`` copy holds
  ``K`` times the sequences (and ``(K-1) * max_num_seqs`` more tokens), to make room for the candidate
  rows. The shared config is never mutated.
- ``initialize_kv_cache``: the runner's private ``kv_cache_config`` copy grows by
  ``K * max_num_seqs + K`` scratch blocks. The scheduler never hands out ids ``>= num_blocks``.
- ``_update_states``: drops the VFD state of finished, unscheduled (preempted) and resumed requests.
- ``_prepare_inputs`` (post-prepare rewrite, internals memo §3.3): for each steered decode row whose
  last token was last step's VFD winner, commit that token's KV (scratch -> real slot and sibling
  scratch blocks), put candidate 0 at ``C+1`` in the row, and append ``K-1`` one-token sequences for
  the other candidates. ``_determine_batch_execution_and_padding``, ``_get_slot_mappings``,
  ``_build_attention_metadata``, ``_prepare_padding_mask`` and ``_preprocess`` are widened by the
  extra tokens and sequences.
- ``execute_model``: after the forward, gathers the candidates' hidden states and restores the
  block table rows it borrowed.
- ``_sample``: runs the first-token forward (requests with no candidates yet), scores all
  candidates (fused value head + ``score_and_select``), replaces each steered row's logits with the
  winner's, lets vLLM's sampler draw candidate 0 of the next step, draws the other candidates, and
  outputs the winner token with the logprobs of the distribution it was drawn from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from value_steer.core.config import parse_additional_config, vfd_unsupported_reason
from value_steer.core.modes import MODE_VFD
from value_steer.core.vfd_math import (
    candidate_block_row,
    candidate_logprobs,
    commit_slots,
    draw_candidates,
    mirror_slots,
    runner_capacity,
    scratch_blocks_needed,
    slot_of,
)
from value_steer.runtime.vfd_state import Candidates, ScratchAllocator, VFDRequestState

logger = logging.getLogger("value_steer")

DEBUG_ENV = "VALUE_STEER_DEBUG"
_DEBUG_MAX_STEPS = 4096
_DEBUG_MAX_REQUESTS = 1024
_SAMPLING_EPS = 1e-5


@dataclass
class _SteadyRow:
    batch_row: int
    req_id: str
    state: VFDRequestState
    position: int  # position of the candidates (C + 1)
    hidden_rows: list[int] = field(default_factory=list)  # token indices of the candidates in this forward


@dataclass
class _FirstRow:
    batch_row: int
    req_id: str
    state: VFDRequestState
    position: int  # position of the token sampled this step


@dataclass
class _StepPlan:
    """One step's VFD work, built in ``_prepare_inputs`` and consumed in ``_sample``."""

    num_scheduled_tokens: int
    num_reqs: int
    steady: list[_SteadyRow] = field(default_factory=list)
    first: list[_FirstRow] = field(default_factory=list)
    extra_tokens: int = 0
    extra_reqs: int = 0
    extra_positions: torch.Tensor | None = None
    restore: list[tuple[int, int, int]] = field(default_factory=list)  # (batch row, column, old block id)
    steady_hidden: torch.Tensor | None = None  # [sum n_valid, H] in steady-row order
    forward_active: bool = False


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
        self._vfd_states: dict[str, VFDRequestState] = {}
        self._vfd_unsupported: dict[str, str] = {}
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
        self._vfd_generator = torch.Generator(device=self.device)  # type: ignore[attr-defined]
        self._vfd_generator.manual_seed(int(seed) if seed is not None else 0)
        if getattr(self, "uses_mrope", False):
            raise RuntimeError("value_steer VFD does not support M-RoPE models")
        if getattr(self, "enable_prompt_embeds", False):
            raise RuntimeError("value_steer VFD does not support prompt embeddings (--enable-prompt-embeds)")

    # ---- KV cache with scratch blocks --------------------------------------------------------------
    def initialize_kv_cache(
        self, kv_cache_config: Any, is_profiling: bool = False, kv_cache_allocation_context: Any = None
    ) -> None:
        n = int(kv_cache_config.num_blocks)
        s = scratch_blocks_needed(self._vfd_k, self._vfd_sched_max_seqs)
        kc = copy.deepcopy(kv_cache_config)
        if len(kc.kv_cache_groups) != 1:
            raise RuntimeError("value_steer VFD supports models with one KV cache group (no hybrid attention)")
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
        self._vfd_states.clear()
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
        if not isinstance(spec, FullAttentionSpec) or getattr(spec, "sliding_window", None):
            raise RuntimeError(f"value_steer VFD supports full attention only, got {type(spec).__name__}")
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

    def _vfd_copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy KV slots ``src[i] -> dst[i]`` in every layer (one op call)."""
        if not src:
            return
        from value_steer.kernels import copy_kv_slots

        dev = self.device  # type: ignore[attr-defined]
        copy_kv_slots(
            self._vfd_views(),
            torch.tensor(src, dtype=torch.int64, device=dev),
            torch.tensor(dst, dtype=torch.int64, device=dev),
        )
        self._vfd_counters["committed_slots"] += len(src)

    # ---- request lifecycle ---------------------------------------------------------------------------
    def _vfd_release(self, req_id: str) -> None:
        st = self._vfd_states.pop(req_id, None)
        if st is not None and st.scratch and self._vfd_scratch is not None:
            self._vfd_scratch.free(st.scratch)
            st.scratch = []

    def _vfd_state_for(self, req_id: str) -> VFDRequestState | None:
        """The VFD state of a steered request (created on first sight); None when it is not VFD-steered."""
        st = self._vfd_states.get(req_id)
        if st is not None:
            return st
        eng = self._vs_state
        rs = eng.requests.get(req_id) if eng is not None else None
        if rs is None or not rs.row or rs.steer.mode != MODE_VFD:
            return None
        if req_id in self._vfd_unsupported:
            return None
        sp = self.requests[req_id].sampling_params  # type: ignore[attr-defined]
        reason = vfd_unsupported_reason(sp)
        if reason is not None:  # only reachable without RequestArgsValidator (which answers 400)
            msg = f"vfd does not support {reason}; served unsteered"
            self._vfd_unsupported[req_id] = msg
            rs.info.error = msg
            logger.warning("value_steer: request %s: %s", req_id, msg)
            return None
        st = VFDRequestState(req_id, int(rs.steer.num_candidates))
        if sp.seed is not None:
            g = torch.Generator(device=self.device)  # type: ignore[attr-defined]
            g.manual_seed((int(sp.seed) * 2654435761 + 0x5F3759DF) % (2**63))
            st.generator = g
        self._vfd_states[req_id] = st
        return st

    def _update_states(self, scheduler_output: Any) -> Any:
        so = scheduler_output
        for rid in so.finished_req_ids:
            self._vfd_release(rid)
            self._vfd_unsupported.pop(rid, None)
        resumed = getattr(so.scheduled_cached_reqs, "resumed_req_ids", None) or ()
        scheduled = so.num_scheduled_tokens
        for rid in [r for r in self._vfd_states if r in resumed or r not in scheduled]:
            # Preempted, resumed, or not scheduled this step: the pipeline restarts with a first-token step.
            self._vfd_release(rid)
            self._vfd_counters["restarts"] += 1
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    # ---- the forward: post-prepare rewrite ------------------------------------------------------------
    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        self._vfd_plan = None
        try:
            out = super().execute_model(scheduler_output, intermediate_tensors)  # type: ignore[misc]
        except BaseException:
            self._vfd_restore()
            self._vfd_plan = None
            raise
        self._vfd_restore()
        plan = self._vfd_plan
        state = getattr(self, "execute_model_state", None)
        if plan is not None:
            if state is None:
                self._vfd_plan = None
            elif plan.steady:
                idx = [t for row in plan.steady for t in row.hidden_rows]
                hs = state.hidden_states
                plan.steady_hidden = hs.index_select(0, torch.tensor(idx, dtype=torch.long, device=hs.device))
        return out

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        self._vfd_plan = None
        if self._vs_state is None or self._vfd_scratch is None:
            return out
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        discard = self.discard_request_mask.np[:n]  # type: ignore[attr-defined]
        plan = _StepPlan(num_scheduled_tokens=int(scheduler_output.total_num_scheduled_tokens), num_reqs=n)
        for i, rid in enumerate(ib.req_ids[:n]):
            if discard[i]:
                continue  # partial prefill chunk: nothing is sampled
            st = self._vfd_state_for(rid)
            if st is None:
                continue
            c = int(ib.num_computed_tokens_cpu[i])
            ns = int(num_scheduled_tokens[i])
            if ns == 1 and c >= int(ib.num_prompt_tokens[i]) and st.steady_at(c, int(ib.token_ids_cpu[i, c])):
                plan.steady.append(_SteadyRow(i, rid, st, c + 1))
            else:
                st.reset()
                plan.first.append(_FirstRow(i, rid, st, c + ns))
        if not plan.steady and not plan.first:
            return out
        self._vfd_plan = plan
        if plan.steady:
            self._vfd_rewrite(plan)
        return out

    def _vfd_rewrite(self, plan: _StepPlan) -> None:
        """Commit last step's winners and lay the candidates out as attention sequences (memo §3.3)."""
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        bs = int(bt.block_size)
        tab = bt.block_table.np
        r0, t0 = plan.num_reqs, plan.num_scheduled_tokens
        qsl = self.query_start_loc  # type: ignore[attr-defined]
        input_ids = self.input_ids  # type: ignore[attr-defined]
        positions = self.positions  # type: ignore[attr-defined]
        slot_map = bt.slot_mapping.gpu
        seq_lens = self.seq_lens  # type: ignore[attr-defined]
        opt_seq = self.optimistic_seq_lens_cpu  # type: ignore[attr-defined]
        src: list[int] = []
        dst: list[int] = []
        e = 0
        for row in plan.steady:
            i, st, q = row.batch_row, row.state, row.position
            c = q - 1
            _, w, _ = st.committed  # type: ignore[misc]
            s, d = commit_slots(c, st.scratch[w], int(tab[i, c // bs]), st.scratch, bs)
            src += s
            dst += d
            toks = st.pending.tokens  # type: ignore[union-attr]
            col = q // bs
            # Candidate 0 takes the scheduler's row: its block `col` is borrowed for the forward.
            t_i = int(qsl.np[i])
            plan.restore.append((i, col, int(tab[i, col])))
            tab[i, col] = st.scratch[0]
            input_ids.gpu[t_i] = toks[0]
            positions[t_i] = q
            slot_map[t_i] = slot_of(st.scratch[0], q, bs)
            seq_lens[i] = q + 1
            opt_seq[i] = q + 1
            row.hidden_rows = [t_i]
            for k in range(1, len(toks)):
                r, t = r0 + e, t0 + e
                tab[r, :col] = tab[i, :col]
                tab[r, col] = st.scratch[k]
                input_ids.gpu[t] = toks[k]
                positions[t] = q
                slot_map[t] = slot_of(st.scratch[k], q, bs)
                qsl.np[r + 1] = t + 1
                seq_lens[r] = q + 1
                opt_seq[r] = q + 1
                ib.num_computed_tokens_cpu[r] = q
                ib.num_prompt_tokens[r] = ib.num_prompt_tokens[i]
                row.hidden_rows.append(t)
                e += 1
        # The commit must land before the forward: candidates at C+1 read C through their scratch
        # blocks, and any request in this batch may read the real block.
        self._vfd_copy_slots(src, dst)
        if e:
            qsl.np[r0 + e + 1 :] = t0 + e
            qsl.copy_to_gpu()
        bt.block_table.copy_to_gpu(r0 + e)
        if input_ids.gpu is not input_ids.cpu:
            input_ids.cpu[: t0 + e].copy_(input_ids.gpu[: t0 + e])
        plan.extra_tokens = e
        plan.extra_reqs = e
        plan.extra_positions = positions[t0 : t0 + e].clone()
        plan.forward_active = True
        self._vfd_counters["steady_rows"] += len(plan.steady)

    def _vfd_restore(self) -> None:
        """Give back the block-table entries and rows the forward borrowed."""
        plan = self._vfd_plan
        if plan is None or not plan.forward_active:
            return
        plan.forward_active = False
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        tab = bt.block_table.np
        for i, col, old in plan.restore:
            tab[i, col] = old
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
    def _vfd_forward(
        self, tokens: list[int], positions: list[int], rows: list[list[int]], slots: list[int]
    ) -> torch.Tensor:
        """One forward over ``E`` one-token attention sequences; returns their final hidden states ``[E, H]``."""
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import BatchDescriptor, set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        dev = self.device  # type: ignore[attr-defined]
        e = len(tokens)
        width = int(self.input_batch.block_table[0].block_table.gpu.shape[1])  # type: ignore[attr-defined]
        table = torch.zeros((e, width), dtype=torch.int32)
        for j, r in enumerate(rows):
            table[j, : len(r)] = torch.tensor(r, dtype=torch.int32)
        pos = torch.tensor(positions, dtype=torch.int64)
        seq_lens = (pos + 1).to(torch.int32)
        qsl = torch.arange(e + 1, dtype=torch.int32)
        slot = torch.tensor(slots, dtype=torch.int64, device=dev)
        pos_d = pos.to(dev)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev),
            query_start_loc_cpu=qsl,
            seq_lens=seq_lens.to(dev),
            num_reqs=e,
            num_actual_tokens=e,
            max_query_len=1,
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=table.to(dev),
            slot_mapping=slot,
            causal=True,
            positions=pos_d,
            is_prefilling=torch.zeros(e, dtype=torch.bool),
            seq_lens_cpu_upper_bound=seq_lens,
        )
        group = self.kv_cache_config.kv_cache_groups[0]  # type: ignore[attr-defined]
        attn_metadata: dict[str, Any] = {}
        for ag in self.attn_groups[0]:  # type: ignore[attr-defined]
            md = ag.build_metadata(cm)
            for name in ag.layer_names:
                attn_metadata[name] = md
        slot_by_layer = {name: slot for name in group.layer_names}
        input_ids = torch.tensor(tokens, dtype=self.input_ids.gpu.dtype, device=dev)  # type: ignore[attr-defined]
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
                input_ids=input_ids,
                positions=pos_d,
                intermediate_tensors=None,
                inputs_embeds=None,
                **self._init_model_kwargs(),  # type: ignore[attr-defined]
            )
        self._vfd_counters["first_token_forwards"] += 1
        return hidden[:e]

    # ---- processed distributions ------------------------------------------------------------------------
    def _vfd_processed(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's processed logits for ``rows`` (memo §4) and which rows are greedy.

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

    def _vfd_generators(self, states: list[VFDRequestState]) -> list[torch.Generator]:
        return [st.generator or self._vfd_generator for st in states]

    # ---- the per-step decision --------------------------------------------------------------------------
    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        plan, self._vfd_plan = self._vfd_plan, None
        if plan is None or logits is None or spec_decode_metadata is not None:
            return super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        eng = self._vs_state
        dev = logits.device
        ib = self.input_batch  # type: ignore[attr-defined]
        bt = ib.block_table[0]
        bs = int(bt.block_size)
        kmax = self._vfd_k
        self._vfd_counters["steps"] += 1

        # Rows in a fixed order: steady rows, then first-token rows.
        batch_rows = [r.batch_row for r in plan.steady] + [r.batch_row for r in plan.first]
        req_ids = [r.req_id for r in plan.steady] + [r.req_id for r in plan.first]
        states = [r.state for r in plan.steady] + [r.state for r in plan.first]
        positions = [r.position for r in plan.steady] + [r.position for r in plan.first]
        n_rows = len(batch_rows)
        rows_t = torch.tensor(batch_rows, dtype=torch.long, device=dev)
        want_lp = [self.requests[r].sampling_params.logprobs for r in req_ids]  # type: ignore[attr-defined]

        # 1. Candidates of first-token rows (drawn now, from this step's distribution) and their forward.
        cand_tokens: list[list[int]] = [list(r.state.pending.tokens) for r in plan.steady]  # type: ignore[union-attr]
        cand_lp = [r.state.pending.logprobs for r in plan.steady]  # type: ignore[union-attr]
        hidden_parts = [plan.steady_hidden] if plan.steady else []
        if plan.first:
            self._vfd_counters["first_token_rows"] += len(plan.first)
            f_states = [r.state for r in plan.first]
            f_rows = rows_t[len(plan.steady) :]
            proc, greedy = self._vfd_processed(logits, f_rows)
            natural = self._vfd_natural_sample(proc, greedy, batch_rows[len(plan.steady) :])
            toks, nval = draw_candidates(proc, greedy, kmax, natural, self._vfd_generators(f_states))
            toks_l, nval_l = toks.tolist(), nval.tolist()
            f_lp: list[Any] = [None] * len(plan.first)
            lp_idx = [j for j, r in enumerate(plan.first) if want_lp[len(plan.steady) + j] is not None]
            if lp_idx:
                sel = torch.tensor(lp_idx, dtype=torch.long, device=dev)
                dist = self._vfd_logprob_dist(
                    logits.index_select(0, f_rows.index_select(0, sel)), proc.index_select(0, sel)
                )
                infos = candidate_logprobs(
                    dist, toks.index_select(0, sel), [want_lp[len(plan.steady) + j] for j in lp_idx]
                )
                for j, info in zip(lp_idx, infos):
                    f_lp[j] = info
            seq_tok: list[int] = []
            seq_pos: list[int] = []
            seq_rows: list[list[int]] = []
            seq_slots: list[int] = []
            src: list[int] = []
            dst: list[int] = []
            for j, r in enumerate(plan.first):
                st = r.state
                k_r = min(st.num_candidates, kmax)
                nv = min(int(nval_l[j]), k_r)
                if not st.scratch:
                    st.scratch = self._vfd_scratch.alloc(k_r)  # type: ignore[union-attr]
                q = r.position
                nb = int(bt.num_blocks_per_row[r.batch_row])
                real = [int(b) for b in bt.block_table.np[r.batch_row, :nb]]
                if q % bs:
                    s, d = mirror_slots(real[q // bs], st.scratch, q, bs)
                    src += s
                    dst += d
                tl = toks_l[j][:nv]
                cand_tokens.append(tl)
                cand_lp.append(f_lp[j])
                for k, tok in enumerate(tl):
                    seq_tok.append(tok)
                    seq_pos.append(q)
                    seq_rows.append(candidate_block_row(real, q, bs, st.scratch[k]))
                    seq_slots.append(slot_of(st.scratch[k], q, bs))
            self._vfd_copy_slots(src, dst)
            hidden_parts.append(self._vfd_forward(seq_tok, seq_pos, seq_rows, seq_slots))
        hidden_all = torch.cat(hidden_parts, dim=0) if len(hidden_parts) > 1 else hidden_parts[0]

        # 2. Score and select (fused value head + score_and_select over the row table).
        from value_steer.kernels import score_and_select

        nvalid = [len(t) for t in cand_tokens]
        offsets = np.concatenate([[0], np.cumsum(nvalid)[:-1]]).astype(np.int64)
        flat = np.zeros((n_rows, kmax), dtype=np.int64)
        valid = np.zeros((n_rows, kmax), dtype=bool)
        tok_np = np.zeros((n_rows, kmax), dtype=np.int64)
        for j, toks_j in enumerate(cand_tokens):
            nv = len(toks_j)
            flat[j, :nv] = offsets[j] + np.arange(nv)
            flat[j, nv:] = offsets[j]
            valid[j, :nv] = True
            tok_np[j, :nv] = toks_j
            tok_np[j, nv:] = toks_j[0]
        flat_t = torch.from_numpy(flat.reshape(-1)).to(dev)
        vals = eng.values(hidden_all)
        values = vals.index_select(0, flat_t).view(n_rows, kmax).clone()
        values[~torch.from_numpy(valid).to(dev)] = float("nan")
        cand_hidden = hidden_all.index_select(0, flat_t)
        row_idx = eng.upload_step_rows(eng.slot_row[np.asarray(batch_rows)])
        tok_t = torch.from_numpy(tok_np).to(dev)
        win_col, win_tok, win_val, _, interv, _, win_hidden = score_and_select(
            values,
            tok_t,
            torch.zeros((n_rows, kmax), dtype=torch.float32, device=dev),
            row_idx,
            eng.rows.threshold,
            eng.rows.sign,
            eng.rows.mode,
            eng.rows.num_candidates,
            cand_hidden,
        )
        win_col_l = win_col.tolist()
        win_tok_l = win_tok.tolist()

        # 3. The steered rows continue from the winner: its logits replace the row's.
        n_steady = len(plan.steady)
        redo = [j for j in range(n_rows) if j >= n_steady or win_col_l[j] != 0]
        if redo:
            sel = torch.tensor(redo, dtype=torch.long, device=dev)
            new_logits = self.model.compute_logits(win_hidden.index_select(0, sel))  # type: ignore[attr-defined]
            logits.index_copy_(0, rows_t.index_select(0, sel), new_logits.to(logits.dtype))

        # 4. vLLM's sampler draws the natural sample of the next position, with the winner in the history
        #    (penalties, bad words). The winner is appended for the sampler only; bookkeeping appends it for real.
        outs = [self.requests[r].output_token_ids for r in req_ids]  # type: ignore[attr-defined]
        for o, tok in zip(outs, win_tok_l):
            o.append(int(tok))
        # The batch rows hold candidate 0; capture records the winner below instead.
        elsewhere = np.zeros(ib.num_reqs, dtype=bool)
        elsewhere[batch_rows] = True
        self._vs_capture_elsewhere = elsewhere
        try:
            if any(self.requests[r].sampling_params.min_tokens for r in req_ids):  # type: ignore[attr-defined]
                self._vfd_refresh_min_tokens()
            proc2, greedy2 = self._vfd_processed(logits, rows_t)
            raw2 = logits.index_select(0, rows_t).clone() if any(x is not None for x in want_lp) else None
            out = super()._sample(logits, spec_decode_metadata)  # type: ignore[misc]
        finally:
            self._vs_capture_elsewhere = None
            for o in outs:
                o.pop()
        if self._vs_capture is not None:  # type: ignore[attr-defined]
            # Decode-matched: the committed token's own hidden state, the one the head scored to pick it.
            self._vs_capture_rows(  # type: ignore[attr-defined]
                None, np.asarray(positions), win_hidden, batch_rows=np.asarray(batch_rows)
            )
        first_next = out.sampled_token_ids.index_select(0, rows_t)[:, 0].long()
        next_toks, next_nval = draw_candidates(proc2, greedy2, kmax, first_next, self._vfd_generators(states))
        next_lp: list[Any] = [None] * n_rows
        lp_rows = [j for j in range(n_rows) if want_lp[j] is not None]
        if lp_rows:
            sel = torch.tensor(lp_rows, dtype=torch.long, device=dev)
            dist = self._vfd_logprob_dist(raw2.index_select(0, sel), proc2.index_select(0, sel))  # type: ignore[union-attr]
            for j, info in zip(
                lp_rows, candidate_logprobs(dist, next_toks.index_select(0, sel), [want_lp[j] for j in lp_rows])
            ):
                next_lp[j] = info

        # 5. Output the winners, with the logprobs of the distribution each was drawn from.
        lpt = out.logprobs_tensors
        if lpt is not None and lp_rows and lpt.logprob_token_ids.numel():
            for j in lp_rows:
                info = cand_lp[j]
                if info is None:
                    continue
                i, w = batch_rows[j], win_col_l[j]
                n = min(len(info.top_ids), lpt.logprob_token_ids.shape[1] - 1)
                lpt.logprob_token_ids[i, 0] = win_tok_l[j]
                lpt.logprobs[i, 0] = info.token_logprobs[w]
                lpt.selected_token_ranks[i] = info.ranks[w]
                if n:
                    ids_t = torch.tensor(info.top_ids[:n], dtype=lpt.logprob_token_ids.dtype)
                    lpt.logprob_token_ids[i, 1 : n + 1] = ids_t
                    lpt.logprobs[i, 1 : n + 1] = torch.tensor(info.top_logprobs[:n], dtype=lpt.logprobs.dtype)
        out.sampled_token_ids[rows_t, 0] = win_tok.to(out.sampled_token_ids.dtype)

        # 6. Pipeline state: the winner's KV stays in its scratch block until next step's commit.
        next_toks_l, next_nval_l = next_toks.tolist(), next_nval.tolist()
        for j, st in enumerate(states):
            k_r = min(st.num_candidates, kmax)
            nv = min(int(next_nval_l[j]), k_r)
            st.committed = (positions[j], int(win_col_l[j]), int(win_tok_l[j]))
            st.pending = Candidates(positions[j] + 1, next_toks_l[j][:nv], next_lp[j])
        eng.stats.record(row_idx, win_val, interv, eos_forced=False)
        if self._vfd_debug is not None:
            self._vfd_record_debug(req_ids, positions, cand_tokens, values, win_col_l, win_tok_l)
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
            "live": sorted(self._vfd_states),
            "counters": dict(self._vfd_counters),
            "steps": copy.deepcopy(self._vfd_debug) if self._vfd_debug is not None else None,
        }
