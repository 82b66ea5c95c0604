// Helpers for the torch-facing half of each loss's translation unit (baseline instruction set).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"

namespace lossfuse {

inline Dtype kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    case at::kDouble: return Dtype::F64;
    default: TORCH_CHECK(false, op, ": expected a float32, float64, float16 or bfloat16 tensor; got ", t.scalar_type());
  }
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline int kernel_threads(int64_t work) { return threads_for(work, at::get_num_threads()); }

// A new contiguous tensor for a kernel to write every element of. Large ones come from the buffer
// cache (buffer_cache.cpp) or get huge pages.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);
size_t cache_bytes();
size_t cache_limit();
void set_cache_limit(size_t bytes);
void empty_cache();

// Streaming (non-temporal) stores pay off for outputs far larger than the caches.
constexpr size_t kStreamBytes = size_t(32) << 20;

}  // namespace lossfuse
