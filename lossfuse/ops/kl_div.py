"""kl_div (torch.nn.functional.kl_div's elementwise KL term): the custom ops, their fake kernels and the
autograd Function.

  lossfuse::kl_div_fwd(input, target, log_target, block)
      block == 0: the per-element loss, float32 (float64 for float64 input), the input's shape
      block >  0: float64 partial sums of the loss over blocks of ``block`` consecutive elements
  lossfuse::kl_div_bwd(grad, input, target, log_target, input_grad, target_grad) -> (grad_input, grad_target)
      grad 0-dim (reduced; the mean's or batchmean's division already applied) or per element, in the
      accumulation type: the kernel multiplies in fp32 and casts once. 0-element tensors where not asked.

``input`` and ``target`` are contiguous, of one shape and one dtype (lossfuse.kl_div broadcasts and
converts them first). The terms (``0 log 0 = 0``; the target's gradient at 0 is NaN, as torch's) are in
csrc/kl_div_kernel.h; CUDA kernels in lossfuse/triton/kl_div.py.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype
from ._common import Op

# Elements per partial sum of a reduced forward (float64 partials: only the fp32 runs inside a block
# carry rounding).
PARTIAL_BLOCK = 4096

_lib = torch.library.Library("lossfuse", "FRAGMENT")


def _fwd_fake(input, target, log_target, block):
    if block > 0:
        return input.new_empty(((input.numel() + block - 1) // block,), dtype=torch.float64)
    return input.new_empty(input.shape, dtype=acc_dtype(input.dtype))


def _bwd_fake(grad, input, target, log_target, input_grad, target_grad):
    gx = input.new_empty(input.shape) if input_grad else input.new_empty((0,))
    gt = target.new_empty(target.shape) if target_grad else target.new_empty((0,))
    return gx, gt


KL_FWD = Op(_lib, "kl_div_fwd(Tensor input, Tensor target, bool log_target, int block) -> Tensor", _fwd_fake,
            triton="lossfuse.triton.kl_div.kl_div_fwd")
KL_BWD = Op(_lib, "kl_div_bwd(Tensor grad, Tensor input, Tensor target, bool log_target, bool input_grad, "
                  "bool target_grad) -> (Tensor, Tensor)", _bwd_fake,
            triton="lossfuse.triton.kl_div.kl_div_bwd")

REDUCTIONS = ("none", "mean", "batchmean", "sum")


class KLDivFunction(torch.autograd.Function):
    """``KLDivFunction.apply(input, target, log_target, reduction, out_dtype, backend)`` with operands
    checked, broadcast to one contiguous shape and converted to one dtype by :func:`lossfuse.kl_div`;
    ``batch`` the denominator of batchmean (the input's first dim). Gradients to both operands."""

    @staticmethod
    def forward(ctx, input, target, log_target, reduction, batch, out_dtype, backend):
        n = input.numel()
        ctx.args = (bool(log_target), reduction, n, batch, backend)
        ctx.save_for_backward(input, target)
        if reduction == "none":
            out = KL_FWD(backend, input, target, bool(log_target), 0)
        else:
            out = KL_FWD(backend, input, target, bool(log_target), PARTIAL_BLOCK).sum()
            if reduction == "mean":
                out = out / n  # float64; 0 / 0 = NaN for an empty input, as torch
            elif reduction == "batchmean":
                out = out / batch
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, target = ctx.saved_tensors
        log_target, reduction, n, batch, backend = ctx.args
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_t):
            return (None,) * 7
        g = grad_out.to(acc_dtype(input.dtype))
        if reduction == "mean":
            g = g / n
        elif reduction == "batchmean":
            g = g / batch
        gx, gt = KL_BWD(backend, g.contiguous(), input, target, log_target, need_x, need_t)
        return (gx if need_x else None, gt if need_t else None) + (None,) * 5
