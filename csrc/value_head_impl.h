// Internal: the value-head evaluation shared by the single-head op (value_head.cpp) and the grouped
// multi-head op (value_head_grouped.cpp). Not part of the extension's Python surface.
//
// A batch is a list of segments, each a run of consecutive rows evaluated with one head's weights. The
// single-head op is one segment; the grouped op sorts its rows by head (a counting sort on the host) and
// passes one segment per head in use. Every output element is computed by the same fixed-order code
// whatever segment or batch it sits in, so row m of the grouped op is bitwise equal to the single-head
// op on x[m:m+1] with that row's head.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace value_steer {
namespace detail {

// Rows [row0, row0 + rows) of the batch, evaluated with one head. Pointers are to contiguous storage:
// w0/w2 [H, H] in the batch's weight dtype; b0/b2/w4 H fp32 each.
struct ValueHeadSegment {
  const void* w0;
  const void* w2;
  const float* b0;
  const float* b2;
  const float* w4;
  float b4;
  int64_t row0;
  int64_t rows;
};

// out[r] = sigmoid(w4 . relu(W2 tanh(W0 x[r] + b0) + b2) + b4) with r's segment's weights, for every
// row of every segment. x: [M, H] fp32 contiguous; out: M fp32; w_dtype: kFloat, kBFloat16 or kHalf.
// Segments must not overlap; rows outside every segment are left untouched. One at::parallel_for per
// layer spans all segments (work items: 16 weight rows x 16 input rows of one segment).
void value_head_segments(const float* x, int64_t m, int64_t h, at::ScalarType w_dtype,
                         const std::vector<ValueHeadSegment>& segments, float* out);

}  // namespace detail
}  // namespace value_steer
