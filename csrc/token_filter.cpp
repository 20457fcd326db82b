// Token-mode VFD's logit filter on CPU (mirror of value_steer/kernels/token_filter.py; the semantics are
// value_steer.core.qhead.token_filter_rows).
//
// Per logit row b: row = row_idx[b]; the row is on when row > 0 and row_mode[row] == token_mode. Every row gets
// z[b] = W_down (h_b + pos) (the caller reads q at the sampled token as w_up[tok] . z + bias[tok]). Off rows are
// bytewise copies (changed false, mass 0); on rows' columns V..V' too. On rows, with q_v = w_up[v] . z + bias[v]
// never materialised as a [B, V] tensor:
//   pass 1, parallel over kTile-column tiles rather than rows, so each tile's W_up^T block ([R, kTile], 64 KiB at
//     R = 32) comes from memory once and serves every on-row from cache (a register-blocked [kGroup x 8]
//     micro-kernel over R, kGroup rows at a time); per (row, tile) the tile's max logit m, the sums of
//     exp(l - m) over safe and unsafe columns (unsafe: sign * (q - logit(t)) > 0), the unsafe count, the first
//     argmin of sign * q with its logit and, for tilt rows, max and exp-sum of l - beta * sign * q. Mask rows
//     write their masked output here (the common case reads the logits once); K rows keep a bit per column.
//   reduce, per row, tiles in order: max, total and unsafe mass, the safest column, the fallback decision
//     (safe mass < min_safe_mass), the K-rule factors (k_emulation_factors), mass and changed.
//   pass 2, parallel over tiles, only where needed: fallback rows (-inf but the safest column), K rows
//     (l + log factor by the bit), tilt rows (q recomputed, l - beta * sign * q, and the total-variation
//     distance between the two softmaxes: one more reduction over tiles).
// exp is a vectorised Cephes-style polynomial (exp8_nonpos: inputs <= 0, relative error < 1e-7, 0 below -87).
// Every sum has a fixed order (lanes, then tiles in order), so results do not depend on the thread count.
// Outputs in bf16/fp16 are narrowed like torch (simd8.h); mask outputs copy the kept logits' bits.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "simd8.h"

namespace value_steer {
namespace {

using namespace simd8;  // NOLINT

constexpr int64_t kTile = 512;  // columns per tile (a multiple of 8): W_up^T's tile is R x 2 KiB
constexpr int kGroup = 8;       // rows sharing one pass over a W_up tile (the micro-kernel's accumulators)
constexpr float kInf = std::numeric_limits<float>::infinity();

#if defined(__GNUC__)
#define VS_LAMBDA_INLINE __attribute__((always_inline))
#else
#define VS_LAMBDA_INLINE
#endif

enum Kind : uint8_t { kMask = 0, kKRule = 1, kTilt = 2 };

struct RowInfo {
  int64_t b;         // batch row
  Kind kind;
  float cut;         // logit(threshold)
  float sign, coef;  // coef = beta * sign (tilt)
  int32_t k;
};

// One on-row's statistics over one tile.
struct Partial {
  float m;             // max logit (-inf: none finite)
  float safe, unsafe;  // sum of exp(l - m) over safe / unsafe columns
  float minv;          // min of sign * q, first at column mini, whose logit is lmin
  float lmin;
  int64_t mini;
  int64_t n_unsafe;
  float tm, ts;  // tilt: max of t = l - coef * q, sum of exp(t - tm)
  float tv;      // tilt, pass 2: sum |softmax(t) - softmax(l)|
};

VS_INLINE v8f vsel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
VS_INLINE v8i vseli(v8i m, v8i a, v8i b) { return (m & a) | (~m & b); }
VS_INLINE v8f vmax(v8f a, v8f b) { return vsel(a > b, a, b); }
VS_INLINE v8i splati(int32_t c) { return v8i{c, c, c, c, c, c, c, c}; }
VS_INLINE float hmax(v8f v) {
  float m = v[0];
  for (int j = 1; j < 8; ++j) m = v[j] > m ? v[j] : m;
  return m;
}
VS_INLINE int32_t hsumi(v8i v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for x <= 0 (or -inf): range reduction x = n ln2 + r, |r| <= ln2 / 2, and the Cephes expf polynomial.
// 0 for x < -87 (the true value is below 1.7e-38: nothing next to a row's total >= 1).
VS_INLINE v8f exp8_nonpos(v8f x) {
  const v8i tiny = x < splat(-87.f);
  x = vsel(tiny, splat(0.f), x);
  const v8f magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  v8f kf = x * splat(1.44269504088896341f) + magic;
  const v8i n = (v8i)kf - (v8i)magic;
  kf = kf - magic;
  v8f r = x - kf * splat(0.693359375f);
  r = r - kf * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  v8f y = p * (r * r) + r + splat(1.f);
  y = (v8f)((v8i)y + (v8i)((v8u)n << 23));
  return vsel(tiny, splat(0.f), y);
}
VS_INLINE v8f vabs(v8f x) { return (v8f)((v8i)x & splati(0x7FFFFFFF)); }

// Lanes [cnt, 8) of a partial block read as `fill`.
template <typename T>
VS_INLINE v8f load_part(const T* p, int64_t cnt, float fill) {
  float tmp[8];
  for (int j = 0; j < 8; ++j) tmp[j] = j < cnt ? to_f(p[j]) : fill;
  return load8(tmp);
}
template <typename T>
VS_INLINE void store_part(T* p, v8f v, int64_t cnt) {
  float tmp[8];
  store8(tmp, v);
  for (int64_t j = 0; j < cnt; ++j) p[j] = static_cast<T>(tmp[j]);
}
VS_INLINE v8i lane_mask(int64_t cnt) {
  const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  return lanes < splati(static_cast<int32_t>(cnt));
}

// q[j * ldq + v] = sum_k z[j][k] wt[k * ldw + v] + bias[v] for j < NR, v < n (k in order; then the bias).
template <int NR>
VS_INLINE void q_block(const float* wt, int64_t ldw, const float* bias, const float* const* z, int64_t r, int64_t n,
                       float* q, int64_t ldq) {
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    v8f acc[NR];
    for (int j = 0; j < NR; ++j) acc[j] = splat(0.f);
    for (int64_t k = 0; k < r; ++k) {
      const v8f w = load8(wt + k * ldw + v);
      // vector * scalar: one broadcast load (simd8's splat of a runtime value compiles to eight inserts)
      for (int j = 0; j < NR; ++j) acc[j] += w * z[j][k];
    }
    const v8f bb = load8(bias + v);
    for (int j = 0; j < NR; ++j) store8(q + j * ldq + v, acc[j] + bb);
  }
  for (; v < n; ++v) {
    for (int j = 0; j < NR; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < r; ++k) acc += z[j][k] * wt[k * ldw + v];
      q[j * ldq + v] = acc + bias[v];
    }
  }
}

VS_INLINE void q_tile(const float* wt, int64_t ldw, const float* bias, const float* const* z, int nr, int64_t r,
                      int64_t n, float* q, int64_t ldq) {
  switch (nr) {
    case 1: q_block<1>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 2: q_block<2>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 3: q_block<3>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 4: q_block<4>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 5: q_block<5>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 6: q_block<6>(wt, ldw, bias, z, r, n, q, ldq); break;
    case 7: q_block<7>(wt, ldw, bias, z, r, n, q, ldq); break;
    default: q_block<8>(wt, ldw, bias, z, r, n, q, ldq);
  }
}

// Pass 1 over one tile of one on-row: l, q, out at the tile's first column (global column v0); n columns.
// Mask rows write out (removed columns -inf, the rest bitwise); K rows write bits (a byte per 8 columns).
template <typename T, bool TILT>
VS_INLINE void stats_row(const T* l, const float* q, int64_t n, int64_t v0, const RowInfo& ri, T* out,
                         uint8_t* bits, Partial& p) {
  const int64_t full = n & ~int64_t{7};
  const int64_t rest = n - full;
  const v8f coef = splat(ri.coef);
  v8f mv = splat(-kInf), tmv = splat(-kInf);
  for (int64_t v = 0; v < full; v += 8) {
    const v8f lv = load8(l + v);
    mv = vmax(mv, lv);
    if (TILT) tmv = vmax(tmv, lv - coef * load8(q + v));
  }
  if (rest) {
    const v8f lv = load_part(l + full, rest, -kInf);
    mv = vmax(mv, lv);
    if (TILT) tmv = vmax(tmv, vsel(lane_mask(rest), lv - coef * load_part(q + full, rest, 0.f), splat(-kInf)));
  }
  const float m = hmax(mv), tm = hmax(tmv);
  // A tile of -inf logits: subtract 0 instead (exp(-inf) = 0, no NaN).
  const v8f m8 = splat(m == -kInf ? 0.f : m), tm8 = splat(tm == -kInf ? 0.f : tm);
  const v8f sign = splat(ri.sign), cut = splat(ri.cut), zero = splat(0.f), ninf = splat(-kInf);
  const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7}, lanebits = {1, 2, 4, 8, 16, 32, 64, 128};
  v8f sacc = zero, uacc = zero, tacc = zero, minv = splat(kInf);
  v8i cnt = splati(0), mini = splati(-1);
  const T neg_inf = static_cast<T>(-kInf);
  auto block = [&](int64_t v, v8f lv, v8f qv, v8i valid, int64_t nvalid) VS_LAMBDA_INLINE {
    const v8i um = (sign * (qv - cut) > zero) & valid;
    const v8f e = exp8_nonpos(lv - m8);
    uacc += vsel(um, e, zero);
    sacc += vsel(um, zero, e);  // invalid lanes hold -inf logits: e = 0
    cnt -= um;  // um lanes are -1 where unsafe
    const v8f sq = vsel(valid, sign * qv, splat(kInf));
    const v8i lt = sq < minv;
    minv = vsel(lt, sq, minv);
    mini = vseli(lt, lanes + static_cast<int32_t>(v), mini);  // vector + scalar: a broadcast, not inserts
    if (TILT) tacc += exp8_nonpos(vsel(valid, lv - coef * qv, ninf) - tm8);
    if (ri.kind == kMask) {
      if (std::is_same<T, float>::value && nvalid == 8) {  // NOLINT
        store8(reinterpret_cast<float*>(out) + v, vsel(um, ninf, lv));  // kept lanes: the same bits
      } else {
        for (int64_t j = 0; j < nvalid; ++j) out[v + j] = um[j] ? neg_inf : l[v + j];
      }
    } else if (ri.kind == kKRule) {
      bits[v >> 3] = static_cast<uint8_t>(hsumi(um & lanebits));
    }
  };
  for (int64_t v = 0; v < full; v += 8) block(v, load8(l + v), load8(q + v), splati(-1), 8);
  if (rest) block(full, load_part(l + full, rest, -kInf), load_part(q + full, rest, 0.f), lane_mask(rest), rest);
  p.m = m;
  p.safe = hsum(sacc);
  p.unsafe = hsum(uacc);
  int64_t count = 0;
  for (int j = 0; j < 8; ++j) count += cnt[j];
  p.n_unsafe = count;
  // The first minimum: the smallest value, ties to the smallest column.
  float bv = kInf;
  int64_t bi = -1;
  for (int j = 0; j < 8; ++j) {
    if (mini[j] < 0) continue;
    if (minv[j] < bv || (minv[j] == bv && mini[j] < bi)) bv = minv[j], bi = mini[j];
  }
  p.minv = bv;
  p.mini = bi < 0 ? -1 : v0 + bi;
  p.lmin = bi < 0 ? -kInf : to_f(l[bi]);
  p.tm = tm;
  p.ts = TILT ? hsum(tacc) : 0.f;
  p.tv = 0.f;
}

// Pass 2, K rule: out = l + (unsafe ? lu : ls), unsafe from the bits of pass 1.
template <typename T>
VS_INLINE void apply_k_row(const T* l, T* out, const uint8_t* bits, int64_t n, float lu, float ls) {
  const v8i lanebits = {1, 2, 4, 8, 16, 32, 64, 128};
  const v8f lu8 = splat(lu), ls8 = splat(ls);
  const int64_t full = n & ~int64_t{7};
  for (int64_t v = 0; v < full; v += 8) {
    const v8i um = (lanebits & static_cast<int32_t>(bits[v >> 3])) != 0;
    store8(out + v, load8(l + v) + vsel(um, lu8, ls8));
  }
  for (int64_t v = full; v < n; ++v) out[v] = static_cast<T>(to_f(l[v]) + (((bits[v >> 3] >> (v & 7)) & 1) ? lu : ls));
}

// Pass 2, tilt: out = l - coef * q; returns sum |exp(t - tm) / ts - exp(l - m) / total| over the n columns.
template <typename T>
VS_INLINE float apply_tilt_row(const T* l, const float* q, T* out, int64_t n, float coef, float m, float total,
                               float tm, float ts) {
  const v8f c8 = splat(coef), m8 = splat(m == -kInf ? 0.f : m), tm8 = splat(tm == -kInf ? 0.f : tm);
  const v8f tot8 = splat(total), ts8 = splat(ts);
  v8f acc = splat(0.f);
  const int64_t full = n & ~int64_t{7};
  for (int64_t v = 0; v < full; v += 8) {
    const v8f lv = load8(l + v);
    const v8f t = lv - c8 * load8(q + v);
    store8(out + v, t);
    acc += vabs(exp8_nonpos(t - tm8) / ts8 - exp8_nonpos(lv - m8) / tot8);
  }
  if (n > full) {
    const int64_t rest = n - full;
    const v8f lv = load_part(l + full, rest, -kInf);
    const v8f t = lv - c8 * load_part(q + full, rest, 0.f);
    store_part(out + full, t, rest);
    acc += vabs(exp8_nonpos(t - tm8) / ts8 - exp8_nonpos(lv - m8) / tot8);  // padding lanes: 0 - 0
  }
  return hsum(acc);
}

template <typename T>
VS_INLINE void z_row(const T* hrow, const float* wd, const float* pos, int64_t h, int64_t r, float* y, float* z) {
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) store8(y + i, load8(hrow + i) + load8(pos + i));
  for (; i < h; ++i) y[i] = to_f(hrow[i]) + pos[i];
  for (int64_t k = 0; k < r; ++k) z[k] = dot(wd + k * h, y, h);
}

VS_CLONES void q_tile_isa(const float* wt, int64_t ldw, const float* bias, const float* const* z, int nr, int64_t r,
                          int64_t n, float* q, int64_t ldq) {
  q_tile(wt, ldw, bias, z, nr, r, n, q, ldq);
}

#define VS_DEFINE_CLONES(T, SUFFIX)                                                                              \
  VS_CLONES void stats_row_##SUFFIX(const T* l, const float* q, int64_t n, int64_t v0, const RowInfo& ri, T* out, \
                                    uint8_t* bits, Partial& p) {                                                 \
    if (ri.kind == kTilt)                                                                                        \
      stats_row<T, true>(l, q, n, v0, ri, out, bits, p);                                                         \
    else                                                                                                         \
      stats_row<T, false>(l, q, n, v0, ri, out, bits, p);                                                        \
  }                                                                                                              \
  VS_CLONES void apply_k_row_##SUFFIX(const T* l, T* out, const uint8_t* bits, int64_t n, float lu, float ls) {  \
    apply_k_row(l, out, bits, n, lu, ls);                                                                        \
  }                                                                                                              \
  VS_CLONES float apply_tilt_row_##SUFFIX(const T* l, const float* q, T* out, int64_t n, float coef, float m,    \
                                          float total, float tm, float ts) {                                     \
    return apply_tilt_row(l, q, out, n, coef, m, total, tm, ts);                                                 \
  }                                                                                                              \
  VS_CLONES void z_row_##SUFFIX(const T* hrow, const float* wd, const float* pos, int64_t h, int64_t r, float* y, \
                                float* z) {                                                                      \
    z_row(hrow, wd, pos, h, r, y, z);                                                                            \
  }                                                                                                              \
  inline void stats_row_isa(const T* l, const float* q, int64_t n, int64_t v0, const RowInfo& ri, T* out,        \
                            uint8_t* bits, Partial& p) {                                                         \
    stats_row_##SUFFIX(l, q, n, v0, ri, out, bits, p);                                                           \
  }                                                                                                              \
  inline void apply_k_row_isa(const T* l, T* out, const uint8_t* bits, int64_t n, float lu, float ls) {          \
    apply_k_row_##SUFFIX(l, out, bits, n, lu, ls);                                                               \
  }                                                                                                              \
  inline float apply_tilt_row_isa(const T* l, const float* q, T* out, int64_t n, float coef, float m,            \
                                  float total, float tm, float ts) {                                             \
    return apply_tilt_row_##SUFFIX(l, q, out, n, coef, m, total, tm, ts);                                        \
  }                                                                                                              \
  inline void z_row_isa(const T* hrow, const float* wd, const float* pos, int64_t h, int64_t r, float* y,        \
                        float* z) {                                                                              \
    z_row_##SUFFIX(hrow, wd, pos, h, r, y, z);                                                                   \
  }
VS_DEFINE_CLONES(float, f32)
VS_DEFINE_CLONES(c10::BFloat16, bf16)
VS_DEFINE_CLONES(c10::Half, f16)
#undef VS_DEFINE_CLONES

// k_emulation_factors (value_steer.core.qhead) for one row, fp32.
void k_factors(float u, int32_t k, float* log_safe, float* log_unsafe) {
  u = std::min(std::max(u, 0.f), 1.f);
  const float kf = static_cast<float>(std::max(k, 1));
  const bool near_one = u > 1.f - 1e-6f;
  const float series = near_one ? kf : (1.f - std::pow(u, kf)) / std::max(1.f - u, 1e-12f);
  *log_safe = std::log(std::max(series, 1.f));
  *log_unsafe = (u > 0.f && !near_one) ? (kf - 1.f) * std::log(std::max(u, 1e-30f)) : 0.f;
}

// A row's statistics over all tiles (tiles in order).
struct RowStats {
  float m, total, safe, unsafe;
  int64_t safest;
  float lsafest;
  int64_t n_unsafe;
  float tm, ts;
};

RowStats reduce_row(const Partial* p, int64_t nt) {
  RowStats s{-kInf, 0.f, 0.f, 0.f, 0, -kInf, 0, -kInf, 0.f};
  for (int64_t t = 0; t < nt; ++t) s.m = std::max(s.m, p[t].m), s.tm = std::max(s.tm, p[t].tm);
  float minv = kInf;
  for (int64_t t = 0; t < nt; ++t) {
    if (p[t].m != -kInf) {
      const float scale = std::exp(p[t].m - s.m);
      s.safe += p[t].safe * scale;
      s.unsafe += p[t].unsafe * scale;
    }
    if (p[t].tm != -kInf) s.ts += p[t].ts * std::exp(p[t].tm - s.tm);
    if (p[t].mini >= 0 && p[t].minv < minv) minv = p[t].minv, s.safest = p[t].mini, s.lsafest = p[t].lmin;
    s.n_unsafe += p[t].n_unsafe;
  }
  s.total = s.safe + s.unsafe;
  return s;
}

template <typename H>
void z_rows(const at::Tensor& hid, const float* wd, const float* pos, int64_t h, int64_t r, float* z) {
  const H* hp = hid.const_data_ptr<H>();
  at::parallel_for(0, hid.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(static_cast<size_t>(std::max<int64_t>(h, 1)));
    for (int64_t i = begin; i < end; ++i) z_row_isa(hp + i * h, wd, pos, h, r, y.data(), z + i * r);
  });
}

struct Weights {
  const float* wt;  // W_up^T [R, V], row stride ldw
  const float* bias;
  int64_t v, r, ldw;
};

template <typename L>
void filter_rows(const at::Tensor& lg, at::Tensor& out, const Weights& w, const float* z,
                 const std::vector<RowInfo>& on, float min_safe_mass, bool* changed, float* mass) {
  const int64_t b = out.size(0), vp = out.size(1), ldl = lg.stride(0), v = w.v, r = w.r;
  const L* lp = lg.const_data_ptr<L>();
  L* op = out.data_ptr<L>();
  const L neg_inf = static_cast<L>(-kInf);

  // Off rows: bytewise copies; on rows: their columns V..V'.
  std::vector<uint8_t> is_on(static_cast<size_t>(b), 0);
  for (const RowInfo& ri : on) is_on[ri.b] = 1;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t from = is_on[i] ? v : 0;
      if (vp > from) std::memcpy(op + i * vp + from, lp + i * ldl + from, static_cast<size_t>(vp - from) * sizeof(L));
    }
  });
  const int64_t n_on = static_cast<int64_t>(on.size());
  if (n_on == 0) return;

  const int64_t nt = (v + kTile - 1) / kTile, nbytes = (v + 7) / 8;
  std::vector<Partial> part(static_cast<size_t>(n_on * nt));
  std::vector<uint8_t> bits;
  std::vector<int64_t> bit_slot(static_cast<size_t>(n_on), -1);
  int64_t n_k = 0;
  for (int64_t j = 0; j < n_on; ++j)
    if (on[j].kind == kKRule) bit_slot[j] = n_k++;
  bits.resize(static_cast<size_t>(n_k * nbytes));

  // Pass 1.
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(static_cast<size_t>(kGroup * kTile));
    const float* zs[kGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t v0 = t * kTile, n = std::min(kTile, v - v0);
      for (int64_t g0 = 0; g0 < n_on; g0 += kGroup) {
        const int nr = static_cast<int>(std::min<int64_t>(kGroup, n_on - g0));
        for (int j = 0; j < nr; ++j) {
          zs[j] = z + on[g0 + j].b * r;
          // Prefetch the group's logits while the micro-kernel runs (perf showed the first read of each row's
          // tile stalling on memory; this halves that stall's share).
          const char* lrow = reinterpret_cast<const char*>(lp + on[g0 + j].b * ldl + v0);
          for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(L)); off += 64) __builtin_prefetch(lrow + off);
        }
        q_tile_isa(w.wt + v0, w.ldw, w.bias + v0, zs, nr, r, n, qbuf.data(), kTile);
        for (int j = 0; j < nr; ++j) {
          const RowInfo& ri = on[g0 + j];
          uint8_t* bp = bit_slot[g0 + j] >= 0 ? bits.data() + bit_slot[g0 + j] * nbytes + v0 / 8 : nullptr;
          stats_row_isa(lp + ri.b * ldl + v0, qbuf.data() + j * kTile, n, v0, ri, op + ri.b * vp + v0, bp,
                        part[(g0 + j) * nt + t]);
        }
      }
    }
  });

  // Reduce; decide what pass 2 has to do.
  std::vector<RowStats> stats(static_cast<size_t>(n_on));
  std::vector<float> lu(static_cast<size_t>(n_on), 0.f), ls(static_cast<size_t>(n_on), 0.f);
  std::vector<uint8_t> fallback(static_cast<size_t>(n_on), 0);
  std::vector<int64_t> tilt_rows;
  bool any_pass2 = false;
  for (int64_t j = 0; j < n_on; ++j) {
    const RowInfo& ri = on[j];
    const RowStats s = stats[j] = reduce_row(part.data() + j * nt, nt);
    const float u = s.unsafe / s.total;
    if (ri.kind == kMask) {
      fallback[j] = s.safe / s.total < min_safe_mass;
      if (fallback[j]) {
        changed[ri.b] = v > 1;
        mass[ri.b] = (s.total - std::exp(s.lsafest - s.m)) / s.total;
        any_pass2 = true;
      } else {
        changed[ri.b] = s.n_unsafe > 0;
        mass[ri.b] = u;
      }
    } else if (ri.kind == kKRule) {
      k_factors(u, ri.k, &ls[j], &lu[j]);
      const float uc = std::min(std::max(u, 0.f), 1.f);
      mass[ri.b] = uc - uc * std::exp(lu[j]);
      changed[ri.b] = mass[ri.b] > 0.f;
      any_pass2 = true;
    } else {
      tilt_rows.push_back(j);
      any_pass2 = true;
    }
  }
  if (!any_pass2) return;

  // Pass 2.
  const int64_t n_tilt = static_cast<int64_t>(tilt_rows.size());
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(n_tilt ? static_cast<size_t>(kGroup * kTile) : 0);
    const float* zs[kGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t v0 = t * kTile, n = std::min(kTile, v - v0);
      for (int64_t j = 0; j < n_on; ++j) {
        const RowInfo& ri = on[j];
        const L* src = lp + ri.b * ldl + v0;
        L* dst = op + ri.b * vp + v0;
        if (ri.kind == kMask && fallback[j]) {
          std::fill(dst, dst + n, neg_inf);
          const int64_t c = stats[j].safest - v0;
          if (c >= 0 && c < n) dst[c] = src[c];
        } else if (ri.kind == kKRule) {
          apply_k_row_isa(src, dst, bits.data() + bit_slot[j] * nbytes + v0 / 8, n, lu[j], ls[j]);
        }
      }
      for (int64_t g0 = 0; g0 < n_tilt; g0 += kGroup) {
        const int nr = static_cast<int>(std::min<int64_t>(kGroup, n_tilt - g0));
        for (int i = 0; i < nr; ++i) zs[i] = z + on[tilt_rows[g0 + i]].b * r;
        q_tile_isa(w.wt + v0, w.ldw, w.bias + v0, zs, nr, r, n, qbuf.data(), kTile);
        for (int i = 0; i < nr; ++i) {
          const int64_t j = tilt_rows[g0 + i];
          const RowInfo& ri = on[j];
          const RowStats& s = stats[j];
          part[j * nt + t].tv = apply_tilt_row_isa(lp + ri.b * ldl + v0, qbuf.data() + i * kTile, op + ri.b * vp + v0,
                                                   n, ri.coef, s.m, s.total, s.tm, s.ts);
        }
      }
    }
  });
  for (const int64_t j : tilt_rows) {
    float tv = 0.f;
    for (int64_t t = 0; t < nt; ++t) tv += part[j * nt + t].tv;
    mass[on[j].b] = 0.5f * tv;
    changed[on[j].b] = mass[on[j].b] > 0.f;
  }
}

bool is_float_type(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_filter(
    const at::Tensor& hidden, const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_threshold,
    const at::Tensor& row_sign, const at::Tensor& row_mode, const at::Tensor& row_beta, const at::Tensor& row_k,
    const at::Tensor& w_down, const at::Tensor& pos, const at::Tensor& w_up, const at::Tensor& bias,
    int64_t token_mode, double min_safe_mass) {
  TORCH_CHECK(logits.device().is_cpu(), "token_filter (C++): expects CPU tensors");
  TORCH_CHECK(logits.dim() == 2 && is_float_type(logits), "logits must be [B, V'] fp32/bf16/fp16");
  const int64_t b = logits.size(0), vp = logits.size(1);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == b && is_float_type(hidden),
              "hidden must be [B, H] fp32/bf16/fp16");
  const int64_t h = hidden.size(1);
  TORCH_CHECK(row_idx.dim() == 1 && row_idx.scalar_type() == at::kInt && row_idx.size(0) >= b,
              "row_idx must be [B_max >= B] int32");
  TORCH_CHECK(row_threshold.dim() == 1 && row_threshold.scalar_type() == at::kFloat, "row_threshold must be [N] fp32");
  const int64_t nrows = row_threshold.size(0);
  TORCH_CHECK(row_sign.dim() == 1 && row_sign.scalar_type() == at::kFloat && row_sign.size(0) == nrows,
              "row_sign must be [N] fp32");
  TORCH_CHECK(row_mode.dim() == 1 && row_mode.scalar_type() == at::kInt && row_mode.size(0) == nrows,
              "row_mode must be [N] int32");
  TORCH_CHECK(row_beta.dim() == 1 && row_beta.scalar_type() == at::kFloat && row_beta.size(0) == nrows,
              "row_beta must be [N] fp32");
  TORCH_CHECK(row_k.dim() == 1 && row_k.scalar_type() == at::kInt && row_k.size(0) == nrows, "row_k must be [N] int32");
  for (const at::Tensor* t : {&row_idx, &row_threshold, &row_sign, &row_mode, &row_beta, &row_k, &hidden})
    TORCH_CHECK(t->device().is_cpu(), "token_filter (C++): expects CPU tensors");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"w_down", &w_down}, {"pos", &pos},
                                 {"w_up", &w_up}, {"bias", &bias}})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), name, " must be an fp32 CPU tensor");
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == h, "w_down must be [R, H]");
  const int64_t r = w_down.size(0);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == r && w_up.size(0) >= 1 && w_up.size(0) <= vp,
              "w_up must be [1 <= V <= V', R]");
  const int64_t v = w_up.size(0);
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == h, "pos must be [H]");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == v, "bias must be [V]");

  auto out = at::empty({b, vp}, logits.options());
  auto z = at::empty({b, r}, logits.options().dtype(at::kFloat));
  auto changed = at::zeros({b}, logits.options().dtype(at::kBool));
  auto mass = at::zeros({b}, logits.options().dtype(at::kFloat));
  if (b == 0) return {out, z, changed, mass};

  const auto rows = row_idx.narrow(0, 0, b).contiguous();
  const auto thr = row_threshold.contiguous(), sg = row_sign.contiguous(), md = row_mode.contiguous(),
             bt = row_beta.contiguous(), kk = row_k.contiguous();
  const int32_t* rp = rows.const_data_ptr<int32_t>();
  std::vector<RowInfo> on;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t row = rp[i];
    TORCH_CHECK(row >= 0 && row < nrows, "row_idx[", i, "] = ", row, " is outside [0, N=", nrows, ")");
    if (row == 0 || md.const_data_ptr<int32_t>()[row] != token_mode) continue;
    const float t = thr.const_data_ptr<float>()[row], s = sg.const_data_ptr<float>()[row];
    const float beta = bt.const_data_ptr<float>()[row];
    const int32_t k = kk.const_data_ptr<int32_t>()[row];
    const Kind kind = beta > 0.f ? kTilt : (k >= 1 ? kKRule : kMask);
    on.push_back(RowInfo{i, kind, std::log(t) - std::log1p(-t), s, beta * s, k});
  }

  const auto hid = hidden.contiguous();
  const auto wd = w_down.contiguous(), ps = pos.contiguous(), bs = bias.contiguous();
  float* zp = z.data_ptr<float>();
  switch (hidden.scalar_type()) {
    case at::kFloat:
      z_rows<float>(hid, wd.const_data_ptr<float>(), ps.const_data_ptr<float>(), h, r, zp);
      break;
    case at::kBFloat16:
      z_rows<c10::BFloat16>(hid, wd.const_data_ptr<float>(), ps.const_data_ptr<float>(), h, r, zp);
      break;
    default:
      z_rows<c10::Half>(hid, wd.const_data_ptr<float>(), ps.const_data_ptr<float>(), h, r, zp);
  }
  if (vp == 0) return {out, z, changed, mass};
  // Rows may be strided (vLLM's logits are a column slice of the padded lm_head output); columns must be dense.
  const auto lg = logits.stride(1) == 1 ? logits : logits.contiguous();
  // W_up^T [R, V] read with unit column stride and any row stride: free for column-major w_up
  // (prepare_token_filter_weights); other layouts are copied.
  at::Tensor wt = w_up.t();
  if (wt.stride(1) != 1) wt = wt.contiguous();
  const int64_t ldw = r > 1 ? wt.stride(0) : v;
  const Weights w{wt.const_data_ptr<float>(), bs.const_data_ptr<float>(), v, r, ldw};
  bool* cp = changed.data_ptr<bool>();
  float* mp = mass.data_ptr<float>();
  const float msm = static_cast<float>(min_safe_mass);
  switch (logits.scalar_type()) {
    case at::kFloat:
      filter_rows<float>(lg, out, w, zp, on, msm, cp, mp);
      break;
    case at::kBFloat16:
      filter_rows<c10::BFloat16>(lg, out, w, zp, on, msm, cp, mp);
      break;
    default:
      filter_rows<c10::Half>(lg, out, w, zp, on, msm, cp, mp);
  }
  return {out, z, changed, mass};
}

}  // namespace value_steer
