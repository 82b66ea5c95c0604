"""Huber / SmoothL1 / L1 in Triton: the CUDA implementations of lossfuse::huber_fwd and huber_bwd
(schemas, layout rule and op contracts in lossfuse/ops/huber.py).

One program per block of BLOCK consecutive elements of the iteration order (the order the CPU kernels
walk; outputs are dense in it). The operands are read through up to four merged dims with their own
strides -- 0 for a broadcast target or weight -- so expanded and transposed views are read in place.
Loads are upcast to fp32 (fp64 for float64 inputs); a reducing forward stores one float64 partial sum
per program, a tree sum of BLOCK fp32 values. Only core ``tl`` operations: valid on Triton 3.6 to 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import collapse, empty_grads_like_walk, empty_like_walk
from .._utils import to_f32
from ._launch import elementwise_launch_config as _launch_config
from ._launch import elementwise_launch_configs

MAX_DIMS = 4


@triton.jit
def _offsets(i, S1, S2, S3, st0, st1, st2, st3, NDIM: tl.constexpr):
    """Element offsets of linear indices i (int64) in a space of sizes (S0, S1, S2, S3), dim 3 innermost."""
    if NDIM == 1:
        off = i * st3
    else:
        off = (i % S3) * st3
        r = i // S3
        if NDIM == 2:
            off += r * st2
        else:
            off += (r % S2) * st2
            r = r // S2
            if NDIM == 3:
                off += r * st1
            else:
                off += (r % S1) * st1 + (r // S1) * st0
    return off


@triton.jit
def _loss(d, delta, half, MODE: tl.constexpr):
    # torch's formulas: z < delta ? 0.5 z^2 : delta (z - delta / 2)   (Huber, MODE 0)
    #                   z < beta  ? 0.5 z^2 / beta : z - beta / 2     (SmoothL1, MODE 1);  z (L1, MODE 2)
    z = tl.abs(d)
    if MODE == 2:
        out = z
    else:
        q = (0.5 * z) * z
        if MODE == 0:
            out = tl.where(z < delta, q, delta * (z - half))
        else:
            out = tl.where(z < delta, q / delta, z - half)
    return out


@triton.jit
def _slope(d, delta, MODE: tl.constexpr):
    # d loss / d d: |d| >= delta is linear (both branches agree at |d| = delta); NaN fails the test
    # and stays NaN through the quadratic branch. L1: sign(d), 0 at 0 and at NaN as torch's l1_loss.
    one = tl.full(d.shape, 1.0, d.dtype)
    zero = tl.zeros(d.shape, d.dtype)
    if MODE == 2:
        s = tl.where(d > 0, one, tl.where(d < 0, -one, zero))
    else:
        sgn = tl.where(d < 0, -one, one)
        linear = tl.abs(d) >= delta
        if MODE == 0:
            s = tl.where(linear, sgn * delta, d)
        else:
            s = tl.where(linear, sgn, d / delta)
    return s


@triton.jit
def _delta(delta_hi, delta_lo, F64: tl.constexpr):
    # Python floats reach a kernel as fp32; float64 inputs get delta back to ~48 bits as hi + lo.
    # A one-element tensor rather than a scalar: the same code then runs in the interpreter.
    if F64:
        delta = tl.zeros((1,), tl.float64) + delta_hi + delta_lo
    else:
        delta = tl.zeros((1,), tl.float32) + delta_hi
    return delta


@triton.jit
def _input_grads(g, d, i, mask, GX, GY, delta, MODE: tl.constexpr, WANT_GX: tl.constexpr, WANT_GY: tl.constexpr):
    # g holds the loss scale (and the weight): formed in fp32 (fp64), cast once at the store.
    gd = g * _slope(d, delta, MODE)
    if WANT_GX:
        tl.store(GX + i, gd.to(GX.dtype.element_ty), mask=mask)
    if WANT_GY:
        tl.store(GY + i, (-gd).to(GY.dtype.element_ty), mask=mask)


@triton.jit
def huber_fwd_kernel(
    X, Y, Wt, OUT, GS, GX, GY, numel, S1, S2, S3,
    x_s0, x_s1, x_s2, x_s3, y_s0, y_s1, y_s2, y_s3, w_s0, w_s1, w_s2, w_s3,
    delta_hi, delta_lo,
    MODE: tl.constexpr, HAS_W: tl.constexpr, REDUCE: tl.constexpr, WANT_GX: tl.constexpr,
    WANT_GY: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """The loss (per element, or one partial sum per program); with WANT_GX / WANT_GY also the
    gradients for the scalar upstream gradient at GS, from the same loads (huber_fwd_grad)."""
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < numel
    delta = _delta(delta_hi, delta_lo, F64)
    half = 0.5 * delta
    ctype = tl.float64 if F64 else tl.float32
    x = tl.load(X + _offsets(i, S1, S2, S3, x_s0, x_s1, x_s2, x_s3, NDIM), mask=mask, other=0.0).to(ctype)
    y = tl.load(Y + _offsets(i, S1, S2, S3, y_s0, y_s1, y_s2, y_s3, NDIM), mask=mask, other=0.0).to(ctype)
    d = x - y
    loss = _loss(d, delta, half, MODE)  # masked lanes: d = 0, loss 0
    if HAS_W:
        w = tl.load(Wt + _offsets(i, S1, S2, S3, w_s0, w_s1, w_s2, w_s3, NDIM), mask=mask, other=0.0).to(ctype)
        loss = loss * w
    if WANT_GX or WANT_GY:
        g = tl.load(GS).to(ctype)
        if HAS_W:
            g = g * w  # the backward kernel's order, so both give the same bits
        _input_grads(g, d, i, mask, GX, GY, delta, MODE, WANT_GX, WANT_GY)
    if REDUCE:
        total = tl.sum(tl.where(mask, loss, 0.0), axis=0)
        tl.store(OUT + pid, total.to(tl.float64))
    else:
        tl.store(OUT + i, loss, mask=mask)


@triton.jit
def huber_bwd_kernel(
    GO, G, X, Y, Wt, GX, GY, GW, numel, S1, S2, S3,
    x_s0, x_s1, x_s2, x_s3, y_s0, y_s1, y_s2, y_s3, w_s0, w_s1, w_s2, w_s3, g_s0, g_s1, g_s2, g_s3,
    delta_hi, delta_lo,
    MODE: tl.constexpr, HAS_W: tl.constexpr, G_SCALAR: tl.constexpr, WANT_GX: tl.constexpr,
    WANT_GY: tl.constexpr, WANT_GW: tl.constexpr, CHECK_ONE: tl.constexpr, NDIM: tl.constexpr,
    F64: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradients for the upstream gradient G (a scalar, or per element). CHECK_ONE: the backward
    of huber_fwd_grad, whose gradients stand when grad_output (GO) is 1 -- decided here, on the
    device, so the host never waits -- and are otherwise rewritten for the scalar G (grad_output,
    divided by N for a mean), one rounding as the unfused backward."""
    if CHECK_ONE:
        if tl.load(GO) == 1.0:
            return
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < numel
    delta = _delta(delta_hi, delta_lo, F64)
    ctype = tl.float64 if F64 else tl.float32
    x = tl.load(X + _offsets(i, S1, S2, S3, x_s0, x_s1, x_s2, x_s3, NDIM), mask=mask, other=0.0).to(ctype)
    y = tl.load(Y + _offsets(i, S1, S2, S3, y_s0, y_s1, y_s2, y_s3, NDIM), mask=mask, other=0.0).to(ctype)
    d = x - y
    if G_SCALAR:
        g = tl.load(G).to(ctype)  # already divided by N for a mean
    else:
        g = tl.load(G + _offsets(i, S1, S2, S3, g_s0, g_s1, g_s2, g_s3, NDIM), mask=mask, other=0.0).to(ctype)
    if WANT_GW:
        gw = g * _loss(d, delta, 0.5 * delta, MODE)
        tl.store(GW + i, gw.to(GW.dtype.element_ty), mask=mask)
    if HAS_W:
        g = g * tl.load(Wt + _offsets(i, S1, S2, S3, w_s0, w_s1, w_s2, w_s3, NDIM), mask=mask, other=0.0).to(ctype)
    _input_grads(g, d, i, mask, GX, GY, delta, MODE, WANT_GX, WANT_GY)


# ----------------------------------------------------------------------------------------------
# Launchers (the op implementations).
# ----------------------------------------------------------------------------------------------


def _space(x, y, w, g=None):
    """Sizes (S1, S2, S3), per-operand strides padded to four dims, NDIM, and the operands to read --
    made contiguous in iteration order only when more than four dims survive merging (rare)."""
    sizes, strides = collapse(x, y, w, g)
    if len(sizes) > MAX_DIMS:
        order_x = empty_like_walk(x, y, w, x.dtype)  # the layout every output takes
        x = order_x.copy_(x)
        y = torch.empty_like(order_x, dtype=y.dtype).copy_(y)
        w = None if w is None else torch.empty_like(order_x, dtype=w.dtype).copy_(w)
        g = g if g is None or g.dim() == 0 else torch.empty_like(order_x, dtype=g.dtype).copy_(g)
        sizes, strides = collapse(x, y, w, g)
    ndim = len(sizes)
    pad = MAX_DIMS - ndim
    sizes = [1] * pad + list(sizes)
    strides = [[0] * pad + list(s) for s in strides]
    return x, y, w, g, sizes[1:], strides, ndim


def launch_configs():
    """Every GPU launch configuration, for lossfuse/triton/aot.py (what the op passes: ops/huber.py
    PARTIAL_BLOCK, or 0)."""
    from ..ops.huber import PARTIAL_BLOCK

    return elementwise_launch_configs(PARTIAL_BLOCK, "huber_fwd_kernel", "huber_bwd_kernel")


def _delta_parts(delta: float):
    hi = to_f32(delta)
    return hi, to_f32(delta - hi)


def _fwd_launch(input, target, weight, mode, delta, block, scale, gx, gy):
    numel = input.numel()
    f64 = input.dtype == torch.float64
    if block > 0:
        out = torch.empty(((numel + block - 1) // block,), dtype=torch.float64, device=input.device)
    else:
        out = empty_like_walk(input, target, weight, torch.float64 if f64 else torch.float32)
    BLOCK, num_warps = _launch_config(block)
    if numel == 0:
        return out
    x, y, w, _, sizes, st, ndim = _space(input, target, weight)
    hi, lo = _delta_parts(delta)
    grid = (triton.cdiv(numel, BLOCK),)
    want_gx, want_gy = gx is not None and gx.numel() > 0, gy is not None and gy.numel() > 0
    huber_fwd_kernel[grid](
        x, y, w if w is not None else x, out, scale if scale is not None else out,
        gx if want_gx else x, gy if want_gy else x,
        numel, *sizes, *st[0], *st[1], *st[2], hi, lo,
        MODE=mode, HAS_W=w is not None, REDUCE=block > 0, WANT_GX=want_gx, WANT_GY=want_gy, NDIM=ndim, F64=f64,
        BLOCK=BLOCK, num_warps=num_warps,
    )
    return out


def huber_fwd(input, target, weight, mode, delta, block):
    return _fwd_launch(input, target, weight, mode, delta, block, None, None, None)


def huber_fwd_grad(input, target, weight, mode, delta, block, scale, input_grad, target_grad):
    """The reducing forward that also writes the input / target gradients for the scalar upstream
    gradient ``scale``, from the same loads: the loss's one pass over the operands (ops/huber.py)."""
    if block <= 0:
        raise ValueError(f"huber_fwd_grad: takes a reducing forward (block > 0); got block {block}")
    gx, gy, _ = empty_grads_like_walk(input, target, weight, input_grad, target_grad, False)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    s = torch.full((1,), float(scale), dtype=acc, device=input.device)
    return _fwd_launch(input, target, weight, mode, delta, block, s, gx, gy), gx, gy


def huber_fused_bwd(grad_output, grad, grad_input, grad_target, input, target, weight, mode, delta):
    """The backward of huber_fwd_grad (scale 1/N or 1): ``grad_input`` / ``grad_target`` (0 elements
    where not wanted) hold the gradients for grad_output 1. The kernel reads ``grad_output`` (one
    value) on the device and leaves them as they are when it is 1; otherwise it rewrites them for
    the scalar upstream gradient ``grad`` (grad_output / N for a mean). No host sync."""
    if grad_output.numel() != 1 or grad.numel() != 1:
        raise ValueError("huber_fused_bwd: grad_output and grad must hold one value each")
    numel = input.numel()
    want_gx, want_gy = grad_input.numel() > 0, grad_target.numel() > 0
    for name, g in (("grad_input", grad_input), ("grad_target", grad_target)):
        if g.numel() not in (0, numel):
            raise ValueError(f"huber_fused_bwd: {name} must have {numel} elements or none; got {g.numel()}")
    if numel == 0 or not (want_gx or want_gy):
        return
    f64 = input.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    x, y, w, _, sizes, st, ndim = _space(input, target, weight)
    hi, lo = _delta_parts(delta)
    BLOCK, num_warps = _launch_config(0)
    huber_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
        grad_output.to(acc).reshape(1), grad.to(acc).reshape(1), x, y, w if w is not None else x,
        grad_input if want_gx else x, grad_target if want_gy else x, x,
        numel, *sizes, *st[0], *st[1], *st[2], 0, 0, 0, 0, hi, lo,
        MODE=mode, HAS_W=w is not None, G_SCALAR=True, WANT_GX=want_gx, WANT_GY=want_gy, WANT_GW=False,
        CHECK_ONE=True, NDIM=ndim, F64=f64, BLOCK=BLOCK, num_warps=num_warps,
    )


def huber_bwd(grad, input, target, weight, mode, delta, input_grad, target_grad, weight_grad):
    numel = input.numel()
    f64 = input.dtype == torch.float64
    want_w = weight is not None and weight_grad
    gx, gy, gw = empty_grads_like_walk(input, target, weight, input_grad, target_grad, weight_grad)
    if numel == 0 or not (input_grad or target_grad or want_w):
        return gx, gy, gw
    x, y, w, g, sizes, st, ndim = _space(input, target, weight, grad)
    hi, lo = _delta_parts(delta)
    BLOCK, num_warps = _launch_config(0)
    grid = (triton.cdiv(numel, BLOCK),)
    huber_bwd_kernel[grid](
        g, g, x, y, w if w is not None else x,
        gx if input_grad else x, gy if target_grad else x, gw if want_w else x,
        numel, *sizes, *st[0], *st[1], *st[2], *st[3], hi, lo,
        MODE=mode, HAS_W=w is not None, G_SCALAR=grad.dim() == 0, WANT_GX=input_grad, WANT_GY=target_grad,
        WANT_GW=want_w, CHECK_ONE=False, NDIM=ndim, F64=f64, BLOCK=BLOCK, num_warps=num_warps,
    )
    return gx, gy, gw
