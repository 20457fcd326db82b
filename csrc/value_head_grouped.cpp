// Grouped (multi-head) value head on CPU: p[m] = value head number head_idx[m] applied to x[m], for a
// batch that mixes heads (one head per concept; the punica / LoRA grouped-GEMM pattern).
//
// Plan: a counting sort of the rows by head on the host (this op runs on CPU tensors, so reading
// head_idx here costs nothing), the rows gathered into head order, then one call of the single-head
// evaluation (detail::value_head_segments, value_head.cpp) with one segment per head in use: every
// head's rows are a batch of their own, so each head's weight chunk is streamed once per 16-row block
// (the rows of a head share every weight load, as in the single-head op), and the two layers are one
// parallel region each over all heads' work items. Rows already in head order (one head, or a caller
// that grouped them) skip the gather and the scatter.
//
// Numerical contract: the arithmetic of an output element does not depend on the segment it sits in,
// so row m is bitwise equal to value_head(x[m:m+1], head head_idx[m]'s weights), in any batch, with any
// thread count (tested with torch.equal).
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "ops.h"
#include "value_head_impl.h"

namespace value_steer {

at::Tensor value_head_grouped(const at::Tensor& x, const at::Tensor& head_idx, const at::Tensor& w0,
                              const at::Tensor& b0, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w4,
                              const at::Tensor& b4) {
  TORCH_CHECK(x.device().is_cpu() && head_idx.device().is_cpu(), "value_head_grouped (C++): expects CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "value_head_grouped: x must be a float [M, H] tensor, got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t m = x.size(0), h = x.size(1);
  TORCH_CHECK(w0.dim() == 3 && w0.size(1) == h && w0.size(2) == h, "value_head_grouped: w0 must be [NH, H=", h,
              ", H=", h, "], got ", w0.sizes());
  const int64_t nh = w0.size(0);
  TORCH_CHECK(nh >= 1, "value_head_grouped: w0 must hold at least one head, got ", w0.sizes());
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == nh && w2.size(1) == h && w2.size(2) == h,
              "value_head_grouped: w2 must be [NH=", nh, ", H=", h, ", H=", h, "] (NH from w0), got ", w2.sizes());
  TORCH_CHECK(w0.scalar_type() == w2.scalar_type(), "value_head_grouped: w0 and w2 must share a dtype, got ",
              w0.scalar_type(), " and ", w2.scalar_type());
  const at::ScalarType w_dtype = w0.scalar_type();
  TORCH_CHECK(w_dtype == at::kFloat || w_dtype == at::kBFloat16 || w_dtype == at::kHalf,
              "value_head_grouped: w0/w2 must be float32, bfloat16 or float16, got ", w_dtype);
  const std::pair<const char*, const at::Tensor*> vecs[] = {{"b0", &b0}, {"b2", &b2}, {"w4", &w4}};
  for (const auto& [name, v] : vecs) {
    TORCH_CHECK(v->dim() == 2 && v->size(0) == nh && v->size(1) == h && v->is_floating_point(),
                "value_head_grouped: ", name, " must be a float [NH=", nh, ", H=", h, "] tensor (NH from w0), got ",
                v->sizes(), " ", v->scalar_type());
  }
  TORCH_CHECK(b4.dim() == 1 && b4.size(0) == nh && b4.is_floating_point(),
              "value_head_grouped: b4 must be a float [NH=", nh, "] tensor (NH from w0), got ", b4.sizes(), " ",
              b4.scalar_type());
  TORCH_CHECK(head_idx.dim() == 1 && head_idx.scalar_type() == at::kInt && head_idx.numel() >= m,
              "value_head_grouped: head_idx must be a 1-D int32 tensor with at least M=", m, " elements, got ",
              head_idx.sizes(), " ", head_idx.scalar_type());
  auto out = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return out;

  // Counting sort of the rows by head (stable): perm[i] is the original row at sorted position i.
  const auto hic = head_idx.contiguous();
  const int32_t* hp = hic.const_data_ptr<int32_t>();
  std::vector<int64_t> start(nh + 1, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int32_t g = hp[i];
    TORCH_CHECK(g >= 0 && g < nh, "value_head_grouped: head_idx[", i, "] = ", g, " is out of range [0, ", nh, ")");
    ++start[g + 1];
  }
  for (int64_t g = 0; g < nh; ++g) start[g + 1] += start[g];
  std::vector<int64_t> perm(m);
  bool sorted = true;
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t pos = next[hp[i]]++;
      perm[pos] = i;
      sorted = sorted && pos == i;
    }
  }

  const auto xf = x.to(at::kFloat).contiguous();
  const auto w0c = w0.contiguous();
  const auto w2c = w2.contiguous();
  const auto b0f = b0.to(at::kFloat).contiguous();
  const auto b2f = b2.to(at::kFloat).contiguous();
  const auto w4f = w4.to(at::kFloat).contiguous();
  const auto b4f = b4.to(at::kFloat).contiguous();
  const float* b4p = b4f.const_data_ptr<float>();
  const int64_t w_bytes = h * h * w0c.element_size();  // one head's [H, H] matrix
  const char* w0p = static_cast<const char*>(w0c.const_data_ptr());
  const char* w2p = static_cast<const char*>(w2c.const_data_ptr());

  std::vector<detail::ValueHeadSegment> segs;
  for (int64_t g = 0; g < nh; ++g) {
    if (start[g + 1] == start[g]) continue;  // head not used by this batch: its weights are never read
    segs.push_back({w0p + g * w_bytes, w2p + g * w_bytes, b0f.const_data_ptr<float>() + g * h,
                    b2f.const_data_ptr<float>() + g * h, w4f.const_data_ptr<float>() + g * h, b4p[g], start[g],
                    start[g + 1] - start[g]});
  }

  if (sorted) {
    detail::value_head_segments(xf.const_data_ptr<float>(), m, h, w_dtype, segs, out.data_ptr<float>());
    return out;
  }
  auto xs = at::empty({m, h}, xf.options());  // the rows in head order
  auto ps = at::empty({m}, xf.options());
  const float* xp = xf.const_data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) std::memcpy(xsp + i * h, xp + perm[i] * h, h * sizeof(float));
  detail::value_head_segments(xsp, m, h, w_dtype, segs, ps.data_ptr<float>());
  const float* psp = ps.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) op[perm[i]] = psp[i];
  return out;
}

}  // namespace value_steer
