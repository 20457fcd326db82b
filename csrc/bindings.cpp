// pybind11 module `value_steer._C`: the CPU implementations behind torch.ops.value_steer.* (registered
// as torch custom ops in value_steer/kernels/ops.py).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "value_steer CPU kernels (value head, score_and_select, paged-KV writes, activation and logit steering)";
  m.def("value_head", &value_steer::value_head, "Fused value-head MLP: x [M, H] -> p [M] fp32", py::arg("x"),
        py::arg("w0"), py::arg("b0"), py::arg("w2"), py::arg("b2"), py::arg("w4"), py::arg("b4"));
  m.def("score_and_select", &value_steer::score_and_select, "Per-row VFD/abstain decision and winner gathers",
        py::arg("values"), py::arg("cand_tokens"), py::arg("cand_logprobs"), py::arg("row_idx"),
        py::arg("row_threshold"), py::arg("row_sign"), py::arg("row_mode"), py::arg("row_num_candidates"),
        py::arg("cand_hidden") = py::none());
  m.def("write_kv", &value_steer::write_kv, "Scatter K/V rows into paged caches by slot (strided views)",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"));
  m.def("steer_activations", &value_steer::steer_activations, "Per-token activation steering at one layer",
        py::arg("hidden"), py::arg("residual"), py::arg("token_row"), py::arg("token_decode"), py::arg("gate"),
        py::arg("bank"), py::arg("op_kind"), py::arg("op_slot"), py::arg("op_a"), py::arg("op_b"),
        py::arg("op_flags"));
  m.def("steer_gate", &value_steer::steer_gate, "Per-token steering gate, written into gate_out", py::arg("hidden"),
        py::arg("residual"), py::arg("token_row"), py::arg("bank"), py::arg("gate_slot"), py::arg("gate_threshold"),
        py::arg("gate_sharpness"), py::arg("gate_out"));
  m.def("logit_steer", &value_steer::logit_steer, "Generative logit steering over a batch of logit rows",
        py::arg("hidden"), py::arg("logits"), py::arg("row_idx"), py::arg("row_strength"), py::arg("w_down"),
        py::arg("pos"), py::arg("w_up"), py::arg("gate_w1"), py::arg("gate_b1"), py::arg("gate_w2"),
        py::arg("gate_b2"), py::arg("max_strength"));
  m.def("copy_kv_slots", &value_steer::copy_kv_slots, "Copy slot -> slot in every cache view", py::arg("caches"),
        py::arg("src_slots"), py::arg("dst_slots"));
  m.def("value_head_grouped", &value_steer::value_head_grouped,
        "Grouped value head: p[m] = head head_idx[m] on x[m] -> [M] fp32", py::arg("x"), py::arg("head_idx"),
        py::arg("w0"), py::arg("b0"), py::arg("w2"), py::arg("b2"), py::arg("w4"), py::arg("b4"));
  m.def("token_filter", &value_steer::token_filter, "Token-mode VFD: filter logit rows by a Q-head's token values",
        py::arg("hidden"), py::arg("logits"), py::arg("row_idx"), py::arg("row_threshold"), py::arg("row_sign"),
        py::arg("row_mode"), py::arg("row_beta"), py::arg("row_k"), py::arg("w_down"), py::arg("pos"),
        py::arg("w_up"), py::arg("bias"), py::arg("token_mode"), py::arg("min_safe_mass"));
}
