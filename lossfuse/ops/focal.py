"""Focal losses: the custom ops, their fake kernels and the autograd Functions.

Sigmoid focal loss, elementwise (torchvision.ops.sigmoid_focal_loss):

  lossfuse::sigmoid_focal_fwd(input, target, alpha, gamma, sum_block, grad_scale) -> (loss, grad_input)
      sum_block == 0: the per-element loss, shaped like input; sum_block > 0: one partial sum per
      sum_block consecutive elements (flat order), shape (ceil(numel / sum_block),). float32 (float64
      for float64 input). Summing in fixed blocks keeps the result independent of the thread count.
      grad_scale None: grad_input is a 0-element tensor; else the gradient for the upstream gradient
      grad_scale on every element (the backward op's result for a scalar grad), from the same pass.
  lossfuse::sigmoid_focal_bwd(grad, input, target, alpha, gamma) -> grad_input (contiguous, input's dtype)
      grad: 0-dim (one upstream gradient for every element: mean/sum) or shaped like input.

  ``input`` is contiguous; ``target`` is a float tensor of input's shape (soft targets allowed), or
  int64 class indices (N,) of an (N, C) input where index C means background (all negatives) -- the
  one-hot is never materialised. alpha < 0 disables the alpha term.

Softmax focal loss, per row, over logits viewed as (N, C, S) exactly as cross-entropy's:

  lossfuse::softmax_focal_fwd(input, target, scale, alpha, gamma, ignore_index, grad_scale)
      -> (loss, lse, dscale, grad_input)
      loss, lse, dscale: (N, S) float32 (float64 for float64 input). The class factor of row n is
      K = alpha * scale[y_n] (scale None: alpha): ``scale`` holds alpha_c * w_c. dscale is the
      per-row factor of the gradient, d loss / d x_c = dscale * (p_c - [c = y]) (csrc/focal_kernel.h).
      grad_input as in the sigmoid op: empty, or the gradient for the upstream gradient grad_scale
      on every row, written while each row is still in cache.
  lossfuse::softmax_focal_bwd(grad, input, target, lse, dscale, ignore_index) -> grad_input
      laid out as empty_like_layout(input); grad is the (N, S) upstream gradient per row.

CPU kernels are C++ (csrc/focal.cpp), CUDA kernels Triton (lossfuse/triton/focal.py). Reductions and
their denominators are computed here, once, for every backend.

The fused path (mean or sum, input requiring grad, not under torch.compile): the forward op also
writes the gradient for grad_output = 1, sharing one pass over the input -- and its transcendental
work -- with the loss.
- CPU, float32/float64: backward() hands that tensor back as it is when grad_output is 1
  (``loss.backward()``), else scales it: one extra float32 rounding, which is why float16/bfloat16
  inputs (whose gradient must be scaled before its single cast, docs/design.md, "Mixed precision")
  do not take this path there.
- Triton, float32/bfloat16 (TRITON_FUSED_DTYPES): checking grad_output == 1 on the host would be a
  device sync, so backward() always launches a fused_bwd op whose kernel reads grad_output on the
  device, returns at once when it is 1 and otherwise recomputes the gradient from the input, rounded
  once. The softmax loss's mean scale 1 / denom stays a device tensor
  (lossfuse::softmax_focal_fused_scaled); the sigmoid loss's 1 / numel is known on the host.

  lossfuse::sigmoid_focal_fused_bwd(grad_output, grad, grad_input!, input, target, alpha, gamma)
  lossfuse::softmax_focal_fused_scaled(input, target, scale, alpha, gamma, ignore_index, grad_scale)
      -> as softmax_focal_fwd; grad_scale a one-value tensor (None: 1)
  lossfuse::softmax_focal_fused_bwd(grad_output, grad, grad_input!, input, target, lse, dscale, ignore_index)
      CUDA only: the backwards of the forwards above, ``grad`` the unfused backward's upstream
      gradient (the scalar, or the (N, S) rows), used only when grad_output is not 1.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype, reciprocal_as, result_dtype
from .._layout import RowShapes, empty_like_layout, mean_denominator
from ._common import Op, cuda_only, reduce_rows, row_grads, take_fused_gradient

# Elements per partial sum of a reduced sigmoid focal loss (every backend sums in these blocks).
SUM_BLOCK = 4096

_lib = torch.library.Library("lossfuse", "FRAGMENT")
def _sigmoid_fwd_fake(input, target, alpha, gamma, sum_block, grad_scale):
    acc = acc_dtype(input.dtype)
    if sum_block == 0:
        loss = input.new_empty(input.shape, dtype=acc)
    else:
        loss = input.new_empty((-(-input.numel() // sum_block),), dtype=acc)
    return loss, input.new_empty(input.shape if grad_scale is not None else (0,))


def _sigmoid_bwd_fake(grad, input, target, alpha, gamma):
    return input.new_empty(input.shape)


def _softmax_fwd_fake(input, target, scale, alpha, gamma, ignore_index, grad_scale):
    n, _, s = input.shape
    acc = acc_dtype(input.dtype)
    gx = empty_like_layout(input) if grad_scale is not None else input.new_empty((0,))
    return tuple(input.new_empty((n, s), dtype=acc) for _ in range(3)) + (gx,)


def _softmax_bwd_fake(grad, input, target, lse, dscale, ignore_index):
    return empty_like_layout(input)


def _softmax_fused_scaled_fake(input, target, scale, alpha, gamma, ignore_index, grad_scale):
    return _softmax_fwd_fake(input, target, scale, alpha, gamma, ignore_index, 1.0)


SIGMOID_FOCAL_FWD = Op(
    _lib,
    "sigmoid_focal_fwd(Tensor input, Tensor target, float alpha, float gamma, int sum_block, "
    "float? grad_scale) -> (Tensor, Tensor)",
    _sigmoid_fwd_fake,
    triton="lossfuse.triton.focal.sigmoid_focal_fwd",
)
SIGMOID_FOCAL_BWD = Op(
    _lib,
    "sigmoid_focal_bwd(Tensor grad, Tensor input, Tensor target, float alpha, float gamma) -> Tensor",
    _sigmoid_bwd_fake,
    triton="lossfuse.triton.focal.sigmoid_focal_bwd",
)
SOFTMAX_FOCAL_FWD = Op(
    _lib,
    "softmax_focal_fwd(Tensor input, Tensor target, Tensor? scale, float alpha, float gamma, "
    "int ignore_index, float? grad_scale) -> (Tensor, Tensor, Tensor, Tensor)",
    _softmax_fwd_fake,
    triton="lossfuse.triton.focal.softmax_focal_fwd",
)
SOFTMAX_FOCAL_BWD = Op(
    _lib,
    "softmax_focal_bwd(Tensor grad, Tensor input, Tensor target, Tensor lse, Tensor dscale, "
    "int ignore_index) -> Tensor",
    _softmax_bwd_fake,
    triton="lossfuse.triton.focal.softmax_focal_bwd",
)
# The CUDA fused path (see the module docstring): the softmax loss's gradient scale is a device tensor,
# and both backwards decide on the device whether the forward's gradient stands.
SIGMOID_FOCAL_FUSED_BWD = Op(
    _lib,
    "sigmoid_focal_fused_bwd(Tensor grad_output, Tensor grad, Tensor(a!) grad_input, Tensor input, Tensor target, "
    "float alpha, float gamma) -> ()",
    lambda *args: None,
    triton="lossfuse.triton.focal.sigmoid_focal_fused_bwd",
)
SOFTMAX_FOCAL_FUSED_SCALED = Op(
    _lib,
    "softmax_focal_fused_scaled(Tensor input, Tensor target, Tensor? scale, float alpha, float gamma, "
    "int ignore_index, Tensor? grad_scale) -> (Tensor, Tensor, Tensor, Tensor)",
    _softmax_fused_scaled_fake,
    triton="lossfuse.triton.focal.softmax_focal_fused_scaled",
)
SOFTMAX_FOCAL_FUSED_BWD = Op(
    _lib,
    "softmax_focal_fused_bwd(Tensor grad_output, Tensor grad, Tensor(a!) grad_input, Tensor input, Tensor target, "
    "Tensor lse, Tensor dscale, int ignore_index) -> ()",
    lambda *args: None,
    triton="lossfuse.triton.focal.softmax_focal_fused_bwd",
)
cuda_only(_lib, SIGMOID_FOCAL_FUSED_BWD, SOFTMAX_FOCAL_FUSED_SCALED, SOFTMAX_FOCAL_FUSED_BWD)


# ----------------------------------------------------------------------------------------------
# Sigmoid focal loss.
# ----------------------------------------------------------------------------------------------


class SigmoidFocalFunction(torch.autograd.Function):
    """Fused sigmoid focal loss as an autograd Function.

    ``SigmoidFocalFunction.apply(inputs, targets, alpha, gamma, reduction, backend, fused)`` takes
    arguments already checked by :func:`lossfuse.sigmoid_focal_loss` (use that unless you compose
    Functions yourself); ``backend`` is a resolved name, "cpu" or "triton"; ``fused`` is
    :func:`fused_gradient`'s answer. Gradient: ``inputs`` only (the functional routes float targets
    that require grad to the reference backend). The gradient is formed in float32 as
    grad_output x d(loss)/d(input) and cast to the input's dtype once.
    """

    @staticmethod
    def forward(ctx, inputs, targets, alpha, gamma, reduction, backend, fused):
        x = inputs.contiguous()
        acc = acc_dtype(inputs.dtype)
        if targets.is_floating_point():
            t = targets if targets.dtype in (inputs.dtype, acc) else targets.to(acc)
            out_dtype = torch.promote_types(inputs.dtype, targets.dtype)
            if out_dtype != torch.float64 and torch.is_autocast_enabled(inputs.device.type):
                out_dtype = torch.float32
        else:
            t = targets
            out_dtype = result_dtype(inputs.dtype, inputs.device)
        t = t.contiguous()
        alpha, gamma = float(alpha), float(gamma)
        if reduction == "none":
            out, _ = SIGMOID_FOCAL_FWD(backend, x, t, alpha, gamma, 0, None)
        else:
            scale = None
            if fused:
                scale = 1.0
                if reduction == "mean" and x.numel():
                    # The C++ kernel rounds the float64 1/numel once. The Triton backward may recompute
                    # with the unfused grad_output / numel, so its forward takes that division's bits.
                    scale = reciprocal_as(x.numel(), acc) if backend == "triton" else 1.0 / x.numel()
            partial, ctx.fused_grad = SIGMOID_FOCAL_FWD(backend, x, t, alpha, gamma, SUM_BLOCK, scale)
            out = partial.sum()
            if reduction == "mean":
                out = out / x.numel()  # 0 / 0 = NaN for an empty input, as torchvision's .mean()
        if not fused:
            ctx.fused_grad = None
        ctx.alpha, ctx.gamma, ctx.reduction, ctx.backend = alpha, gamma, reduction, backend
        ctx.save_for_backward(x, t)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        acc = acc_dtype(x.dtype)
        if ctx.backend == "triton" and ctx.fused_grad is not None:
            # Handed out once (a retained graph's second backward recomputes below); whether
            # grad_output is 1 is decided by the kernel, on the device.
            gx, ctx.fused_grad = ctx.fused_grad, None
            go = grad_out.to(acc)
            g = go / x.numel() if ctx.reduction == "mean" else go
            SIGMOID_FOCAL_FUSED_BWD(ctx.backend, go, g, gx, x, t, ctx.alpha, ctx.gamma)
            return gx, None, None, None, None, None, None
        gx = take_fused_gradient(ctx, grad_out)
        if gx is not None:
            return gx, None, None, None, None, None, None
        if ctx.reduction == "none":
            if grad_out.dim() and all(st == 0 for st in grad_out.stride()):
                grad_out = grad_out.as_strided((), ())  # an expanded scalar (e.g. from .sum()): no copy
            grad = grad_out.to(acc)
            grad = grad if grad.dim() == 0 else grad.contiguous()
        elif ctx.reduction == "sum":
            grad = grad_out.to(acc)
        else:
            # float32 division: the cast to the input's dtype happens once, inside the kernel.
            grad = grad_out.to(acc) / x.numel()
        gx = SIGMOID_FOCAL_BWD(ctx.backend, grad, x, t, ctx.alpha, ctx.gamma)
        return gx, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Softmax focal loss.
# ----------------------------------------------------------------------------------------------


def class_scale(alpha, weight, acc):
    """(scale, alpha) for the ops: K_y = alpha * scale[y] = alpha_y * w_y.

    alpha None keeps the weight itself as the scale (so K_y is w_y bit for bit, as in cross-entropy);
    a float alpha stays a scalar; a per-class alpha is multiplied into the weight once, here.
    """
    if alpha is None or not torch.is_tensor(alpha):
        return weight, 1.0 if alpha is None else float(alpha)
    a = alpha.to(acc)
    return (a if weight is None else a * weight.to(acc)), 1.0


class SoftmaxFocalFunction(torch.autograd.Function):
    """Fused softmax focal loss as an autograd Function.

    ``SoftmaxFocalFunction.apply(input, target, alpha, gamma, weight, ignore_index, reduction,
    backend, fused)`` takes arguments already checked by :func:`lossfuse.softmax_focal_loss`.
    Gradient: ``input``. Mean divides by the summed weight of the rows not ignored (cross-entropy's
    rule).
    """

    @staticmethod
    def forward(ctx, input, target, alpha, gamma, weight, ignore_index, reduction, backend, fused):
        shapes = RowShapes(input)
        x3 = shapes.input3d(input)
        t3 = shapes.rows2d(target if target.dtype == torch.int64 else target.long())
        acc = acc_dtype(input.dtype)
        scale, alpha_f = class_scale(alpha, weight, acc)
        denom = mean_denominator(t3, weight, ignore_index, False, acc) if reduction == "mean" else None
        if fused and backend == "triton":
            # 1 / denom on the device (IEEE division, the value the unfused backward scales by): the
            # kernel reads it from memory, the host never waits for the count of kept rows.
            grad_scale = torch.reciprocal(denom) if denom is not None else None
            loss, lse, dscale, ctx.fused_grad = SOFTMAX_FOCAL_FUSED_SCALED(
                backend, x3, t3, scale, alpha_f, float(gamma), ignore_index, grad_scale,
            )
        else:
            grad_scale = None
            if fused:
                # 1 / denom in float32 (float64), the value the unfused backward would divide out.
                grad_scale = float(torch.ones((), dtype=acc) / denom) if denom is not None else 1.0
            loss, lse, dscale, ctx.fused_grad = SOFTMAX_FOCAL_FWD(
                backend, x3, t3, scale, alpha_f, float(gamma), ignore_index, grad_scale,
            )
        if not fused:
            ctx.fused_grad = None
        out = reduce_rows(loss, reduction, denom, shapes.row_shape())
        ctx.shapes = shapes
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.backend = backend
        ctx.save_for_backward(x3, t3, lse, dscale, denom)
        return out.to(result_dtype(input.dtype, input.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x3, t3, lse, dscale, denom = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        if ctx.backend == "triton" and ctx.fused_grad is not None:
            gx3, ctx.fused_grad = ctx.fused_grad, None  # handed out once, as the sigmoid loss's
            grad_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, lse.dtype)
            SOFTMAX_FOCAL_FUSED_BWD(ctx.backend, grad_out.to(lse.dtype), grad_rows, gx3, x3, t3, lse, dscale,
                                    ctx.ignore_index)
            return ctx.shapes.from3d(gx3), None, None, None, None, None, None, None, None
        gx3 = take_fused_gradient(ctx, grad_out)
        if gx3 is None:
            grad_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, lse.dtype)
            gx3 = SOFTMAX_FOCAL_BWD(ctx.backend, grad_rows, x3, t3, lse, dscale, ctx.ignore_index)
        return ctx.shapes.from3d(gx3), None, None, None, None, None, None, None, None
