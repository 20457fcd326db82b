"""Fused steering kernels, registered as ``torch.ops.value_steer.*`` custom ops.

One module per op (Triton kernel + launcher + torch reference hook), Liger-style:

- ``value_head``: fused value-head MLP ``x [M, H] -> p [M]`` (batch invariant).
- ``score_and_select``: per-row VFD / abstention decision over the row table, winner gathers.
- ``write_kv`` / ``copy_kv_slots``: paged-KV scatter by slot and slot -> slot copies across all layers.

``ops`` registers each as a custom op (CUDA = Triton, CPU = the ``value_steer._C`` extension or the
torch reference, plus a fake impl). Importing this package needs neither Triton nor vLLM; the Triton
launchers raise if called without Triton. Set ``TRITON_INTERPRET=1`` *before* importing to run the
Triton launchers on CPU tensors.
"""

from value_steer.kernels.ops import copy_kv_slots, score_and_select, value_head, write_kv
from value_steer.kernels.score_and_select import score_and_select_reference, score_and_select_triton
from value_steer.kernels.value_head import prepare_value_head_weights, value_head_reference, value_head_triton
from value_steer.kernels.write_kv import (
    copy_kv_slots_reference,
    copy_kv_slots_triton,
    kv_pointer_table,
    kv_views_cpu,
    kv_views_fa,
    kv_views_fa_v019,
    write_kv_fa2,
    write_kv_reference,
    write_kv_triton,
)

__all__ = [
    "copy_kv_slots",
    "copy_kv_slots_reference",
    "copy_kv_slots_triton",
    "kv_pointer_table",
    "kv_views_cpu",
    "kv_views_fa",
    "kv_views_fa_v019",
    "prepare_value_head_weights",
    "score_and_select",
    "score_and_select_reference",
    "score_and_select_triton",
    "value_head",
    "value_head_reference",
    "value_head_triton",
    "write_kv",
    "write_kv_fa2",
    "write_kv_reference",
    "write_kv_triton",
]
