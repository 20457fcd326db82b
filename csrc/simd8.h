// 8-float vector helpers shared by the C++ CPU ops (value_head.cpp, steer_activations.cpp).
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

}  // namespace simd8
}  // namespace value_steer
