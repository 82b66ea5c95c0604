"""Focal-loss Triton kernels and their launchers: the CUDA implementation of the lossfuse:: ops
(lossfuse/ops/focal.py), and with TRITON_INTERPRET=1 a CPU one for testing.

  sigmoid_focal_fwd(input, target, alpha, gamma, sum_block, grad_scale) -> (loss, grad_input)
  sigmoid_focal_bwd(grad, input, target, alpha, gamma) -> grad_input
  softmax_focal_fwd(input, target, scale, alpha, gamma, ignore_index, grad_scale) -> (loss, lse, dscale, grad_input)
  softmax_focal_bwd(grad, input, target, lse, dscale, ignore_index) -> grad_input

  sigmoid_focal_fused_bwd(grad_output, grad, grad_input!, input, target, alpha, gamma)
  softmax_focal_fused_scaled(input, target, scale, alpha, gamma, ignore_index, grad_scale) -> as softmax_focal_fwd
  softmax_focal_fused_bwd(grad_output, grad, grad_input!, input, target, lse, dscale, ignore_index)

(grad_scale: the gradient for that upstream gradient, written by the forward kernel from the terms
the loss already has -- one read of the input for loss and gradient. The fused_bwd kernels are the
backward of such a forward: they read grad_output on the device, stop at once when it is 1 and
otherwise rewrite the gradient from the input, so the host never waits and the gradient is rounded
once whatever grad_output is.)

The math and its derivation are those of the C++ kernels (csrc/focal_kernel.h): the sigmoid focal
term in log space from a log-sigmoid, the closed-form gradients without a (1 - p_t)^(gamma - 1) factor,
branches chosen with tl.where. Sigmoid: one program per block of elements of the flat input (class-index
targets compare the class with the row's index: no one-hot in memory). Softmax: one program per row
(n, s) of logits viewed as (N, C, S), looping over the classes with an online max / sum-exp. Loads in
the input dtype, upcast at once to fp32 (fp64 for fp64 input, interpreter only); gradients formed whole
in fp32 and cast once, at the store. Offsets are int64. Core ``tl`` ops only (Triton 3.x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import acc_dtype
from .._layout import empty_like_layout
from .._backend import triton_interpreting as _interpreting
from ._launch import check_device as _check_device
from ._math import expm1, log1p

__all__ = ["sigmoid_focal_fwd", "sigmoid_focal_bwd", "softmax_focal_fwd", "softmax_focal_bwd"]

_NEG_INF = tl.constexpr(float("-inf"))
_NAN = tl.constexpr(float("nan"))


# ----------------------------------------------------------------------------------------------
# Sigmoid focal loss.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid_focal_terms(x, t, gamma):
    """The pieces loss and gradient share; csrc/focal_kernel.h has the derivation.

    e = exp(-|x|); the target seen from the logit's side, (u, v) = (1 - t, t) for x >= 0 else (t, 1 - t);
    ce = u |x| + log1p(e); log q = log w - log1p(e) with w = u + v e (log w = -|x| where u = 0);
    f = q^gamma = exp(gamma log q).
    """
    t1 = 1.0 - t
    pos = x >= 0.0
    u = tl.where(pos, t1, t)
    v = tl.where(pos, t, t1)
    a = tl.abs(x)
    e = tl.exp(-a)
    l1 = log1p(e)
    ce = u * a + l1
    agree = u == 0.0
    w = u + v * e
    logw = tl.where(agree, -a, tl.log(tl.where(agree, 1.0, w)))
    f = tl.exp(gamma * (logw - l1))
    return pos, u, v, e, ce, agree, w, f


@triton.jit
def _sigmoid_targets(t_ptr, offs, mask, C, INDEX: tl.constexpr, ACC: tl.constexpr):
    """Targets of the elements at ``offs`` (float), and whether they are valid."""
    if INDEX:
        n = offs // C
        y = tl.load(t_ptr + n, mask=mask, other=0)
        t = tl.where((offs - n * C) == y, 1.0, 0.0).to(ACC)
        valid = (y >= 0) & (y <= C)  # y == C: background
    else:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
        valid = offs == offs
    return t, valid


@triton.jit
def _sigmoid_focal_grad(x, t, alpha, gamma, HAS_ALPHA: tl.constexpr):
    """(loss, d loss / dx) of each element, from one set of shared terms."""
    pos, u, v, e, ce, agree, w, f = _sigmoid_focal_terms(x, t, gamma)
    loss = ce * f
    # d loss / dx = s alpha_t f [ (u - v e) d + gamma ce (u - v) r ], r = sigma'/q = e d / w (= d where u = 0)
    d = 1.0 / (1.0 + e)
    r = tl.where(agree, d, e * d / tl.where(agree, 1.0, w))
    inner = (u - v * e) * d + gamma * ce * (u - v) * r
    grad = f * inner
    if HAS_ALPHA:
        a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss = a_t * loss
        grad = a_t * grad
    grad = tl.where(pos, grad, -grad)
    return loss, grad


@triton.jit
def _sigmoid_focal_fwd_kernel(
    x_ptr, t_ptr, out_ptr, gs_ptr, gx_ptr,
    numel, C, alpha, gamma,
    SUM_BLOCK,
    HAS_ALPHA: tl.constexpr,
    INDEX: tl.constexpr,
    PARTIAL: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The loss (per element, or one partial sum per SUM_BLOCK elements); with STORE_GRAD also the
    gradient for the scalar upstream gradient at gs_ptr, from the same terms."""
    ACC = out_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    start = pid * SUM_BLOCK
    acc = tl.zeros([BLOCK], ACC)
    if STORE_GRAD:
        gs = tl.load(gs_ptr).to(ACC)
    for off in range(0, SUM_BLOCK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK).to(tl.int64)
        mask = (offs < numel) & (off + tl.arange(0, BLOCK) < SUM_BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        t, valid = _sigmoid_targets(t_ptr, offs, mask, C, INDEX, ACC)
        loss, grad = _sigmoid_focal_grad(x, t, alpha, gamma, HAS_ALPHA)
        loss = tl.where(valid, loss, _NAN)  # a class index out of [0, C] is a loud NaN, not a 0
        if STORE_GRAD:
            o = tl.where(valid, gs * grad, _NAN)
            tl.store(gx_ptr + offs, o.to(gx_ptr.dtype.element_ty), mask=mask)
        if PARTIAL:
            acc += tl.where(mask, loss, 0.0)
        else:
            tl.store(out_ptr + offs, loss.to(ACC), mask=mask)
    if PARTIAL:
        tl.store(out_ptr + pid, tl.sum(acc, axis=0).to(ACC))


@triton.jit
def _sigmoid_focal_bwd_kernel(
    go_ptr, g_ptr, x_ptr, t_ptr, gx_ptr,
    numel, C, alpha, gamma,
    HAS_ALPHA: tl.constexpr,
    INDEX: tl.constexpr,
    GRAD_SCALAR: tl.constexpr,
    CHECK_ONE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The gradient for the upstream gradient g (a scalar, or one per element). CHECK_ONE: the
    backward of the gradient-writing forward, whose gradient stands when grad_output (go_ptr) is 1 --
    decided here, on the device, so the host never waits -- and is otherwise rewritten for g
    (grad_output, divided by numel for a mean), rounded once as the unfused backward."""
    if CHECK_ONE:
        if tl.load(go_ptr) == 1.0:
            return
    ACC = g_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    t, valid = _sigmoid_targets(t_ptr, offs, mask, C, INDEX, ACC)
    _, grad = _sigmoid_focal_grad(x, t, alpha, gamma, HAS_ALPHA)
    if GRAD_SCALAR:
        g = tl.load(g_ptr).to(ACC)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    o = tl.where(valid, g * grad, _NAN)
    tl.store(gx_ptr + offs, o.to(gx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Softmax focal loss.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_focal_row(x_row, y, C, x_sC, scale_ptr, alpha, gamma, ignore_index,
                       HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """One row's (lse, loss, dscale, x_y, live, fill): live says the row counts; fill is what a row
    that does not count gets (0 when ignored, a loud NaN when the target is out of range)."""
    # Online max / sum-exp relative to a finite shift: the running max, or 0 while every logit so far
    # is -inf (a masked vocabulary), so -inf - -inf is never formed. exp(m - ref_new) is 0 while m is
    # -inf and the sum is still 0: no 0 * inf.
    m = tl.max(tl.full([BLOCK_C], _NEG_INF, ACC), axis=0)  # a scalar -inf in ACC
    sum_exp = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        x = tl.load(x_row + cols * x_sC, mask=cols < C, other=_NEG_INF).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        ref_new = tl.where(m_new == _NEG_INF, 0.0, m_new)
        sum_exp = sum_exp * tl.exp(m - ref_new) + tl.exp(x - ref_new)
        m = m_new
    ref = tl.where(m == _NEG_INF, 0.0, m)
    logsum = tl.log(tl.sum(sum_exp, axis=0))
    lse = ref + logsum

    valid = (y >= 0) & (y < C)
    live = valid & (y != ignore_index)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(x_row + y_safe * x_sC, mask=valid, other=0.0).to(ACC)
    if HAS_SCALE:
        k = alpha * tl.load(scale_ptr + y_safe, mask=valid, other=0.0).to(ACC)
    else:
        k = alpha
    # nl = -log p_y, q = 1 - p_y; loss = K q^gamma nl, dscale = K q^gamma (1 + gamma p_y nl / q).
    nl = (ref - x_y) + logsum
    q = -expm1(-nl)
    # q^gamma = exp(gamma log q): 0 where q is 0 (p_y rounded to 1), exactly 1 for gamma = 0.
    f = tl.where(q > 0.0, tl.exp(gamma * tl.log(tl.where(q > 0.0, q, 1.0))), 0.0)
    f = tl.where(gamma == 0.0, 1.0, f)
    p = tl.exp(-nl)
    ratio = tl.where(q > 0.0, nl / tl.where(q > 0.0, q, 1.0), 1.0)
    pnl = tl.where(p > 0.0, p * ratio, 0.0)
    loss = k * f * nl
    dscale = k * f * (1.0 + gamma * pnl)
    fill = tl.where(y == ignore_index, 0.0, _NAN).to(ACC)
    return lse.to(ACC), loss, dscale, x_y, live, fill


@triton.jit
def _softmax_focal_grad_row(x_row, gx_row, C, x_sC, gx_sC, y, x_y, lse, kp, live, fill, BLOCK_C: tl.constexpr):
    """One row's gradient, kp (p_c - [c = y]) with kp = upstream gradient x dscale, applied in fp32
    before the single cast. Rows that do not count get ``fill`` by a select: NaN logits cannot leak in."""
    gy = kp * expm1(x_y - lse)  # dscale (p_y - 1)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        x = tl.load(x_row + cols * x_sC, mask=cmask, other=0.0).to(lse.dtype)
        o = tl.exp(x - lse) * kp
        o = tl.where(cols == y, gy, o)
        o = tl.where(live, o, fill)
        tl.store(gx_row + cols * gx_sC, o.to(gx_row.dtype.element_ty), mask=cmask)


@triton.jit
def _softmax_focal_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, loss_ptr, lse_ptr, d_ptr, gs_ptr, gx_ptr,
    C, S,
    x_sN, x_sC, x_sS,
    y_sN, y_sS,
    gx_sN, gx_sC, gx_sS,
    alpha, gamma, ignore_index,
    HAS_SCALE: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per row: loss, lse and dscale; with STORE_GRAD also the row's gradient for the
    upstream gradient at gs_ptr (one value, e.g. 1 / denom on the device), read again while the
    row is still in cache."""
    ACC = lse_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64)
    n = r // S
    s = r - n * S
    x_row = x_ptr + (n * x_sN + s * x_sS)
    y = tl.load(y_ptr + (n * y_sN + s * y_sS))
    lse, loss, dscale, x_y, live, fill = _softmax_focal_row(x_row, y, C, x_sC, scale_ptr, alpha, gamma,
                                                            ignore_index, HAS_SCALE, BLOCK_C, ACC)
    dscale = tl.where(live, dscale, fill)
    tl.store(loss_ptr + r, tl.where(live, loss, fill).to(ACC))
    tl.store(d_ptr + r, dscale.to(ACC))
    tl.store(lse_ptr + r, lse)
    if STORE_GRAD:
        kp = tl.load(gs_ptr).to(ACC) * dscale
        _softmax_focal_grad_row(x_row, gx_ptr + (n * gx_sN + s * gx_sS), C, x_sC, gx_sC, y, x_y, lse, kp, live,
                                fill, BLOCK_C)


@triton.jit
def _softmax_focal_bwd_kernel(
    go_ptr, g_ptr, x_ptr, y_ptr, lse_ptr, d_ptr, gx_ptr,
    C, S,
    g_sN, g_sS,
    x_sN, x_sC, x_sS,
    y_sN, y_sS,
    gx_sN, gx_sC, gx_sS,
    ignore_index,
    CHECK_ONE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per row: the gradient for the per-row upstream gradient g. CHECK_ONE: the backward
    of the gradient-writing forward, as the sigmoid kernel's (nothing to do when grad_output is 1)."""
    if CHECK_ONE:
        if tl.load(go_ptr) == 1.0:
            return
    ACC = lse_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64)
    n = r // S
    s = r - n * S
    x_row = x_ptr + (n * x_sN + s * x_sS)
    g = tl.load(g_ptr + (n * g_sN + s * g_sS)).to(ACC)
    lse = tl.load(lse_ptr + r).to(ACC)
    kp = g * tl.load(d_ptr + r).to(ACC)  # g * dscale, applied in fp32 before the single cast
    y = tl.load(y_ptr + (n * y_sN + s * y_sS))
    valid = (y >= 0) & (y < C)
    live = valid & (y != ignore_index)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(x_row + y_safe * x_sC, mask=valid, other=0.0).to(ACC)
    fill = tl.where(y == ignore_index, 0.0, _NAN).to(ACC)
    _softmax_focal_grad_row(x_row, gx_ptr + (n * gx_sN + s * gx_sS), C, x_sC, gx_sC, y, x_y, lse, kp, live, fill,
                            BLOCK_C)


# ----------------------------------------------------------------------------------------------
# Launch configuration and checks.
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024  # sigmoid: elements per program (per loop step when summing)
_MAX_BLOCK_C = 4096  # softmax: classes per loop step
# Under the interpreter every block op is a numpy call per program: small class chunks, so that small
# test shapes still go through the online rescaling and the masked tails.
_INTERPRET_MAX_BLOCK_C = 32


def _num_warps(block: int) -> int:
    return min(16, max(4, block // 256))


def _sigmoid_prepare(input, target, who):
    """Contiguous input and target, (is_index, C)."""
    _check_device(input, who)
    acc = acc_dtype(input.dtype)
    x = input.contiguous()
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"{who}: a float target must have the input's shape {list(input.shape)}")
        t = target if target.dtype in (input.dtype, acc) else target.to(acc)
        return x, t.contiguous(), False, 1
    if target.dtype != torch.int64:
        raise TypeError(f"{who}: class-index targets must be int64; got {target.dtype}")
    if input.dim() != 2 or target.shape != (input.shape[0],):
        raise ValueError(f"{who}: class-index targets must be (N,) for an (N, C) input")
    return x, target.contiguous(), True, max(1, input.shape[1])


# ----------------------------------------------------------------------------------------------
# Launchers (the op implementations).
# ----------------------------------------------------------------------------------------------


def sigmoid_focal_fwd(input, target, alpha, gamma, sum_block, grad_scale=None):
    x, t, index, c = _sigmoid_prepare(input, target, "sigmoid_focal_fwd")
    if sum_block < 0:
        raise ValueError(f"sigmoid_focal_fwd: sum_block must be >= 0; got {sum_block}")
    acc = acc_dtype(input.dtype)
    numel = x.numel()
    partial = sum_block > 0
    if partial:
        out = torch.empty((triton.cdiv(numel, sum_block),), dtype=acc, device=input.device)
    else:
        out = torch.empty(input.shape, dtype=acc, device=input.device)
    block, span, num_warps = _sigmoid_fwd_config(sum_block)
    store_grad = grad_scale is not None
    gx = torch.empty(input.shape, dtype=input.dtype, device=input.device) if store_grad else input.new_empty((0,))
    if numel == 0:
        return out, gx
    gs = torch.full((1,), float(grad_scale), dtype=acc, device=input.device) if store_grad else out
    _sigmoid_focal_fwd_kernel[(triton.cdiv(numel, span),)](
        x, t, out, gs, gx if store_grad else x, numel, c, float(alpha), float(gamma), span,
        HAS_ALPHA=alpha >= 0, INDEX=index, PARTIAL=partial, STORE_GRAD=store_grad, BLOCK=block,
        num_warps=num_warps,
    )
    return out, gx


def sigmoid_focal_bwd(grad, input, target, alpha, gamma):
    x, t, index, c = _sigmoid_prepare(input, target, "sigmoid_focal_bwd")
    acc = acc_dtype(input.dtype)
    if grad.dim() != 0 and grad.shape != input.shape:
        raise ValueError("sigmoid_focal_bwd: grad must be a scalar or have the input's shape")
    g = grad.to(acc).contiguous()
    gx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    numel = x.numel()
    if numel == 0:
        return gx
    _sigmoid_focal_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](
        g, g, x, t, gx, numel, c, float(alpha), float(gamma),
        HAS_ALPHA=alpha >= 0, INDEX=index, GRAD_SCALAR=grad.dim() == 0, CHECK_ONE=False, BLOCK=_BLOCK,
        num_warps=_num_warps(_BLOCK),
    )
    return gx


def sigmoid_focal_fused_bwd(grad_output, grad, grad_input, input, target, alpha, gamma):
    """The backward of sigmoid_focal_fwd with a grad_scale (1/numel or 1): ``grad_input`` holds the
    gradient for grad_output 1. The kernel reads ``grad_output`` (one value) on the device and
    leaves grad_input as it is when it is 1; otherwise it rewrites it for the scalar upstream
    gradient ``grad`` (grad_output / numel for a mean). No host sync."""
    x, t, index, c = _sigmoid_prepare(input, target, "sigmoid_focal_fused_bwd")
    if grad_output.numel() != 1 or grad.numel() != 1:
        raise ValueError("sigmoid_focal_fused_bwd: grad_output and grad must hold one value each")
    if grad_input.shape != input.shape or grad_input.dtype != input.dtype or not grad_input.is_contiguous():
        raise ValueError("sigmoid_focal_fused_bwd: grad_input must be contiguous with the input's shape and dtype")
    numel = x.numel()
    if numel == 0:
        return
    acc = acc_dtype(input.dtype)
    _sigmoid_focal_bwd_kernel[(triton.cdiv(numel, _BLOCK),)](
        grad_output.to(acc).reshape(1), grad.to(acc).reshape(1), x, t, grad_input, numel, c, float(alpha),
        float(gamma), HAS_ALPHA=alpha >= 0, INDEX=index, GRAD_SCALAR=True, CHECK_ONE=True, BLOCK=_BLOCK,
        num_warps=_num_warps(_BLOCK),
    )


def _softmax_check(input, target, who):
    _check_device(input, who)
    if input.dim() != 3:
        raise ValueError(f"{who}: input must be viewed as (N, C, S); got shape {list(input.shape)}")
    n, _, s = input.shape
    if target.dtype != torch.int64 or tuple(target.shape) != (n, s):
        raise ValueError(f"{who}: targets must be int64 of shape {[n, s]}; got {target.dtype} {list(target.shape)}")


def _block_c(c: int, interpret: bool | None = None) -> int:
    interpret = _interpreting() if interpret is None else interpret
    return min(triton.next_power_of_2(max(c, 1)), _INTERPRET_MAX_BLOCK_C if interpret else _MAX_BLOCK_C)


def _sigmoid_fwd_config(sum_block: int):
    """(BLOCK, elements per program, num_warps) of the sigmoid forward: one BLOCK per program, or
    sum_block elements per partial sum in BLOCK steps."""
    if sum_block > 0:
        block = min(_BLOCK, triton.next_power_of_2(sum_block))
        return block, sum_block, _num_warps(block)
    return _BLOCK, _BLOCK, _num_warps(_BLOCK)


def launch_configs():
    """Every GPU launch configuration of the kernels above (constexprs + num_warps), from the same
    functions the launchers call, over the supported range: the op's partial-sum block
    (ops/focal.py SUM_BLOCK) or none, any number of classes (the cap is reached at 2 x _MAX_BLOCK_C).
    lossfuse/triton/aot.py compiles them."""
    from ..ops.focal import SUM_BLOCK

    fwd = []
    for sum_block in (0, SUM_BLOCK):
        block, _, warps = _sigmoid_fwd_config(sum_block)
        fwd.append(dict(PARTIAL=sum_block > 0, BLOCK=block, num_warps=warps))
    bwd = [dict(BLOCK=_BLOCK, num_warps=_num_warps(_BLOCK))]
    softmax = {}
    for k in range((2 * _MAX_BLOCK_C).bit_length()):
        block_c = _block_c(1 << k, interpret=False)
        softmax[block_c] = dict(BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return {
        "_sigmoid_focal_fwd_kernel": fwd,
        "_sigmoid_focal_bwd_kernel": bwd,
        "_softmax_focal_fwd_kernel": list(softmax.values()),
        "_softmax_focal_bwd_kernel": list(softmax.values()),
    }


def softmax_focal_fwd(input, target, scale, alpha, gamma, ignore_index, grad_scale=None):
    acc = acc_dtype(input.dtype)
    gs = None if grad_scale is None else torch.full((1,), float(grad_scale), dtype=acc, device=input.device)
    return _softmax_fwd_launch(input, target, scale, alpha, gamma, ignore_index, gs, grad_scale is not None,
                               "softmax_focal_fwd")


def softmax_focal_fused_scaled(input, target, scale, alpha, gamma, ignore_index, grad_scale):
    """softmax_focal_fwd that also writes the gradient for the upstream gradient ``grad_scale`` (a
    one-value tensor read on the device, e.g. 1 / denom of a mean; None: 1) in the same kernel."""
    if grad_scale is None:
        grad_scale = torch.ones((1,), dtype=acc_dtype(input.dtype), device=input.device)
    elif grad_scale.numel() != 1:
        raise ValueError("softmax_focal_fused_scaled: grad_scale must hold one value")
    gs = grad_scale.to(acc_dtype(input.dtype)).reshape(1)
    return _softmax_fwd_launch(input, target, scale, alpha, gamma, ignore_index, gs, True,
                               "softmax_focal_fused_scaled")


def _softmax_fwd_launch(input, target, scale, alpha, gamma, ignore_index, gs, store_grad, who):
    _softmax_check(input, target, who)
    n, c, s = input.shape
    acc = acc_dtype(input.dtype)
    loss, lse, dscale = (torch.empty((n, s), dtype=acc, device=input.device) for _ in range(3))
    gx = empty_like_layout(input) if store_grad else input.new_empty((0,))
    if n * s == 0:
        return loss, lse, dscale, gx
    if scale is not None:
        if scale.shape != (c,):
            raise ValueError(f"{who}: scale must have shape ({c},); got {list(scale.shape)}")
        scale = scale.to(acc).contiguous()
    block_c = _block_c(c)
    gxs = gx.stride() if store_grad else (0, 0, 0)
    _softmax_focal_fwd_kernel[(n * s,)](
        input, target, scale if scale is not None else lse, loss, lse, dscale,
        gs if store_grad else lse, gx if store_grad else input,
        c, s,
        input.stride(0), input.stride(1), input.stride(2),
        target.stride(0), target.stride(1),
        *gxs,
        float(alpha), float(gamma), int(ignore_index),
        HAS_SCALE=scale is not None, STORE_GRAD=store_grad, BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )
    return loss, lse, dscale, gx


def _softmax_bwd_check(grad, input, target, lse, dscale, who):
    _softmax_check(input, target, who)
    n, _, s = input.shape
    for name, t in (("grad", grad), ("lse", lse), ("dscale", dscale)):
        if tuple(t.shape) != (n, s):
            raise ValueError(f"{who}: {name} must have shape {[n, s]}; got {list(t.shape)}")


def _softmax_bwd_launch(go, grad, input, target, lse, dscale, gi, ignore_index):
    n, c, s = input.shape
    block_c = _block_c(c)
    _softmax_focal_bwd_kernel[(n * s,)](
        go if go is not None else grad, grad, input, target, lse.contiguous(), dscale.contiguous(), gi,
        c, s,
        grad.stride(0), grad.stride(1),
        input.stride(0), input.stride(1), input.stride(2),
        target.stride(0), target.stride(1),
        gi.stride(0), gi.stride(1), gi.stride(2),
        int(ignore_index),
        CHECK_ONE=go is not None, BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )


def softmax_focal_bwd(grad, input, target, lse, dscale, ignore_index):
    _softmax_bwd_check(grad, input, target, lse, dscale, "softmax_focal_bwd")
    gi = empty_like_layout(input)  # as the fake kernel (ops/focal.py)
    if input.numel() == 0:
        return gi
    _softmax_bwd_launch(None, grad, input, target, lse, dscale, gi, ignore_index)
    return gi


def softmax_focal_fused_bwd(grad_output, grad, grad_input, input, target, lse, dscale, ignore_index):
    """The backward of softmax_focal_fused_scaled: ``grad_input`` holds the gradient for grad_output 1.
    The kernel reads ``grad_output`` (one value) on the device and leaves grad_input as it is when it
    is 1; otherwise it rewrites it for the per-row upstream gradient ``grad`` ((N, S), e.g.
    grad_output / denom expanded). No host sync."""
    _softmax_bwd_check(grad, input, target, lse, dscale, "softmax_focal_fused_bwd")
    if grad_output.numel() != 1:
        raise ValueError("softmax_focal_fused_bwd: grad_output must hold one value")
    if grad_input.shape != input.shape or grad_input.dtype != input.dtype:
        raise ValueError("softmax_focal_fused_bwd: grad_input must have the input's shape and dtype")
    if input.numel() == 0:
        return
    go = grad_output.to(acc_dtype(input.dtype)).reshape(1)
    _softmax_bwd_launch(go, grad, input, target, lse, dscale, grad_input, ignore_index)
