// Focal losses on the CPU: the torch-facing ops lossfuse::sigmoid_focal_fwd / _bwd and
// lossfuse::softmax_focal_fwd / _bwd (schemas in lossfuse/ops/focal.py) and the kernels in
// focal_kernel.h, compiled per ISA.
//
// The Python layer has already checked arguments; here we re-check only what protects memory (shapes,
// dtypes, class-index range) and bring layouts into what the kernels walk.
#include <torch/library.h>

#include "tensor_utils.h"

namespace lossfuse {

struct SigmoidFocalArgs {
  Dtype dtype;
  const void* x;  // logits, contiguous
  int64_t numel;
  const void* t;    // float target of the input's shape, contiguous; null for class indices
  bool t_is_acc;    // stored in the accumulation type rather than the input's
  const int64_t* y;  // class-index target (N) of an (N, C) input, y == C: background; or null
  int64_t C;
  double alpha, gamma;  // alpha < 0: no alpha term
  int64_t block;        // elements per parallel chunk (and per partial sum)
  // forward: per-element loss (numel) or, with `partial`, one sum per block; accumulation type
  void* out;
  bool partial;
  // backward: upstream gradient (numel elements, or one with g_scalar), accumulation type
  const void* g;
  bool g_scalar;
  // gradient, input dtype, contiguous: the backward's output, or the fused forward's (then formed with
  // the upstream gradient grad_scale for every element)
  void* gx;
  double grad_scale;
  bool stream;  // write gx with non-temporal stores
  int nthreads;
};

struct SoftmaxFocalArgs {
  Dtype dtype;
  // logits (N, C, S): element (n, c, s) at x + n*x_sN + c*x_sC + s*x_sS
  const void* x;
  int64_t N, C, S, x_sN, x_sC, x_sS;
  const int64_t* y;  // class-index target (N, S)
  int64_t y_sN, y_sS;
  const void* scale;  // per-class factor alpha_c * w_c (C), accumulation type, contiguous; or null
  double alpha;       // uniform factor
  double gamma;
  int64_t ignore_index;
  // forward outputs, (N*S) contiguous, accumulation type
  void* loss;
  void* lse;
  void* dscale;
  // fused forward: also the gradient for the per-row upstream gradient grad_scale, into gx
  double grad_scale;
  // backward inputs
  const void* g;
  int64_t g_sN, g_sS;
  const void* lse_in;
  const void* dscale_in;
  void* gx;
  bool stream;
  int64_t gx_sN, gx_sC, gx_sS;
  int nthreads;
};

}  // namespace lossfuse

#define LF_KERNEL_HEADER "focal_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {
namespace {

// Elements per parallel chunk when the forward does not sum (and in the backward): 16 KB of fp32.
constexpr int64_t kSigmoidChunk = 4096;

struct SigmoidPrepared {
  at::Tensor x, t, y;
  SigmoidFocalArgs a{};
};

SigmoidPrepared sigmoid_prepare(const char* op, const at::Tensor& input, const at::Tensor& target, double alpha,
                                double gamma) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(), op, ": expected CPU tensors");
  SigmoidPrepared p;
  SigmoidFocalArgs& a = p.a;
  a.dtype = kernel_dtype(input, op);
  const auto acc = acc_type(input.scalar_type());
  p.x = input.contiguous();
  a.x = p.x.data_ptr();
  a.numel = p.x.numel();
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == input.sizes(), op, ": a float target must have the input's shape ",
                input.sizes(), "; got ", target.sizes());
    p.t = target;
    if (p.t.scalar_type() != input.scalar_type() && p.t.scalar_type() != acc) p.t = p.t.to(acc);
    p.t = p.t.contiguous();
    a.t = p.t.data_ptr();
    a.t_is_acc = p.t.scalar_type() != input.scalar_type();
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index targets must be int64; got ",
                target.scalar_type());
    TORCH_CHECK(input.dim() == 2 && target.dim() == 1 && target.size(0) == input.size(0), op,
                ": class-index targets must be (N,) for an (N, C) input; got input ", input.sizes(), " and target ",
                target.sizes());
    p.y = target.contiguous();
    a.y = p.y.data_ptr<int64_t>();
    a.C = input.size(1);
  }
  TORCH_CHECK(gamma >= 0, op, ": gamma must be >= 0; got ", gamma);
  TORCH_CHECK(alpha <= 1, op, ": alpha must be <= 1 (negative: no alpha term); got ", alpha);
  a.alpha = alpha;
  a.gamma = gamma;
  a.block = kSigmoidChunk;
  a.nthreads = kernel_threads(a.numel);
  return p;
}

// gx for the fused forward / the backward: the input's shape and dtype, contiguous.
at::Tensor sigmoid_grad_output(const at::Tensor& input, SigmoidFocalArgs& a) {
  at::Tensor gx = empty_output(input.sizes(), input.options());
  a.gx = gx.data_ptr();
  a.stream = gx.nbytes() >= kStreamBytes;
  return gx;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                         double alpha, double gamma, int64_t sum_block,
                                                         std::optional<double> grad_scale) {
  const char* op = "lossfuse::sigmoid_focal_fwd";
  TORCH_CHECK(sum_block >= 0, op, ": sum_block must be >= 0; got ", sum_block);
  SigmoidPrepared p = sigmoid_prepare(op, input, target, alpha, gamma);
  SigmoidFocalArgs& a = p.a;
  const auto opts = input.options().dtype(acc_type(input.scalar_type()));
  at::Tensor out;
  if (sum_block == 0) {
    out = empty_output(input.sizes(), opts);
  } else {
    a.partial = true;
    a.block = sum_block;
    out = at::empty({(a.numel + sum_block - 1) / sum_block}, opts);
  }
  a.out = out.data_ptr();
  at::Tensor gx = at::empty({0}, input.options());
  if (grad_scale) {
    gx = sigmoid_grad_output(input, a);
    a.grad_scale = *grad_scale;
  }
  if (a.numel > 0 && LF_RUN_KERNEL(focal::sigmoid_run, a, a.numel, false)) report_bad_target(p.y, a.C + 1, std::nullopt, op);
  return {out, gx};
}

at::Tensor sigmoid_focal_bwd_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                 double alpha, double gamma) {
  const char* op = "lossfuse::sigmoid_focal_bwd";
  SigmoidPrepared p = sigmoid_prepare(op, input, target, alpha, gamma);
  SigmoidFocalArgs& a = p.a;
  TORCH_CHECK(grad.dim() == 0 || grad.sizes() == input.sizes(), op,
              ": grad must be a scalar or have the input's shape ", input.sizes(), "; got ", grad.sizes());
  const at::Tensor g = grad.to(acc_type(input.scalar_type())).contiguous();
  a.g = g.data_ptr();
  a.g_scalar = grad.dim() == 0;
  at::Tensor gx = sigmoid_grad_output(input, a);
  if (a.numel > 0 && LF_RUN_KERNEL(focal::sigmoid_run, a, a.numel, true)) report_bad_target(p.y, a.C + 1, std::nullopt, op);
  return gx;
}

}  // namespace

// Each of the two losses registers its ops after its own section: they share this file, not their code.
TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("sigmoid_focal_fwd", &sigmoid_focal_fwd_cpu);
  m.impl("sigmoid_focal_bwd", &sigmoid_focal_bwd_cpu);
}

namespace {

struct SoftmaxPrepared {
  at::Tensor x, y, scale;
  SoftmaxFocalArgs a{};
};

SoftmaxPrepared softmax_prepare(const char* op, const at::Tensor& input, const at::Tensor& target,
                                int64_t ignore_index) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be (N, C, S); got ", input.sizes());
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(), op, ": expected CPU tensors");
  SoftmaxPrepared p;
  SoftmaxFocalArgs& a = p.a;
  a.dtype = kernel_dtype(input, op);
  p.x = set_walked_logits(a, input);
  set_class_target(a, target, op);
  p.y = target;
  a.ignore_index = ignore_index;
  a.nthreads = kernel_threads(base::thread_work(a));
  return p;
}

// The gradient's layout: as the input's walk order (empty_like_layout in lossfuse/_layout.py).
at::Tensor softmax_grad_output(const at::Tensor& input, SoftmaxFocalArgs& a, const at::Tensor& x) {
  at::Tensor gx = empty_walk_layout(x, input.scalar_type());
  set_input_grad(a, gx);
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_focal_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& scale, double alpha,
    double gamma, int64_t ignore_index, std::optional<double> grad_scale) {
  const char* op = "lossfuse::softmax_focal_fwd";
  TORCH_CHECK(gamma >= 0, op, ": gamma must be >= 0; got ", gamma);
  SoftmaxPrepared p = softmax_prepare(op, input, target, ignore_index);
  SoftmaxFocalArgs& a = p.a;
  const auto acc = acc_type(input.scalar_type());
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dim() == 1 && scale->numel() == a.C, op, ": scale must have C = ", a.C,
                " elements; got ", scale->sizes());
    p.scale = scale->to(acc).contiguous();
    a.scale = p.scale.data_ptr();
  }
  a.alpha = alpha;
  a.gamma = gamma;
  const auto opts = input.options().dtype(acc);
  at::Tensor loss = at::empty({a.N, a.S}, opts);
  at::Tensor lse = at::empty({a.N, a.S}, opts);
  at::Tensor dscale = at::empty({a.N, a.S}, opts);
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  a.dscale = dscale.data_ptr();
  at::Tensor gx = at::empty({0}, input.options());
  if (grad_scale) {
    gx = softmax_grad_output(input, a, p.x);
    a.grad_scale = *grad_scale;
  }
  if (a.N * a.S > 0 && LF_RUN_KERNEL(focal::softmax_forward, a, a.N * a.S * a.C)) report_bad_target(p.y, a.C, ignore_index, op);
  return {loss, lse, dscale, gx};
}

at::Tensor softmax_focal_bwd_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                                 const at::Tensor& lse, const at::Tensor& dscale, int64_t ignore_index) {
  const char* op = "lossfuse::softmax_focal_bwd";
  SoftmaxPrepared p = softmax_prepare(op, input, target, ignore_index);
  SoftmaxFocalArgs& a = p.a;
  const auto acc = acc_type(input.scalar_type());
  for (const at::Tensor* t : {&grad, &lse, &dscale})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == a.N && t->size(1) == a.S, op,
                ": grad, lse and dscale must be (N, S); got ", t->sizes());
  const at::Tensor g = grad.to(acc);  // no copy when already in the accumulation type
  const at::Tensor lse_c = lse.to(acc).contiguous();
  const at::Tensor d_c = dscale.to(acc).contiguous();
  a.g = g.data_ptr();
  a.g_sN = g.stride(0);
  a.g_sS = g.stride(1);
  a.lse_in = lse_c.data_ptr();
  a.dscale_in = d_c.data_ptr();
  at::Tensor gx = softmax_grad_output(input, a, p.x);
  if (a.N * a.S > 0 && a.C > 0 && LF_RUN_KERNEL(focal::softmax_backward, a, a.N * a.S * a.C)) report_bad_target(p.y, a.C, ignore_index, op);
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("softmax_focal_fwd", &softmax_focal_fwd_cpu);
  m.impl("softmax_focal_bwd", &softmax_focal_bwd_cpu);
}

}  // namespace lossfuse
