// Per-token activation steering on CPU (mirror of value_steer/kernels/steer_activations.py).
//
// steer_activations: per token t < T, row = token_row[t]; the row's ops are the columns before the first
// kind outside {1 add, 2 cap, 3 ablate} whose flags hold the token's kind (bit 0 prompt, bit 1 decode).
// None applies (or row 0): out[t] = hidden[t], a bytewise copy. Otherwise x = hidden (+ residual) in an
// fp32 scratch row, then per op, in order, x += c * v with v = bank[slot] and
//   add:    c = a
//   cap:    c = (min(max(p, a), b) - p) / |v|,   p = x.v / |v|
//   ablate: c = (a - 1) p / |v|
// times gate[t] when bit 2 (gated) is set; out[t] = x - residual (or x) cast to hidden's dtype.
//
// steer_gate: gate_out[t] = sigmoid(sharpness[row] * (x . bank[gate_slot[row]] - threshold[row])) for
// tokens whose row (not 0) has gate_slot >= 0; other tokens' entries are left as they are (a row gated at
// another layer keeps its gate).
//
// Dots accumulate in fp32 over 8 interleaved lanes (a fixed order, so results do not depend on the
// thread count); they agree with the torch reference to fp32 rounding. The inner loops use 8-float GCC
// vector extensions (as value_head.cpp); bf16 is widened by a shift and narrowed with round-to-nearest-even
// (c10::BFloat16's bits).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"
#include "simd8.h"

namespace value_steer {
namespace {

constexpr int32_t kOpAdd = 1;     // value_steer.core.activation.OP_ADD
constexpr int32_t kOpCap = 2;     // OP_CAP
constexpr int32_t kOpAblate = 3;  // OP_ABLATE
constexpr int32_t kFlagPrompt = 1, kFlagDecode = 2, kFlagGated = 4;

// 8-float vectors, loads/stores, splat, hsum, dot and the AVX2/baseline clone macros: simd8.h (shared with
// value_head.cpp and logit_steer.cpp).
using namespace simd8;  // NOLINT

// (x . v, v . v) in one pass, same lane order as dot().
VS_INLINE void dot2(const float* __restrict__ x, const float* __restrict__ v, int64_t n, float* xv, float* vv) {
  v8f ax = {}, av = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f vi = load8(v + i);
    ax += load8(x + i) * vi;
    av += vi * vi;
  }
  float tx = 0.f, tv = 0.f;
  for (; i < n; ++i) {
    tx += x[i] * v[i];
    tv += v[i] * v[i];
  }
  *xv = hsum(ax) + tx;
  *vv = hsum(av) + tv;
}

// x += c * v.
VS_INLINE void axpy(float* __restrict__ x, const float* __restrict__ v, float c, int64_t n) {
  const v8f cv = splat(c);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(x + i, load8(x + i) + cv * load8(v + i));
  for (; i < n; ++i) x[i] += c * v[i];
}

// x[i] = hidden[i] (+ residual[i]) in fp32.
template <typename scalar_t>
VS_INLINE void load_stream(const scalar_t* hid, const scalar_t* res, float* x, int64_t h) {
  int64_t i = 0;
  if (res != nullptr) {
    for (; i + 8 <= h; i += 8) store8(x + i, load8(hid + i) + load8(res + i));
    for (; i < h; ++i) x[i] = to_f(hid[i]) + to_f(res[i]);
  } else {
    for (; i + 8 <= h; i += 8) store8(x + i, load8(hid + i));
    for (; i < h; ++i) x[i] = to_f(hid[i]);
  }
}

// out[i] = x[i] (- residual[i]) cast to scalar_t.
template <typename scalar_t>
VS_INLINE void store_stream(const float* x, const scalar_t* res, scalar_t* out, int64_t h) {
  int64_t i = 0;
  if (res != nullptr) {
    for (; i + 8 <= h; i += 8) store8(out + i, load8(x + i) - load8(res + i));
    for (; i < h; ++i) out[i] = static_cast<scalar_t>(x[i] - to_f(res[i]));
  } else {
    for (; i + 8 <= h; i += 8) store8(out + i, load8(x + i));
    for (; i < h; ++i) out[i] = static_cast<scalar_t>(x[i]);
  }
}

// residual is [T, H] like hidden (fused) or has no elements (none).
bool check_residual(const at::Tensor& hidden, const at::Tensor& residual) {
  if (residual.dim() == 2 && residual.sizes() == hidden.sizes()) {
    TORCH_CHECK(residual.scalar_type() == hidden.scalar_type() && residual.device() == hidden.device(),
                "residual must match hidden's dtype and device");
    return true;
  }
  TORCH_CHECK(residual.numel() == 0, "residual must be [T, H] or a 0-element tensor");
  return false;
}

void check_common(const at::Tensor& hidden, const at::Tensor& token_row, const at::Tensor& bank) {
  TORCH_CHECK(hidden.device().is_cpu(), "steer ops (C++): expects CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 &&
                  (hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                   hidden.scalar_type() == at::kHalf),
              "hidden must be [T, H] fp32/bf16/fp16");
  TORCH_CHECK(token_row.dim() == 1 && token_row.scalar_type() == at::kInt && token_row.size(0) >= hidden.size(0),
              "token_row must be [T_max >= T] int32");
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == hidden.size(1) && bank.scalar_type() == at::kFloat,
              "bank must be [S, H] fp32");
}

// Raw pointers into the contiguous CPU tables of one call.
struct Tables {
  const int32_t* row;     // [T]
  const int8_t* decode;   // [T]
  const float* gate;      // [T]
  const float* bank;      // [S, H]
  const int32_t* kind;    // [R, M]
  const int32_t* slot;    // [R, M]
  const float* a;         // [R, M]
  const float* b;         // [R, M]
  const int32_t* flags;   // [R, M]
  int64_t s, r, m;
};

struct OpRef {
  int32_t kind;
  int64_t slot;
  float a, b, gmul;
};

// One edited token: x = hidden (+ residual); the ops in order; out = x (- residual).
template <typename scalar_t>
VS_INLINE void edit_token(const scalar_t* hrow, const scalar_t* rrow, scalar_t* orow, float* x, const OpRef* ops,
                          int64_t n_ops, const float* bank, int64_t h) {
  load_stream(hrow, rrow, x, h);
  for (int64_t k = 0; k < n_ops; ++k) {
    const OpRef& o = ops[k];
    const float* v = bank + o.slot * h;
    float c = o.a;
    if (o.kind != kOpAdd) {
      float xv, vv;
      dot2(x, v, h, &xv, &vv);
      const float nrm = std::sqrt(vv);
      const float p = xv / nrm;  // x . u
      c = o.kind == kOpCap ? (std::min(std::max(p, o.a), o.b) - p) / nrm : (o.a - 1.f) * p / nrm;
    }
    axpy(x, v, c * o.gmul, h);
  }
  store_stream(x, rrow, orow, h);
}

// (hidden (+ residual)) . v, with x as scratch.
template <typename scalar_t>
VS_INLINE float stream_dot(const scalar_t* hrow, const scalar_t* rrow, const float* v, float* x, int64_t h) {
  load_stream(hrow, rrow, x, h);
  return dot(x, v, h);
}

#define VS_DEFINE_CLONES(T, SUFFIX)                                                                              \
  VS_CLONES void edit_token_##SUFFIX(const T* hrow, const T* rrow, T* orow, float* x, const OpRef* ops,          \
                                     int64_t n_ops, const float* bank, int64_t h) {                              \
    edit_token(hrow, rrow, orow, x, ops, n_ops, bank, h);                                                        \
  }                                                                                                              \
  VS_CLONES float stream_dot_##SUFFIX(const T* hrow, const T* rrow, const float* v, float* x, int64_t h) {      \
    return stream_dot(hrow, rrow, v, x, h);                                                                      \
  }                                                                                                              \
  inline void edit_token_isa(const T* hrow, const T* rrow, T* orow, float* x, const OpRef* ops, int64_t n_ops,  \
                             const float* bank, int64_t h) {                                                     \
    edit_token_##SUFFIX(hrow, rrow, orow, x, ops, n_ops, bank, h);                                               \
  }                                                                                                              \
  inline float stream_dot_isa(const T* hrow, const T* rrow, const float* v, float* x, int64_t h) {               \
    return stream_dot_##SUFFIX(hrow, rrow, v, x, h);                                                             \
  }
VS_DEFINE_CLONES(float, f32)
VS_DEFINE_CLONES(c10::BFloat16, bf16)
VS_DEFINE_CLONES(c10::Half, f16)
#undef VS_DEFINE_CLONES

template <typename scalar_t>
void steer_rows(const at::Tensor& hid, const at::Tensor* res, at::Tensor& out, const Tables& tb) {
  const int64_t t = hid.size(0), h = hid.size(1), s = tb.s, r = tb.r, m = tb.m;
  const scalar_t* hp = hid.const_data_ptr<scalar_t>();
  const scalar_t* rp = res != nullptr ? res->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, t, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(static_cast<size_t>(h));
    std::vector<OpRef> ops;
    ops.reserve(static_cast<size_t>(m));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = tb.row[i];
      TORCH_CHECK(row >= 0 && row < r, "token_row[", i, "] = ", row, " is outside [0, R=", r, ")");
      const int32_t want = tb.decode[i] != 0 ? kFlagDecode : kFlagPrompt;
      ops.clear();
      if (row != 0) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t e = row * m + j;
          const int32_t kind = tb.kind[e];
          if (kind != kOpAdd && kind != kOpCap && kind != kOpAblate) break;  // OP_NONE ends the list
          const int32_t flags = tb.flags[e];
          if ((flags & want) == 0) continue;
          const int64_t slot = tb.slot[e];
          TORCH_CHECK(slot >= 0 && slot < s, "op_slot[", row, ", ", j, "] = ", slot, " is outside [0, S=", s, ")");
          ops.push_back({kind, slot, tb.a[e], tb.b[e], (flags & kFlagGated) ? tb.gate[i] : 1.f});
        }
      }
      const scalar_t* hrow = hp + i * h;
      scalar_t* orow = op + i * h;
      if (ops.empty()) {  // passthrough, bitwise
        std::memcpy(orow, hrow, static_cast<size_t>(h) * sizeof(scalar_t));
        continue;
      }
      edit_token_isa(hrow, rp != nullptr ? rp + i * h : nullptr, orow, x.data(), ops.data(),
                     static_cast<int64_t>(ops.size()), tb.bank, h);
    }
  });
}

template <typename scalar_t>
void gate_rows(const at::Tensor& hid, const at::Tensor* res, const int32_t* rowp, const float* bankp, int64_t s,
               const int32_t* gslotp, const float* gthrp, const float* gsharpp, int64_t r, float* outp,
               int64_t out_stride) {
  const int64_t t = hid.size(0), h = hid.size(1);
  const scalar_t* hp = hid.const_data_ptr<scalar_t>();
  const scalar_t* rp = res != nullptr ? res->const_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  at::parallel_for(0, t, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(static_cast<size_t>(h));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = rowp[i];
      TORCH_CHECK(row >= 0 && row < r, "token_row[", i, "] = ", row, " is outside [0, R=", r, ")");
      const int64_t slot = gslotp[row];
      // Only rows gated at this layer are written: a row gated at another layer keeps its value.
      if (row != 0 && slot >= 0) {
        TORCH_CHECK(slot < s, "gate_slot[", row, "] = ", slot, " is outside [0, S=", s, ")");
        const float d = stream_dot_isa(hp + i * h, rp != nullptr ? rp + i * h : nullptr, bankp + slot * h, x.data(), h);
        const float z = gsharpp[row] * (d - gthrp[row]);
        outp[i * out_stride] = 1.f / (1.f + std::exp(-z));
      }
    }
  });
}

}  // namespace

at::Tensor steer_activations(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& token_row,
                             const at::Tensor& token_decode, const at::Tensor& gate, const at::Tensor& bank,
                             const at::Tensor& op_kind, const at::Tensor& op_slot, const at::Tensor& op_a,
                             const at::Tensor& op_b, const at::Tensor& op_flags) {
  check_common(hidden, token_row, bank);
  const bool has_res = check_residual(hidden, residual);
  const int64_t t = hidden.size(0), h = hidden.size(1);
  TORCH_CHECK(token_decode.dim() == 1 && token_decode.scalar_type() == at::kChar && token_decode.size(0) >= t,
              "token_decode must be [T_max >= T] int8");
  TORCH_CHECK(gate.dim() == 1 && gate.scalar_type() == at::kFloat && gate.size(0) >= t,
              "gate must be [T_max >= T] fp32");
  TORCH_CHECK(op_kind.dim() == 2 && op_kind.scalar_type() == at::kInt, "op_kind must be [R, M] int32");
  TORCH_CHECK(op_slot.sizes() == op_kind.sizes() && op_slot.scalar_type() == at::kInt, "op_slot must be [R, M] int32");
  TORCH_CHECK(op_a.sizes() == op_kind.sizes() && op_a.scalar_type() == at::kFloat, "op_a must be [R, M] fp32");
  TORCH_CHECK(op_b.sizes() == op_kind.sizes() && op_b.scalar_type() == at::kFloat, "op_b must be [R, M] fp32");
  TORCH_CHECK(op_flags.sizes() == op_kind.sizes() && op_flags.scalar_type() == at::kInt,
              "op_flags must be [R, M] int32");
  auto out = at::empty({t, h}, hidden.options());
  if (t == 0 || h == 0) return out;

  const auto hid = hidden.contiguous();
  const auto res = has_res ? residual.contiguous() : residual;
  const auto rows = token_row.narrow(0, 0, t).contiguous();
  const auto dec = token_decode.narrow(0, 0, t).contiguous();
  const auto gt = gate.narrow(0, 0, t).contiguous();
  const auto bk = bank.contiguous();
  const auto kind = op_kind.contiguous(), slot = op_slot.contiguous(), flags = op_flags.contiguous();
  const auto a = op_a.contiguous(), b = op_b.contiguous();
  const Tables tb{rows.const_data_ptr<int32_t>(),  dec.const_data_ptr<int8_t>(),   gt.const_data_ptr<float>(),
                  bk.const_data_ptr<float>(),      kind.const_data_ptr<int32_t>(), slot.const_data_ptr<int32_t>(),
                  a.const_data_ptr<float>(),       b.const_data_ptr<float>(),      flags.const_data_ptr<int32_t>(),
                  bank.size(0),                    op_kind.size(0),                op_kind.size(1)};
  const at::Tensor* resp = has_res ? &res : nullptr;
  switch (hidden.scalar_type()) {
    case at::kFloat:
      steer_rows<float>(hid, resp, out, tb);
      break;
    case at::kBFloat16:
      steer_rows<c10::BFloat16>(hid, resp, out, tb);
      break;
    default:
      steer_rows<c10::Half>(hid, resp, out, tb);
  }
  return out;
}

void steer_gate(const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& token_row,
                const at::Tensor& bank, const at::Tensor& gate_slot, const at::Tensor& gate_threshold,
                const at::Tensor& gate_sharpness, at::Tensor gate_out) {
  check_common(hidden, token_row, bank);
  const bool has_res = check_residual(hidden, residual);
  const int64_t t = hidden.size(0);
  TORCH_CHECK(gate_slot.dim() == 1 && gate_slot.scalar_type() == at::kInt, "gate_slot must be [R] int32");
  const int64_t r = gate_slot.size(0);
  TORCH_CHECK(gate_threshold.dim() == 1 && gate_threshold.size(0) == r && gate_threshold.scalar_type() == at::kFloat,
              "gate_threshold must be [R] fp32");
  TORCH_CHECK(gate_sharpness.dim() == 1 && gate_sharpness.size(0) == r && gate_sharpness.scalar_type() == at::kFloat,
              "gate_sharpness must be [R] fp32");
  TORCH_CHECK(gate_out.dim() == 1 && gate_out.scalar_type() == at::kFloat && gate_out.size(0) >= t,
              "gate_out must be [T_max >= T] fp32");
  if (t == 0) return;
  const auto hid = hidden.contiguous();
  const auto res = has_res ? residual.contiguous() : residual;
  const auto rows = token_row.narrow(0, 0, t).contiguous();
  const auto bk = bank.contiguous();
  const auto gs = gate_slot.contiguous(), gth = gate_threshold.contiguous(), gsh = gate_sharpness.contiguous();
  const at::Tensor* resp = has_res ? &res : nullptr;
  float* outp = gate_out.data_ptr<float>();
  const int64_t os = gate_out.stride(0), s = bank.size(0);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      gate_rows<float>(hid, resp, rows.const_data_ptr<int32_t>(), bk.const_data_ptr<float>(), s,
                       gs.const_data_ptr<int32_t>(), gth.const_data_ptr<float>(), gsh.const_data_ptr<float>(), r, outp,
                       os);
      break;
    case at::kBFloat16:
      gate_rows<c10::BFloat16>(hid, resp, rows.const_data_ptr<int32_t>(), bk.const_data_ptr<float>(), s,
                               gs.const_data_ptr<int32_t>(), gth.const_data_ptr<float>(), gsh.const_data_ptr<float>(),
                               r, outp, os);
      break;
    default:
      gate_rows<c10::Half>(hid, resp, rows.const_data_ptr<int32_t>(), bk.const_data_ptr<float>(), s,
                           gs.const_data_ptr<int32_t>(), gth.const_data_ptr<float>(), gsh.const_data_ptr<float>(), r,
                           outp, os);
  }
}

}  // namespace value_steer
