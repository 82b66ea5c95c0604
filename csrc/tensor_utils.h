// Helpers for the torch-facing half of each loss's translation unit (baseline instruction set).
//
// Only the ATen headers these files use: the tensor class and the operators called by name (at::empty,
// at::full). <ATen/ATen.h> declares every operator and took twice as long to compile, in each of these
// translation units (setup.py defines TORCH_ASSERT_ONLY_METHOD_OPERATORS, which makes including it an error).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <optional>

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
// cache (buffer_cache.cpp; its controls are declared in common.h) or get huge pages.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// (N, C, S) layouts of the softmax-family kernels (walk.h): walked along the classes (class stride 1)
// or across neighbouring rows (spatial stride 1). empty_like_layout in lossfuse/_layout.py
// gives the fake kernels the same strides: keep the two in step.
inline bool walks_classes(const at::Tensor& x3) { return x3.size(1) == 1 || x3.stride(1) == 1; }

// An (N, C, S) output laid out the way the kernels walk x3.
inline at::Tensor empty_walk_layout(const at::Tensor& x3, at::ScalarType dtype) {
  const int64_t N = x3.size(0), C = x3.size(1), S = x3.size(2);
  const auto opts = x3.options().dtype(dtype);
  if (walks_classes(x3)) return empty_output({N, S, C}, opts).transpose(1, 2);
  return empty_output({N, C, S}, opts);
}

// Logits in a layout the kernels walk in place; anything else is copied once.
inline at::Tensor walkable_input(const at::Tensor& x3) {
  if (walks_classes(x3) || x3.size(2) == 1 || x3.stride(2) == 1) return x3;
  return x3.contiguous();
}

// Streaming (non-temporal) stores pay off for outputs far larger than the caches.
constexpr size_t kStreamBytes = size_t(32) << 20;

// The (N, C, S) fields shared by the softmax-family kernels' arguments (CeArgs, SoftmaxFocalArgs), filled
// by the ops of every such loss alike.

// The logits in a walkable layout into a.x, a.N, a.C, a.S and their strides; returns the tensor walked,
// which must outlive the kernel call.
template <class Args>
inline at::Tensor set_walked_logits(Args& a, const at::Tensor& input) {
  at::Tensor x = walkable_input(input);
  a.x = x.data_ptr();
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = x.size(2);
  a.x_sN = x.stride(0);
  a.x_sC = x.stride(1);
  a.x_sS = x.stride(2);
  return x;
}

// A class-index target, checked to be int64 of shape (N, S), into a.y and its strides (after
// set_walked_logits).
template <class Args>
inline void set_class_target(Args& a, const at::Tensor& target, const char* op) {
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index targets must be int64; got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == a.N && target.size(1) == a.S, op,
              ": class-index target must be (N, S) = (", a.N, ", ", a.S, "); got ", target.sizes());
  a.y = target.data_ptr<int64_t>();
  a.y_sN = target.stride(0);
  a.y_sS = target.stride(1);
}

// The input gradient (N, C, S) the kernel writes into a.gx, its strides, and whether to stream it.
template <class Args>
inline void set_input_grad(Args& a, const at::Tensor& gx) {
  a.gx = gx.data_ptr();
  a.gx_sN = gx.stride(0);
  a.gx_sC = gx.stride(1);
  a.gx_sS = gx.stride(2);
  a.stream = gx.nbytes() >= kStreamBytes;
}

// The kernels only flag that some class index was bad; name the first one, as torch does: a value
// outside [0, upper) that is not `ignore_index` (when there is one).
[[noreturn]] inline void report_bad_target(const at::Tensor& y, int64_t upper, std::optional<int64_t> ignore_index,
                                           const char* op) {
  const at::Tensor yc = y.contiguous();
  const int64_t* p = yc.data_ptr<int64_t>();
  for (int64_t i = 0; i < yc.numel(); ++i) {
    const int64_t v = p[i];
    if (ignore_index && v == *ignore_index) continue;
    if (v < 0 || v >= upper) TORCH_CHECK_INDEX(false, "Target ", v, " is out of bounds.");
  }
  TORCH_CHECK(false, op, ": a target is out of bounds");
}

}  // namespace lossfuse
