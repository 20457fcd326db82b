// Per-row steering decision on CPU (mirror of value_steer/kernels/score_and_select.py).
//
// signed = sign * (value - threshold) in fp32 (as value_steer.steering._signed); valid = col < n and
// finite; safe = valid and signed < 0. MODE_VFD: first safe column, else the safest valid one (lowest
// column on ties), else 0. MODE_ABSTAIN: column 0, force_eos = finite(signed0) and signed0 >= 0.
// Anything else (MODE_OFF, row 0): column 0, nothing flagged. num_candidates is clamped to [1, K].
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "ops.h"

namespace value_steer {
namespace {

constexpr int32_t kModeAbstain = 1;  // value_steer.rows.MODE_ABSTAIN
constexpr int32_t kModeVfd = 2;      // value_steer.rows.MODE_VFD

inline int64_t load_index(const at::Tensor& t, const void* base, int64_t i, int64_t stride) {
  if (t.scalar_type() == at::kInt) return static_cast<const int32_t*>(base)[i * stride];
  return static_cast<const int64_t*>(base)[i * stride];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> score_and_select(
    const at::Tensor& values, const at::Tensor& cand_tokens, const at::Tensor& cand_logprobs,
    const at::Tensor& row_idx, const at::Tensor& row_threshold, const at::Tensor& row_sign,
    const at::Tensor& row_mode, const at::Tensor& row_num_candidates, const std::optional<at::Tensor>& cand_hidden) {
  TORCH_CHECK(values.device().is_cpu(), "score_and_select (C++): expects CPU tensors");
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat, "values must be [R, K] fp32");
  const int64_t r = values.size(0), k = values.size(1);
  TORCH_CHECK(k >= 1, "K must be >= 1");
  TORCH_CHECK(cand_tokens.sizes() == values.sizes() && cand_tokens.scalar_type() == at::kLong,
              "cand_tokens must be [R, K] int64");
  TORCH_CHECK(cand_logprobs.sizes() == values.sizes() && cand_logprobs.scalar_type() == at::kFloat,
              "cand_logprobs must be [R, K] fp32");
  TORCH_CHECK(row_idx.dim() == 1 && row_idx.size(0) == r &&
                  (row_idx.scalar_type() == at::kInt || row_idx.scalar_type() == at::kLong),
              "row_idx must be [R] int32/int64");
  TORCH_CHECK(row_threshold.scalar_type() == at::kFloat && row_sign.scalar_type() == at::kFloat &&
                  row_mode.scalar_type() == at::kInt && row_num_candidates.scalar_type() == at::kInt,
              "row table buffers must be fp32 threshold/sign and int32 mode/num_candidates");
  int64_t h = 0;
  if (cand_hidden.has_value()) {
    TORCH_CHECK(cand_hidden->dim() == 2 && cand_hidden->size(0) == r * k, "cand_hidden must be [R*K, H]");
    h = cand_hidden->size(1);
  }
  const auto i64 = values.options().dtype(at::kLong);
  auto out_col = at::empty({r}, i64);
  auto out_tok = at::empty({r}, i64);
  auto out_val = at::empty({r}, values.options());
  auto out_lp = at::empty({r}, values.options());
  auto out_int = at::empty({r}, values.options().dtype(at::kBool));
  auto out_eos = at::empty({r}, values.options().dtype(at::kBool));
  auto out_hid = at::empty({r, h}, cand_hidden.has_value() ? cand_hidden->options() : values.options());
  if (r == 0) return {out_col, out_tok, out_val, out_lp, out_int, out_eos, out_hid};

  const float* vp = values.const_data_ptr<float>();
  const int64_t* tp = cand_tokens.const_data_ptr<int64_t>();
  const float* lp = cand_logprobs.const_data_ptr<float>();
  const int64_t vs0 = values.stride(0), vs1 = values.stride(1);
  const int64_t ts0 = cand_tokens.stride(0), ts1 = cand_tokens.stride(1);
  const int64_t ls0 = cand_logprobs.stride(0), ls1 = cand_logprobs.stride(1);
  const void* rip = row_idx.const_data_ptr();
  const int64_t ris = row_idx.stride(0);
  const float* thp = row_threshold.const_data_ptr<float>();
  const float* sgp = row_sign.const_data_ptr<float>();
  const int32_t* mdp = row_mode.const_data_ptr<int32_t>();
  const int32_t* ncp = row_num_candidates.const_data_ptr<int32_t>();
  const int64_t ths = row_threshold.stride(0), sgs = row_sign.stride(0), mds = row_mode.stride(0),
                ncs = row_num_candidates.stride(0);
  int64_t* ocp = out_col.data_ptr<int64_t>();
  int64_t* otp = out_tok.data_ptr<int64_t>();
  float* ovp = out_val.data_ptr<float>();
  float* olp = out_lp.data_ptr<float>();
  bool* oip = out_int.data_ptr<bool>();
  bool* oep = out_eos.data_ptr<bool>();

  const char* hsrc = nullptr;
  char* hdst = nullptr;
  int64_t hs0 = 0, hs1 = 0, os0 = 0, esz = 0;
  if (cand_hidden.has_value() && h > 0) {
    hsrc = static_cast<const char*>(cand_hidden->const_data_ptr());
    hdst = static_cast<char*>(out_hid.data_ptr());
    esz = cand_hidden->element_size();
    hs0 = cand_hidden->stride(0) * esz;
    hs1 = cand_hidden->stride(1) * esz;
    os0 = out_hid.stride(0) * esz;
  }

  at::parallel_for(0, r, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = load_index(row_idx, rip, i, ris);
      const float thr = thp[row * ths];
      const float sgn = sgp[row * sgs];
      const int32_t mode = mdp[row * mds];
      int64_t n = ncp[row * ncs];
      n = n < 1 ? 1 : (n > k ? k : n);
      const float* v = vp + i * vs0;

      int64_t winner = 0;
      bool eos = false;
      if (mode == kModeVfd) {
        int64_t first_safe = -1, safest = -1;
        float best = std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < n; ++c) {
          const float s = sgn * (v[c * vs1] - thr);
          if (!std::isfinite(s)) continue;
          if (s < 0.f) {
            first_safe = c;
            break;
          }
          if (safest < 0 || s < best) {
            best = s;
            safest = c;
          }
        }
        winner = first_safe >= 0 ? first_safe : (safest >= 0 ? safest : 0);
      } else if (mode == kModeAbstain) {
        const float s0 = sgn * (v[0] - thr);
        eos = std::isfinite(s0) && s0 >= 0.f;
      }
      ocp[i] = winner;
      otp[i] = tp[i * ts0 + winner * ts1];
      ovp[i] = v[winner * vs1];
      olp[i] = lp[i * ls0 + winner * ls1];
      oip[i] = mode == kModeVfd && winner != 0;
      oep[i] = eos;
      if (hsrc != nullptr) {
        const char* src = hsrc + (i * k + winner) * hs0;
        char* dst = hdst + i * os0;
        if (hs1 == esz) {
          std::memcpy(dst, src, static_cast<size_t>(h * esz));
        } else {
          for (int64_t j = 0; j < h; ++j) std::memcpy(dst + j * esz, src + j * hs1, static_cast<size_t>(esz));
        }
      }
    }
  });
  return {out_col, out_tok, out_val, out_lp, out_int, out_eos, out_hid};
}

}  // namespace value_steer
