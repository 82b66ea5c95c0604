// The argument block of the Huber / SmoothL1 / L1 CPU kernels, shared by the torch-facing huber.cpp
// and the kernel translation units huber_forward.cpp and huber_backward.cpp (which include no ATen
// headers and build in parallel).
#pragma once

#include "common.h"

namespace lossfuse {

constexpr int kHuberMaxDims = 16;

struct HuberArgs {
  Dtype dtype;  // the input's; the accumulation type A is double for double, float otherwise
  bool y_acc;   // target stored in A (a float target with an fp16/bf16 input), else in the input's type
  bool w_acc;   // likewise for the weight
  int mode;     // 0 Huber, 1 SmoothL1, 2 L1
  double delta;  // delta or beta
  // Iteration space, innermost dim first: sizes and, per operand, strides in elements.
  int ndim;
  int64_t numel;
  int64_t size[kHuberMaxDims];
  int64_t x_st[kHuberMaxDims], y_st[kHuberMaxDims], w_st[kHuberMaxDims], g_st[kHuberMaxDims];
  const void* x;
  const void* y;
  const void* w;  // null: no weight
  int64_t block;  // elements per block (per partial sum in a reducing forward)
  // forward
  double* partials;  // reduce: one sum per block; null: write `out`
  void* out;         // per-element loss in A
  double scale;      // huber_fwd_grad: the scalar upstream gradient the gradients are formed for
  // backward
  const void* g;  // upstream gradient in A: per element (strides g_st) or one scalar
  bool g_scalar;
  void* gx;  // null where not requested
  void* gy;
  void* gw;
  bool stream;  // non-temporal stores: outputs far larger than the caches
  int nthreads;
};

// The kernels of huber_kernel.h for the instruction set in use (huber_forward.cpp, huber_backward.cpp).
void run_huber_forward(const HuberArgs& a);
void run_huber_backward(const HuberArgs& a);

}  // namespace lossfuse
