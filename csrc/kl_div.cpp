// kl_div on the CPU: the torch-facing ops lossfuse::kl_div_fwd / _bwd (schemas in lossfuse/ops/kl_div.py)
// and the kernels in kl_div_kernel.h, compiled per ISA. The Python layer has broadcast both operands to
// one contiguous shape and one dtype; here we re-check only what protects memory.
#include <torch/library.h>

#include "tensor_utils.h"

namespace lossfuse {

struct KlArgs {
  Dtype dtype;
  const void* x;  // input (log-probabilities), n contiguous elements
  const void* t;  // target, the same
  int64_t n;
  bool log_target;
  int64_t block;  // forward: 0 = per-element loss into `loss` (accumulation type), else float64 partial
                  // sums of `block` consecutive elements
  void* loss;
  const void* g;  // backward: upstream gradient, accumulation type, one value or one per element
  bool g_elementwise;
  void* gx;  // null when not wanted
  void* gt;
  int nthreads;
};

}  // namespace lossfuse

#define LF_KERNEL_HEADER "kl_div_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {
namespace {

KlArgs prepare(const char* op, const at::Tensor& input, const at::Tensor& target, bool log_target) {
  TORCH_CHECK(input.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(input.sizes() == target.sizes(), op, ": input and target must have one shape; got ", input.sizes(),
              " and ", target.sizes());
  TORCH_CHECK(input.scalar_type() == target.scalar_type(), op, ": input and target must have one dtype");
  TORCH_CHECK(input.is_contiguous() && target.is_contiguous(), op, ": input and target must be contiguous");
  KlArgs a{};
  a.dtype = kernel_dtype(input, op);
  a.x = input.data_ptr();
  a.t = target.data_ptr();
  a.n = input.numel();
  a.log_target = log_target;
  a.nthreads = kernel_threads(a.n);
  return a;
}

at::Tensor kl_div_fwd_cpu(const at::Tensor& input, const at::Tensor& target, bool log_target, int64_t block) {
  KlArgs a = prepare("lossfuse::kl_div_fwd", input, target, log_target);
  TORCH_CHECK(block >= 0, "lossfuse::kl_div_fwd: block must be >= 0");
  a.block = block;
  at::Tensor out = block > 0 ? at::empty({(a.n + block - 1) / block}, input.options().dtype(at::kDouble))
                             : at::empty(input.sizes(), input.options().dtype(acc_type(input.scalar_type())));
  a.loss = out.data_ptr();
  if (a.n > 0) LF_RUN_KERNEL(kl_run, a, a.n, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                  const at::Tensor& target, bool log_target, bool input_grad,
                                                  bool target_grad) {
  const char* op = "lossfuse::kl_div_bwd";
  KlArgs a = prepare(op, input, target, log_target);
  const at::Tensor g = grad.to(acc_type(input.scalar_type())).contiguous();
  a.g_elementwise = g.dim() > 0;
  TORCH_CHECK(!a.g_elementwise || g.sizes() == input.sizes(), op, ": grad must be 0-dim or the input's shape");
  TORCH_CHECK(a.g_elementwise || g.numel() == 1, op, ": grad must be 0-dim or the input's shape");
  a.g = g.data_ptr();
  at::Tensor gx = input_grad ? empty_output(input.sizes(), input.options()) : at::empty({0}, input.options());
  at::Tensor gt = target_grad ? empty_output(target.sizes(), target.options()) : at::empty({0}, target.options());
  a.gx = input_grad ? gx.data_ptr() : nullptr;
  a.gt = target_grad ? gt.data_ptr() : nullptr;
  if (a.n > 0 && (input_grad || target_grad)) LF_RUN_KERNEL(kl_run, a, a.n, true);
  return {gx, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd_cpu);
  m.impl("kl_div_bwd", &kl_div_bwd_cpu);
}

}  // namespace lossfuse
