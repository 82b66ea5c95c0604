"""Fused linear + distillation: ``distillation_loss(x_s @ W_s.T, x_t @ W_t.T, ...)`` without either
model's full logits.

Rows go through both output layers in chunks, as lossfuse/ops/linear_cross_entropy.py does: per chunk,
student and teacher logits into two reused buffers, the distillation op (lossfuse/ops/distillation.py)
on them -- its per-row loss and, where gradients are due, the student's logit gradient from the same
walk -- then grad_x[chunk] = G W_s and grad_W_s += G^T x_chunk (float32 accumulation across chunks).
The teacher gets no gradient (its logits are computed without one).

Two schedules, as linear_cross_entropy's: gradients during the forward pass (reduction mean /
batchmean / sum, float32 / bfloat16), scaled by grad_output in the backward in float32 -- a second
backward through the same graph then raises; or recompute in the backward (reduction 'none', float16
-- whose loss scale must be applied before the cast -- and float64, which gradcheck differentiates
more than once).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype, result_dtype
from ._common import take_eager_grads
from .distillation import DISTILL_FWD, reduce_loss, row_grads, scales

# Default chunk: 1/40 of the logits, at least 2^21 elements. Three chunk-sized buffers exist at once
# (student logits, teacher logits, the student's logit gradient): 7.5% of one full logits tensor.
def default_chunk_size(n: int, v: int) -> int:
    elements = min(max(n * v // 40, 1 << 21), 1 << 26)
    return max(1, min(n, elements // max(v, 1)))


class LinearDistillationFunction(torch.autograd.Function):
    """``LinearDistillationFunction.apply(x_s, W_s, x_t, W_t, target, ignore_index, temperature, beta,
    reduction, scale_by_t2, chunk_size, backend)`` with arguments checked by
    :func:`lossfuse.linear_distillation_loss`: ``x_s`` (N, H_s), ``W_s`` (V, H_s), ``x_t`` (N, H_t),
    ``W_t`` (V, H_t), ``target`` None or int64 (N,). Gradients: ``x_s`` and ``W_s``."""

    @staticmethod
    def forward(ctx, xs, Ws, xt, Wt, target, ignore_index, temperature, beta, reduction, scale_by_t2, chunk_size,
                backend):
        n, v = xs.shape[0], Ws.shape[0]
        acc = acc_dtype(xs.dtype)
        scale, factor, denom = scales(temperature, scale_by_t2, reduction, target, n, v, ignore_index, acc, xs.device)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        eager = any(need) and reduction != "none" and xs.dtype in (torch.float32, torch.bfloat16)
        opts = (int(ignore_index), float(temperature), float(beta))
        g = row_grads(torch.ones((), dtype=acc, device=xs.device), reduction, denom, n, acc, factor) if eager else None
        loss, grads = _chunks(xs, Ws, xt, Wt, target, opts, chunk_size, backend, g, need)
        out = reduce_loss(loss, scale, reduction, denom, (n,))
        ctx.eager = eager
        if eager:
            ctx.eager_grads = list(grads)  # handed out (scaled in place) by the one backward
        else:
            ctx.save_for_backward(xs, Ws, xt, Wt, target, denom)
        ctx.args = (reduction, opts, chunk_size, backend, need, factor, xs.dtype, Ws.dtype)
        return out.to(result_dtype(xs.dtype, xs.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        reduction, opts, chunk_size, backend, need, factor, xdt, Wdt = ctx.args
        acc = acc_dtype(xdt)
        if ctx.eager:
            grads = take_eager_grads(
                ctx, grad_out.to(acc), (xdt, Wdt),
                "lossfuse.linear_distillation_loss: a second backward through the same graph is not supported "
                "when the gradients were computed during the forward pass (reduction 'mean'/'batchmean'/'sum', "
                "fp32/bf16). Use reduction='none' followed by a sum for that.")
        else:
            xs, Ws, xt, Wt, target, denom = ctx.saved_tensors
            rows = row_grads(grad_out, reduction, denom, xs.shape[0], acc, factor)
            _, grads = _chunks(xs, Ws, xt, Wt, target, opts, chunk_size, backend, rows, need)
            grads = [None if t is None else t.to(dt) for t, dt in zip(grads, (xdt, Wdt))]
        gx, gW = grads
        return (gx, gW) + (None,) * 10


def _chunks(xs, Ws, xt, Wt, target, opts, chunk_size, backend, rows, need):
    """One sweep over the row chunks: the per-row loss and, with ``rows`` (each row's upstream gradient,
    1 / T and the loss scale folded in), the gradients of x_s and W_s in float32 (float64) buffers."""
    n, v = xs.shape[0], Ws.shape[0]
    acc = acc_dtype(xs.dtype)
    want = rows is not None and any(need)
    need_x, need_W = need if want else (False, False)
    loss = torch.empty(n, dtype=acc, device=xs.device)
    gx = torch.empty(xs.shape, dtype=acc, device=xs.device) if need_x else None
    gW = torch.zeros(Ws.shape, dtype=acc, device=Ws.device) if need_W else None
    m = min(chunk_size, n)
    bs = torch.empty((m, v), dtype=xs.dtype, device=xs.device)
    bt = torch.empty((m, v), dtype=xt.dtype, device=xt.device)
    with torch.autocast(xs.device.type, enabled=False):
        for i0 in range(0, n, chunk_size):
            i1 = min(i0 + chunk_size, n)
            s = torch.mm(xs[i0:i1], Ws.t(), out=bs[: i1 - i0])
            t = torch.mm(xt[i0:i1], Wt.t(), out=bt[: i1 - i0])
            if t.dtype != s.dtype:
                t = t.to(s.dtype)
            y = None if target is None else target[i0:i1]
            lc, gs, _ = DISTILL_FWD(backend, s, t, y, *opts, rows[i0:i1] if want else None, want, False)
            loss[i0:i1] = lc
            if not want:
                continue
            if need_x:
                if xs.dtype == acc:
                    torch.mm(gs, Ws, out=gx[i0:i1])
                else:
                    gx[i0:i1] = torch.mm(gs, Ws)
            if need_W:
                if xs.dtype == acc:
                    gW.addmm_(gs.t(), xs[i0:i1])
                else:
                    gW.addmm_(gs.t().to(acc), xs[i0:i1].to(acc))
            del gs
    return loss, (gx, gW)
