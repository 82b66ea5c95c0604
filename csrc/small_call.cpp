// The small-call entry points: cross-entropy and Huber / SmoothL1 / L1 taken whole, from the Python
// arguments to the reduced loss and its autograd node, in one C++ call.
//
// Why: at a (64, 10) cross-entropy the kernel runs for about a microsecond, and the Python path around
// it -- argument checks, a Python autograd Function, the reduction and the mean's denominator as small
// tensor ops, the custom-op dispatch -- cost more than torch's whole loss. Here the same kernels
// (the ops of cross_entropy.cpp and huber.cpp, reached through the dispatcher straight at their CPU
// kernels) run with everything around them in C++: the checks, the reduction (summed in double), the
// fused gradient handed out by a C++ autograd node. lossfuse/functional.py calls these first for
// the common cases; anything they do not take returns None and goes the general way, which also
// raises the errors (so the messages are the general path's, word for word).
//
// What the node guarantees matches the Python Functions (lossfuse/ops/cross_entropy.py, huber.py):
// the inputs are saved version-checked, the gradient formed in the forward for grad_output 1 is handed
// out once, any other grad_output scales it in the accumulation type (float32 / float64) or reruns the
// backward kernel (bfloat16, whose gradient must be scaled before its one cast), and the backward is
// once-differentiable.
//
// This file includes torch's Python and autograd headers, which the kernel files avoid: it is the one
// translation unit that needs them.
#undef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace lossfuse {
namespace {

using at::Tensor;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// Above this many logits (or elements) the per-call overhead is a few percent of the kernel's time,
// and the general path -- which spreads the work over threads -- is as fast.
constexpr int64_t kSmallMaxElements = int64_t(1) << 18;

constexpr int kNone = 0, kMean = 1, kSum = 2;  // reductions, as lossfuse/functional.py passes them

const c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using CeFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, double, double,
                                            double);
using CeFusedSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t, double,
                                                      double, double, double);
using CeBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                            const Tensor&, int64_t, double, double, double, bool, bool);
using FocalFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, double,
                                                               double, int64_t, std::optional<double>);
using FocalBwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using HuberFwdSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t, double, int64_t);
using HuberFwdGradSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                                           double, int64_t, double, bool, bool);
using HuberBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                                       int64_t, double, bool, bool, bool);

// The op handles, looked up on first use (the schemas are defined from Python before this module loads).
struct Ops {
  c10::TypedOperatorHandle<CeFwdSig> ce_fwd = op<CeFwdSig>("lossfuse::cross_entropy_fwd");
  c10::TypedOperatorHandle<CeFusedSig> ce_fused = op<CeFusedSig>("lossfuse::cross_entropy_fused");
  c10::TypedOperatorHandle<CeBwdSig> ce_bwd = op<CeBwdSig>("lossfuse::cross_entropy_bwd");
  c10::TypedOperatorHandle<FocalFwdSig> focal_fwd = op<FocalFwdSig>("lossfuse::softmax_focal_fwd");
  c10::TypedOperatorHandle<FocalBwdSig> focal_bwd = op<FocalBwdSig>("lossfuse::softmax_focal_bwd");
  c10::TypedOperatorHandle<HuberFwdSig> huber_fwd = op<HuberFwdSig>("lossfuse::huber_fwd");
  c10::TypedOperatorHandle<HuberFwdGradSig> huber_fwd_grad = op<HuberFwdGradSig>("lossfuse::huber_fwd_grad");
  c10::TypedOperatorHandle<HuberBwdSig> huber_bwd = op<HuberBwdSig>("lossfuse::huber_bwd");
};

// Autograd nodes are held by c10::intrusive_ptr in newer torch and by std::shared_ptr in older ones
// (the supported range spans the change).
template <class T, class... Args>
auto new_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

const Ops& ops() {
  static const Ops o;
  return o;
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A plain CPU tensor: not a subclass (DTensor, FakeTensor, a functorch wrapper), strided, on the CPU.
std::optional<Tensor> plain_cpu(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return std::nullopt;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.is_neg() || t.is_conj()) {
    return std::nullopt;
  }
  return t;
}

// A 0-dim tensor of `dtype` holding v (rounded once, as Tensor.to would).
Tensor scalar_of(double v, at::ScalarType dtype) {
  Tensor out = at::empty({}, at::TensorOptions().dtype(dtype));
  switch (dtype) {
    case at::kFloat: *out.data_ptr<float>() = float(v); break;
    case at::kDouble: *out.data_ptr<double>() = v; break;
    case at::kBFloat16: *out.data_ptr<at::BFloat16>() = at::BFloat16(float(v)); break;
    case at::kHalf: *out.data_ptr<at::Half>() = at::Half(float(v)); break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
  return out;
}

// The reductions below use the same tensor ops, in the same order, as the general path
// (lossfuse/ops/_common.py, reduce_rows; lossfuse/_layout.py, mean_denominator): the two paths give
// the same bits.

// The value of a 0-dim upstream gradient, read directly where it is a CPU tensor (Tensor.item goes
// through the dispatcher: a microsecond, which calls this small feel).
double scalar_value(const Tensor& g) {
  if (g.dim() == 0 && g.device().is_cpu() && !g.is_neg() && !g.is_conj()) {
    switch (g.scalar_type()) {
      case at::kFloat: return *g.const_data_ptr<float>();
      case at::kDouble: return *g.const_data_ptr<double>();
      case at::kBFloat16: return float(*g.const_data_ptr<at::BFloat16>());
      case at::kHalf: return float(*g.const_data_ptr<at::Half>());
      default: break;
    }
  }
  return g.item<double>();
}

// As torch.autograd.function.once_differentiable: a gradient computed while a graph is being built
// (create_graph=True with an upstream gradient that requires grad) carries an error node, so that
// differentiating it again raises instead of silently missing the second-order terms.
variable_list once_differentiable(variable_list grads, const Tensor& grad_out) {
  if (!at::GradMode::is_enabled() || !grad_out.requires_grad()) return grads;
  variable_list marked;
  for (auto& g : grads) {
    if (g.defined()) {
      Tensor d = g.detach();
      d.set_requires_grad(true);
      marked.push_back(d);
    } else {
      marked.push_back(g);
    }
  }
  auto err = new_node<torch::autograd::DelayedError>(
      "trying to differentiate twice a function that was marked with @once_differentiable", int64_t(marked.size()));
  return (*err)(std::move(marked));
}

// ---------------------------------------------------------------------------------------------------
// Row losses (cross-entropy, softmax focal): (C) or (N, C) logits walked along the classes, int64
// class indices, optional class weights, any reduction.
// ---------------------------------------------------------------------------------------------------

struct RowCall {
  Tensor x, x3, y2;  // the logits, their (N, C, 1) view, the (N, 1) targets
  OptTensor w;
  int64_t n = 0, c = 0, ignore_index = 0;
  int reduction = kMean;
  at::ScalarType dt = at::kFloat, acc = at::kFloat;
  bool grad = false;  // an autograd node is needed
  Tensor denom;       // the mean's denominator: a 0-dim tensor of the accumulation type
};

bool parse_int(PyObject* o, int64_t& v) {
  int overflow = 0;
  const long long r = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (r == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  v = r;
  return true;
}

bool parse_double(PyObject* o, double& v) {
  v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// Must run under AutoDispatchBelowADInplaceOrView: the views it makes record no graph.

std::optional<RowCall> row_call(PyObject* input, PyObject* target, PyObject* weight, PyObject* ignore_index,
                                PyObject* reduction) {
  auto xo = plain_cpu(input);
  auto yo = plain_cpu(target);
  if (!xo || !yo) return std::nullopt;
  RowCall r;
  r.x = *xo;
  const Tensor& x = r.x;
  const Tensor& y = *yo;
  r.dt = x.scalar_type();
  r.acc = acc_of(r.dt);
  if (!is_float(r.dt) || y.scalar_type() != at::kLong || y.requires_grad()) return std::nullopt;
  const int64_t nd = x.dim();
  if (nd != 1 && nd != 2) return std::nullopt;
  r.n = nd == 2 ? x.size(0) : 1;
  r.c = x.size(nd - 1);
  if (r.n == 0 || r.c == 0 || x.numel() > kSmallMaxElements) return std::nullopt;
  if (r.c > 1 && x.stride(nd - 1) != 1) return std::nullopt;  // rows along the classes only
  if (nd == 2 ? (y.dim() != 1 || y.size(0) != r.n) : y.dim() != 0) return std::nullopt;
  if (weight != Py_None) {
    auto wo = plain_cpu(weight);
    if (!wo || !is_float(wo->scalar_type()) || wo->dim() != 1 || wo->size(0) != r.c || wo->requires_grad()) {
      return std::nullopt;
    }
    r.w = *wo;
  }
  int64_t red = 0;
  if (!parse_int(ignore_index, r.ignore_index) || !parse_int(reduction, red) || red < kNone || red > kSum) {
    return std::nullopt;
  }
  r.reduction = int(red);
  if (at::autocast::is_autocast_enabled(at::kCPU)) return std::nullopt;  // torch's float32 result: general path
  r.grad = at::GradMode::is_enabled() && x.requires_grad();
  r.x3 = x.as_strided({r.n, r.c, 1}, {nd == 2 ? x.stride(0) : r.c, nd == 2 ? x.stride(1) : 1, 1});
  r.y2 = y.as_strided({r.n, 1}, {nd == 2 ? y.stride(0) : 1, 1});

  // The mean's denominator: the count of kept rows (exact), or the sum of their weights -- summed by
  // torch's sum over the same (N, 1) values, zeros at the ignored rows, as the general path does.
  if (r.reduction == kMean) {
    const int64_t* yp = r.y2.data_ptr<int64_t>();
    const int64_t ys = r.y2.stride(0);
    if (!r.w) {
      int64_t kept = 0;
      for (int64_t i = 0; i < r.n; ++i) kept += yp[i * ys] != r.ignore_index;
      r.denom = scalar_of(double(kept), r.acc);
    } else {
      const Tensor wa = r.w->to(r.acc).contiguous();
      Tensor wy = at::empty({r.n, 1}, at::TensorOptions().dtype(r.acc));
      for (int64_t i = 0; i < r.n; ++i) {
        const int64_t t = yp[i * ys];
        const bool keep = t != r.ignore_index;
        if (keep && (t < 0 || t >= r.c)) return std::nullopt;  // the general path names the bad target
        if (r.acc == at::kDouble) {
          wy.data_ptr<double>()[i] = keep ? wa.data_ptr<double>()[t] : 0.0;
        } else {
          wy.data_ptr<float>()[i] = keep ? wa.data_ptr<float>()[t] : 0.0f;
        }
      }
      r.denom = wy.sum();
    }
  }
  return r;
}

// The scale of the gradient a fused forward writes: 1 / denom in the accumulation type for a mean.
double fused_scale(const RowCall& r) {
  if (r.reduction != kMean) return 1.0;
  const double d = r.denom.item<double>();
  return r.acc == at::kDouble ? 1.0 / d : double(1.0f / float(d));
}

// The loss the caller sees, from the (N, 1) per-row losses.
Tensor row_result(const RowCall& r, const Tensor& loss) {
  if (r.reduction == kNone) return (r.x.dim() == 2 ? loss.view({r.n}) : loss.view(at::IntArrayRef())).to(r.dt);
  // torch's sum, then the mean's division and the cast as scalar arithmetic: one IEEE division in the
  // accumulation type and one rounding, the bits of the general path's 0-dim tensor ops.
  // One row: its loss is the sum, bit for bit, without the reduction's dispatch.
  const Tensor s = r.n == 1 ? loss : loss.sum();
  if (r.acc == at::kDouble) {
    const double v = *s.data_ptr<double>();
    return scalar_of(r.reduction == kMean ? v / *r.denom.data_ptr<double>() : v, r.dt);
  }
  const float v = *s.data_ptr<float>();
  return scalar_of(r.reduction == kMean ? v / *r.denom.data_ptr<float>() : v, r.dt);
}

// The backward shared by the row losses: the forward's gradient when it stands, else the loss's
// backward kernel (backward_kernel) for the per-row upstream gradient.
struct RowBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x_;  // version-checked: modifying the logits in place is refused
  RowCall call;                       // its x, x3 are reset: x_ holds the logits
  Tensor fused;                       // the forward's gradient for grad_output 1, (N, C, 1); handed out once
  std::vector<int64_t> shape;

  void setup(RowCall&& r, Tensor fused_grad) {
    set_next_edges(torch::autograd::collect_next_edges(r.x));
    x_ = torch::autograd::SavedVariable(r.x, false);
    shape = r.x.sizes().vec();
    r.x.reset();
    r.x3.reset();
    call = std::move(r);
    fused = std::move(fused_grad);
  }

  virtual Tensor backward_kernel(const Tensor& rows, const Tensor& x3) = 0;

  void release_variables() override {
    x_.reset_data();
    call.y2.reset();
    call.w.reset();
    fused.reset();
    release_saved();
  }
  virtual void release_saved() = 0;

  variable_list apply(variable_list&& grads) override {
    const Tensor& g = grads[0];
    if (!g.defined() || !should_compute_output(0)) return {Tensor()};
    Tensor x = x_.unpack();
    at::AutoDispatchBelowADInplaceOrView guard;
    const RowCall& r = call;
    Tensor gx3;
    if (fused.defined()) {
      Tensor f = std::move(fused);
      fused.reset();
      if (scalar_value(g) == 1.0) {
        gx3 = f;
      } else if (f.scalar_type() == r.acc) {
        gx3 = f.mul(g.to(r.acc));
      }
    }
    if (!gx3.defined()) {
      Tensor rows = g.to(r.acc);
      if (r.reduction == kNone) {
        rows = rows.reshape({r.n, 1});
      } else {
        if (r.reduction == kMean) rows = rows.div(r.denom);
        rows = rows.expand({r.n, 1});
      }
      const bool two = x.dim() == 2;
      gx3 = backward_kernel(rows, x.as_strided({r.n, r.c, 1}, {two ? x.stride(0) : r.c, two ? x.stride(1) : 1, 1}));
    }
    return once_differentiable({gx3.reshape(shape)}, g);
  }
};

struct CeBackward : RowBackward {
  Tensor lse;
  double eps = 0;
  std::string name() const override { return "CrossEntropyBackward (lossfuse)"; }
  void release_saved() override { lse.reset(); }
  Tensor backward_kernel(const Tensor& rows, const Tensor& x3) override {
    return std::get<0>(ops().ce_bwd.redispatch(kCpuKeys, rows, x3, call.y2, call.w, lse, call.ignore_index, eps, 0.0,
                                               0.0, true, false));
  }
};

// cross_entropy_small(input, target, weight, ignore_index, reduction, label_smoothing)
std::optional<Tensor> cross_entropy_small(PyObject* const* args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the views and kernels here record no graph
  auto rc = row_call(args[0], args[1], args[2], args[3], args[4]);
  double eps = 0;
  if (!rc || !parse_double(args[5], eps) || !(eps >= 0.0 && eps <= 1.0)) return std::nullopt;
  RowCall& r = *rc;
  // bfloat16's gradient is formed for grad_output 1 and rerun otherwise; float16's never is (its users
  // scale the loss, so the work would be wasted): as the Python Function.
  const bool fuse = r.grad && r.reduction != kNone && r.dt != at::kHalf;
  Tensor loss, lse, gx3;
  if (fuse) {
    std::tie(loss, lse, gx3) =
        ops().ce_fused.redispatch(kCpuKeys, r.x3, r.y2, r.w, r.ignore_index, eps, 0.0, 0.0, fused_scale(r));
  } else {
    std::tie(loss, lse) = ops().ce_fwd.redispatch(kCpuKeys, r.x3, r.y2, r.w, r.ignore_index, eps, 0.0, 0.0);
  }
  Tensor out = row_result(r, loss);
  if (r.grad) {
    auto node = new_node<CeBackward>();
    node->lse = lse;
    node->eps = eps;
    node->setup(std::move(r), gx3);
    torch::autograd::set_history(out, node);
  }
  return out;
}

struct SoftmaxFocalBackward : RowBackward {
  Tensor lse, dscale;
  std::string name() const override { return "SoftmaxFocalBackward (lossfuse)"; }
  void release_saved() override {
    lse.reset();
    dscale.reset();
  }
  Tensor backward_kernel(const Tensor& rows, const Tensor& x3) override {
    return ops().focal_bwd.redispatch(kCpuKeys, rows, x3, call.y2, lse, dscale, call.ignore_index);
  }
};

// softmax_focal_small(input, target, alpha, gamma, weight, ignore_index, reduction); alpha a float.
std::optional<Tensor> softmax_focal_small(PyObject* const* args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto rc = row_call(args[0], args[1], args[4], args[5], args[6]);
  double alpha = 1, gamma = 2;
  if (!rc || !parse_double(args[2], alpha) || !parse_double(args[3], gamma)) return std::nullopt;
  if (!(alpha >= 0.0 && alpha <= 1.0) || !(gamma >= 0.0)) return std::nullopt;
  RowCall& r = *rc;
  // float32 / float64 only, as the Python Function (lossfuse/ops/focal.py, "The fused path").
  const bool fuse = r.grad && r.reduction != kNone && r.acc == r.dt;
  auto [loss, lse, dscale, gx3] = ops().focal_fwd.redispatch(
      kCpuKeys, r.x3, r.y2, r.w, alpha, gamma, r.ignore_index, fuse ? std::optional<double>(fused_scale(r)) : std::nullopt);
  Tensor out = row_result(r, loss);
  if (r.grad) {
    auto node = new_node<SoftmaxFocalBackward>();
    node->lse = lse;
    node->dscale = dscale;
    node->setup(std::move(r), fuse ? gx3 : Tensor());
    torch::autograd::set_history(out, node);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Huber (mode 0), SmoothL1 (1), L1 (2): input and target of one shape and dtype, no weight.
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kHuberPartialBlock = 4096;  // PARTIAL_BLOCK of lossfuse/ops/huber.py

struct HuberBackward : torch::autograd::Node {
  torch::autograd::SavedVariable x_, y_;
  Tensor gx, gy;  // the forward's gradients for grad_output 1; handed out once
  bool eager = false;
  int64_t mode = 0;
  double delta = 1;
  int reduction = kMean;
  int64_t numel = 0;

  std::string name() const override { return "HuberBackward (lossfuse)"; }

  void release_variables() override {
    x_.reset_data();
    y_.reset_data();
    gx.reset();
    gy.reset();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor& g = grads[0];
    const bool want_x = should_compute_output(0), want_y = should_compute_output(1);
    if (!g.defined() || !(want_x || want_y)) return {Tensor(), Tensor()};
    Tensor x = x_.unpack();
    Tensor y = y_.unpack();
    at::AutoDispatchBelowADInplaceOrView guard;
    if (eager) {
      eager = false;
      Tensor ax = std::move(gx), ay = std::move(gy);
      gx.reset();
      gy.reset();
      const double s = scalar_value(g);
      if (s != 1.0) {
        if (ax.defined() && ax.numel()) ax.mul_(s);
        if (ay.defined() && ay.numel()) ay.mul_(s);
      }
      return once_differentiable({want_x ? ax : Tensor(), want_y ? ay : Tensor()}, g);
    }
    Tensor ga = g.to(acc_of(x.scalar_type()));
    if (reduction == kMean) ga = ga.div(double(numel));
    auto [bx, by, bw] = ops().huber_bwd.redispatch(kCpuKeys, ga, x, y, std::nullopt, mode, delta, want_x, want_y, false);
    return once_differentiable({want_x ? bx : Tensor(), want_y ? by : Tensor()}, g);
  }
};

std::optional<Tensor> huber_small(PyObject* const* args) {
  auto xo = plain_cpu(args[0]);
  auto yo = plain_cpu(args[1]);
  if (!xo || !yo) return std::nullopt;
  const Tensor& x = *xo;
  const Tensor& y = *yo;
  const at::ScalarType dt = x.scalar_type();
  if (!is_float(dt) || y.scalar_type() != dt || !x.sizes().equals(y.sizes())) return std::nullopt;
  const int64_t numel = x.numel();
  if (numel == 0 || numel > kSmallMaxElements || !x.is_contiguous() || !y.is_contiguous()) return std::nullopt;
  int64_t mode = 0, reduction = 0;
  double delta = 1;
  if (!parse_int(args[2], mode) || !parse_double(args[3], delta) || !parse_int(args[4], reduction)) return std::nullopt;
  if (mode < 0 || mode > 2 || reduction < kNone || reduction > kSum || !(mode == 2 || delta > 0)) return std::nullopt;
  if (at::autocast::is_autocast_enabled(at::kCPU)) return std::nullopt;

  const bool need_x = x.requires_grad(), need_y = y.requires_grad();
  const bool grad = at::GradMode::is_enabled() && (need_x || need_y);
  const bool eager = grad && reduction != kNone && acc_of(dt) == dt;  // float32 / float64, as the Function
  Tensor out, gx, gy;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (reduction == kNone) {
      out = ops().huber_fwd.redispatch(kCpuKeys, x, y, std::nullopt, mode, delta, 0).to(dt);
    } else {
      Tensor partials;
      const double scale = reduction == kMean ? 1.0 / double(numel) : 1.0;
      if (eager) {
        std::tie(partials, gx, gy) = ops().huber_fwd_grad.redispatch(kCpuKeys, x, y, std::nullopt, mode, delta,
                                                                     kHuberPartialBlock, scale, need_x, need_y);
      } else {
        partials = ops().huber_fwd.redispatch(kCpuKeys, x, y, std::nullopt, mode, delta, kHuberPartialBlock);
      }
      // The partial sums are float64; the mean divides in float64 (as the Python Function), then one cast.
      const double total = *partials.sum().data_ptr<double>();
      out = scalar_of(reduction == kMean ? total / double(numel) : total, dt);
    }
  }
  if (grad) {
    auto node = new_node<HuberBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, y));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->y_ = torch::autograd::SavedVariable(y, false);
    node->eager = eager;
    node->gx = gx;
    node->gy = gy;
    node->mode = mode;
    node->delta = delta;
    node->reduction = int(reduction);
    node->numel = numel;
    torch::autograd::set_history(out, node);
  }
  return out;
}

template <std::optional<Tensor> (*Fn)(PyObject* const*), Py_ssize_t Nargs>
PyObject* entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != Nargs) {
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", Nargs, nargs);
    return nullptr;
  }
  std::optional<Tensor> out = Fn(args);
  if (!out) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(*out));
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef small_call_methods[] = {
    {"cross_entropy_small", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&entry<cross_entropy_small, 6>)),
     METH_FASTCALL,
     "cross_entropy_small(input, target, weight, ignore_index, reduction, label_smoothing) -> Tensor | None"},
    {"softmax_focal_small",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&entry<softmax_focal_small, 7>)), METH_FASTCALL,
     "softmax_focal_small(input, target, alpha, gamma, weight, ignore_index, reduction) -> Tensor | None"},
    {"huber_small", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&entry<huber_small, 5>)), METH_FASTCALL,
     "huber_small(input, target, mode, delta, reduction) -> Tensor | None"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace lossfuse
