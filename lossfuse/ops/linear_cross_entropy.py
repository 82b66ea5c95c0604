"""Fused linear + cross-entropy: ``cross_entropy(input @ W.T + b, target)`` without the full logits.

Rows are processed in chunks; one chunk of logits exists at a time, in one reused buffer. Per chunk:
logits = x_chunk @ W.T (+ b), the cross-entropy forward op (per-row loss, float64 lse), then -- where
gradients are due -- the in-place cross-entropy backward op overwrites the chunk with d loss / d
logits, and grad_input[chunk] = g @ W, grad_W += g.T @ x_chunk (float32 accumulation across chunks).

Two schedules:

- Gradients during the forward pass (three matmuls, as unfused training): when gradients will be
  needed, the reduction is mean or sum, and the compute dtype is fp32/bf16/fp64. grad_output is then a
  scalar: the forward pass computes the gradients for grad_output = 1 into float32 buffers, and the
  backward pass scales them by grad_output in float32 and casts once.
- Recompute in the backward pass (one matmul more): reduction="none" (grad_output per row is unknown
  during the forward pass), and fp16, where a loss scale must be applied before the cast to fp16 or
  small gradients flush to zero. The forward pass is then just the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._utils import acc_dtype
from ._common import take_eager_grads
from .cross_entropy import CE_BWD_INPLACE, CE_FWD

# Default chunk: 1/18 of the rows (5.6% extra memory, under the 6% the benchmark holds it to), but at
# least 224 rows and 2^22 elements, at most 2^26 elements (256 MB in fp32), in multiples of 16 rows.
# Every chunk re-reads W and re-writes the fp32 weight gradient, and thin chunks make slow matmuls: on
# the 2-core CPU machine (torch.mm on MKL, one interleaved run) the three matmuls of 2048 x 256 -> 32000
# fp32 took 1.30x the time of whole-batch ones in 128-row chunks, 1.16x in 256-row chunks, 1.04x in
# 512-row chunks. The 224-row floor leaves 4096 rows at 5.5% (a 256-row chunk there is 6.25%, plus the
# per-row loss and lse) and keeps the 2048 tokens of a small training batch off the thin chunks (11%
# of its logits there).
def default_chunk_size(n: int, v: int) -> int:
    v = max(v, 1)
    rows = min(max(n // 18, 224, (1 << 22) // v), (1 << 26) // v)
    if rows >= n:
        return max(1, n)
    return max(1, rows - rows % 16 if rows > 16 else rows)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``LinearCrossEntropyFunction.apply(input2d, linear_weight, target, linear_bias, weight,
    reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, backend)`` with arguments
    checked by :func:`lossfuse.linear_cross_entropy`: ``input2d`` (N, H), ``target`` (N,) class
    indices or (N, V) probabilities, ``softcap`` 0.0 for none, a resolved ``backend``."""

    @staticmethod
    def forward(ctx, x, W, target, bias, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                chunk_size, backend):
        n = x.shape[0]
        # Under autocast, run the projection in the autocast dtype, as torch's linear would.
        compute = x.dtype
        if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            compute = torch.get_autocast_dtype(x.device.type)
        prob = target.is_floating_point()
        acc = acc_dtype(compute)
        opts = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
        denom = None
        if reduction == "mean":
            if prob:
                denom = torch.tensor(float(n), dtype=acc, device=x.device)
            else:
                keep = target != ignore_index
                denom = keep.sum().to(acc) if weight is None else torch.where(
                    keep, weight.to(acc)[torch.where(keep, target, 0)], 0).sum()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], prob and ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3])
        # float64 takes the recompute schedule too: it is for verification (gradcheck runs many
        # backwards through one graph), and only that schedule supports a second backward.
        eager_grads = any(need) and reduction != "none" and compute in (torch.float32, torch.bfloat16)
        rows = None
        if eager_grads:  # gradients for grad_output = 1, scaled in backward
            one = torch.ones((), dtype=acc, device=x.device)
            rows = (one / denom if denom is not None else one).expand(n, 1)
        loss, lse, grads = _chunks(x, W, target, bias, weight, opts, chunk_size, backend, compute, prob,
                                   rows, need, forward=True)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        ctx.eager = eager_grads
        if eager_grads:
            # Handed out (scaled in place) by the one backward: kept off save_for_backward, whose
            # version checks would see that scaling. A second backward raises rather than scale twice.
            ctx.eager_grads = list(grads)
        else:
            ctx.save_for_backward(x, W, target, bias, weight, lse, denom)
        ctx.args = (reduction, opts, chunk_size, backend, compute, prob, need, x.dtype, W.dtype,
                    None if bias is None else bias.dtype, target.dtype)
        out_dtype = torch.promote_types(compute, target.dtype) if prob else compute
        if torch.is_autocast_enabled(x.device.type) and out_dtype != torch.float64:
            out_dtype = torch.float32
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        reduction, opts, chunk_size, backend, compute, prob, need, xdt, Wdt, bdt, tdt = ctx.args
        acc = acc_dtype(compute)
        g = grad_out.to(acc)
        dtypes = (xdt, Wdt, tdt, bdt)
        if ctx.eager:
            grads = take_eager_grads(
                ctx, g, dtypes,
                "lossfuse.linear_cross_entropy: a second backward through the same graph is not "
                "supported when the gradients were computed during the forward pass (reduction "
                "'mean'/'sum', fp32/bf16). Use reduction='none' followed by .sum()/.mean() for that.")
        else:
            x, W, target, bias, weight, lse, denom = ctx.saved_tensors
            n = x.shape[0]
            if reduction == "none":
                rows = g.reshape(n, 1)
            elif reduction == "sum":
                rows = g.expand(n, 1)
            else:
                rows = (g / denom).expand(n, 1)
            _, _, grads = _chunks(x, W, target, bias, weight, opts, chunk_size, backend, compute, prob, rows,
                                  need, forward=False, lse=lse)
            grads = [None if t is None else t.to(dt) for t, dt in zip(grads, dtypes)]
        gx, gW, gt, gb = grads
        return gx, gW, gt, gb, None, None, None, None, None, None, None, None


def _chunks(x, W, target, bias, weight, opts, chunk_size, backend, compute, prob, rows, need, forward,
            lse=None):
    """One sweep over the row chunks. With ``forward``: per-row loss and lse. With ``rows`` (the
    per-row upstream gradient): the gradients asked for in ``need`` -- input, weight, target, bias --
    in float32 (float64) buffers."""
    n, v = x.shape[0], W.shape[0]
    acc = acc_dtype(compute)
    xc, Wc = x.to(compute), W.to(compute)
    bc = None if bias is None else bias.to(compute)
    need_x, need_W, need_t, need_b = need if rows is not None else (False,) * 4
    loss = torch.empty(n, dtype=acc, device=x.device) if forward else None
    if forward:
        lse = torch.empty(n, dtype=torch.float64, device=x.device)
    gx = torch.empty(x.shape, dtype=acc, device=x.device) if need_x else None
    gW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_W else None
    gb = torch.zeros(v, dtype=acc, device=W.device) if need_b else None
    gt = torch.empty(target.shape, dtype=acc, device=x.device) if need_t else None
    buf = torch.empty((min(chunk_size, n), v), dtype=compute, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for i0 in range(0, n, chunk_size):
            i1 = min(i0 + chunk_size, n)
            logits = _project(xc[i0:i1], Wc, bc, buf[: i1 - i0])
            t = target[i0:i1].unsqueeze(2) if prob else target[i0:i1].unsqueeze(1)
            if forward:
                lc, sc = CE_FWD(backend, logits.unsqueeze(2), t, weight, *opts)
                loss[i0:i1] = lc.view(-1)
                lse[i0:i1] = sc.view(-1)
            if rows is None or not any((need_x, need_W, need_t, need_b)):
                continue
            gt_c = CE_BWD_INPLACE(backend, rows[i0:i1], logits.unsqueeze(2), t, weight, lse[i0:i1].view(-1, 1), *opts,
                       bool(need_t))
            glog = logits  # now d loss / d logits of this chunk
            if need_t:
                gt[i0:i1] = gt_c.view(i1 - i0, v)
            if need_x:
                if compute == acc:
                    torch.mm(glog, Wc, out=gx[i0:i1])
                else:
                    gx[i0:i1] = torch.mm(glog, Wc)
            if need_W:
                if compute == acc:
                    gW.addmm_(glog.t(), xc[i0:i1])
                else:
                    gW.addmm_(glog.t().to(acc), xc[i0:i1].to(acc))
            if need_b:
                gb += glog.sum(0, dtype=acc)
    return loss, lse, (gx, gW, gt, gb)


def _project(x, W, b, out):
    """x @ W.T (+ b) into ``out`` (a reused buffer: no fresh allocation per chunk)."""
    if b is None:
        return torch.mm(x, W.t(), out=out)
    return torch.addmm(b, x, W.t(), out=out)


def reference_linear_cross_entropy(x, W, target, bias, **kw):
    """The definition, full logits and all (the reference backend)."""
    from .. import reference

    return reference.cross_entropy(F.linear(x, W, bias), target, **kw)
