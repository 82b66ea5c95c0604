// Huber, SmoothL1 and L1 on the CPU: the torch-facing ops lossfuse::huber_fwd / huber_fwd_grad /
// huber_bwd (schemas and the Python twin of the layout rule in lossfuse/ops/huber.py). The kernels
// (huber_kernel.h) are compiled per ISA in this file, as cross_entropy.cpp does its own.
//
// The Python layer has already checked arguments torch's way and broadcast the operands (as expanded
// views: nothing is materialised). Here we re-check what protects memory and turn the operands' shapes
// and strides into the kernels' iteration space: dims ordered by the operands' strides (so a transposed
// or channels-last input is walked in memory order) and merged where every operand allows it. Outputs
// are dense in that order, so they follow the input's layout and are written sequentially.
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "tensor_utils.h"

namespace lossfuse {

// The argument block of the kernels (huber_kernel.h).
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

}  // namespace lossfuse

#define LF_KERNEL_HEADER "huber_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {
namespace {

constexpr int64_t kWorkBlock = 16384;  // elements per parallel work item when nothing is reduced

// Dims outermost first: by decreasing stride of the first operand with a nonzero stride in that dim
// (input, then target, then weight); size-1 and all-zero-stride dims go innermost. A stable sort, so
// ties keep their order. Must match iteration_order() in lossfuse/ops/huber.py, which the fake
// kernels and the Triton launchers use: output strides depend on it.
std::vector<int64_t> iteration_order(const at::Tensor& x, const at::Tensor& y, const at::Tensor* w) {
  const int64_t nd = x.dim();
  std::vector<int64_t> key(nd, 0);
  for (int64_t d = 0; d < nd; ++d) {
    if (x.size(d) == 1) continue;
    for (const at::Tensor* t : {&x, &y, w}) {
      if (!t) continue;
      if (t->stride(d) != 0) {
        key[d] = t->stride(d);
        break;
      }
    }
  }
  std::vector<int64_t> order(nd);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
  return order;
}

// Strides of a tensor of `sizes` that is dense in `order` (outermost first).
std::vector<int64_t> dense_strides(at::IntArrayRef sizes, const std::vector<int64_t>& order) {
  std::vector<int64_t> st(sizes.size(), 0);
  int64_t step = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    st[*it] = step;
    step *= std::max<int64_t>(sizes[*it], 1);
  }
  return st;
}

struct Plan {
  std::vector<int64_t> out_strides;
  HuberArgs a{};
  at::Tensor g;  // keeps a converted upstream gradient alive
};

// Validates the operands and fills the iteration space of `a`.
Plan plan(const char* op, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
          const at::Tensor* g, int64_t mode, double delta) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": target must have the input's (broadcast) shape ", x.sizes(), "; got ",
              y.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (Huber), 1 (SmoothL1) or 2 (L1); got ", mode);
  TORCH_CHECK(mode == 2 || delta > 0, op, ": delta (beta) must be positive; got ", delta);
  Plan p;
  HuberArgs& a = p.a;
  a.dtype = kernel_dtype(x, op);
  const auto acc = acc_type(x.scalar_type());
  auto storage_ok = [&](const at::Tensor& t) { return t.scalar_type() == x.scalar_type() || t.scalar_type() == acc; };
  TORCH_CHECK(y.device() == x.device() && storage_ok(y), op, ": target must be a CPU tensor of the input's dtype or ",
              acc, "; got ", y.scalar_type(), " on ", y.device());
  const at::Tensor* w = nullptr;
  if (weight.has_value() && weight->defined()) {
    w = &*weight;
    TORCH_CHECK(w->sizes() == x.sizes(), op, ": weight must have the input's (broadcast) shape ", x.sizes(),
                "; got ", w->sizes());
    TORCH_CHECK(w->device() == x.device() && storage_ok(*w), op,
                ": weight must be a CPU tensor of the input's dtype or ", acc, "; got ", w->scalar_type());
  }
  if (g) {
    TORCH_CHECK(g->device() == x.device() && g->scalar_type() == acc, op, ": grad must be a CPU ", acc,
                " tensor; got ", g->scalar_type());
    TORCH_CHECK(g->dim() == 0 || g->sizes() == x.sizes(), op, ": grad must be a scalar or have the input's shape ",
                x.sizes(), "; got ", g->sizes());
  }
  a.y_acc = y.scalar_type() != x.scalar_type();
  a.w_acc = w && w->scalar_type() != x.scalar_type();
  a.mode = int(mode);
  a.delta = delta;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.w = w ? w->data_ptr() : nullptr;
  a.numel = x.numel();

  const std::vector<int64_t> order = iteration_order(x, y, w);
  p.out_strides = dense_strides(x.sizes(), order);

  // Merge dims from the innermost outwards: dim b folds into the group below it when every operand
  // steps over the group exactly (stride_b == stride_group * size_group). Outputs are dense in this
  // order, so they always allow it.
  const bool g_vec = g && g->dim() > 0;
  int nd = 0;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const int64_t d = *it, sz = x.size(d);
    if (sz == 1) continue;
    const int64_t sx = x.stride(d), sy = y.stride(d), sw = w ? w->stride(d) : 0, sg = g_vec ? g->stride(d) : 0;
    if (nd > 0) {
      const int k = nd - 1;
      const int64_t n = a.size[k];
      if (sx == a.x_st[k] * n && sy == a.y_st[k] * n && sw == a.w_st[k] * n && sg == a.g_st[k] * n) {
        a.size[k] *= sz;
        continue;
      }
    }
    TORCH_CHECK(nd < kHuberMaxDims, op, ": more than ", kHuberMaxDims,
                " dims remain after merging; make the operands contiguous first");
    a.size[nd] = sz;
    a.x_st[nd] = sx;
    a.y_st[nd] = sy;
    a.w_st[nd] = sw;
    a.g_st[nd] = sg;
    ++nd;
  }
  if (nd == 0) {  // a single element (or none)
    a.size[0] = a.numel;
    a.x_st[0] = a.y_st[0] = a.w_st[0] = a.g_st[0] = 0;
    nd = 1;
  }
  a.ndim = nd;
  a.nthreads = kernel_threads(a.numel);
  return p;
}

at::Tensor empty_dense(const at::Tensor& x, const std::vector<int64_t>& strides, at::ScalarType dtype) {
  return empty_output({x.numel()}, x.options().dtype(dtype)).as_strided(x.sizes(), strides);
}

// block == 0: the per-element loss (times the weight), in the accumulation type, laid out like the
// input. block > 0: float64 partial sums of the loss over consecutive blocks of `block` elements of the
// iteration order, ceil(numel / block) of them -- what a mean or sum needs, without an N-element write.
at::Tensor huber_fwd_cpu(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t mode, double delta, int64_t block) {
  const char* op = "lossfuse::huber_fwd";
  TORCH_CHECK(block >= 0, op, ": block must be >= 0; got ", block);
  Plan p = plan(op, input, target, weight, nullptr, mode, delta);
  HuberArgs& a = p.a;
  const auto acc = acc_type(input.scalar_type());
  at::Tensor out;
  if (block > 0) {
    a.block = block;
    out = at::empty({(a.numel + block - 1) / block}, input.options().dtype(at::kDouble));
    a.partials = out.data_ptr<double>();
  } else {
    a.block = kWorkBlock;
    out = empty_dense(input, p.out_strides, acc);
    a.out = out.data_ptr();
    a.stream = out.nbytes() >= kStreamBytes;
  }
  if (a.numel > 0) LF_RUN_KERNEL(huber_forward, a, a.numel);
  return out;
}

// A reducing forward that also writes the gradients for input and/or target that a scalar upstream
// gradient of `scale` (1/N for a mean, 1 for a sum) gives: partials as huber_fwd, then
// grad_input = scale * w * slope(d) and grad_target = -grad_input (0-element tensors where not asked).
// One pass over input and target instead of two (forward, then backward) when, as usual, the loss is
// backpropagated with grad_output 1 -- the autograd Function then returns these as they are, and
// otherwise multiplies them by grad_output. float32 and float64 inputs (target in the same dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> huber_fwd_grad_cpu(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t mode, double delta, int64_t block,
                                                                  double scale, bool input_grad, bool target_grad) {
  const char* op = "lossfuse::huber_fwd_grad";
  TORCH_CHECK(block > 0, op, ": block must be positive; got ", block);
  TORCH_CHECK(input.scalar_type() == acc_type(input.scalar_type()) && target.scalar_type() == input.scalar_type(),
              op, ": input and target must both be float32 or both float64; got ", input.scalar_type(), " and ",
              target.scalar_type());
  Plan p = plan(op, input, target, weight, nullptr, mode, delta);
  HuberArgs& a = p.a;
  a.block = block;
  a.scale = scale;
  at::Tensor partials = at::empty({(a.numel + block - 1) / block}, input.options().dtype(at::kDouble));
  a.partials = partials.data_ptr<double>();
  at::Tensor gx = input_grad ? empty_dense(input, p.out_strides, input.scalar_type()) : at::empty({0}, input.options());
  at::Tensor gy = target_grad ? empty_dense(input, p.out_strides, target.scalar_type())
                              : at::empty({0}, target.options());
  a.gx = input_grad ? gx.data_ptr() : nullptr;
  a.gy = target_grad ? gy.data_ptr() : nullptr;
  a.stream = int64_t(a.numel * input.element_size()) >= int64_t(kStreamBytes);
  if (a.numel > 0) LF_RUN_KERNEL(huber_forward, a, a.numel);
  return {partials, gx, gy};
}

// Gradients for input, target and weight (each a 0-element tensor where not requested), laid out as
// the forward's per-element loss. grad: the upstream gradient in the accumulation type, already
// divided by N for a mean -- a 0-dim tensor for mean/sum, or the per-element gradient for 'none'.
std::tuple<at::Tensor, at::Tensor, at::Tensor> huber_bwd_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                             const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight, int64_t mode,
                                                             double delta, bool input_grad, bool target_grad,
                                                             bool weight_grad) {
  const char* op = "lossfuse::huber_bwd";
  Plan p = plan(op, input, target, weight, &grad, mode, delta);
  HuberArgs& a = p.a;
  const bool has_w = weight.has_value() && weight->defined();  // (a.w is null for an empty weight too)
  a.block = kWorkBlock;
  a.g = grad.data_ptr();
  a.g_scalar = grad.dim() == 0;
  at::Tensor gx = input_grad ? empty_dense(input, p.out_strides, input.scalar_type()) : at::empty({0}, input.options());
  at::Tensor gy = target_grad ? empty_dense(input, p.out_strides, target.scalar_type())
                              : at::empty({0}, target.options());
  const auto w_opts = has_w ? weight->options() : input.options();
  at::Tensor gw = (weight_grad && has_w) ? empty_dense(input, p.out_strides, weight->scalar_type())
                                         : at::empty({0}, w_opts);
  a.gx = input_grad ? gx.data_ptr() : nullptr;
  a.gy = target_grad ? gy.data_ptr() : nullptr;
  a.gw = (weight_grad && has_w) ? gw.data_ptr() : nullptr;
  a.stream = int64_t(a.numel * input.element_size()) >= int64_t(kStreamBytes);
  if (a.numel > 0 && (a.gx || a.gy || a.gw)) LF_RUN_KERNEL(huber_backward, a, a.numel);
  return {gx, gy, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("huber_fwd", &huber_fwd_cpu);
  m.impl("huber_bwd", &huber_bwd_cpu);
  m.impl("huber_fwd_grad", &huber_fwd_grad_cpu);
}

}  // namespace lossfuse
