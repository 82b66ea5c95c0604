"""Distillation (KL divergence / generalised JSD between the softmax of student and teacher logits at a
temperature): the custom ops, their fake kernels and the autograd Function.

The ops work over both logits viewed as (R, V) rows of class stride 1, one dtype:

  lossfuse::distillation_fwd(student, teacher, target?, ignore_index, temperature, beta, grad?,
                             student_grad, teacher_grad) -> (loss[R], grad_student, grad_teacher)
      the per-row loss (float32; float64 for float64 input) of the distributions at ``temperature``,
      rows whose ``target`` is ``ignore_index`` 0. With ``grad`` (R,) -- the upstream gradient of each
      row with 1 / T and the loss scale folded in -- the gradients asked for come from the same walk
      (the fused path, docs/design.md "The fused gradient"); otherwise 0-element tensors.
  lossfuse::distillation_bwd(grad[R], student, teacher, target?, ignore_index, temperature, beta,
                             student_grad, teacher_grad) -> (grad_student, grad_teacher)
      the same kernel, gradients only.

``beta`` 0 is the forward KL(teacher || student), 1 the reverse KL(student || teacher), in between
liger-kernel's generalised JSD, beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q
(p the teacher's, q the student's distribution); the formulas and their gradients are in
csrc/distillation_kernel.h. The backward recomputes the row statistics from the logits instead of
saving them: two reads of each row, like the forward.

The fused path (CPU backend, mean / batchmean / sum, float32 / float64 / bfloat16, not under
torch.compile): the forward passes the gradient for grad_output = 1 and the kernel writes it in the
walk that computes the loss; backward() hands it out when grad_output is 1, scales it for
float32 / float64 otherwise, and runs the backward kernel for bfloat16 (its gradient must be scaled
before its one cast). float16 never takes it (its users have a GradScaler).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype, result_dtype
from ._common import Op, take_fused_gradient

_lib = torch.library.Library("lossfuse", "FRAGMENT")


def _fwd_fake(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad):
    r, v = student.shape
    loss = student.new_empty((r,), dtype=acc_dtype(student.dtype))
    want = grad is not None
    gs = student.new_empty((r, v)) if want and student_grad else student.new_empty((0,))
    gt = teacher.new_empty((r, v)) if want and teacher_grad else teacher.new_empty((0,))
    return loss, gs, gt


def _bwd_fake(grad, student, teacher, target, ignore_index, temperature, beta, student_grad, teacher_grad):
    _, gs, gt = _fwd_fake(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad)
    return gs, gt


DISTILL_FWD = Op(
    _lib,
    "distillation_fwd(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float temperature, "
    "float beta, Tensor? grad, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)",
    _fwd_fake,
    triton="lossfuse.triton.distillation.distillation_fwd",
)
DISTILL_BWD = Op(
    _lib,
    "distillation_bwd(Tensor grad, Tensor student, Tensor teacher, Tensor? target, int ignore_index, "
    "float temperature, float beta, bool student_grad, bool teacher_grad) -> (Tensor, Tensor)",
    _bwd_fake,
    triton="lossfuse.triton.distillation.distillation_bwd",
)

REDUCTIONS = ("none", "mean", "batchmean", "sum")
# The dtypes whose forward writes the gradient (see the module docstring).
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class Rows:
    """(N, V) or (N, V, d1, ..., dk) logits as (R, V) rows of class stride 1, and back. (N, V) with
    class stride 1 is a view; the spatial form is a view for channels-last storage, a copy otherwise."""

    def __init__(self, x: torch.Tensor):
        self.shape = tuple(x.shape)
        self.v = x.shape[1]

    def to2d(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, self.v)
        return x2 if self.v <= 1 or x2.stride(1) == 1 else x2.contiguous()

    def from2d(self, g2: torch.Tensor) -> torch.Tensor:
        if len(self.shape) == 2:
            return g2
        return g2.reshape((self.shape[0],) + self.shape[2:] + (self.v,)).movedim(-1, 1)

    def row_shape(self) -> tuple:
        return (self.shape[0],) + self.shape[2:]


def loss_scale(temperature: float, scale_by_t2: bool) -> float:
    return temperature * temperature if scale_by_t2 else 1.0


def denominator(reduction: str, y, r: int, v: int, ignore_index: int, acc, device):
    """batchmean: the rows kept; mean: their elements (rows x V), as kl_div's element mean. A device
    tensor, made there (no host round trip on CUDA)."""
    if reduction not in ("mean", "batchmean"):
        return None
    if y is None:
        kept = torch.full((), float(r), dtype=acc, device=device)
    else:
        kept = torch.count_nonzero(y != ignore_index).to(acc)
    return kept * v if reduction == "mean" else kept


def scales(temperature: float, scale_by_t2: bool, reduction: str, y, r: int, v: int, ignore_index: int, acc, device):
    """(loss scale, the gradient's factor loss scale / T, the mean's denominator)."""
    scale = loss_scale(temperature, scale_by_t2)
    return scale, scale / temperature, denominator(reduction, y, r, v, ignore_index, acc, device)


def reduce_loss(loss, scale: float, reduction: str, denom, row_shape):
    """The per-row losses (of the kernel, before the loss scale) reduced."""
    loss = loss * scale if scale != 1.0 else loss
    if reduction == "none":
        return loss.reshape(row_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denom


def row_grads(grad_out, reduction: str, denom, r: int, acc, factor: float) -> torch.Tensor:
    """Each row's upstream gradient times ``factor`` (loss scale / T), in the accumulation type: the
    kernel multiplies its fp32 gradient by it and casts once (docs/design.md, "Mixed precision")."""
    g = grad_out.to(acc)
    if reduction == "none":
        return (g.reshape(r) * factor).contiguous()
    if denom is not None:
        g = g / denom
    return (g * factor).expand(r)


class DistillationFunction(torch.autograd.Function):
    """``DistillationFunction.apply(student, teacher, target, ignore_index, temperature, beta,
    reduction, scale_by_t2, backend, fused)`` with arguments checked by
    :func:`lossfuse.distillation_loss`; ``target`` None or int64 of the logits' shape without dim 1,
    ``backend`` a resolved name. Gradients: the student's, and the teacher's when it requires grad."""

    @staticmethod
    def forward(ctx, student, teacher, target, ignore_index, temperature, beta, reduction, scale_by_t2, backend,
                fused=False):
        rows = Rows(student)
        s2 = rows.to2d(student)
        # One dtype for both (the student's): a teacher of another dtype is converted once.
        t2 = rows.to2d(teacher if teacher.dtype == student.dtype else teacher.to(student.dtype))
        y = None if target is None else target.reshape(-1).long()
        r, v = s2.shape
        acc = acc_dtype(student.dtype)
        scale, factor, denom = scales(temperature, scale_by_t2, reduction, y, r, v, ignore_index, acc, student.device)
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        opts = (int(ignore_index), float(temperature), float(beta))
        ctx.fused_grads = None
        if fused and (need_s or need_t):
            g = row_grads(torch.ones((), dtype=acc, device=student.device), reduction, denom, r, acc, factor)
            loss, gs, gt = DISTILL_FWD(backend, s2, t2, y, *opts, g, need_s, need_t)
            ctx.fused_grads = (gs if need_s else None, gt if need_t else None)
        else:
            loss, _, _ = DISTILL_FWD(backend, s2, t2, y, *opts, None, False, False)
        out = reduce_loss(loss, scale, reduction, denom, rows.row_shape())
        ctx.rows, ctx.reduction, ctx.opts, ctx.backend, ctx.factor = rows, reduction, opts, backend, factor
        ctx.dtypes = (student.dtype, teacher.dtype)
        ctx.save_for_backward(s2, t2, y, denom)
        return out.to(result_dtype(student.dtype, student.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        s2, t2, y, denom = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 8
        grads = _take_fused(ctx, grad_out)
        if grads is None:
            r = s2.shape[0]
            g = row_grads(grad_out, ctx.reduction, denom, r, acc_dtype(s2.dtype), ctx.factor)
            grads = DISTILL_BWD(ctx.backend, g, s2, t2, y, *ctx.opts, need_s, need_t)
        gs, gt = grads
        gs = ctx.rows.from2d(gs) if need_s else None
        gt = ctx.rows.from2d(gt).to(ctx.dtypes[1]) if need_t else None
        return (gs, gt) + none


def _take_fused(ctx, grad_out):
    """The forward's gradients for this grad_output (take_fused_gradient, for two tensors), or None."""
    fused, ctx.fused_grads = ctx.fused_grads, None
    if fused is None:
        return None
    out = []
    for g in fused:
        if g is None:
            out.append(None)
            continue
        ctx.fused_grad = g
        taken = take_fused_gradient(ctx, grad_out)
        if taken is None:
            return None
        out.append(taken)
    return tuple(out)
