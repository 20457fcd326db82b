// CPU implementations of the value_steer custom ops (the `value_steer._C` extension).
//
// Every function mirrors a Triton launcher in value_steer/kernels/*.py and is tested against the torch
// reference there. Shapes/dtypes are documented on the Python side (value_steer.kernels.ops).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace value_steer {

// x [M, H] float -> p [M] fp32. w0/w2 [H, H] fp32/bf16/fp16; b0/b2/w4 H elements; b4 1 element.
// Every output element is one dot product with a fixed 16-lane summation order and the last layer is
// summed per row in a fixed order, so results do not depend on M or on the thread count.
at::Tensor value_head(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w2,
                      const at::Tensor& b2, const at::Tensor& w4, const at::Tensor& b4);

// Grouped value head: p[m] = value head head_idx[m] on x[m] (value_steer/kernels/value_head_grouped.py).
// x [M, H] float; head_idx [M_max >= M] int32 in [0, NH) (checked); w0/w2 [NH, H, H] fp32/bf16/fp16;
// b0/b2/w4 [NH, H]; b4 [NH]. Returns [M] fp32, row m bitwise equal to value_head on x[m:m+1] with head
// head_idx[m]'s weights.
at::Tensor value_head_grouped(const at::Tensor& x, const at::Tensor& head_idx, const at::Tensor& w0,
                              const at::Tensor& b0, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w4,
                              const at::Tensor& b4);

// Returns (winner_col i64, winner_token i64, winner_value f32, winner_logprob f32, intervened bool,
//          force_eos bool, winner_hidden [R, H] or [R, 0] f32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_and_select(
    const at::Tensor& values, const at::Tensor& cand_tokens, const at::Tensor& cand_logprobs,
    const at::Tensor& row_idx, const at::Tensor& row_threshold, const at::Tensor& row_sign,
    const at::Tensor& row_mode, const at::Tensor& row_num_candidates, const std::optional<at::Tensor>& cand_hidden);

// key/value [N, kvh, d]; caches: 4-D logical [nb, bs, kvh, d] or 6-D tiled [nb, bs_o, bs_i, kvh, d_o, d_i]
// views with arbitrary strides; slot_mapping [N] int64 (negative = skip). Writes in place.
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache, at::Tensor value_cache,
              const at::Tensor& slot_mapping);

// For every view and every pair p with both slots >= 0: cache[dst[p]] = cache[src[p]].
void copy_kv_slots(std::vector<at::Tensor> caches, const at::Tensor& src_slots, const at::Tensor& dst_slots);

// Per-token activation steering at one layer (value_steer/kernels/steer_activations.py). hidden [T, H]
// fp32/bf16/fp16; residual [T, H] (fused, the ops edit hidden + residual) or 0 elements; token_row /
// token_decode / gate [T_max >= T] int32 / int8 / fp32; bank [S, H] fp32; op_kind / op_slot / op_flags
// [R, M] int32, op_a / op_b [R, M] fp32. Returns a new [T, H] tensor; untouched tokens are bitwise copies.
at::Tensor steer_activations(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& token_row,
                             const at::Tensor& token_decode, const at::Tensor& gate, const at::Tensor& bank,
                             const at::Tensor& op_kind, const at::Tensor& op_slot, const at::Tensor& op_a,
                             const at::Tensor& op_b, const at::Tensor& op_flags);

// gate_out[t] = sigmoid(sharpness * ((hidden + residual)[t] . bank[gate_slot[row]] - threshold)) for t < T
// whose row (not 0) has gate_slot >= 0, else 1. gate_slot [R] int32, threshold/sharpness [R] fp32,
// gate_out [T_max >= T] fp32 written in place.
void steer_gate(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& token_row,
                const at::Tensor& bank, const at::Tensor& gate_slot, const at::Tensor& gate_threshold,
                const at::Tensor& gate_sharpness, at::Tensor gate_out);

// Generative logit steering over a batch of logit rows (value_steer/kernels/logit_steer.py). hidden [B, H] and
// logits [B, V'] fp32/bf16/fp16; row_idx [B_max >= B] int32; row_strength [N] fp32; w_down [R, H], pos [H],
// w_up [V <= V', R] (any strides), gate_w1 [G, H], gate_b1 [G], gate_w2 [G], gate_b2 [1] fp32. Returns
// (logits' [B, V'] contiguous, gate_strength [B] fp32); untouched rows (row 0 or strength 0) are bytewise copies.
std::tuple<at::Tensor, at::Tensor> logit_steer(const at::Tensor& hidden, const at::Tensor& logits,
                                               const at::Tensor& row_idx, const at::Tensor& row_strength,
                                               const at::Tensor& w_down, const at::Tensor& pos, const at::Tensor& w_up,
                                               const at::Tensor& gate_w1, const at::Tensor& gate_b1,
                                               const at::Tensor& gate_w2, const at::Tensor& gate_b2,
                                               double max_strength);

// Token-mode VFD's logit filter (value_steer/kernels/token_filter.py; semantics value_steer.core.qhead's
// token_filter_rows). hidden [B, H] and logits [B, V'] fp32/bf16/fp16; row_idx [B_max >= B] int32 in [0, N)
// (checked); row_threshold / row_sign / row_beta [N] fp32, row_mode / row_k [N] int32; Q-head w_down [R, H],
// pos [H], w_up [1 <= V <= V', R] (any strides; column-major is free), bias [V] fp32. A row is on when its
// row > 0 and row_mode[row] == token_mode. Returns (logits' [B, V'] contiguous, z = W_down (h + pos) [B, R] fp32
// for every row, changed [B] bool, mass [B] fp32); off rows and columns V.. are bytewise copies.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_filter(
    const at::Tensor& hidden, const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_threshold,
    const at::Tensor& row_sign, const at::Tensor& row_mode, const at::Tensor& row_beta, const at::Tensor& row_k,
    const at::Tensor& w_down, const at::Tensor& pos, const at::Tensor& w_up, const at::Tensor& bias,
    int64_t token_mode, double min_safe_mass);

}  // namespace value_steer
