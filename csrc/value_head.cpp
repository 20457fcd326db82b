// Fused value-head MLP on CPU: p = sigmoid(w4 . relu(W2 tanh(W0 x + b0) + b2) + b4), fp32 math.
//
// Numerical contract (batch invariance): each hidden unit h[m, n] is ONE dot product computed by one
// thread with a fixed summation order (16 interleaved lanes over the 16-element blocks, a fixed lane
// tree, then the tail); the final layer sums w4[n] * relu(...) per row in the same fixed order. The
// work split (weight-row chunks x row blocks, spread over threads by at::parallel_for) only decides
// *who* computes an element, never *how*, so a row's value is bitwise identical alone or in any batch,
// with any thread count. The 1-, 2-, 3- and 4-row dot kernels perform identical per-output arithmetic.
//
// Performance: the work item is a chunk of 16 weight rows x a block of 16 input rows, ordered so a
// thread walks all row blocks of one weight chunk back to back (the chunk stays in L2); inside, four
// input rows share each weight-row load. On x86-64 Linux the chunk kernels are built for AVX2 and for
// the baseline ISA (GCC target_clones, runtime-dispatched); FMA is deliberately not enabled so both
// clones round identically.
//
// The evaluation itself is value_steer::detail::value_head_segments (value_head_impl.h): a batch of row
// segments, each with its own head's weights. This op is one segment; value_head_grouped.cpp passes one
// per head in use, so both ops share every line of arithmetic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ops.h"
#include "simd8.h"
#include "value_head_impl.h"


namespace value_steer {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kColChunk = 16;  // weight rows per work item
constexpr int64_t kRowBlock = 16;  // input rows per work item

// 8-float vectors and loads: simd8.h.
using namespace simd8;  // NOLINT

// Lane j of the 16 accumulates the products with k = j (mod 16) over the full 16-blocks, in order.
VS_INLINE float lane_tree(v8f lo, v8f hi) {
  float acc[kLanes];
  std::memcpy(acc, &lo, sizeof(lo));
  std::memcpy(acc + 8, &hi, sizeof(hi));
  for (int s = kLanes / 2; s > 0; s >>= 1) {
    for (int j = 0; j < s; ++j) acc[j] += acc[j + s];
  }
  return acc[0];
}

template <typename W>
VS_INLINE float dot1(const float* __restrict__ x, const W* __restrict__ w, int64_t n) {
  v8f lo = {}, hi = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    lo += load8(x + k) * load8(w + k);
    hi += load8(x + k + 8) * load8(w + k + 8);
  }
  float tail = 0.f;
  for (; k < n; ++k) tail += x[k] * to_f(w[k]);
  return lane_tree(lo, hi) + tail;
}

// Four rows against one weight row; out[i] is bit-identical to dot1(x_i, w, n).
template <typename W>
VS_INLINE void dot4(const float* __restrict__ x0, const float* __restrict__ x1, const float* __restrict__ x2,
                 const float* __restrict__ x3, const W* __restrict__ w, int64_t n, float* out) {
  v8f l0 = {}, h0 = {}, l1 = {}, h1 = {}, l2 = {}, h2 = {}, l3 = {}, h3 = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const v8f wl = load8(w + k), wh = load8(w + k + 8);
    l0 += load8(x0 + k) * wl;
    h0 += load8(x0 + k + 8) * wh;
    l1 += load8(x1 + k) * wl;
    h1 += load8(x1 + k + 8) * wh;
    l2 += load8(x2 + k) * wl;
    h2 += load8(x2 + k + 8) * wh;
    l3 += load8(x3 + k) * wl;
    h3 += load8(x3 + k + 8) * wh;
  }
  float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
  for (; k < n; ++k) {
    const float wk = to_f(w[k]);
    t0 += x0[k] * wk;
    t1 += x1[k] * wk;
    t2 += x2[k] * wk;
    t3 += x3[k] * wk;
  }
  out[0] = lane_tree(l0, h0) + t0;
  out[1] = lane_tree(l1, h1) + t1;
  out[2] = lane_tree(l2, h2) + t2;
  out[3] = lane_tree(l3, h3) + t3;
}

// One row against two weight rows (more loads in flight for the memory-bound single-row case); each
// output is bit-identical to dot1.
template <typename W>
VS_INLINE void dot1x2(const float* __restrict__ x, const W* __restrict__ w0, const W* __restrict__ w1, int64_t n,
                      float* out) {
  v8f l0 = {}, h0 = {}, l1 = {}, h1 = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const v8f xl = load8(x + k), xh = load8(x + k + 8);
    l0 += xl * load8(w0 + k);
    h0 += xh * load8(w0 + k + 8);
    l1 += xl * load8(w1 + k);
    h1 += xh * load8(w1 + k + 8);
  }
  float t0 = 0.f, t1 = 0.f;
  for (; k < n; ++k) {
    t0 += x[k] * to_f(w0[k]);
    t1 += x[k] * to_f(w1[k]);
  }
  out[0] = lane_tree(l0, h0) + t0;
  out[1] = lane_tree(l1, h1) + t1;
}

VS_INLINE float sum_fixed(const float* __restrict__ x, int64_t n) {
  v8f lo = {}, hi = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    lo += load8(x + k);
    hi += load8(x + k + 8);
  }
  float tail = 0.f;
  for (; k < n; ++k) tail += x[k];
  return lane_tree(lo, hi) + tail;
}

// Epilogue kinds: 0 -> tanh(z); 1 -> relu(z) * w4[n].
VS_INLINE float epilogue(int kind, float z, const float* w4, int64_t n) {
  if (kind == 0) return std::tanh(z);
  return (z > 0.f ? z : 0.f) * w4[n];
}

// Two or three rows against one weight row (the rows of a block past its last full group of 4, e.g. a
// head with 7 rows in a grouped batch): the rows share each weight load; out[i] is bit-identical to
// dot1(x_i, w, n).
template <int R, typename W>
VS_INLINE void dot_r(const float* __restrict__ x, int64_t ldx, const W* __restrict__ w, int64_t n, float* out) {
  v8f lo[R] = {}, hi[R] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    const v8f wl = load8(w + k), wh = load8(w + k + 8);
    for (int i = 0; i < R; ++i) {
      lo[i] += load8(x + i * ldx + k) * wl;
      hi[i] += load8(x + i * ldx + k + 8) * wh;
    }
  }
  float t[R] = {};
  for (; k < n; ++k) {
    const float wk = to_f(w[k]);
    for (int i = 0; i < R; ++i) t[i] += x[i * ldx + k] * wk;
  }
  for (int i = 0; i < R; ++i) out[i] = lane_tree(lo[i], hi[i]) + t[i];
}

// out[m, n] = epilogue(dot(in[m], W[n]) + b[n]) for m in [m0, m1), n in [n0, n1).
template <typename W>
VS_INLINE void chunk_kernel(const float* in, const W* w, const float* b, const float* w4, float* out, int64_t h,
                         int64_t m0, int64_t m1, int64_t n0, int64_t n1, int kind) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) {
    const float* x0 = in + m * h;
    for (int64_t n = n0; n < n1; ++n) {
      float r[4];
      dot4(x0, x0 + h, x0 + 2 * h, x0 + 3 * h, w + n * h, h, r);
      for (int i = 0; i < 4; ++i) out[(m + i) * h + n] = epilogue(kind, r[i] + b[n], w4, n);
    }
  }
  if (m1 - m == 2 || m1 - m == 3) {
    const int64_t rest = m1 - m;
    for (int64_t n = n0; n < n1; ++n) {
      float r[3];
      if (rest == 3) {
        dot_r<3>(in + m * h, h, w + n * h, h, r);
      } else {
        dot_r<2>(in + m * h, h, w + n * h, h, r);
      }
      for (int64_t i = 0; i < rest; ++i) out[(m + i) * h + n] = epilogue(kind, r[i] + b[n], w4, n);
    }
    return;
  }
  for (; m < m1; ++m) {  // a single row: two weight rows at a time keep more loads in flight
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
      float r[2];
      dot1x2(in + m * h, w + n * h, w + (n + 1) * h, h, r);
      out[m * h + n] = epilogue(kind, r[0] + b[n], w4, n);
      out[m * h + n + 1] = epilogue(kind, r[1] + b[n + 1], w4, n + 1);
    }
    for (; n < n1; ++n) out[m * h + n] = epilogue(kind, dot1(in + m * h, w + n * h, h) + b[n], w4, n);
  }
}

VS_CLONES void chunk_f32(const float* in, const float* w, const float* b, const float* w4, float* out, int64_t h,
                         int64_t m0, int64_t m1, int64_t n0, int64_t n1, int kind) {
  chunk_kernel(in, w, b, w4, out, h, m0, m1, n0, n1, kind);
}
VS_CLONES void chunk_bf16(const float* in, const c10::BFloat16* w, const float* b, const float* w4, float* out,
                          int64_t h, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int kind) {
  chunk_kernel(in, w, b, w4, out, h, m0, m1, n0, n1, kind);
}
VS_CLONES void chunk_f16(const float* in, const c10::Half* w, const float* b, const float* w4, float* out, int64_t h,
                         int64_t m0, int64_t m1, int64_t n0, int64_t n1, int kind) {
  chunk_kernel(in, w, b, w4, out, h, m0, m1, n0, n1, kind);
}
VS_CLONES void finish_rows(const float* contrib, float b4, float* out, int64_t h, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float logit = sum_fixed(contrib + m * h, h) + b4;
    out[m] = 1.f / (1.f + std::exp(-logit));
  }
}

inline void chunk_dispatch(const float* in, const void* w, at::ScalarType w_dtype, const float* b, const float* w4,
                           float* out, int64_t h, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int kind) {
  switch (w_dtype) {
    case at::kFloat:
      chunk_f32(in, static_cast<const float*>(w), b, w4, out, h, m0, m1, n0, n1, kind);
      break;
    case at::kBFloat16:
      chunk_bf16(in, static_cast<const c10::BFloat16*>(w), b, w4, out, h, m0, m1, n0, n1, kind);
      break;
    case at::kHalf:
      chunk_f16(in, static_cast<const c10::Half*>(w), b, w4, out, h, m0, m1, n0, n1, kind);
      break;
    default:
      TORCH_CHECK(false, "value_head: unsupported weight dtype ", w_dtype);
  }
}

// One layer over every segment (kind 0: W0/b0 -> tanh; kind 1: W2/b2 -> relu * w4). The work items of
// all segments form one parallel range (segment-major, then weight chunk, then row block), so a batch
// mixing heads costs one parallel region per layer, not one per head.
void dense_layer(const float* in, float* out, int64_t h, at::ScalarType w_dtype,
                 const std::vector<detail::ValueHeadSegment>& segs, int kind) {
  const int64_t n_chunks = (h + kColChunk - 1) / kColChunk;
  std::vector<int64_t> item_start(segs.size() + 1, 0);
  for (size_t s = 0; s < segs.size(); ++s) {
    item_start[s + 1] = item_start[s] + n_chunks * ((segs[s].rows + kRowBlock - 1) / kRowBlock);
  }
  at::parallel_for(0, item_start.back(), 1, [&](int64_t begin, int64_t end) {
    size_t s = std::upper_bound(item_start.begin(), item_start.end(), begin) - item_start.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= item_start[s + 1]) ++s;
      const detail::ValueHeadSegment& seg = segs[s];
      const int64_t m_blocks = (seg.rows + kRowBlock - 1) / kRowBlock;
      const int64_t local = item - item_start[s];
      const int64_t c = local / m_blocks, mb = local % m_blocks;
      const int64_t n0 = c * kColChunk, n1 = std::min(h, n0 + kColChunk);
      const int64_t m0 = seg.row0 + mb * kRowBlock, m1 = std::min(seg.row0 + seg.rows, m0 + kRowBlock);
      chunk_dispatch(in, kind == 0 ? seg.w0 : seg.w2, w_dtype, kind == 0 ? seg.b0 : seg.b2,
                     kind == 0 ? nullptr : seg.w4, out, h, m0, m1, n0, n1, kind);
    }
  });
}

}  // namespace

at::Tensor value_head(const at::Tensor& x, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& w2,
                      const at::Tensor& b2, const at::Tensor& w4, const at::Tensor& b4) {
  TORCH_CHECK(x.device().is_cpu(), "value_head (C++): expects CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "value_head: x must be a float [M, H] tensor");
  const int64_t m = x.size(0), h = x.size(1);
  TORCH_CHECK(w0.dim() == 2 && w0.size(0) == h && w0.size(1) == h, "value_head: w0 must be [H, H]");
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == h && w2.size(1) == h, "value_head: w2 must be [H, H]");
  TORCH_CHECK(w0.scalar_type() == w2.scalar_type(), "value_head: w0 and w2 must share a dtype");
  TORCH_CHECK(b0.numel() == h && b2.numel() == h && w4.numel() == h && b4.numel() == 1,
              "value_head: b0, b2, w4 need H elements and b4 one");
  auto out = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return out;

  const auto xf = x.to(at::kFloat).contiguous();
  const auto w0c = w0.contiguous();
  const auto w2c = w2.contiguous();
  const auto b0f = b0.to(at::kFloat).contiguous();
  const auto b2f = b2.to(at::kFloat).contiguous();
  const auto w4f = w4.to(at::kFloat).contiguous();
  const float b4v = b4.to(at::kFloat).reshape({-1})[0].item<float>();
  const std::vector<detail::ValueHeadSegment> segs = {{w0c.const_data_ptr(), w2c.const_data_ptr(),
                                                       b0f.const_data_ptr<float>(), b2f.const_data_ptr<float>(),
                                                       w4f.const_data_ptr<float>(), b4v, 0, m}};
  detail::value_head_segments(xf.const_data_ptr<float>(), m, h, w0c.scalar_type(), segs, out.data_ptr<float>());
  return out;
}

namespace detail {

void value_head_segments(const float* x, int64_t m, int64_t h, at::ScalarType w_dtype,
                         const std::vector<ValueHeadSegment>& segments, float* out) {
  auto h1 = at::empty({m, h}, at::TensorOptions().dtype(at::kFloat));
  auto contrib = at::empty({m, h}, at::TensorOptions().dtype(at::kFloat));
  dense_layer(x, h1.data_ptr<float>(), h, w_dtype, segments, 0);
  dense_layer(h1.const_data_ptr<float>(), contrib.data_ptr<float>(), h, w_dtype, segments, 1);
  const float* cp = contrib.const_data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (const ValueHeadSegment& seg : segments) {  // each row's own head's b4
      const int64_t r0 = std::max(begin, seg.row0), r1 = std::min(end, seg.row0 + seg.rows);
      if (r0 < r1) finish_rows(cp, seg.b4, out, h, r0, r1);
    }
  });
}

}  // namespace detail
}  // namespace value_steer
