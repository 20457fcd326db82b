// Paged-KV writes on CPU (mirror of value_steer/kernels/write_kv.py).
//
// Caches are views in the logical order [num_blocks, block_size, kv_heads, head_dim] with arbitrary
// strides, or 6-D tiled views [num_blocks, bs_outer, bs_inner, kv_heads, d_outer, d_inner] (token
// t = t_o * bs_inner + t_i, dim i = i_o * d_inner + i_i) for packed layouts such as vLLM's AMX CPU
// attention cache, which no 4-D strided view expresses. All addressing goes through the strides;
// copies are element-size generic (2 or 4 bytes), with a memcpy fast path for unit-stride head dims.
#include <ATen/Parallel.h>

#include <cstring>

#include "ops.h"

namespace value_steer {
namespace {

struct Geom {
  int64_t nb, bs, kvh, d;
  int64_t s_blk, s_to, s_ti, bs_in;  // token addressing
  int64_t s_h;
  int64_t s_do, s_di, d_in;  // head-dim addressing

  // Element offset of (block, token-in-block, head, dim 0) and of dim i relative to it.
  int64_t token(int64_t blk, int64_t t, int64_t h) const {
    return blk * s_blk + (t / bs_in) * s_to + (t % bs_in) * s_ti + h * s_h;
  }
  int64_t dim(int64_t i) const { return (i / d_in) * s_do + (i % d_in) * s_di; }
  bool dim_contiguous() const { return d_in == 1 ? s_do == 1 : (s_di == 1 && s_do == d_in); }
};

Geom geometry(const at::Tensor& c) {
  Geom g{};
  if (c.dim() == 4) {
    g.nb = c.size(0);
    g.bs = c.size(1);
    g.kvh = c.size(2);
    g.d = c.size(3);
    g.s_blk = c.stride(0);
    g.s_to = c.stride(1);
    g.s_ti = 0;
    g.bs_in = 1;
    g.s_h = c.stride(2);
    g.s_do = c.stride(3);
    g.s_di = 0;
    g.d_in = 1;
  } else {
    TORCH_CHECK(c.dim() == 6, "cache views must be 4-D [nb, bs, kvh, d] or 6-D tiled, got ", c.dim(), "-D");
    g.nb = c.size(0);
    g.bs = c.size(1) * c.size(2);
    g.kvh = c.size(3);
    g.d = c.size(4) * c.size(5);
    g.s_blk = c.stride(0);
    g.s_to = c.stride(1);
    g.s_ti = c.stride(2);
    g.bs_in = c.size(2);
    g.s_h = c.stride(3);
    g.s_do = c.stride(4);
    g.s_di = c.stride(5);
    g.d_in = c.size(5);
  }
  TORCH_CHECK(g.bs > 0 && g.d > 0, "empty cache geometry");
  return g;
}

bool same_shape(const Geom& a, const Geom& b) { return a.nb == b.nb && a.bs == b.bs && a.kvh == b.kvh && a.d == b.d; }

template <typename E>
inline void copy_head(const E* src, int64_t src_stride, bool src_unit, E* dst, const Geom& g, int64_t d) {
  if (src_unit && g.dim_contiguous()) {
    std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(E));
    return;
  }
  for (int64_t i = 0; i < d; ++i) dst[g.dim(i)] = src[i * src_stride];
}

template <typename E>
void write_kv_impl(const at::Tensor& x, at::Tensor& cache, const Geom& g, const int64_t* slots, int64_t n) {
  const E* xp = static_cast<const E*>(x.const_data_ptr());
  E* cp = static_cast<E*>(cache.data_ptr());
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  at::parallel_for(0, n * g.kvh, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tok = item / g.kvh, h = item % g.kvh;
      const int64_t slot = slots[tok];
      if (slot < 0) continue;
      copy_head(xp + tok * xs0 + h * xs1, xs2, xs2 == 1, cp + g.token(slot / g.bs, slot % g.bs, h), g, g.d);
    }
  });
}

template <typename E>
void copy_slots_impl(const std::vector<at::Tensor>& caches, const std::vector<Geom>& geoms, const int64_t* src,
                     const int64_t* dst, int64_t p) {
  const int64_t t = static_cast<int64_t>(caches.size());
  const int64_t kvh = geoms[0].kvh;
  at::parallel_for(0, t * p, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / p, q = item % p;
      const int64_t s = src[q], dd = dst[q];
      if (s < 0 || dd < 0) continue;
      const Geom& g = geoms[l];
      E* base = static_cast<E*>(caches[l].data_ptr());
      for (int64_t h = 0; h < kvh; ++h) {
        const E* from = base + g.token(s / g.bs, s % g.bs, h);
        E* to = base + g.token(dd / g.bs, dd % g.bs, h);
        if (g.dim_contiguous()) {
          std::memcpy(to, from, static_cast<size_t>(g.d) * sizeof(E));
        } else {
          for (int64_t i = 0; i < g.d; ++i) to[g.dim(i)] = from[g.dim(i)];
        }
      }
    }
  });
}

}  // namespace

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache, at::Tensor value_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.device().is_cpu() && key_cache.device().is_cpu(), "write_kv (C++): expects CPU tensors");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key/value must be [N, kvh, d] with equal shapes");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "key_cache/value_cache dtypes differ");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  slot_mapping.scalar_type() == at::kLong,
              "slot_mapping must be [N] int64");
  const Geom gk = geometry(key_cache), gv = geometry(value_cache);
  TORCH_CHECK(same_shape(gk, gv), "key_cache/value_cache geometry differs");
  TORCH_CHECK(key.size(1) == gk.kvh && key.size(2) == gk.d, "key [N, kvh, d] does not match the cache");
  const int64_t n = key.size(0);
  if (n == 0) return;
  const auto slots = slot_mapping.contiguous();
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  const auto k = key.to(key_cache.scalar_type());
  const auto v = value.to(value_cache.scalar_type());
  switch (key_cache.element_size()) {
    case 2:
      write_kv_impl<uint16_t>(k, key_cache, gk, sp, n);
      write_kv_impl<uint16_t>(v, value_cache, gv, sp, n);
      break;
    case 4:
      write_kv_impl<uint32_t>(k, key_cache, gk, sp, n);
      write_kv_impl<uint32_t>(v, value_cache, gv, sp, n);
      break;
    default:
      TORCH_CHECK(false, "write_kv: unsupported cache dtype ", key_cache.scalar_type());
  }
}

void copy_kv_slots(std::vector<at::Tensor> caches, const at::Tensor& src_slots, const at::Tensor& dst_slots) {
  TORCH_CHECK(src_slots.dim() == 1 && src_slots.sizes() == dst_slots.sizes() &&
                  src_slots.scalar_type() == at::kLong && dst_slots.scalar_type() == at::kLong,
              "src/dst slots must be [P] int64 with equal shapes");
  const int64_t p = src_slots.size(0);
  if (p == 0 || caches.empty()) return;
  std::vector<Geom> geoms;
  geoms.reserve(caches.size());
  for (const auto& c : caches) {
    TORCH_CHECK(c.device().is_cpu(), "copy_kv_slots (C++): expects CPU tensors");
    TORCH_CHECK(c.scalar_type() == caches[0].scalar_type(), "all caches must share a dtype");
    geoms.push_back(geometry(c));
    TORCH_CHECK(same_shape(geoms.back(), geoms[0]), "all caches must share [nb, bs, kvh, d]");
  }
  const auto src = src_slots.contiguous();
  const auto dst = dst_slots.contiguous();
  switch (caches[0].element_size()) {
    case 2:
      copy_slots_impl<uint16_t>(caches, geoms, src.const_data_ptr<int64_t>(), dst.const_data_ptr<int64_t>(), p);
      break;
    case 4:
      copy_slots_impl<uint32_t>(caches, geoms, src.const_data_ptr<int64_t>(), dst.const_data_ptr<int64_t>(), p);
      break;
    default:
      TORCH_CHECK(false, "copy_kv_slots: unsupported cache dtype ", caches[0].scalar_type());
  }
}

}  // namespace value_steer
