// Generative logit steering on CPU (mirror of value_steer/kernels/logit_steer.py).
//
// Per logit row b: row = row_idx[b], s = row_strength[row]. Untouched (row 0 or s == 0): out[b] = logits[b], a
// bytewise copy, and gate_strength[b] = 0. Otherwise:
//   phase 1 (per row):   x = hidden[b] in fp32, y = x + pos,
//                        gate = sum_g w2[g] tanh(W1[g] . x + b1[g]) + b2,  strength = max_strength * sigmoid(gate),
//                        zc[r] = s * strength * (W_down[r] . y),  gate_strength[b] = strength;
//   phase 2 (parallel over (row, kChunk-column) tiles):
//                        out[b, v] = logits[b, v] + sum_r W_up[v, r] zc[r]   for v < V (fp32, cast back),
//                        out[b, v] = logits[b, v]                           for V <= v < V' (bytewise).
// Phase 2 reads W_up as W_up^T [R, V] rows and adds eight columns at a time (the weights' column-major storage,
// prepare_logit_steer_weights, makes that transpose free). Rows are independent and every sum has a fixed
// order, so results do not depend on the thread count; they agree with the torch reference to fp32 rounding.
// bf16 is narrowed with round-to-nearest-even (c10::BFloat16's bits, simd8.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "ops.h"
#include "simd8.h"

namespace value_steer {
namespace {

using namespace simd8;  // NOLINT

// Columns per phase-2 tile: 16 KiB of fp32 logits, so a row of a large vocabulary spreads over the threads.
constexpr int64_t kChunk = 4096;

// The generator's contiguous fp32 tensors.
struct Gen {
  const float* w_down;  // [R, H]
  const float* pos;     // [H]
  const float* w1;      // [G, H]
  const float* b1;      // [G]
  const float* w2;      // [G]
  float b2, max_strength;
  int64_t h, r, g;
};

template <typename T>
VS_INLINE void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = to_f(src[i]);
}

// Phase 1 for one row: writes zc [R] (already scaled by s * strength) and returns strength. x, y: [H] scratch.
template <typename T>
VS_INLINE float prep_row(const T* hrow, const Gen& w, float s, float* x, float* y, float* zc) {
  const int64_t h = w.h;
  widen(hrow, x, h);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) store8(y + i, load8(x + i) + load8(w.pos + i));
  for (; i < h; ++i) y[i] = x[i] + w.pos[i];
  float gate = w.b2;
  for (int64_t k = 0; k < w.g; ++k) gate += w.w2[k] * std::tanh(dot(w.w1 + k * h, x, h) + w.b1[k]);
  const float strength = w.max_strength / (1.f + std::exp(-gate));
  const float c = s * strength;
  for (int64_t k = 0; k < w.r; ++k) zc[k] = c * dot(w.w_down + k * h, y, h);
  return strength;
}

// out[v] = logits[v] + sum_k wt[k * ldw + v] zc[k] for v in [0, n): eight columns per step, k in order.
template <typename T>
VS_INLINE void add_lowrank(const T* logits, T* out, const float* wt, int64_t ldw, const float* zc, int64_t r,
                           int64_t n) {
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    v8f acc = {};
    for (int64_t k = 0; k < r; ++k) acc += splat(zc[k]) * load8(wt + k * ldw + v);
    store8(out + v, load8(logits + v) + acc);
  }
  for (; v < n; ++v) {
    float acc = 0.f;
    for (int64_t k = 0; k < r; ++k) acc += zc[k] * wt[k * ldw + v];
    out[v] = static_cast<T>(to_f(logits[v]) + acc);
  }
}

#define VS_DEFINE_CLONES(T, SUFFIX)                                                                              \
  VS_CLONES float prep_row_##SUFFIX(const T* hrow, const Gen& w, float s, float* x, float* y, float* zc) {      \
    return prep_row(hrow, w, s, x, y, zc);                                                                       \
  }                                                                                                              \
  VS_CLONES void add_lowrank_##SUFFIX(const T* logits, T* out, const float* wt, int64_t ldw, const float* zc,   \
                                      int64_t r, int64_t n) {                                                    \
    add_lowrank(logits, out, wt, ldw, zc, r, n);                                                                 \
  }                                                                                                              \
  inline float prep_row_isa(const T* hrow, const Gen& w, float s, float* x, float* y, float* zc) {               \
    return prep_row_##SUFFIX(hrow, w, s, x, y, zc);                                                              \
  }                                                                                                              \
  inline void add_lowrank_isa(const T* logits, T* out, const float* wt, int64_t ldw, const float* zc, int64_t r, \
                              int64_t n) {                                                                       \
    add_lowrank_##SUFFIX(logits, out, wt, ldw, zc, r, n);                                                        \
  }
VS_DEFINE_CLONES(float, f32)
VS_DEFINE_CLONES(c10::BFloat16, bf16)
VS_DEFINE_CLONES(c10::Half, f16)
#undef VS_DEFINE_CLONES

template <typename H>
void prep_rows(const at::Tensor& hid, const int32_t* rows, const float* strength, int64_t nrows, const Gen& w,
               float* zc, uint8_t* on, float* gs) {
  const int64_t b = hid.size(0), h = w.h;
  const H* hp = hid.const_data_ptr<H>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(static_cast<size_t>(h)), y(static_cast<size_t>(h));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = rows[i];
      TORCH_CHECK(row >= 0 && row < nrows, "row_idx[", i, "] = ", row, " is outside [0, N=", nrows, ")");
      const float s = strength[row];
      on[i] = row != 0 && s != 0.f;
      if (on[i]) gs[i] = prep_row_isa(hp + i * h, w, s, x.data(), y.data(), zc + i * w.r);
    }
  });
}

template <typename L>
void apply_rows(const at::Tensor& lg, at::Tensor& out, const float* wt, int64_t v, int64_t r, const float* zc,
                const uint8_t* on) {
  const int64_t b = out.size(0), vp = out.size(1), ldl = lg.stride(0);
  const L* lp = lg.const_data_ptr<L>();
  L* op = out.data_ptr<L>();
  const int64_t nchunks = (vp + kChunk - 1) / kChunk;
  at::parallel_for(0, b * nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / nchunks, lo = (t % nchunks) * kChunk, hi = std::min(vp, lo + kChunk);
      const L* src = lp + i * ldl;
      L* dst = op + i * vp;
      const int64_t edit_end = on[i] ? std::min(hi, v) : lo;  // untouched rows: nothing edited
      if (edit_end > lo) add_lowrank_isa(src + lo, dst + lo, wt + lo, v, zc + i * r, r, edit_end - lo);
      const int64_t copy_from = std::max(lo, edit_end);
      if (hi > copy_from) std::memcpy(dst + copy_from, src + copy_from, static_cast<size_t>(hi - copy_from) * sizeof(L));
    }
  });
}

bool is_float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> logit_steer(const at::Tensor& hidden, const at::Tensor& logits,
                                               const at::Tensor& row_idx, const at::Tensor& row_strength,
                                               const at::Tensor& w_down, const at::Tensor& pos, const at::Tensor& w_up,
                                               const at::Tensor& gate_w1, const at::Tensor& gate_b1,
                                               const at::Tensor& gate_w2, const at::Tensor& gate_b2,
                                               double max_strength) {
  TORCH_CHECK(logits.device().is_cpu(), "logit_steer (C++): expects CPU tensors");
  TORCH_CHECK(logits.dim() == 2 && is_float_type(logits), "logits must be [B, V'] fp32/bf16/fp16");
  const int64_t b = logits.size(0), vp = logits.size(1);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == b && is_float_type(hidden), "hidden must be [B, H] fp32/bf16/fp16");
  const int64_t h = hidden.size(1);
  TORCH_CHECK(row_idx.dim() == 1 && row_idx.scalar_type() == at::kInt && row_idx.size(0) >= b,
              "row_idx must be [B_max >= B] int32");
  TORCH_CHECK(row_strength.dim() == 1 && row_strength.scalar_type() == at::kFloat, "row_strength must be [N] fp32");
  for (const at::Tensor* t : {&w_down, &pos, &w_up, &gate_w1, &gate_b1, &gate_w2, &gate_b2})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "generator tensors must be fp32 CPU tensors");
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == h, "w_down must be [R, H]");
  const int64_t r = w_down.size(0);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == r && w_up.size(0) <= vp, "w_up must be [V <= V', R]");
  const int64_t v = w_up.size(0);
  TORCH_CHECK(gate_w1.dim() == 2 && gate_w1.size(1) == h, "gate_w1 must be [G, H]");
  const int64_t g = gate_w1.size(0);
  TORCH_CHECK(pos.numel() == h && gate_b1.numel() == g && gate_w2.numel() == g && gate_b2.numel() == 1,
              "pos / gate_b1 / gate_w2 / gate_b2 must be [H] / [G] / [G] / [1]");

  auto out = at::empty({b, vp}, logits.options());
  auto gs = at::zeros({b}, logits.options().dtype(at::kFloat));
  if (b == 0 || vp == 0) return {out, gs};
  // Rows may be strided (vLLM's logits are a column slice of the padded lm_head output); columns must be dense.
  const auto lg = logits.stride(1) == 1 ? logits : logits.contiguous();
  const auto hid = hidden.contiguous();
  const auto rows = row_idx.narrow(0, 0, b).contiguous();
  const auto st = row_strength.contiguous();
  const auto wd = w_down.contiguous(), ps = pos.contiguous(), w1 = gate_w1.contiguous(), b1 = gate_b1.contiguous(),
             w2 = gate_w2.contiguous(), b2 = gate_b2.contiguous();
  const auto wt = w_up.t().contiguous();  // [R, V]: free for column-major w_up
  const Gen gen{wd.const_data_ptr<float>(), ps.const_data_ptr<float>(), w1.const_data_ptr<float>(),
                b1.const_data_ptr<float>(), w2.const_data_ptr<float>(), b2.const_data_ptr<float>()[0],
                static_cast<float>(max_strength), h, r, g};
  std::vector<float> zc(static_cast<size_t>(b * std::max<int64_t>(r, 1)), 0.f);
  std::vector<uint8_t> on(static_cast<size_t>(b), 0);
  const int32_t* rp = rows.const_data_ptr<int32_t>();
  const float* sp = st.const_data_ptr<float>();
  float* gsp = gs.data_ptr<float>();
  const int64_t nrows = row_strength.size(0);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      prep_rows<float>(hid, rp, sp, nrows, gen, zc.data(), on.data(), gsp);
      break;
    case at::kBFloat16:
      prep_rows<c10::BFloat16>(hid, rp, sp, nrows, gen, zc.data(), on.data(), gsp);
      break;
    default:
      prep_rows<c10::Half>(hid, rp, sp, nrows, gen, zc.data(), on.data(), gsp);
  }
  const float* wtp = wt.const_data_ptr<float>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      apply_rows<float>(lg, out, wtp, v, r, zc.data(), on.data());
      break;
    case at::kBFloat16:
      apply_rows<c10::BFloat16>(lg, out, wtp, v, r, zc.data(), on.data());
      break;
    default:
      apply_rows<c10::Half>(lg, out, wtp, v, r, zc.data(), on.data());
  }
  return {out, gs};
}

}  // namespace value_steer
