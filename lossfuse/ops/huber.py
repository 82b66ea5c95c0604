"""Huber, SmoothL1 (and L1, SmoothL1's beta = 0): the custom ops, their fake kernels, the layout rule
and the autograd Function.

One op pair serves the three losses, told apart by ``mode`` (HUBER, SMOOTH_L1, L1). SmoothL1(beta)
equals Huber(delta=beta) / beta in exact arithmetic, but not after rounding: torch computes
``z - 0.5 * beta`` and ``0.5 * z * z / beta`` directly, so the kernels do too.

  lossfuse::huber_fwd(input, target, weight, mode, delta, block)
      block == 0: the per-element loss (times weight), float32 (float64 for float64 input), laid out
                  like the input (lossfuse/_layout.py, iteration_order)
      block >  0: float64 partial sums of the loss over blocks of ``block`` consecutive elements,
                  ceil(numel / block) of them: all a mean or sum needs, and no N-element write
  lossfuse::huber_fwd_grad(input, target, weight, mode, delta, block, scale, input_grad, target_grad)
      -> (partials as huber_fwd, grad_input, grad_target): a reducing forward that also writes the
         gradients for a scalar upstream gradient ``scale`` (1/N for mean, 1 for sum) in the same pass
         (see _eager_gradient for when it is used).
  lossfuse::huber_fused_bwd(grad_output, grad, grad_input!, grad_target!, input, target, weight, loss_mode, delta)
      CUDA only: the backward of huber_fwd_grad. It reads grad_output on the device and leaves the
      forward's gradients as they are when it is 1, else rewrites them for the scalar ``grad``.
  lossfuse::huber_bwd(grad, input, target, weight, mode, delta, input_grad, target_grad, weight_grad)
      -> (grad_input, grad_target, grad_weight)  each laid out like the forward's per-element loss,
         in its operand's dtype; a 0-element tensor where not requested.
         grad: 0-dim (mean/sum, already divided by N for mean) or per element ('none'), in the
         accumulation type; the kernels apply it in fp32 before the single cast.

``input``, ``target`` and ``weight`` have one (broadcast) shape -- expanded views, nothing is
materialised -- and any strides. ``target`` and ``weight`` are stored in the input's dtype or the
accumulation type. CPU kernels are C++ (csrc/huber.cpp), CUDA kernels Triton (lossfuse/triton/huber.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype, reciprocal_as
from .._layout import empty_grads_like_walk, empty_like_walk
from ._common import TRITON_FUSED_DTYPES, Op, cuda_only

HUBER, SMOOTH_L1, L1 = 0, 1, 2

# Elements per partial sum of a reducing forward. The partials are float64, so the length of the fp32
# runs inside a block is all that bounds the accumulation error.
PARTIAL_BLOCK = 4096

_lib = torch.library.Library("lossfuse", "FRAGMENT")


def _fwd_fake(input, target, weight, mode, delta, block):
    if block > 0:
        return input.new_empty(((input.numel() + block - 1) // block,), dtype=torch.float64)
    return empty_like_walk(input, target, weight, acc_dtype(input.dtype))


def _bwd_fake(grad, input, target, weight, mode, delta, input_grad, target_grad, weight_grad):
    return empty_grads_like_walk(input, target, weight, input_grad, target_grad, weight_grad)


def _fwd_grad_fake(input, target, weight, mode, delta, block, scale, input_grad, target_grad):
    partials = _fwd_fake(input, target, weight, mode, delta, block)
    gx, gy, _ = _bwd_fake(None, input, target, weight, mode, delta, input_grad, target_grad, False)
    return partials, gx, gy


HUBER_FWD = Op(
    _lib,
    "huber_fwd(Tensor input, Tensor target, Tensor? weight, int mode, float delta, int block) -> Tensor",
    _fwd_fake,
    triton="lossfuse.triton.huber.huber_fwd",
)
HUBER_BWD = Op(
    _lib,
    "huber_bwd(Tensor grad, Tensor input, Tensor target, Tensor? weight, int mode, float delta, "
    "bool input_grad, bool target_grad, bool weight_grad) -> (Tensor, Tensor, Tensor)",
    _bwd_fake,
    triton="lossfuse.triton.huber.huber_bwd",
)
# See EAGER_GRADIENT.
HUBER_FWD_GRAD = Op(
    _lib,
    "huber_fwd_grad(Tensor input, Tensor target, Tensor? weight, int mode, float delta, int block, float scale, "
    "bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)",
    _fwd_grad_fake,
    triton="lossfuse.triton.huber.huber_fwd_grad",
)
HUBER_FUSED_BWD = Op(
    _lib,
    # loss_mode, not mode: torch's auto_functionalize passes a mutating op's arguments by name next to
    # its own ``mode`` argument
    "huber_fused_bwd(Tensor grad_output, Tensor grad, Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor input, "
    "Tensor target, Tensor? weight, int loss_mode, float delta) -> ()",
    lambda *args: None,
    triton="lossfuse.triton.huber.huber_fused_bwd",
)
cuda_only(_lib, HUBER_FUSED_BWD)


# ----------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------


# A reducing forward forms the input/target gradient too (lossfuse::huber_fwd_grad), for the usual
# backward's `grad_output = 1`: one pass over input and target instead of two, 3 N instead of 5 N
# elements of memory traffic for a training step. Only in eager mode (under torch.compile the
# backward must not depend on grad_output's value). The CPU backend takes float32/float64 and scales
# the gradient in place for another grad_output (a CPU scalar: reading it is free); an fp16/bf16
# gradient would have to be scaled before its cast, so it is not formed early. The Triton backend
# takes TRITON_FUSED_DTYPES (ops/_common.py): its backward (lossfuse::huber_fused_bwd) reads
# grad_output on the device and recomputes the gradient, rounded once, when it is not 1. Set False to
# always recompute.
EAGER_GRADIENT = True


def _eager_gradient(ctx, input, target, weight, reduction, backend) -> bool:
    need = ctx.needs_input_grad
    return (
        EAGER_GRADIENT
        and ((backend == "cpu" and input.dtype in (torch.float32, torch.float64))
             or (backend == "triton" and input.dtype in TRITON_FUSED_DTYPES))
        and reduction != "none"
        and (need[0] or need[1])
        and not (weight is not None and need[2])
        and target.dtype == input.dtype
        and not torch.compiler.is_compiling()
    )


class HuberFunction(torch.autograd.Function):
    """Fused Huber / SmoothL1 / L1 as an autograd Function.

    ``HuberFunction.apply(input, target, weight, mode, delta, reduction, out_dtype, backend)`` takes
    operands already checked, converted and broadcast to one shape by :func:`lossfuse.huber_loss` /
    :func:`lossfuse.smooth_l1_loss` (use those unless you compose Functions yourself); ``backend`` is a
    resolved name, "cpu" or "triton". Gradients flow to input, target and weight, each formed in fp32
    as grad_output x d(loss)/d(operand) and cast to the operand's dtype once.
    """

    @staticmethod
    def forward(ctx, input, target, weight, mode, delta, reduction, out_dtype, backend):
        n = input.numel()
        ctx.eager_grads = None
        if reduction == "none":
            out = HUBER_FWD(backend, input, target, weight, mode, float(delta), 0)
        else:
            if _eager_gradient(ctx, input, target, weight, reduction, backend):
                scale = 1.0 / n if reduction == "mean" and n > 0 else 1.0
                if backend == "triton" and reduction == "mean" and n > 0:
                    # 1 / N rounded as the unfused backward's grad_output / N (in the accumulation type)
                    scale = reciprocal_as(n, acc_dtype(input.dtype))
                need = ctx.needs_input_grad
                partials, gx, gy = HUBER_FWD_GRAD(backend, input, target, weight, mode, float(delta), PARTIAL_BLOCK, scale,
                                       need[0], need[1])
                # Kept on ctx, not saved: they are not inputs or outputs, and backward hands them out once.
                ctx.eager_grads = (gx, gy)
            else:
                partials = HUBER_FWD(backend, input, target, weight, mode, float(delta), PARTIAL_BLOCK)
            out = partials.sum()
            if reduction == "mean":
                out = out / n  # float64; 0 / 0 = NaN for an empty input, as torch
        ctx.mode = mode
        ctx.delta = float(delta)
        ctx.reduction = reduction
        ctx.backend = backend
        ctx.numel = n
        ctx.save_for_backward(input, target, weight)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, target, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        want_w = weight is not None and need[2]
        if not (need[0] or need[1] or want_w):
            return (None,) * 8
        if ctx.eager_grads is not None:
            # Formed in the forward for grad_output 1; handed out once (a second backward through a
            # retained graph recomputes below), scaled in place for any other grad_output.
            gx, gy = ctx.eager_grads
            ctx.eager_grads = None
            if ctx.backend == "triton":
                go = grad_out.to(acc_dtype(input.dtype))
                g = go / ctx.numel if ctx.reduction == "mean" else go
                HUBER_FUSED_BWD(ctx.backend, go, g, gx, gy, input, target, weight, ctx.mode, ctx.delta)
                return (gx if need[0] else None, gy if need[1] else None, None, None, None, None, None, None)
            g = grad_out.item()  # a CPU scalar: no device sync
            if g != 1.0:
                gx.mul_(g)
                gy.mul_(g)
            return (gx if need[0] else None, gy if need[1] else None, None, None, None, None, None, None)
        g = grad_out.to(acc_dtype(input.dtype))
        if ctx.reduction == "mean":
            # In fp32 (fp64): the cast to the operands' dtypes happens once, inside the kernel.
            g = g / ctx.numel
        gx, gy, gw = HUBER_BWD(
            ctx.backend, g, input, target, weight, ctx.mode, ctx.delta, need[0], need[1], want_w,
        )
        return (gx if need[0] else None, gy if need[1] else None, gw if want_w else None,
                None, None, None, None, None)
