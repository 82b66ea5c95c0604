// Distillation on the CPU: the torch-facing ops lossfuse::distillation_fwd / _bwd (schemas in
// lossfuse/ops/distillation.py) and the kernels in distillation_kernel.h, compiled per ISA.
//
// The Python layer has checked the arguments and brought both logits to (R, V) rows of class stride 1
// in one dtype; here we re-check only what protects memory.
#include <torch/library.h>

#include "tensor_utils.h"

namespace lossfuse {

struct DistillArgs {
  Dtype dtype;
  // student and teacher logits (R, V), class stride 1: element (r, c) at s + r * s_sR + c
  const void* s;
  const void* t;
  int64_t R, V, s_sR, t_sR;
  const int64_t* y;  // (R) rows whose value is ignore_index are skipped; null: every row counts
  int64_t y_sR;
  int64_t ignore_index;
  double inv_t;  // 1 / temperature
  double beta;
  int mode;  // 0 forward KL, 1 reverse KL, 2 JSD (distillation_kernel.h)
  void* loss;  // (R) per-row loss in the accumulation type
  // per-row upstream gradient (accumulation type, strided: may be an expanded scalar); null: no gradients
  const void* g;
  int64_t g_sR;
  void* gs;  // student gradient (R, V), null when not wanted
  int64_t gs_sR;
  void* gt;  // teacher gradient
  int64_t gt_sR;
  bool stream;  // write gs with non-temporal stores where rows are aligned (outputs far larger than the caches)
  int nthreads;
  int64_t chunk;
};

}  // namespace lossfuse

#define LF_KERNEL_HEADER "distillation_kernel.h"
#include "isa_instantiate.h"

namespace lossfuse {
namespace {

void check_rows(const char* op, const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2, op, ": ", what, " must be (R, V); got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": ", what, " must have class stride 1");
}

struct Prepared {
  at::Tensor s, t, y, g, loss, gs, gt;
  DistillArgs a{};
};

Prepared prepare(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& target, int64_t ignore_index, double temperature, double beta,
                 const std::optional<at::Tensor>& grad, bool student_grad, bool teacher_grad) {
  check_rows(op, student, "student");
  check_rows(op, teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student and teacher must have one shape; got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student and teacher must have one dtype");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1]");
  Prepared p;
  DistillArgs& a = p.a;
  a.dtype = kernel_dtype(student, op);
  const auto acc = acc_type(student.scalar_type());
  p.s = student;
  p.t = teacher;
  a.s = p.s.data_ptr();
  a.t = p.t.data_ptr();
  a.R = p.s.size(0);
  a.V = p.s.size(1);
  a.s_sR = p.s.stride(0);
  a.t_sR = p.t.stride(0);
  if (target.has_value() && target->defined()) {
    TORCH_CHECK(target->scalar_type() == at::kLong && target->dim() == 1 && target->size(0) == a.R, op,
                ": target must be int64 (R,) = (", a.R, ",); got ", target->scalar_type(), " ", target->sizes());
    p.y = *target;
    a.y = p.y.data_ptr<int64_t>();
    a.y_sR = p.y.stride(0);
  }
  a.ignore_index = ignore_index;
  a.inv_t = 1.0 / temperature;
  a.beta = beta;
  a.mode = beta == 0 ? 0 : (beta == 1 ? 1 : 2);
  p.loss = at::empty({a.R}, student.options().dtype(acc));
  a.loss = p.loss.data_ptr();
  if (grad.has_value() && grad->defined() && (student_grad || teacher_grad)) {
    TORCH_CHECK(grad->dim() == 1 && grad->size(0) == a.R, op, ": grad must be (R,); got ", grad->sizes());
    p.g = grad->to(acc);
    a.g = p.g.data_ptr();
    a.g_sR = p.g.stride(0);
    if (student_grad) {
      p.gs = empty_output({a.R, a.V}, student.options());
      a.gs = p.gs.data_ptr();
      a.gs_sR = p.gs.stride(0);
      a.stream = p.gs.nbytes() >= kStreamBytes;
    }
    if (teacher_grad) {
      p.gt = empty_output({a.R, a.V}, teacher.options());
      a.gt = p.gt.data_ptr();
      a.gt_sR = p.gt.stride(0);
    }
  }
  if (!p.gs.defined()) p.gs = at::empty({0}, student.options());
  if (!p.gt.defined()) p.gt = at::empty({0}, teacher.options());
  a.nthreads = kernel_threads(a.R * a.V * 2);
  a.chunk = std::max<int64_t>(1, a.R / (int64_t(a.nthreads) * 32));
  return p;
}

// The per-row loss and, when grad is given, the gradients for that per-row upstream gradient from the
// same walk: the fused path's forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distillation_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    int64_t ignore_index, double temperature, double beta, const std::optional<at::Tensor>& grad, bool student_grad,
    bool teacher_grad) {
  Prepared p = prepare("lossfuse::distillation_fwd", student, teacher, target, ignore_index, temperature, beta, grad,
                       student_grad, teacher_grad);
  if (p.a.R > 0) LF_RUN_KERNEL(distill_run, p.a, p.a.R * p.a.V);
  return {p.loss, p.gs, p.gt};
}

std::tuple<at::Tensor, at::Tensor> distillation_bwd_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& target, int64_t ignore_index,
                                                        double temperature, double beta, bool student_grad,
                                                        bool teacher_grad) {
  Prepared p = prepare("lossfuse::distillation_bwd", student, teacher, target, ignore_index, temperature, beta, grad,
                       student_grad, teacher_grad);
  if (p.a.R > 0 && (student_grad || teacher_grad)) LF_RUN_KERNEL(distill_run, p.a, p.a.R * p.a.V);
  return {p.gs, p.gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(lossfuse, CPU, m) {
  m.impl("distillation_fwd", &distillation_fwd_cpu);
  m.impl("distillation_bwd", &distillation_bwd_cpu);
}

}  // namespace lossfuse
