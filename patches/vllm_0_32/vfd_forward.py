"""VFD's forward: the post-prepare rewrite that puts a step's candidates into vLLM's batch (extra tokens and
one-token sequences), the runner hooks it widens, and the separate candidates' forward (first token, second
phase)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from value_steer.patches.vllm_0_32.vfd_common import StepPlan


class VFDForwardMixin:
    """The candidates inside the runner's forward (``execute_model`` / ``_prepare_inputs`` and the hooks they widen)."""

    _vs_state: Any

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
        plan = StepPlan(
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

    def _vfd_rewrite(self, plan: StepPlan) -> None:
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

    def _vfd_fwd(self) -> StepPlan | None:
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
