"""Distillation Triton kernel and its launchers: the CUDA implementation of lossfuse::distillation_fwd
and distillation_bwd (lossfuse/ops/distillation.py), and with TRITON_INTERPRET=1 a CPU one for testing.

  distillation_fwd(student, teacher, target, ignore_index, temperature, beta, grad, student_grad,
                   teacher_grad) -> (loss[R], grad_student, grad_teacher)
  distillation_bwd(grad, student, teacher, target, ...) -> (grad_student, grad_teacher)

One program per row of the (R, V) logits, looping over the vocabulary in BLOCK_V chunks: walk 1 the
online max / sum-exp of both rows, walk 2 the row's sums (forward KL's student gradient written on the
way), walk 3 the gradients that need those sums -- the formulas of csrc/distillation_kernel.h, with
q - p formed as max(q, p) * expm1(-|d|) (no cancellation) and the JSD's log m from a log1p. The later
walks re-read the row from L2 (two rows of 32000 bf16 are 128 KB). Loads in the input dtype, fp32 math,
each gradient formed whole in fp32 with the row's upstream gradient and cast once at the store; int64
offsets; core ``tl`` ops only (Triton 3.x).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import acc_dtype
from ._math import expm1, log1p

__all__ = ["distillation_fwd", "distillation_bwd"]

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _row_lse(x_ptr, V, inv, BLOCK_V: tl.constexpr):
    """log sum_c exp(x_c inv), online over the chunks."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.zeros((), tl.float32)
    for c0 in range(0, V, BLOCK_V):
        c = c0 + cols
        x = tl.load(x_ptr + c, mask=c < V, other=float("-inf")).to(tl.float32) * inv
        bm = tl.maximum(m, tl.max(x, 0))
        safe = tl.where(bm == _NEG_INF, 0.0, bm)
        acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
        m = bm
    return tl.where(m == _NEG_INF, m, m + tl.log(acc))


@triton.jit
def _elems(s_ptr, t_ptr, c, V, inv, lse_s, lse_t):
    mask = c < V
    s = tl.load(s_ptr + c, mask=mask, other=0.0).to(tl.float32) * inv
    t = tl.load(t_ptr + c, mask=mask, other=0.0).to(tl.float32) * inv
    a = s - lse_s
    b = t - lse_t
    d = (s - t) - (lse_s - lse_t)
    return mask, tl.exp(a), tl.exp(b), d


@triton.jit
def _q_minus_p(q, p, d):
    e = tl.where(d > 0.0, q, p) * expm1(-tl.abs(d))  # -|q - p|
    return tl.where(d > 0.0, -e, e)


@triton.jit
def _jsd_logs(d, lr, nla, nlb):
    """a - log m and b - log m (csrc/distillation_kernel.h, jsd_logs)."""
    u = d + lr
    l1p = log1p(tl.exp(-tl.abs(u)))
    return (nla + tl.minimum(u, 0.0)) - l1p, (nlb + tl.minimum(-u, 0.0)) - l1p


@triton.jit
def _distill_kernel(s_ptr, t_ptr, y_ptr, g_ptr, loss_ptr, gs_ptr, gt_ptr, V, s_sR, t_sR, g_sR, gs_sR, gt_sR,
                    ignore_index, inv, beta, lr, nla, nlb,
                    MODE: tl.constexpr, HAS_Y: tl.constexpr, WANT_GS: tl.constexpr, WANT_GT: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    s_row = s_ptr + r * s_sR
    t_row = t_ptr + r * t_sR
    keep = True
    if HAS_Y:
        keep = tl.load(y_ptr + r) != ignore_index
    if keep:
        lse_s = _row_lse(s_row, V, inv, BLOCK_V)
        lse_t = _row_lse(t_row, V, inv, BLOCK_V)
        g = 0.0
        if WANT_GS or WANT_GT:
            g = tl.load(g_ptr + r * g_sR).to(tl.float32)
        acc0 = tl.zeros((BLOCK_V,), tl.float32)
        acc1 = tl.zeros((BLOCK_V,), tl.float32)
        for c0 in range(0, V, BLOCK_V):
            c = c0 + cols
            mask, q, p, d = _elems(s_row, t_row, c, V, inv, lse_s, lse_t)
            if MODE == 0:
                acc0 += tl.where(mask, -p * d, 0.0)
                if WANT_GS:
                    tl.store(gs_ptr + r * gs_sR + c, (g * _q_minus_p(q, p, d)).to(gs_ptr.dtype.element_ty), mask=mask)
            elif MODE == 1:
                acc0 += tl.where(mask, q * d, 0.0)
            else:
                am, bm = _jsd_logs(d, lr, nla, nlb)
                acc0 += tl.where(mask, (1.0 - beta) * q * am, 0.0)
                acc1 += tl.where(mask, beta * p * bm, 0.0)
        ss = tl.sum(acc0, 0)
        st = tl.sum(acc1, 0)
        loss = ss + st
        tl.store(loss_ptr + r, loss)
        if (MODE != 0 and WANT_GS) or WANT_GT:
            for c0 in range(0, V, BLOCK_V):
                c = c0 + cols
                mask, q, p, d = _elems(s_row, t_row, c, V, inv, lse_s, lse_t)
                if MODE == 0:
                    o_t = p * (-d - loss)
                    o_s = o_t
                elif MODE == 1:
                    o_s = q * (d - loss)
                    o_t = -_q_minus_p(q, p, d)
                else:
                    am, bm = _jsd_logs(d, lr, nla, nlb)
                    o_s = q * ((1.0 - beta) * am - ss)
                    o_t = p * (beta * bm - st)
                if MODE != 0 and WANT_GS:
                    tl.store(gs_ptr + r * gs_sR + c, (g * o_s).to(gs_ptr.dtype.element_ty), mask=mask)
                if WANT_GT:
                    tl.store(gt_ptr + r * gt_sR + c, (g * o_t).to(gt_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + r, 0.0)
        for c0 in range(0, V, BLOCK_V):
            c = c0 + cols
            if WANT_GS:
                tl.store(gs_ptr + r * gs_sR + c, tl.zeros((BLOCK_V,), gs_ptr.dtype.element_ty), mask=c < V)
            if WANT_GT:
                tl.store(gt_ptr + r * gt_sR + c, tl.zeros((BLOCK_V,), gt_ptr.dtype.element_ty), mask=c < V)


def _launch_config(v: int):
    """(BLOCK_V, num_warps): chunks of up to 4096 classes, 4-16 warps."""
    block = min(4096, triton.next_power_of_2(max(v, 16)))
    return block, (4 if block <= 1024 else (8 if block <= 2048 else 16))


def launch_configs():
    """Every GPU launch configuration of the kernel (lossfuse/triton/aot.py compiles them)."""
    out = []
    for v in (16, 1024, 2048, 32000):
        b, w = _launch_config(v)
        out.append(dict(BLOCK_V=b, num_warps=w))
    return {"_distill_kernel": out}


def _mode(beta: float) -> int:
    return 0 if beta == 0 else (1 if beta == 1 else 2)


def _run(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad):
    r, v = student.shape
    acc = acc_dtype(student.dtype)
    loss = torch.empty(r, dtype=acc, device=student.device)
    want = grad is not None
    gs = torch.empty((r, v), dtype=student.dtype, device=student.device) if want and student_grad else None
    gt = torch.empty((r, v), dtype=teacher.dtype, device=student.device) if want and teacher_grad else None
    mode = _mode(beta)
    jsd = mode == 2
    lr = math.log((1 - beta) / beta) if jsd else 0.0
    nla = -math.log1p(-beta) if jsd else 0.0
    nlb = -math.log(beta) if jsd else 0.0
    g = grad.to(acc) if want else loss
    if r > 0:
        block, warps = _launch_config(v)
        _distill_kernel[(r,)](
            student, teacher, target if target is not None else loss, g, loss,
            gs if gs is not None else student, gt if gt is not None else teacher, v,
            student.stride(0), teacher.stride(0), g.stride(0) if want else 0,
            gs.stride(0) if gs is not None else 0, gt.stride(0) if gt is not None else 0,
            ignore_index, 1.0 / temperature, float(beta), lr, nla, nlb,
            MODE=mode, HAS_Y=target is not None, WANT_GS=gs is not None, WANT_GT=gt is not None,
            BLOCK_V=block, num_warps=warps,
        )
    empty_s = student.new_empty((0,))
    empty_t = teacher.new_empty((0,))
    return loss, (gs if gs is not None else empty_s), (gt if gt is not None else empty_t)


def distillation_fwd(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad):
    return _run(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad)


def distillation_bwd(grad, student, teacher, target, ignore_index, temperature, beta, student_grad, teacher_grad):
    _, gs, gt = _run(student, teacher, target, ignore_index, temperature, beta, grad, student_grad, teacher_grad)
    return gs, gt
