// 8-float vector helpers shared by the C++ CPU ops (value_head.cpp, steer_activations.cpp, logit_steer.cpp).
//
// GCC/Clang vector extensions: one ymm op in an AVX2 clone, two xmm ops in the baseline one. Ops are
// elementwise mul then add (never fused), so every clone rounds alike. Kernels that want both builds are
// marked VS_CLONES (GCC target_clones, runtime-dispatched); the helpers are VS_INLINE (forced inline), so
// they are compiled for each clone's ISA and no vector crosses a call boundary.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VS_CLONES
#endif
#if defined(__GNUC__)
#define VS_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define VS_INLINE inline
#endif

namespace value_steer {
namespace simd8 {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

VS_INLINE float to_f(float v) { return v; }
VS_INLINE float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
VS_INLINE float to_f(c10::Half v) { return static_cast<float>(v); }

VS_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// bf16 -> fp32 is exact: widen the 16 bits and shift them into the high half.
VS_INLINE v8f load8(const c10::BFloat16* p) {
  v8h u;
  std::memcpy(&u, p, sizeof(u));
  const v8u w = __builtin_convertvector(u, v8u) << 16;
  v8f f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
VS_INLINE v8f load8(const c10::Half* p) {
  float tmp[8];
  for (int j = 0; j < 8; ++j) tmp[j] = static_cast<float>(p[j]);
  return load8(tmp);
}

VS_INLINE v8f splat(float c) { return v8f{c, c, c, c, c, c, c, c}; }
VS_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float).
VS_INLINE void store8(c10::BFloat16* p, v8f v) {
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  const v8u rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const v8u nan = (v8u)(v != v);  // all ones where v is NaN
  const v8u bits = (nan & 0x7FC0u) | (~nan & rounded);
  const v8h h = __builtin_convertvector(bits, v8h);
  std::memcpy(p, &h, sizeof(h));
}
VS_INLINE void store8(c10::Half* p, v8f v) {
  float tmp[8];
  store8(tmp, v);
  for (int j = 0; j < 8; ++j) p[j] = static_cast<c10::Half>(tmp[j]);
}

VS_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// a . b over 8 interleaved lanes, then the tail: a fixed order.
VS_INLINE float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  v8f acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return hsum(acc) + tail;
}

}  // namespace simd8
}  // namespace value_steer
