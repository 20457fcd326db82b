"""Fused steering kernels, registered as ``torch.ops.value_steer.*`` custom ops (layer 1: ops).

One module per op, Liger-style: the torch reference hook, the Triton kernel and launcher, the C++ CPU
dispatch and the ``torch.library`` registration (with its fake) live together:

- ``value_head``: fused value-head MLP ``x [M, H] -> p [M]`` (batch invariant).
- ``value_head_grouped``: the same over several stacked heads, row ``m`` scored by head ``head_idx[m]`` (one
  call for a batch mixing heads, the grouped-GEMM pattern; batch invariant).
- ``score_and_select``: per-row VFD / abstention decision over the row table, winner gathers.
- ``copy_kv_slots``: slot -> slot paged-KV copies across all layers in one launch (VFD's commit).
- ``write_kv``: paged-KV scatter of new tokens by slot, the design card's FA-layout KV write
  (``patches.vllm_0_32.kv_layout.write_kv_fa2``). No runner path calls it today (VFD commits through
  ``copy_kv_slots``); it stays as a tested, benchmarked op for a candidate forward that writes its own KV.
- ``steer_activations``: per-token activation steering at one layer (add / projection cap / ablate from
  the per-row op tables, prompt/decode filters, gated ops, fused residual), one launch over all tokens;
  untouched tokens are bitwise copies. ``steer_gate``: the per-token gate at the gate layer, in place.
  Design: ``docs/activation-steering.md``.
- ``logit_steer``: generative logit steering (GenSteer / CALM) over a batch of logit rows: a low-rank generator
  of the final hidden state, gated, added to each row's logits by its request's strength from a per-row table;
  untouched rows are bitwise copies. Design: ``docs/logit-steering.md``.
- ``token_filter``: token-mode VFD over a batch of logit rows: a low-rank Q-head's predicted token values mask,
  reweight (the K-candidate rule) or tilt each row's logits by its request's row of the row table, with the
  mass each edit moved; untouched rows are bitwise copies; ``[B, V]`` q is never materialised on CPU.
- ``capture_stream``: the residual stream of capturing tokens at one layer into a persistent buffer (a
  masked copy; one torch implementation for every device).

Importing this package needs neither Triton nor vLLM; the Triton launchers raise if called without
Triton. Set ``TRITON_INTERPRET=1`` *before* importing to run the Triton launchers on CPU tensors.
"""

from value_steer.kernels.capture_stream import capture_stream, capture_stream_reference
from value_steer.kernels.logit_steer import (
    logit_steer,
    logit_steer_reference,
    logit_steer_triton,
    prepare_logit_steer_weights,
)
from value_steer.kernels.score_and_select import (
    ScoreOutputs,
    score_and_select,
    score_and_select_reference,
    score_and_select_triton,
)
from value_steer.kernels.steer_activations import (
    steer_activations,
    steer_activations_reference,
    steer_activations_triton,
    steer_gate,
    steer_gate_reference,
    steer_gate_triton,
)
from value_steer.kernels.token_filter import (
    prepare_token_filter_weights,
    token_filter,
    token_filter_reference,
    token_filter_triton,
)
from value_steer.kernels.value_head import (
    prepare_value_head_weights,
    value_head,
    value_head_reference,
    value_head_triton,
)
from value_steer.kernels.value_head_grouped import (
    prepare_value_head_grouped_weights,
    value_head_grouped,
    value_head_grouped_reference,
    value_head_grouped_triton,
)
from value_steer.kernels.write_kv import (
    copy_kv_slots,
    copy_kv_slots_reference,
    copy_kv_slots_triton,
    kv_pointer_table,
    write_kv,
    write_kv_reference,
    write_kv_triton,
)

__all__ = [
    "ScoreOutputs",
    "capture_stream",
    "capture_stream_reference",
    "copy_kv_slots",
    "copy_kv_slots_reference",
    "copy_kv_slots_triton",
    "kv_pointer_table",
    "logit_steer",
    "logit_steer_reference",
    "logit_steer_triton",
    "prepare_logit_steer_weights",
    "prepare_token_filter_weights",
    "prepare_value_head_grouped_weights",
    "prepare_value_head_weights",
    "score_and_select",
    "score_and_select_reference",
    "score_and_select_triton",
    "steer_activations",
    "steer_activations_reference",
    "steer_activations_triton",
    "steer_gate",
    "steer_gate_reference",
    "steer_gate_triton",
    "token_filter",
    "token_filter_reference",
    "token_filter_triton",
    "value_head",
    "value_head_grouped",
    "value_head_grouped_reference",
    "value_head_grouped_triton",
    "value_head_reference",
    "value_head_triton",
    "write_kv",
    "write_kv_reference",
    "write_kv_triton",
]
