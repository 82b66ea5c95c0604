"""kl_div Triton kernels and their launchers: the CUDA implementation of lossfuse::kl_div_fwd and
kl_div_bwd (lossfuse/ops/kl_div.py), and with TRITON_INTERPRET=1 a CPU one for testing.

One program per block of BLOCK contiguous elements; the terms of csrc/kl_div_kernel.h (0 log 0 = 0 by a
select; the target's gradient at a zero of a probability target NaN, as torch's autograd). A reduced
forward stores one float64 partial sum per program (a tree sum of BLOCK fp32 values). Loads upcast to
fp32, gradients formed in fp32 with the upstream gradient and cast once; int64 offsets; core ``tl``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import acc_dtype
from ._launch import elementwise_launch_config as _launch_config
from ._launch import elementwise_launch_configs

__all__ = ["kl_div_fwd", "kl_div_bwd"]


@triton.jit
def _kl_loss(x, t, LOG_TARGET: tl.constexpr):
    if LOG_TARGET:
        out = tl.exp(t) * (t - x)
    else:
        out = tl.where(t == 0.0, 0.0, t * tl.log(t)) - t * x
    return out


@triton.jit
def kl_div_fwd_kernel(X, T, OUT, numel, LOG_TARGET: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + i, mask=mask, other=1.0).to(tl.float32)
    loss = _kl_loss(x, t, LOG_TARGET)
    if REDUCE:
        tl.store(OUT + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), 0).to(tl.float64))
    else:
        tl.store(OUT + i, loss, mask=mask)


@triton.jit
def kl_div_bwd_kernel(G, X, T, GX, GT, numel, LOG_TARGET: tl.constexpr, G_SCALAR: tl.constexpr,
                      WANT_GX: tl.constexpr, WANT_GT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    t = tl.load(T + i, mask=mask, other=1.0).to(tl.float32)
    if G_SCALAR:
        g = tl.load(G).to(tl.float32)
    else:
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        et = tl.exp(t)
        dx = -et
    else:
        dx = -t
    if WANT_GX:
        tl.store(GX + i, (g * dx).to(GX.dtype.element_ty), mask=mask)
    if WANT_GT:
        x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            dt = et * ((t - x) + 1.0)
        else:
            dt = tl.where(t == 0.0, float("nan"), (tl.log(t) + 1.0) - x)
        tl.store(GT + i, (g * dt).to(GT.dtype.element_ty), mask=mask)


def launch_configs():
    """Every GPU launch configuration, for lossfuse/triton/aot.py (what the op passes: ops/kl_div.py
    PARTIAL_BLOCK, or 0)."""
    from ..ops.kl_div import PARTIAL_BLOCK

    return elementwise_launch_configs(PARTIAL_BLOCK, "kl_div_fwd_kernel", "kl_div_bwd_kernel")


def kl_div_fwd(input, target, log_target, block):
    numel = input.numel()
    if block > 0:
        out = torch.empty(((numel + block - 1) // block,), dtype=torch.float64, device=input.device)
    else:
        out = torch.empty(input.shape, dtype=acc_dtype(input.dtype), device=input.device)
    if numel > 0:
        b, warps = _launch_config(block)
        kl_div_fwd_kernel[(triton.cdiv(numel, b),)](input, target, out, numel, LOG_TARGET=bool(log_target),
                                                    REDUCE=block > 0, BLOCK=b, num_warps=warps)
    return out


def kl_div_bwd(grad, input, target, log_target, input_grad, target_grad):
    numel = input.numel()
    gx = torch.empty_like(input) if input_grad else input.new_empty((0,))
    gt = torch.empty_like(target) if target_grad else target.new_empty((0,))
    if numel > 0 and (input_grad or target_grad):
        g = grad.to(acc_dtype(input.dtype)).contiguous()
        b, warps = _launch_config(0)
        kl_div_bwd_kernel[(triton.cdiv(numel, b),)](
            g, input, target, gx if input_grad else input, gt if target_grad else target, numel,
            LOG_TARGET=bool(log_target), G_SCALAR=g.dim() == 0, WANT_GX=bool(input_grad), WANT_GT=bool(target_grad),
            BLOCK=b, num_warps=warps)
    return gx, gt
