// Cross-entropy on the CPU: the torch-facing ops lossfuse::cross_entropy_fwd / _bwd (schemas in
// lossfuse/ops/cross_entropy.py) and the kernels in cross_entropy_kernel.h, compiled per ISA.
//
// The Python layer has already checked arguments torch's way; here we re-check only what protects
// memory (shapes, dtypes, target range) and bring layouts into one of the two walk orders.
#include <torch/library.h>

#include "tensor_utils.h"

namespace lossfuse {

struct CeArgs {
  Dtype dtype;
  // logits (N, C, S): element (n, c, s) at x + n*x_sN + c*x_sC + s*x_sS
  const void* x;
  int64_t N, C, S, x_sN, x_sC, x_sS;
  // class-index target (N, S) int64, or (t != null) a probability target (N, C, S)
  const int64_t* y;
  int64_t y_sN, y_sS;
  const void* t;
  int64_t t_sN, t_sC, t_sS;
  bool t_dtype_is_acc;  // probability target stored in the accumulation type, not the input's
  const void* w;        // class weights (C), accumulation type, contiguous; null = all ones
  double w_sum;         // sum of the weights (C when there are none)
  int64_t ignore_index;
  double eps;      // label smoothing
  double z_loss;   // coefficient of lse^2 (0 = off)
  double softcap;  // logits -> softcap * tanh(x / softcap) (0 = off)
  // forward outputs, (N*S) contiguous: loss in the accumulation type, lse in double
  void* loss;
  double* lse;
  // backward: per-row upstream gradient (strided, may be an expanded scalar) and the saved lse
  const void* g;
  int64_t g_sN, g_sS;
  const double* lse_in;
  bool inplace;  // gx is x: every logit is read before its gradient overwrites it
  void* gx;      // null when not wanted
  bool stream;  // write gx with non-temporal stores (outputs far larger than the caches)
  int64_t gx_sN, gx_sC, gx_sS;
  void* gt;  // null when not wanted
  int64_t gt_sN, gt_sC, gt_sS;
  int nthreads;
  // Rows (or tiles) per dynamically scheduled chunk: a thread whose core another process holds
  // takes fewer chunks instead of holding up the whole call, as a static split would.
  int64_t chunk;
};

// What ce_run (cross_entropy_kernel.h) computes: the loss and lse, the input (and probability-target)
// gradient from a saved lse, or both in one walk for one upstream gradient on every row.
enum class CePass { kForward, kBackward, kFused };

}  // namespace lossfuse

#define LF_KERNEL_HEADER "cross_entropy_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {
namespace {

// A probability target in the logits' walk order (class stride 1 or spatial stride 1 like x3).
at::Tensor walkable_target(const at::Tensor& t3, const at::Tensor& x3) {
  if (walks_classes(x3)) {
    if (t3.size(1) == 1 || t3.stride(1) == 1) return t3;
    return t3.transpose(1, 2).contiguous().transpose(1, 2);
  }
  if (t3.size(2) == 1 || t3.stride(2) == 1) return t3;
  return t3.contiguous();
}

struct Prepared {
  at::Tensor x, y, t, w;
  CeArgs a{};
};

Prepared prepare(const char* op, const at::Tensor& input, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                 double z_loss, double softcap) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be (N, C, S); got ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), op, ": expected CPU tensors");
  Prepared p;
  CeArgs& a = p.a;
  a.dtype = kernel_dtype(input, op);
  const auto acc = acc_type(input.scalar_type());
  p.x = set_walked_logits(a, input);
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == input.sizes(), op, ": a probability target must have the input's shape ",
                input.sizes(), "; got ", target.sizes());
    p.t = target;
    if (p.t.scalar_type() != input.scalar_type() && p.t.scalar_type() != acc) p.t = p.t.to(acc);
    p.t = walkable_target(p.t, p.x);
    a.t = p.t.data_ptr();
    a.t_sN = p.t.stride(0);
    a.t_sC = p.t.stride(1);
    a.t_sS = p.t.stride(2);
    a.t_dtype_is_acc = p.t.scalar_type() != input.scalar_type();
  } else {
    set_class_target(a, target, op);
    p.y = target;
  }
  a.w_sum = double(a.C);
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == a.C, op, ": weight must have C = ", a.C,
                " elements; got ", weight->sizes());
    p.w = weight->to(acc).contiguous();
    a.w = p.w.data_ptr();
    a.w_sum = p.w.sum().item<double>();
  }
  a.ignore_index = ignore_index;
  a.eps = label_smoothing;
  TORCH_CHECK(z_loss >= 0 && softcap >= 0, op, ": z_loss and softcap must be >= 0");
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.nthreads = kernel_threads(base::thread_work(a));
  {
    const int64_t units = walks_classes(p.x) ? a.N * a.S : a.N * ((a.S + 15) / 16);  // rows or tiles
    a.chunk = std::max<int64_t>(1, units / (int64_t(a.nthreads) * 32));
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double z_loss, double softcap) {
  Prepared p = prepare("lossfuse::cross_entropy_fwd", input, target, weight, ignore_index, label_smoothing,
                       z_loss, softcap);
  CeArgs& a = p.a;
  at::Tensor loss = at::empty({a.N, a.S}, input.options().dtype(acc_type(input.scalar_type())));
  at::Tensor lse = at::empty({a.N, a.S}, input.options().dtype(at::kDouble));
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr<double>();
  if (a.N * a.S > 0 && LF_RUN_KERNEL(ce_run, a, a.N * a.S * a.C, CePass::kForward)) report_bad_target(p.y, a.C, ignore_index, "cross_entropy");
  return {loss, lse};
}

// The forward and, from the same walk, the input gradient for the upstream gradient grad_scale on
// every row (the fused path of lossfuse/ops/cross_entropy.py): (loss, lse, grad_input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fused_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double grad_scale) {
  Prepared p = prepare("lossfuse::cross_entropy_fused", input, target, weight, ignore_index, label_smoothing, z_loss,
                       softcap);
  CeArgs& a = p.a;
  const auto acc = acc_type(input.scalar_type());
  at::Tensor loss = at::empty({a.N, a.S}, input.options().dtype(acc));
  at::Tensor lse = at::empty({a.N, a.S}, input.options().dtype(at::kDouble));
  at::Tensor gx = empty_walk_layout(p.x, input.scalar_type());
  at::Tensor g = at::full({1}, grad_scale, input.options().dtype(acc));
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr<double>();
  a.lse_in = a.lse;  // for the layouts that run the forward and the backward kernels in turn
  a.g = g.data_ptr();
  a.g_sN = a.g_sS = 0;
  set_input_grad(a, gx);
  if (a.N * a.S > 0 && LF_RUN_KERNEL(ce_run, a, a.N * a.S * a.C, CePass::kFused)) report_bad_target(p.y, a.C, ignore_index, "cross_entropy");
  return {loss, lse, gx};
}

// Rows per call of the kernel in cross_entropy_fused_sum: their loss and lse take 12 bytes a row
// (768 KiB here), reused from block to block.
constexpr int64_t kSumBlockRows = 65536;

// cross_entropy_fused for a caller that only sums the loss: (sum of the rows' losses, grad_input).
// The rows go through the kernel in blocks of at most kSumBlockRows, each block's loss summed in
// double, so no (N, S) loss or lse exists -- for short rows (segmentation's 21 classes) those are
// 12 bytes against 84 of logits a row. Blocks are whole n ranges, or for a long S, ranges of s in
// multiples of 16 (the tile walk's width, so the tiles and their results are the unblocked call's).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_sum_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double grad_scale) {
  Prepared p = prepare("lossfuse::cross_entropy_fused_sum", input, target, weight, ignore_index, label_smoothing,
                       z_loss, softcap);
  TORCH_CHECK(!target.is_floating_point(), "lossfuse::cross_entropy_fused_sum: takes class-index targets");
  const CeArgs& a = p.a;
  const auto acc = acc_type(input.scalar_type());
  at::Tensor gx = empty_walk_layout(p.x, input.scalar_type());
  at::Tensor g = at::full({1}, grad_scale, input.options().dtype(acc));
  const int64_t bs = std::max<int64_t>(1, std::min(a.S, kSumBlockRows));  // S or a multiple of 16
  const int64_t bn = std::max<int64_t>(1, kSumBlockRows / bs);
  const int64_t rows = std::min(a.N, bn) * bs;
  at::Tensor loss = at::empty({rows}, input.options().dtype(acc));
  at::Tensor lse = at::empty({rows}, input.options().dtype(at::kDouble));
  const int64_t xsize = p.x.element_size(), gsize = gx.element_size();
  double total = 0;
  bool bad = false;
  for (int64_t n0 = 0; n0 < a.N; n0 += bn) {
    for (int64_t s0 = 0; s0 < a.S; s0 += bs) {
      CeArgs b = a;
      b.N = std::min(bn, a.N - n0);
      b.S = std::min(bs, a.S - s0);
      b.x = static_cast<const char*>(a.x) + (n0 * a.x_sN + s0 * a.x_sS) * xsize;
      b.y = a.y + n0 * a.y_sN + s0 * a.y_sS;
      b.loss = loss.data_ptr();
      b.lse = lse.data_ptr<double>();
      b.lse_in = b.lse;
      b.g = g.data_ptr();
      b.g_sN = b.g_sS = 0;
      set_input_grad(b, gx);
      b.gx = static_cast<char*>(b.gx) + (n0 * b.gx_sN + s0 * b.gx_sS) * gsize;
      b.nthreads = kernel_threads(base::thread_work(b));
      const int64_t units = walks_classes(p.x) ? b.N * b.S : b.N * ((b.S + 15) / 16);
      b.chunk = std::max<int64_t>(1, units / (int64_t(b.nthreads) * 32));
      if (b.N * b.S == 0) continue;
      bad = LF_RUN_KERNEL(ce_run, b, b.N * b.S * b.C, CePass::kFused) || bad;
      // torch's vectorised sum within the block (the unblocked path sums all rows that way), the
      // blocks' sums in double.
      total += loss.narrow(0, 0, b.N * b.S).sum().item<double>();
    }
  }
  if (bad) report_bad_target(p.y, a.C, ignore_index, "cross_entropy");
  return {at::full({}, total, input.options().dtype(acc)), gx};
}

// Shared by the out-of-place and the in-place backward: checks, the upstream gradient, the saved lse.
struct Backward {
  Prepared p;
  at::Tensor g, lse;
};

Backward prepare_backward(const char* op, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                          double label_smoothing, double z_loss, double softcap) {
  Backward b{prepare(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap), {}, {}};
  CeArgs& a = b.p.a;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == a.N && grad.size(1) == a.S, op, ": grad must be (N, S); got ",
              grad.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == a.N && lse.size(1) == a.S, op, ": lse must be (N, S); got ",
              lse.sizes());
  b.g = grad.to(acc_type(input.scalar_type()));  // no copy when already in the accumulation type
  b.lse = lse.to(at::kDouble).contiguous();
  a.g = b.g.data_ptr();
  a.g_sN = b.g.stride(0);
  a.g_sS = b.g.stride(1);
  a.lse_in = b.lse.data_ptr<double>();
  return b;
}

at::Tensor empty_target_grad(const at::Tensor& input, const at::Tensor& target) {
  const bool prob = target.is_floating_point();
  return at::empty({0}, input.options().dtype(prob ? target.scalar_type() : input.scalar_type()));
}

void set_target_grad(CeArgs& a, at::Tensor& gt) {
  a.gt = gt.data_ptr();
  a.gt_sN = gt.stride(0);
  a.gt_sC = gt.stride(1);
  a.gt_sS = gt.stride(2);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_bwd_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                         const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         const at::Tensor& lse, int64_t ignore_index,
                                                         double label_smoothing, double z_loss, double softcap,
                                                         bool input_grad, bool target_grad) {
  Backward b = prepare_backward("lossfuse::cross_entropy_bwd", grad, input, target, weight, lse, ignore_index,
                                label_smoothing, z_loss, softcap);
  Prepared& p = b.p;
  CeArgs& a = p.a;
  const bool prob = target.is_floating_point();
  at::Tensor gx = input_grad ? empty_walk_layout(p.x, input.scalar_type()) : at::empty({0}, input.options());
  at::Tensor gt = (target_grad && prob) ? empty_walk_layout(p.x, p.t.scalar_type()) : empty_target_grad(input, target);
  if (input_grad) set_input_grad(a, gx);
  if (target_grad && prob) set_target_grad(a, gt);
  if ((a.gx || a.gt) && a.N * a.S > 0 && LF_RUN_KERNEL(ce_run, a, a.N * a.S * a.C, CePass::kBackward)) report_bad_target(p.y, a.C, ignore_index, "cross_entropy");
  if (a.gt && gt.scalar_type() != target.scalar_type()) gt = gt.to(target.scalar_type());
  return {gx, gt};
}

// The gradient with respect to the logits written over the logits themselves: no second N x C buffer.
// Returns the target gradient (a 0-element tensor unless asked for a probability target).
at::Tensor cross_entropy_bwd_inplace_cpu(const at::Tensor& grad, at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                         double softcap, bool target_grad) {
  const char* op = "lossfuse::cross_entropy_bwd_inplace";
  Backward b = prepare_backward(op, grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap);
  Prepared& p = b.p;
  CeArgs& a = p.a;
  TORCH_CHECK(p.x.data_ptr() == input.data_ptr(), op,
              ": the logits' layout is not one the kernels walk in place; make them contiguous first");
  const bool prob = target.is_floating_point();
  at::Tensor gt = (target_grad && prob) ? empty_walk_layout(p.x, p.t.scalar_type()) : empty_target_grad(input, target);
  a.inplace = true;
  a.gx = input.data_ptr();
  a.gx_sN = a.x_sN;
  a.gx_sC = a.x_sC;
  a.gx_sS = a.x_sS;
  if (target_grad && prob) set_target_grad(a, gt);
  if (a.N * a.S > 0 && LF_RUN_KERNEL(ce_run, a, a.N * a.S * a.C, CePass::kBackward)) report_bad_target(p.y, a.C, ignore_index, "cross_entropy");
  if (a.gt && gt.scalar_type() != target.scalar_type()) gt = gt.to(target.scalar_type());
  return gt;
}

}  // namespace

TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_fused", &cross_entropy_fused_cpu);
  m.impl("cross_entropy_fused_sum", &cross_entropy_fused_sum_cpu);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cpu);
}

}  // namespace lossfuse
