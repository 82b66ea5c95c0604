"""Cross-entropy: the custom ops, their fake kernels and the autograd Function.

Four ops carry the work, over logits viewed as (N, C, S) -- S the product of any spatial dims, laid out
as lossfuse/_layout.py says:

  lossfuse::cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
      -> (loss[N, S] float32 (float64 for float64 input), lse[N, S] float64)
  lossfuse::cross_entropy_bwd(grad[N, S], input, target, weight, lse, ignore_index, label_smoothing,
                              z_loss, softcap, input_grad, target_grad)
      -> (grad_input like input, grad_target like target)   a 0-element tensor where not requested
  lossfuse::cross_entropy_bwd_inplace(grad, input!, target, weight, lse, ignore_index,
                                      label_smoothing, z_loss, softcap, target_grad) -> grad_target
      the input gradient written over the logits (no second N x C buffer)
  lossfuse::cross_entropy_fused(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                grad_scale) -> (loss, lse, grad_input)
      the forward, and from the same walk the input gradient for the upstream gradient grad_scale on
      every row: the logits are read from memory once instead of twice (the fused path, below; the
      contract is docs/design.md, "The fused gradient")

``target`` is int64 (N, S) class indices or a floating (N, C, S) probability target. ``softcap`` 0
means none. lse is saved in float64 so that the backward can form x - lse without the rounding of a
float32 lse (half an ulp of |lse|). CPU kernels are C++ (csrc/cross_entropy.cpp), CUDA kernels Triton
(lossfuse/triton/cross_entropy.py). Reductions and their denominators are computed here, once, for
every backend.

The fused path (CPU backend, class-index targets, mean or sum, float32 / float64 / bfloat16 logits
requiring grad, not in place, not under torch.compile): the forward calls cross_entropy_fused with
the gradient's scale for grad_output = 1, and backward() hands that tensor back when grad_output is
1 (``loss.backward()``, a training loop without a GradScaler). Any other grad_output: float32 and
float64 scale it (one extra rounding in the accumulation type), bfloat16 -- whose gradient must be
scaled before its one cast (docs/design.md, "Mixed precision") -- discards it and runs the backward kernel.
float16 never takes the path: its users scale the loss (GradScaler), and the work would be wasted.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype, result_dtype
from .._layout import RowShapes, classes_contiguous, empty_like_layout, mean_denominator
from ._common import Op, reduce_rows, row_grads, take_fused_gradient

_lib = torch.library.Library("lossfuse", "FRAGMENT")


def _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    n, _, s = input.shape
    return input.new_empty((n, s), dtype=acc_dtype(input.dtype)), input.new_empty((n, s), dtype=torch.float64)


def _target_grad_fake(input, target, target_grad):
    if target_grad and target.is_floating_point():
        return empty_like_layout(input, dtype=target.dtype)
    return target.new_empty((0,), dtype=target.dtype if target.is_floating_point() else input.dtype)


def _bwd_fake(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, input_grad,
              target_grad):
    gi = empty_like_layout(input) if input_grad else input.new_empty((0,))
    return gi, _target_grad_fake(input, target, target_grad)


def _bwd_inplace_fake(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                      target_grad):
    return _target_grad_fake(input, target, target_grad)


def _fused_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    return _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap) + (empty_like_layout(input),)


CE_FWD = Op(
    _lib,
    "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)",
    _fwd_fake,
    triton="lossfuse.triton.cross_entropy.cross_entropy_fwd",
)
CE_BWD = Op(
    _lib,
    "cross_entropy_bwd(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool input_grad, "
    "bool target_grad) -> (Tensor, Tensor)",
    _bwd_fake,
    triton="lossfuse.triton.cross_entropy.cross_entropy_bwd",
)
CE_FUSED = Op(
    _lib,
    "cross_entropy_fused(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float grad_scale) -> (Tensor, Tensor, Tensor)",
    _fused_fake,
    triton="lossfuse.triton.cross_entropy.cross_entropy_fused",
)
CE_BWD_INPLACE = Op(
    _lib,
    "cross_entropy_bwd_inplace(Tensor grad, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool target_grad) -> Tensor",
    _bwd_inplace_fake,
    triton="lossfuse.triton.cross_entropy.cross_entropy_bwd_inplace",
)


# ----------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy as an autograd Function.

    ``loss, lse = CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, inplace_backward, backend)`` takes arguments already checked
    by :func:`lossfuse.cross_entropy` (use that unless you compose Functions yourself): ``softcap``
    0.0 for none, ``backend`` a resolved name ("cpu" or "triton"). ``lse`` is the per-row
    log-sum-exp of the (soft-capped) logits in float32 (float64 for float64 input), shaped like the
    unreduced loss, non-differentiable.

    Gradients: ``input``, and a floating-point ``target`` when it requires grad. The gradient is
    formed in float32 as grad_output x d(loss)/d(input) and cast to the input's dtype once, so a
    GradScaler's loss scale cannot underflow in fp16 before it is applied. With
    ``inplace_backward`` the input gradient is written over the logits (their version counter is
    bumped, so autograd refuses any later use of the overwritten values).
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, backend, fused=False):
        shapes = RowShapes(input, prefer_tiles=backend == "cpu")
        x3 = shapes.input3d(input)
        prob = target.is_floating_point()
        acc = acc_dtype(input.dtype)
        if prob:
            t = target if target.dtype in (input.dtype, acc) else target.to(acc)
            t3 = shapes.target3d(t, x3)
        else:
            t3 = shapes.rows2d(target if target.dtype == torch.int64 else target.long())
        # The fused walk pays off where rows are walked along their classes (and is only asked for
        # class-index targets: see the module docstring).
        fused = bool(fused) and not prob and not inplace_backward and classes_contiguous(x3) and not shapes.retile
        denom = mean_denominator(t3, weight, ignore_index, prob, acc) if reduction == "mean" else None
        opts = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
        ctx.fused_grad = None
        if fused:
            # 1 / denom in the accumulation type: the value the unfused backward would scale by.
            grad_scale = float(torch.ones((), dtype=acc) / denom) if denom is not None else 1.0
            loss, lse, ctx.fused_grad = CE_FUSED(backend, x3, t3, weight, *opts, grad_scale)
        else:
            loss, lse = CE_FWD(backend, x3, t3, weight, *opts)

        out = reduce_rows(loss, reduction, denom, shapes.row_shape())

        if prob:
            out_dtype = torch.promote_types(input.dtype, target.dtype)
            if torch.is_autocast_enabled(input.device.type):
                out_dtype = torch.float32 if out_dtype != torch.float64 else out_dtype
        else:
            out_dtype = result_dtype(input.dtype, input.device)

        ctx.shapes = shapes
        ctx.reduction = reduction
        ctx.opts = opts
        ctx.inplace = bool(inplace_backward)
        ctx.backend = backend
        ctx.prob = prob
        ctx.target_dtype = target.dtype
        ctx.save_for_backward(x3, t3, weight, lse, denom)
        lse_rows = lse.to(acc).reshape(shapes.row_shape())
        ctx.mark_non_differentiable(lse_rows)
        return out.to(out_dtype), lse_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x3, t3, weight, lse, denom = ctx.saved_tensors
        shapes = ctx.shapes
        need_input = ctx.needs_input_grad[0]
        need_target = ctx.prob and ctx.needs_input_grad[1]
        none = (None,) * 9
        if not (need_input or need_target):
            return (None, None) + none
        gx3 = take_fused_gradient(ctx, grad_out) if need_input else None
        if gx3 is not None:  # the fused path: class-index targets, so no target gradient
            return (shapes.from3d(gx3), None) + none
        grad_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, acc_dtype(x3.dtype))
        if ctx.inplace and need_input:
            gt3 = CE_BWD_INPLACE(ctx.backend, grad_rows, x3, t3, weight, lse, *ctx.opts, need_target)
            # The logits now hold their gradient. Bumping their version makes autograd refuse any
            # node that saved them and runs later, instead of computing with overwritten values.
            torch.autograd.graph.increment_version(x3)
            gx3 = x3
        else:
            gx3, gt3 = CE_BWD(ctx.backend, grad_rows, x3, t3, weight, lse, *ctx.opts, need_input, need_target)
        gx = shapes.from3d(gx3) if need_input else None
        gt = shapes.from3d(gt3).to(ctx.target_dtype) if need_target else None
        return (gx, gt) + none

