"""Cross-entropy Triton kernels and their launchers: the CUDA implementation of the lossfuse:: ops
(lossfuse/ops/cross_entropy.py), and with TRITON_INTERPRET=1 a CPU one for testing.

  cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing) -> (loss, lse)
  cross_entropy_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing,
                    input_grad, target_grad) -> (grad_input, grad_target)
  cross_entropy_fused_scaled(input, target, weight, grad_scale, ...) -> (loss, lse, grad_input)
  cross_entropy_fused_scaled_inplace(input, target, weight, grad_scale, ...) -> (loss, lse)
  cross_entropy_fused_bwd(grad_output, grad, grad_input, input, target, weight, lse, ...)
  cross_entropy_scale_inplace(grad_output, grad_input)

Logits are (N, C, S) with any strides, row r = n * S + s. The same math as the C++ kernels
(csrc/cross_entropy_kernel.h). A program owns a [BLOCK_R rows, BLOCK_C classes] tile and loops over
the classes in BLOCK_C chunks; the tile is laid out by one of two walk orders, chosen by strides:

  rows:    class stride 1 ((N, C), channels-last): BLOCK_R consecutive rows (1 when C is large), the
           classes of each row contiguous in the tile;
  spatial: spatial stride 1 ((N, C, H, W), a transposed (N, C)): BLOCK_R neighbouring positions s of
           one n, so every class step reads a contiguous run -- the segmentation layout is read in
           place, never through a transposed copy.

Forward makes one pass over the logits with an online max / sum-exp; backward recomputes
p = exp(x - lse) from the saved lse instead of storing an N x C softmax. The fused path
(ops/cross_entropy.py) runs both in one kernel, _ce_fused_kernel: statistics, then the gradient
for a device-held scale while the row is in registers (rows of up to _FUSED_ONE_CHUNK_MAX classes)
or L2 (longer rows: see the comment above the kernel); its backward, _ce_bwd_kernel with CHECK_ONE, reads
grad_output on the device and exits when it is 1. Launch configurations: _launch_config (forward,
backward) and fused_launch_config (the fused kernels) -- the only places block sizes and warps
are chosen. Loads are in the input dtype,
upcast to fp32 at once (fp64 for fp64 input, interpreter only); the gradient is formed whole in fp32
and cast to the output dtype once, at the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting as _interpreting
from .._utils import acc_dtype
from .._layout import classes_contiguous, empty_like_layout
from ._launch import check_device

__all__ = [
    "cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_inplace", "cross_entropy_fused",
    "cross_entropy_fused_scaled", "cross_entropy_fused_scaled_inplace", "cross_entropy_fused_bwd",
    "cross_entropy_scale_inplace",
]

_NEG_INF = tl.constexpr(float("-inf"))
_NAN = tl.constexpr(float("nan"))


# ----------------------------------------------------------------------------------------------
# Device helpers.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(pid, R, S, BLOCK_R: tl.constexpr, SPATIAL_WALK: tl.constexpr):
    """(n, s, in-range) of the BLOCK_R rows of program ``pid`` (int64, so N*S may pass 2^31)."""
    if SPATIAL_WALK:
        # One n per program and consecutive s: with spatial stride 1 (specialised to a constant by
        # Triton) the compiler sees the rows are contiguous and vectorises / coalesces along them.
        # The split of the program id in 32 bits: both it and the tile count are below 2^31 (a grid
        # dimension's limit), and a 64-bit division is a long instruction sequence.
        p32 = tl.program_id(0)
        tiles = (S + BLOCK_R - 1) // BLOCK_R
        n32 = p32 // tiles
        n = n32.to(tl.int64)  # a scalar: one register pair, not one per row (it broadcasts where it meets s)
        s = (p32 - n32 * tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = s < S
    else:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < R
        n = r // S
        s = r - n * S
    return n, s, ok


@triton.jit
def _expm1(d):
    """exp(d) - 1 without the cancellation of exp(d) - 1 near 0 (Triton has no expm1).

    p_y - 1 = expm1(x_y - lse) is the gradient of a confident, correct prediction: exp(d) - 1 would
    round it to a multiple of 2^-24 or to 0. For |d| < 0.5: a Taylor series at d/16 (error < 3e-18
    relative) doubled back four times with expm1(2a) = expm1(a) * (expm1(a) + 2).
    """
    a = d * 0.0625
    q = a * (1.0 + a * (0.5 + a * (0.16666666666666666 + a * (0.041666666666666664 + a * (
        0.008333333333333333 + a * (0.001388888888888889 + a * (0.0001984126984126984
                                                                + a * 2.48015873015873e-05)))))))
    q = q * (q + 2.0)
    q = q * (q + 2.0)
    q = q * (q + 2.0)
    q = q * (q + 2.0)
    return tl.where(tl.abs(d) < 0.5, q, tl.exp(d) - 1.0)


@triton.jit
def _log1p(u):
    """log(1 + u), exact for tiny u (Triton has no log1p): log(w) * u / (w - 1) with w = 1 + u
    cancels w's rounding (Goldberg's trick). u = -1 gives -inf, as log(0)."""
    w = 1.0 + u
    safe = (w != 1.0) & (w != float("inf"))
    return tl.where(safe, tl.log(w) * (u / tl.where(safe, w - 1.0, 1.0)), tl.where(w == 1.0, u, tl.log(w)))


@triton.jit
def _tanh(u):
    """tanh(u) = expm1(2u) / (expm1(2u) + 2), no cancellation near 0; |u| clamped at 9 (tanh is +-1
    there in fp32, and expm1 would overflow)."""
    u = tl.minimum(tl.maximum(u, -9.0), 9.0)
    em = _expm1(u + u)
    return em / (em + 2.0)


@triton.jit
def _capped(x, softcap):
    """(x' = cap tanh(x / cap), tanh(x / cap)): soft-capped logits and the tanh their slope needs.

    x / cap is formed as x times 1 / cap, one scalar division per program: an fp32 division per
    element (div.full: a reciprocal and scaling steps) holds more registers than a multiply, and with it
    ptxas spilled the 16-warp forward tiles (python -m lossfuse.triton.aot). Within an ulp or two of
    the division, and what the CPU kernels do.
    """
    th = _tanh(x * (1.0 / softcap))
    return softcap * th, th


@triton.jit
def _split_lse(lse64, ACC: tl.constexpr):
    """lse = hi + lo in the accumulation type: x - lse is then formed as (x - hi) - lo, free of the
    rounding of a single fp32 lse (half an ulp of |lse|)."""
    hi = lse64.to(ACC)
    lo = (lse64 - hi.to(tl.float64)).to(ACC)
    finite = (hi == hi) & (tl.abs(hi) < float("inf"))
    return hi, tl.where(finite, lo, 0.0)


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr,
    R, C, S,
    x_sN, x_sC, x_sS,
    t_sN, t_sC, t_sS,
    ignore_index, keep, eps_c, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SPATIAL_WALK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    ACC = loss_ptr.dtype.element_ty  # fp32 (fp64 for fp64 input); lse is stored in fp64
    pid = tl.program_id(0).to(tl.int64)
    n, s, row_ok = _tile_rows(pid, R, S, BLOCK_R, SPATIAL_WALK)
    x_row = x_ptr + (n * x_sN + s * x_sS)
    t_row = t_ptr + (n * t_sN + s * t_sS)
    if (not PROB_TARGET) and SPATIAL_WALK:
        # The target's logit and weight before the class loop: nothing but these three values per row
        # stays live across it (loaded after it, the row addresses did, and ptxas parked one in local
        # memory: a spill, seen on sm_80 in the spatial walk).
        y = tl.load(t_row, mask=row_ok, other=0)
        valid = (y >= 0) & (y < C)
        y_safe = tl.where(valid, y, 0)  # an out-of-range target never addresses memory
        x_y = tl.load(x_row + y_safe * x_sC, mask=row_ok & valid, other=0.0).to(ACC)
        if HAS_WEIGHT:
            wy = tl.load(w_ptr + y_safe, mask=row_ok & valid, other=0.0).to(ACC)
        else:
            wy = 1.0

    # Running statistics relative to a finite shift `ref`: the running max once one is finite, 0
    # before (a row whose first chunks are all -inf, a masked vocabulary, would otherwise compute
    # -inf - -inf = NaN). `m` is the true running max and only rescales the sums.
    m = tl.full([BLOCK_R], _NEG_INF, ACC)
    ref = tl.zeros([BLOCK_R], ACC)
    # sum_c exp(x_c - ref) as rest + top: top counts the terms at the max (exactly 1 each), rest sums
    # the others, so a confident row's log-sum is log1p(rest), not the rounding of 1 + rest.
    rest = tl.zeros([BLOCK_R], ACC)
    top = tl.zeros([BLOCK_R], ACC)
    acc_w = tl.zeros([BLOCK_R], ACC)  # sum_c w_c (smoothing) or sum_c w_c t'_c (probabilities)
    acc_wd = tl.zeros([BLOCK_R], ACC)  # the same weights times (x_c - ref)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)  # int64: c * class stride may pass 2^31
        cmask = cols < C
        mask = row_ok[:, None] & cmask[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * x_sC, mask=mask, other=_NEG_INF).to(ACC)
        if HAS_SOFTCAP:  # x' = cap tanh(x / cap); masked lanes stay -inf
            x = tl.where(mask, _capped(x, softcap)[0], _NEG_INF)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        ref_new = tl.where(m_new == _NEG_INF, 0.0, m_new)
        e = x - ref_new[:, None]  # masked lanes: -inf, exp -> 0
        # m - ref_new, not ref - ref_new: while m is -inf the sum is 0 and must stay 0 (exp(-inf) = 0),
        # where exp(0 - ref_new) could overflow to inf and make 0 * inf = NaN.
        scale = tl.exp(m - ref_new)
        grown = m_new > m  # the old max's terms join the rest: e^(m - m_new) < 1 now
        at_max = e == 0.0
        rest = rest * scale + tl.where(grown, top * scale, 0.0) + tl.sum(tl.where(at_max, 0.0, tl.exp(e)), axis=1)
        top = tl.where(grown, 0.0, top) + tl.sum(tl.where(at_max, 1.0, 0.0), axis=1)
        if PROB_TARGET:
            t = tl.load(t_row[:, None] + cols[None, :] * t_sC, mask=mask, other=0.0).to(ACC)
            wt = t * keep + eps_c
            if HAS_WEIGHT:
                wt = wt * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            wt = tl.where(mask, wt, 0.0)
            acc_wd = acc_wd + (ref - ref_new) * acc_w + tl.sum(tl.where(mask, wt * e, 0.0), axis=1)
            acc_w = acc_w + tl.sum(wt, axis=1)
        elif HAS_SMOOTHING:
            if HAS_WEIGHT:
                wc = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
                we = wc[None, :] * e
            else:
                wc = tl.where(cmask, 1.0, 0.0).to(ACC)
                we = e
            acc_wd = acc_wd + (ref - ref_new) * acc_w + tl.sum(tl.where(mask, we, 0.0), axis=1)
            acc_w = acc_w + tl.sum(wc, axis=0)
        m = m_new
        ref = ref_new

    logsum = _log1p(tl.where(row_ok, rest + (top - 1.0), 0.0))  # (rows past the end: no log(0))
    lse = ref + logsum
    lse64 = ref.to(tl.float64) + logsum.to(tl.float64)  # exact: the pair, not its fp32 rounding
    if PROB_TARGET:
        # sum_c w_c t'_c (lse - x_c) = log(sum) * sum_c w_c t'_c - sum_c w_c t'_c (x_c - ref)
        loss = logsum * acc_w - acc_wd + z_loss * lse * lse
    else:
        if not SPATIAL_WALK:
            y = tl.load(t_row, mask=row_ok, other=0)
            valid = (y >= 0) & (y < C)
            y_safe = tl.where(valid, y, 0)
            x_y = tl.load(x_row + y_safe * x_sC, mask=row_ok & valid, other=0.0).to(ACC)
            if HAS_WEIGHT:
                wy = tl.load(w_ptr + y_safe, mask=row_ok & valid, other=0.0).to(ACC)
            else:
                wy = 1.0
        live = valid & (y != ignore_index)
        if HAS_SOFTCAP:
            x_y = _capped(x_y, softcap)[0]
        # (ref - x_y) + log(sum) rather than lse - x_y: exact when the target holds the max logit.
        # (Tensor first, scalars after: the product then takes the tensor's precision.)
        loss = ((ref - x_y) + logsum) * keep * wy
        if HAS_SMOOTHING:
            # sum_c w_c (lse - x_c) = W (lse - ref) - sum_c w_c (x_c - ref): no cancellation of large
            # logits, as summing lse - x_c directly would have.
            loss = loss + (acc_w * logsum - acc_wd) * eps_c
        loss = loss + z_loss * lse * lse  # PaLM's z-loss, per kept row
        # Selects, not a multiply by a 0/1 flag: an ignored row's loss may be inf or NaN. A target
        # out of [0, C) that is not ignored is a NaN row: loud, not a silent 0.
        loss = tl.where(live, loss, tl.where(y == ignore_index, 0.0, _NAN))
    r = n * S + s
    tl.store(loss_ptr + r, loss.to(ACC), mask=row_ok)
    tl.store(lse_ptr + r, lse64, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Class-index pieces shared by the forward + gradient kernel and the backward kernels: the same
# expressions in the same order, so a fused gradient has the bits of the unfused one.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _stats_step(x, mask, cmask, cols, w_ptr, m, ref, rest, top, acc_w, acc_wd,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr):
    """One chunk of the forward's online max / sum-exp (class-index targets); see _ce_fwd_kernel for
    the meaning of each running value. ``x``: the chunk's (soft-capped) logits, -inf where masked."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref_new = tl.where(m_new == _NEG_INF, 0.0, m_new)
    e = x - ref_new[:, None]
    scale = tl.exp(m - ref_new)
    grown = m_new > m
    at_max = e == 0.0
    rest = rest * scale + tl.where(grown, top * scale, 0.0) + tl.sum(tl.where(at_max, 0.0, tl.exp(e)), axis=1)
    top = tl.where(grown, 0.0, top) + tl.sum(tl.where(at_max, 1.0, 0.0), axis=1)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            wc = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
            we = wc[None, :] * e
        else:
            wc = tl.where(cmask, 1.0, 0.0).to(ACC)
            we = e
        acc_wd = acc_wd + (ref - ref_new) * acc_w + tl.sum(tl.where(mask, we, 0.0), axis=1)
        acc_w = acc_w + tl.sum(wc, axis=0)
    return m_new, ref_new, rest, top, acc_w, acc_wd


@triton.jit
def _ci_target(x_row, t_row, w_ptr, row_ok, C, x_sC, ignore_index, softcap,
               HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Per row: the target y, whether it is in range and counts, the (soft-capped) target logit x'_y,
    tanh(x_y / cap) (x'_y without soft-capping) and w_y. An out-of-range target addresses no memory."""
    y = tl.load(t_row, mask=row_ok, other=0)
    valid = (y >= 0) & (y < C)
    live = valid & (y != ignore_index)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(x_row + y_safe * x_sC, mask=row_ok & valid, other=0.0).to(ACC)
    th_y = x_y
    if HAS_SOFTCAP:
        x_y, th_y = _capped(x_y, softcap)
    if HAS_WEIGHT:
        wy = tl.load(w_ptr + y_safe, mask=row_ok & valid, other=0.0).to(ACC)
    else:
        wy = tl.full([BLOCK_R], 1.0, ACC)
    return y, valid, live, x_y, th_y, wy


@triton.jit
def _ci_coefs(g, x_y, th_y, wy, y, hi, lo, wsum_ptr, num_classes, ignore_index, keep, eps_c, z_loss,
              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """Per-row factors of the gradient for upstream gradient ``g``: d loss / d x'_c = kp p_c - kw w_c
    off the target, gy at it; ``fill`` for rows that do not count."""
    # (1-eps) wy p_c + (eps/C)(p_c W - w_c) + 2 z lse p_c, times g; with soft-capping times
    # d x'/d x = 1 - tanh^2.
    lse = hi
    kp = g * (keep * wy + 2.0 * z_loss * lse)
    kw = g * eps_c
    dy = (x_y - hi) - lo
    # The target's own element, p_y - 1 as expm1 (see _expm1); dy is exact to the fp32 log-sum,
    # so a confident, correct prediction keeps its small gradient.
    gy = g * (keep * wy * _expm1(dy) + 2.0 * z_loss * lse * tl.exp(dy))
    if HAS_SMOOTHING:
        w_total = _w_total(wsum_ptr, num_classes, HAS_WEIGHT, HAS_SMOOTHING, ACC)
        kp = kp + kw * w_total
        gy = gy + kw * (tl.exp(dy) * w_total - wy)
    if HAS_SOFTCAP:
        gy = gy * (1.0 - th_y * th_y)
    # Rows that do not count: exact zeros when ignored, whatever their logits hold (a select, so
    # an inf or NaN logit cannot leak in as 0 * inf); NaN when the target is out of range.
    fill = tl.where(y == ignore_index, 0.0, float("nan")).to(ACC)
    return kp, kw, gy, fill


@triton.jit
def _w_total(wsum_ptr, num_classes, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr):
    """W = sum_c w_c (torch's sum of the weight, read from memory) or C; only smoothing needs it."""
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w_total = tl.load(wsum_ptr).to(ACC)
        else:
            w_total = num_classes
    else:
        w_total = 0.0
    return w_total


@triton.jit
def _ci_grad(x, th, cols, cmask, y, live, kp, kw, gy, fill, hi, lo, w_ptr,
             HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             ACC: tl.constexpr):
    """One chunk's input gradient (fp32, uncast); ``x`` the soft-capped logits x', ``th`` tanh(x / cap)."""
    o = tl.exp((x - hi[:, None]) - lo[:, None]) * kp[:, None]
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            o = o - kw[:, None] * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        else:
            o = o - kw[:, None]
    if HAS_SOFTCAP:
        o = o * (1.0 - th * th)
    o = tl.where(cols[None, :] == y[:, None], gy[:, None], o)
    return tl.where(live[:, None], o, fill[:, None])


@triton.jit
def _ci_grad_chunks(x_row, gx_row, w_ptr, row_ok, C, x_sC, gx_sC, softcap, y, live, kp, kw, gy, fill, hi, lo,
                    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The rows' input gradient, chunk by chunk, each chunk's logits loaded before its gradient is
    stored (so ``gx_row`` may be ``x_row``)."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        mask = row_ok[:, None] & cmask[None, :]
        x = tl.load(x_row[:, None] + cols[None, :] * x_sC, mask=mask, other=0.0).to(ACC)
        th = x
        if HAS_SOFTCAP:
            x, th = _capped(x, softcap)
        o = _ci_grad(x, th, cols, cmask, y, live, kp, kw, gy, fill, hi, lo, w_ptr,
                     HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)
        tl.store(gx_row[:, None] + cols[None, :] * gx_sC, o.to(gx_row.dtype.element_ty), mask=mask)


@triton.jit
def _ci_bwd_rows(x_row, t_row, gx_row, w_ptr, wsum_ptr, g, hi, lo, row_ok, C, num_classes, x_sC, gx_sC,
                 ignore_index, keep, eps_c, z_loss, softcap,
                 HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """The input gradient of a block of class-index rows from the saved lse (one more read of the
    logits). In place (gx_row == x_row) every logit is loaded before its gradient is stored."""
    y, valid, live, x_y, th_y, wy = _ci_target(x_row, t_row, w_ptr, row_ok, C, x_sC, ignore_index, softcap,
                                               HAS_WEIGHT, HAS_SOFTCAP, BLOCK_R, ACC)
    kp, kw, gy, fill = _ci_coefs(g, x_y, th_y, wy, y, hi, lo, wsum_ptr, num_classes, ignore_index, keep, eps_c,
                                 z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)
    _ci_grad_chunks(x_row, gx_row, w_ptr, row_ok, C, x_sC, gx_sC, softcap, y, live, kp, kw, gy, fill, hi, lo,
                    HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_C, ACC)


# ----------------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_bwd_kernel(
    go_ptr, g_ptr, x_ptr, t_ptr, w_ptr, wsum_ptr, lse_ptr, gx_ptr, gt_ptr,
    R, C, S, num_classes,
    g_sN, g_sS,
    x_sN, x_sC, x_sS,
    t_sN, t_sC, t_sS,
    gx_sN, gx_sC, gx_sS,
    gt_sN, gt_sC, gt_sS,
    ignore_index, keep, eps_c, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    SPATIAL_WALK: tl.constexpr,
    CHECK_ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """The input (and probability-target) gradient for the per-row upstream gradient ``g``, from the
    saved lse. CHECK_ONE: the backward of the fused forward (class-index targets), whose gradient
    buffer already holds the answer when grad_output (``go_ptr``) is 1 -- decided here, on the
    device, so the host never waits -- and is otherwise rewritten from the logits for ``g``
    (grad_output / denom, scaled in fp32 before the one cast, as the unfused backward)."""
    if CHECK_ONE:
        if tl.load(go_ptr) == 1.0:
            return
    # In place (gx_ptr == x_ptr) every logit is loaded before its gradient is stored: x_y before the
    # loops, and each chunk's loads before that chunk's stores.
    pid = tl.program_id(0).to(tl.int64)
    n, s, row_ok = _tile_rows(pid, R, S, BLOCK_R, SPATIAL_WALK)
    x_row = x_ptr + (n * x_sN + s * x_sS)
    t_row = t_ptr + (n * t_sN + s * t_sS)
    gx_row = gx_ptr + (n * gx_sN + s * gx_sS)
    g = tl.load(g_ptr + (n * g_sN + s * g_sS), mask=row_ok, other=0.0).to(ACC)
    lse64 = tl.load(lse_ptr + (n * S + s), mask=row_ok, other=0.0)
    hi, lo = _split_lse(lse64, ACC)
    lse = hi

    if PROB_TARGET:
        gt_row = gt_ptr + (n * gt_sN + s * gt_sS)
        gtw = tl.zeros([BLOCK_R], ACC)
        if INPUT_GRAD:
            # d loss / d x_c = g (p_c sum_k w_k t'_k - w_c t'_c): the target's weighted mass first.
            tw = tl.zeros([BLOCK_R], ACC)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                cmask = cols < C
                mask = row_ok[:, None] & cmask[None, :]
                t = tl.load(t_row[:, None] + cols[None, :] * t_sC, mask=mask, other=0.0).to(ACC)
                wt = t * keep + eps_c
                if HAS_WEIGHT:
                    wt = wt * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
                tw = tw + tl.sum(tl.where(mask, wt, 0.0), axis=1)
            gtw = g * (tw + 2.0 * z_loss * lse)  # z-loss: + 2 z lse p_c
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            cmask = cols < C
            mask = row_ok[:, None] & cmask[None, :]
            x = tl.load(x_row[:, None] + cols[None, :] * x_sC, mask=mask, other=0.0).to(ACC)
            if HAS_SOFTCAP:
                x, th = _capped(x, softcap)
                slope = 1.0 - th * th  # d x' / d x
            if HAS_WEIGHT:
                wc = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            else:
                wc = 1.0
            if INPUT_GRAD:
                t = tl.load(t_row[:, None] + cols[None, :] * t_sC, mask=mask, other=0.0).to(ACC)
                wt = (t * keep + eps_c) * wc
                o = tl.exp((x - hi[:, None]) - lo[:, None]) * gtw[:, None] - g[:, None] * wt
                if HAS_SOFTCAP:
                    o = o * slope
            if TARGET_GRAD:
                # d loss / d t_c = (1 - eps) w_c (lse - x'_c)
                o_t = (g * keep)[:, None] * wc * ((hi[:, None] - x) + lo[:, None])
                tl.store(gt_row[:, None] + cols[None, :] * gt_sC, o_t.to(gt_ptr.dtype.element_ty), mask=mask)
            if INPUT_GRAD:
                # after the target's loads and stores: in place (gx over x), this chunk of x is read
                tl.store(gx_row[:, None] + cols[None, :] * gx_sC, o.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        _ci_bwd_rows(x_row, t_row, gx_row, w_ptr, wsum_ptr, g, hi, lo, row_ok, C, num_classes, x_sC, gx_sC,
                     ignore_index, keep, eps_c, z_loss, softcap, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP,
                     BLOCK_R, BLOCK_C, ACC)


# ----------------------------------------------------------------------------------------------
# Forward + gradient in one kernel (the fused path, class-index targets), and its backward.
#
# Memory traffic of a training step over N x V logits of b bytes each, the gradient b bytes too:
#   unfused: forward reads N V b, backward reads N V b and writes N V b      -> 3 N V b
#   fused:   this kernel reads N V b and writes N V b; backward, grad_output 1: nothing -> 2 N V b
# A row (block) is read twice by this kernel -- the statistics, then the gradient -- but the second
# read comes from L2, not from memory: the program re-reads chunks it read a few microseconds
# earlier, and the L2 holds every resident program's rows while their footprint (SMs x resident
# programs x V b; 132 x 256 KB = 33 MB for V = 128k bf16 at one program per SM) stays under its size
# (50 MB H100, 60 MB H200); past that (V = 256k bf16, or more programs per SM) part of the second
# read goes to memory. A row of at most BLOCK_C classes (ONE_CHUNK) is held in registers instead
# and read once. The gradient is written for the upstream gradient `scale` of every row: 1/denom
# for a mean (a device tensor: no host sync for the weighted count of kept rows), 1 for a sum.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_fused_kernel(
    x_ptr, t_ptr, w_ptr, wsum_ptr, s_ptr, loss_ptr, lse_ptr, gx_ptr,
    R, C, S, num_classes,
    x_sN, x_sC, x_sS,
    t_sN, t_sS,
    gx_sN, gx_sC, gx_sS,
    ignore_index, keep, eps_c, z_loss, softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SPATIAL_WALK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # In place (gx_ptr == x_ptr): every logit is read before its gradient is stored -- the
    # statistics pass and x_y come first, and each gradient chunk is loaded before it is stored.
    ACC = loss_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n, s, row_ok = _tile_rows(pid, R, S, BLOCK_R, SPATIAL_WALK)
    x_row = x_ptr + (n * x_sN + s * x_sS)
    t_row = t_ptr + (n * t_sN + s * t_sS)
    gx_row = gx_ptr + (n * gx_sN + s * gx_sS)

    m = tl.full([BLOCK_R], _NEG_INF, ACC)
    ref = tl.zeros([BLOCK_R], ACC)
    rest = tl.zeros([BLOCK_R], ACC)
    top = tl.zeros([BLOCK_R], ACC)
    acc_w = tl.zeros([BLOCK_R], ACC)
    acc_wd = tl.zeros([BLOCK_R], ACC)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        mask = row_ok[:, None] & cmask[None, :]
        xk = tl.load(x_row[:, None] + cols[None, :] * x_sC, mask=mask, other=_NEG_INF).to(ACC)
        th = xk
        if HAS_SOFTCAP:
            xk, th = _capped(xk, softcap)
            xk = tl.where(mask, xk, _NEG_INF)
        m, ref, rest, top, acc_w, acc_wd = _stats_step(xk, mask, cmask, cols, w_ptr, m, ref, rest, top, acc_w,
                                                       acc_wd, HAS_WEIGHT, HAS_SMOOTHING, ACC)
    else:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            cmask = cols < C
            mask = row_ok[:, None] & cmask[None, :]
            x = tl.load(x_row[:, None] + cols[None, :] * x_sC, mask=mask, other=_NEG_INF).to(ACC)
            if HAS_SOFTCAP:
                x = tl.where(mask, _capped(x, softcap)[0], _NEG_INF)
            m, ref, rest, top, acc_w, acc_wd = _stats_step(x, mask, cmask, cols, w_ptr, m, ref, rest, top, acc_w,
                                                           acc_wd, HAS_WEIGHT, HAS_SMOOTHING, ACC)

    # The loss, as _ce_fwd_kernel forms it for class-index targets.
    logsum = _log1p(tl.where(row_ok, rest + (top - 1.0), 0.0))
    lse = ref + logsum
    lse64 = ref.to(tl.float64) + logsum.to(tl.float64)
    y, valid, live, x_y, th_y, wy = _ci_target(x_row, t_row, w_ptr, row_ok, C, x_sC, ignore_index, softcap,
                                               HAS_WEIGHT, HAS_SOFTCAP, BLOCK_R, ACC)
    loss = ((ref - x_y) + logsum) * keep * wy
    if HAS_SMOOTHING:
        loss = loss + (acc_w * logsum - acc_wd) * eps_c
    loss = loss + z_loss * lse * lse
    loss = tl.where(live, loss, tl.where(y == ignore_index, 0.0, float("nan")))
    r = n * S + s
    tl.store(loss_ptr + r, loss.to(ACC), mask=row_ok)
    tl.store(lse_ptr + r, lse64, mask=row_ok)

    # The gradient, as the backward kernel forms it from the stored lse (the same fp64 value).
    hi, lo = _split_lse(lse64, ACC)
    if HAS_SCALE:
        g = tl.zeros([BLOCK_R], ACC) + tl.load(s_ptr).to(ACC)
    else:
        g = tl.full([BLOCK_R], 1.0, ACC)
    kp, kw, gy, fill = _ci_coefs(g, x_y, th_y, wy, y, hi, lo, wsum_ptr, num_classes, ignore_index, keep, eps_c,
                                 z_loss, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)
    if ONE_CHUNK:
        o = _ci_grad(xk, th, cols, cmask, y, live, kp, kw, gy, fill, hi, lo, w_ptr,
                     HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)
        tl.store(gx_row[:, None] + cols[None, :] * gx_sC, o.to(gx_ptr.dtype.element_ty), mask=mask)
    else:  # the row again, from L2 (see the section comment)
        _ci_grad_chunks(x_row, gx_row, w_ptr, row_ok, C, x_sC, gx_sC, softcap, y, live, kp, kw, gy, fill, hi, lo,
                        HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_C, ACC)


@triton.jit
def _ce_scale_kernel(
    go_ptr, gx_ptr,
    R, C, S,
    gx_sN, gx_sC, gx_sS,
    SPATIAL_WALK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The backward of the in-place fused forward (float32 only): the logits are gone, so the
    gradient written for grad_output 1 is multiplied by grad_output in fp32 -- one rounding more
    than a recompute -- and left as it is, without touching memory, when grad_output is 1."""
    go = tl.load(go_ptr)
    if go == 1.0:
        return
    pid = tl.program_id(0).to(tl.int64)
    n, s, row_ok = _tile_rows(pid, R, S, BLOCK_R, SPATIAL_WALK)
    gx_row = gx_ptr + (n * gx_sN + s * gx_sS)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = row_ok[:, None] & (cols < C)[None, :]
        p = gx_row[:, None] + cols[None, :] * gx_sC
        v = tl.load(p, mask=mask, other=0.0)
        tl.store(p, v * go.to(v.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration.
# ----------------------------------------------------------------------------------------------

# On a GPU: a row of up to 8k classes is one chunk (16 fp32 per thread at 16 warps); a tile holds
# at least _TILE elements so that small-C rows and the spatial walk still keep every warp busy.
# (16k-class chunks, 32 values per thread under the 128-register cap of 16 warps, spilled in the
# backward with a probability target on sm_90: python -m lossfuse.triton.aot.)
_MAX_BLOCK_C = 8192
_TILE = 2048
_MAX_BLOCK_S = 128  # spatial walk: 128 neighbouring positions, a 512-byte run of fp32 per class
# Under the interpreter every block op is a numpy call per program: small chunks, so the tests go
# through the online rescaling and the masked tails with small shapes.
_INTERPRET_MAX_BLOCK_C = 32
_INTERPRET_TILE = 128
_INTERPRET_MAX_BLOCK_S = 16


def _spatial_walk(x3: torch.Tensor) -> bool:
    return not classes_contiguous(x3) and x3.shape[2] > 1


def _launch_config(n: int, c: int, s: int, spatial: bool, interpret: bool):
    """(grid, BLOCK_R, BLOCK_C, num_warps) for an (n, c, s) problem in the given walk order."""
    max_c = _INTERPRET_MAX_BLOCK_C if interpret else _MAX_BLOCK_C
    tile = _INTERPRET_TILE if interpret else _TILE
    max_s = _INTERPRET_MAX_BLOCK_S if interpret else _MAX_BLOCK_S
    if spatial:
        block_r = min(triton.next_power_of_2(s), max_s)
        block_c = min(triton.next_power_of_2(c), max(1, tile // block_r))
        grid = (n * triton.cdiv(s, block_r),)
    else:
        block_c = min(triton.next_power_of_2(c), max_c)
        block_r = max(1, min(tile // block_c, triton.next_power_of_2(n * s)))
        grid = (triton.cdiv(n * s, block_r),)
    # 4..16 elements per thread (32 at 16k); a tall tile (many rows of few classes) also gets a warp per
    # 256 rows: each row keeps its own running statistics, and 16 rows per thread spilled on sm_90.
    num_warps = min(16, max(4, (block_r * block_c) // 512, block_r // 256))
    return grid, block_r, block_c, num_warps


# The shapes the GPU heuristics are enumerated over for ahead-of-time compilation (lossfuse/triton/aot.py):
# _launch_config and fused_launch_config depend on n, c, s only through next_power_of_2, min/max and
# c <= BLOCK_C, so powers of two up to twice each cap reach every configuration they can return, for any
# shape.
def _aot_shapes():
    pow2 = [1 << k for k in range(max(_MAX_BLOCK_C, _TILE).bit_length() + 1)]
    for spatial in (False, True):
        for c in pow2:
            for r in pow2:
                # spatial: r is S (walks need S > 1), n = 1; rows: r is N * S, walked with S = 1
                if spatial and r == 1:
                    continue
                yield ((1, c, r) if spatial else (r, c, 1)), spatial


def launch_configs(archs=(80, 90)):
    """Every GPU launch configuration of the kernels above, as constexprs + launch options (num_warps,
    and for the fused kernels maxnreg per arch in ``archs``, as ((arch, value), ...)): the distinct
    outputs of _launch_config and fused_launch_config (what the launchers call) over all shapes, per
    kernel."""
    seen, fused, fused_bwd = {}, {}, {}
    for (n, c, s), spatial in _aot_shapes():
        _, block_r, block_c, num_warps = _launch_config(n, c, s, spatial, interpret=False)
        cfg = dict(SPATIAL_WALK=spatial, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        seen[tuple(cfg.values())] = cfg
        per_arch = {arch: fused_launch_config(n, c, s, spatial, False, arch) for arch in archs}
        tiles = {out[1:5] for out in per_arch.values()}
        if len(tiles) != 1:  # one variant is compiled for every arch: only maxnreg may differ by arch
            raise ValueError(f"fused_launch_config({n}, {c}, {s}, {spatial}) tiles differ by arch: {per_arch}")
        _, block_r, block_c, num_warps, one_chunk, _ = per_arch[archs[0]]
        maxnreg = tuple((arch, out[5]) for arch, out in per_arch.items())
        cfg = dict(SPATIAL_WALK=spatial, ONE_CHUNK=one_chunk, BLOCK_R=block_r, BLOCK_C=block_c,
                   num_warps=num_warps, maxnreg=maxnreg)
        fused[tuple(cfg.values())] = cfg
        cfg = {k: v for k, v in cfg.items() if k != "ONE_CHUNK"}  # the backward kernels have no ONE_CHUNK
        fused_bwd[tuple(cfg.values())] = cfg
    configs = list(seen.values())
    # _ce_bwd_kernel: the unfused backward's tiles, and with CHECK_ONE (cross_entropy_fused_bwd) the
    # fused forward's.
    bwd = [dict(cfg, CHECK_ONE=False) for cfg in configs] + [dict(cfg, CHECK_ONE=True) for cfg in fused_bwd.values()]
    return {"_ce_fwd_kernel": configs, "_ce_bwd_kernel": bwd, "_ce_fused_kernel": list(fused.values()),
            "_ce_scale_kernel": list(fused_bwd.values())}


# Rows held in registers by the fused kernel: at 16384 classes (32 fp32 per thread at 16 warps, the
# 128-register ceiling of 512 threads) the logits, their tanh and the gradient do not fit and ptxas
# spills (320 bytes with every option on). Longer rows are walked in chunks of this size too: at
# 16384 the float32 chunk loop with weight, smoothing and soft-capping spills 124 bytes on sm_90.
_FUSED_ONE_CHUNK_MAX = 8192


def _arch(t: torch.Tensor) -> int:
    """Compute capability x 10 of a CUDA tensor's device (a cached host query, no sync); 90 otherwise."""
    if t.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def fused_launch_config(n: int, c: int, s: int, spatial: bool, interpret: bool, arch: int = 90):
    """(grid, BLOCK_R, BLOCK_C, num_warps, ONE_CHUNK, maxnreg) of _ce_fused_kernel, of _ce_bwd_kernel
    with CHECK_ONE and of _ce_scale_kernel (these two ignore ONE_CHUNK).

    The tiles are the forward's (_launch_config; the same chunks give the same running sums, so the
    fused loss has the unfused one's bits) except that a chunk holds at most _FUSED_ONE_CHUNK_MAX
    classes; a row that fits one chunk is held in registers between the statistics and the
    gradient (ONE_CHUNK). Tiles of 64+ rows (short rows, the spatial walk) take 8 warps: at 4 their
    per-row state needs 255 registers and spills.

    maxnreg: launch_maxnreg's for the option-free kernels; a launcher with loss options asks
    launch_maxnreg itself.
    """
    grid, block_r, block_c, num_warps = _launch_config(n, c, s, spatial, interpret)
    if block_r >= 64:
        num_warps = max(num_warps, 8)
    one_chunk = c <= block_c <= _FUSED_ONE_CHUNK_MAX
    block_c = min(block_c, _FUSED_ONE_CHUNK_MAX)
    return grid, block_r, block_c, num_warps, one_chunk, launch_maxnreg(num_warps, arch, fused=True, options=False)


def launch_maxnreg(num_warps: int, arch: int, fused: bool, options: bool):
    """The ``maxnreg`` a launch states: the block's hardware ceiling (65536 registers / threads, at most
    255) or None (ptxas' own choice).

    Left to itself, ptxas sometimes parks a value or two in local memory rather than take more
    registers: in the kernels with loss options (weight, smoothing, soft-capping, a probability target:
    the most live values) at a few tile shapes on either arch, and in the fused kernels below sm_90
    (ptxas 12.9 settles on 64 registers for some and spills 4-8 bytes). python -m lossfuse.triton.aot
    found 8 such variants in 1324 of the cover set on Triton 3.9 (4-16 bytes each); stating the
    ceiling, they compile with no spill. The option-free kernels -- the common call -- keep ptxas'
    choice, which favours resident blocks and spills nothing there.
    """
    if options or (fused and arch < 90):
        return min(255, 65536 // (32 * num_warps))
    return None


def _options(weight, eps: float, softcap: float, prob: bool) -> bool:
    return weight is not None or eps > 0 or softcap > 0 or prob


def _check_inputs(input: torch.Tensor, target: torch.Tensor, who: str) -> bool:
    """Cheap invariants that protect memory; returns True for a probability target."""
    if input.dim() != 3:
        raise ValueError(f"{who}: input must be viewed as (N, C, S); got shape {list(input.shape)}")
    check_device(input, who)
    n, c, s = input.shape
    if target.is_floating_point():
        if tuple(target.shape) != (n, c, s):
            raise ValueError(
                f"{who}: a probability target must have shape {[n, c, s]}; got {list(target.shape)}"
            )
        if target.dtype not in (input.dtype, acc_dtype(input.dtype)):
            raise TypeError(
                f"{who}: a probability target must be {input.dtype} or {acc_dtype(input.dtype)}; "
                f"got {target.dtype}"
            )
        return True
    if target.dtype != torch.int64:
        raise TypeError(f"{who}: class-index targets must be int64; got {target.dtype}")
    if tuple(target.shape) != (n, s):
        raise ValueError(f"{who}: a class-index target must have shape {[n, s]}; got {list(target.shape)}")
    return False


def _weight(weight, c: int, acc: torch.dtype):
    if weight is None:
        return None
    if weight.shape != (c,):
        raise ValueError(f"weight must have shape ({c},); got {list(weight.shape)}")
    return weight.to(acc).contiguous()


def _smoothing(label_smoothing: float, c: int):
    eps = float(label_smoothing)
    return eps, 1.0 - eps, (eps / c if c > 0 else 0.0)


# ----------------------------------------------------------------------------------------------
# Launchers (the op implementations).
# ----------------------------------------------------------------------------------------------


def _option_flags(w, eps, softcap) -> dict:
    """The loss options' constexprs, as every cross-entropy kernel names them."""
    return dict(HAS_WEIGHT=w is not None, HAS_SMOOTHING=eps > 0, HAS_SOFTCAP=softcap > 0)


def cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss (N, S) fp32 (fp64 for fp64 input) and log-sum-exp (N, S) fp64, contiguous."""
    prob = _check_inputs(input, target, "cross_entropy_fwd")
    n, c, s = input.shape
    acc = acc_dtype(input.dtype)
    loss = torch.empty((n, s), dtype=acc, device=input.device)
    lse = torch.empty((n, s), dtype=torch.float64, device=input.device)
    if n * s == 0:
        return loss, lse
    eps, keep, eps_c = _smoothing(label_smoothing, c)
    if c == 0:  # an empty sum: lse = -inf; every class-index target is ignored or out of range
        lse.fill_(float("-inf"))
        if prob:
            loss.zero_()
        else:
            loss.copy_(torch.where(target == ignore_index, 0.0, float("nan")))
        return loss, lse
    w = _weight(weight, c, acc)
    spatial = _spatial_walk(input)
    grid, block_r, block_c, num_warps = _launch_config(n, c, s, spatial, _interpreting())
    maxnreg = launch_maxnreg(num_warps, _arch(input), False, _options(w, eps, softcap, prob))
    t_sC = target.stride(1) if prob else 0
    t_sS = target.stride(2) if prob else target.stride(1)
    _ce_fwd_kernel[grid](
        input, target, w if w is not None else loss, loss, lse,
        n * s, c, s,
        input.stride(0), input.stride(1), input.stride(2),
        target.stride(0), t_sC, t_sS,
        int(ignore_index), keep, eps_c, float(z_loss), float(softcap) if softcap > 0 else 1.0,
        **_option_flags(w, eps, softcap),
        PROB_TARGET=prob,
        SPATIAL_WALK=spatial,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )
    return loss, lse


def _target_grad(input, target, target_grad):
    """Allocated exactly as the fake kernels do (ops/cross_entropy.py)."""
    if target_grad and target.is_floating_point():
        return empty_like_layout(input, dtype=target.dtype)
    return target.new_empty((0,), dtype=target.dtype if target.is_floating_point() else input.dtype)


def _launch_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, gi, gt,
                need_input, need_target, grad_output=None):
    """_ce_bwd_kernel on the backward's tiles; with ``grad_output`` (cross_entropy_fused_bwd) on the
    fused forward's tiles, with CHECK_ONE."""
    prob = target.is_floating_point()
    n, c, s = input.shape
    if n * s * c == 0 or not (need_input or need_target):
        return
    if tuple(grad.shape) != (n, s) or tuple(lse.shape) != (n, s):
        raise ValueError(f"cross_entropy_bwd: grad and lse must have shape {[n, s]}")
    lse = lse.to(torch.float64).contiguous()
    acc = acc_dtype(input.dtype)
    eps, keep, eps_c = _smoothing(label_smoothing, c)
    w = _weight(weight, c, acc)
    wsum = w.sum().reshape(1) if (w is not None and eps > 0 and not prob) else None
    spatial = _spatial_walk(input)
    if grad_output is None:
        grid, block_r, block_c, num_warps = _launch_config(n, c, s, spatial, _interpreting())
        go = grad  # never read without CHECK_ONE
    else:
        grid, block_r, block_c, num_warps, _, _ = fused_launch_config(n, c, s, spatial, _interpreting())
        go = grad_output.to(acc)
    maxnreg = launch_maxnreg(num_warps, _arch(input), grad_output is not None, _options(w, eps, softcap, prob))
    t_sC = target.stride(1) if prob else 0
    t_sS = target.stride(2) if prob else target.stride(1)
    gx = gi if need_input else input  # never written when not needed
    gtt = gt if need_target else target
    gt_strides = (gt.stride(0), gt.stride(1), gt.stride(2)) if need_target else (0, 0, 0)
    gx_strides = (gx.stride(0), gx.stride(1), gx.stride(2)) if need_input else (0, 0, 0)
    _ce_bwd_kernel[grid](
        go, grad, input, target, w if w is not None else lse, wsum if wsum is not None else lse, lse, gx, gtt,
        n * s, c, s, float(c),
        grad.stride(0), grad.stride(1),
        input.stride(0), input.stride(1), input.stride(2),
        target.stride(0), t_sC, t_sS,
        *gx_strides,
        *gt_strides,
        int(ignore_index), keep, eps_c, float(z_loss), float(softcap) if softcap > 0 else 1.0,
        **_option_flags(w, eps, softcap),
        PROB_TARGET=prob,
        INPUT_GRAD=need_input,
        TARGET_GRAD=need_target,
        SPATIAL_WALK=spatial,
        CHECK_ONE=grad_output is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )


def cross_entropy_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                      input_grad, target_grad):
    """grad_input (laid out as empty_like_layout(input)) and grad_target; 0-element where not asked.

    ``grad`` is the (N, S) upstream gradient per row, read with its strides (an expanded scalar for
    mean/sum reductions costs no copy).
    """
    prob = _check_inputs(input, target, "cross_entropy_bwd")
    # Allocations exactly as the fake kernel (ops/cross_entropy.py _bwd_fake).
    gi = empty_like_layout(input) if input_grad else input.new_empty((0,))
    gt = _target_grad(input, target, target_grad)
    _launch_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, gi, gt,
                bool(input_grad), bool(target_grad) and prob)
    return gi, gt


def cross_entropy_bwd_inplace(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                              target_grad):
    """The input gradient written over ``input`` (each chunk is loaded before it is stored); returns
    grad_target (0-element unless asked for a probability target)."""
    prob = _check_inputs(input, target, "cross_entropy_bwd_inplace")
    gt = _target_grad(input, target, target_grad)
    _launch_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, input, gt,
                True, bool(target_grad) and prob)
    return gt


def cross_entropy_fused(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    """The fused op's contract (loss, lse, grad_input for grad_scale on every row) as the two kernels in
    turn. The autograd Function asks for this op (a host float grad_scale) on the CPU only -- on CUDA it
    takes cross_entropy_fused_scaled, one kernel; this keeps the op complete for direct callers."""
    loss, lse = cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    n, _, s = input.shape
    g = torch.full((1, 1), float(grad_scale), dtype=acc_dtype(input.dtype), device=input.device).expand(n, s)
    gi, _ = cross_entropy_bwd(g, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                              True, False)
    return loss, lse, gi


def _launch_fused(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, gx, who):
    """loss, lse and (into ``gx``: a new buffer, or ``input`` itself) the gradient for the upstream
    gradient ``grad_scale`` (a 0-dim device tensor; None for 1) on every row, in one kernel."""
    if _check_inputs(input, target, who):
        raise TypeError(f"{who}: the fused forward takes class-index targets; got a probability target")
    n, c, s = input.shape
    acc = acc_dtype(input.dtype)
    loss = torch.empty((n, s), dtype=acc, device=input.device)
    lse = torch.empty((n, s), dtype=torch.float64, device=input.device)
    if n * s == 0:
        return loss, lse
    if c == 0:  # no classes: lse = -inf, rows 0 when ignored and NaN (out of range) else; no gradient
        lse.fill_(float("-inf"))
        loss.copy_(torch.where(target == ignore_index, 0.0, float("nan")))
        return loss, lse
    if grad_scale is not None and grad_scale.numel() != 1:
        raise ValueError(f"{who}: grad_scale must hold one value; got shape {list(grad_scale.shape)}")
    eps, keep, eps_c = _smoothing(label_smoothing, c)
    w = _weight(weight, c, acc)
    wsum = w.sum().reshape(1) if (w is not None and eps > 0) else None
    spatial = _spatial_walk(input)
    grid, block_r, block_c, num_warps, one_chunk, _ = fused_launch_config(n, c, s, spatial, _interpreting())
    maxnreg = launch_maxnreg(num_warps, _arch(input), True, _options(w, eps, softcap, False))
    _ce_fused_kernel[grid](
        input, target, w if w is not None else loss, wsum if wsum is not None else loss,
        grad_scale if grad_scale is not None else loss, loss, lse, gx,
        n * s, c, s, float(c),
        input.stride(0), input.stride(1), input.stride(2),
        target.stride(0), target.stride(1),
        gx.stride(0), gx.stride(1), gx.stride(2),
        int(ignore_index), keep, eps_c, float(z_loss), float(softcap) if softcap > 0 else 1.0,
        **_option_flags(w, eps, softcap),
        HAS_SCALE=grad_scale is not None,
        SPATIAL_WALK=spatial,
        ONE_CHUNK=one_chunk,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )
    return loss, lse


def cross_entropy_fused_scaled(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """(loss, lse, grad_input): the forward and the input gradient for the upstream gradient
    ``grad_scale`` (0-dim device tensor, None for 1) from one read of the logits; grad_input is laid
    out as empty_like_layout(input), as the backward op's."""
    gi = empty_like_layout(input)
    loss, lse = _launch_fused(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                              gi, "cross_entropy_fused_scaled")
    return loss, lse, gi


def cross_entropy_fused_scaled_inplace(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                                       softcap):
    """(loss, lse); the input gradient for ``grad_scale`` written over ``input`` in the same pass."""
    return _launch_fused(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                         input, "cross_entropy_fused_scaled_inplace")


def cross_entropy_fused_bwd(grad_output, grad, grad_input, input, target, weight, lse, ignore_index,
                            label_smoothing, z_loss, softcap):
    """The backward of cross_entropy_fused_scaled (grad_scale 1/denom or 1): ``grad_input`` holds the
    gradient for grad_output 1. The kernel reads ``grad_output`` (0-dim) on the device and leaves
    grad_input as it is when it is 1; otherwise it rewrites grad_input from the logits for the
    per-row upstream gradient ``grad`` ((N, S), e.g. grad_output / denom expanded). No host sync."""
    if _check_inputs(input, target, "cross_entropy_fused_bwd"):
        raise TypeError("cross_entropy_fused_bwd: takes class-index targets; got a probability target")
    n, c, s = input.shape
    if tuple(grad.shape) != (n, s) or tuple(lse.shape) != (n, s) or grad_output.numel() != 1:
        raise ValueError(f"cross_entropy_fused_bwd: grad and lse must have shape {[n, s]}, grad_output one value")
    if grad_input.shape != input.shape or grad_input.dtype != input.dtype:
        raise ValueError("cross_entropy_fused_bwd: grad_input must have the input's shape and dtype")
    _launch_bwd(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, grad_input, None,
                True, False, grad_output)


def cross_entropy_scale_inplace(grad_output, grad_input):
    """grad_input *= grad_output (0-dim), in place and in grad_input's dtype (float32 / float64), read
    on the device: nothing is touched when grad_output is 1. The backward of
    cross_entropy_fused_scaled_inplace, whose logits are gone."""
    if grad_input.dim() != 3 or grad_output.numel() != 1:
        raise ValueError("cross_entropy_scale_inplace: grad_input (N, C, S) and a one-value grad_output")
    if grad_input.dtype not in (torch.float32, torch.float64):
        raise TypeError("cross_entropy_scale_inplace: grad_input must be float32 or float64 (scaling a "
                        f"narrower gradient after its cast would round twice); got {grad_input.dtype}")
    n, c, s = grad_input.shape
    if n * s * c == 0:
        return
    spatial = _spatial_walk(grad_input)
    grid, block_r, block_c, num_warps, _, maxnreg = fused_launch_config(n, c, s, spatial, _interpreting(),
                                                                        _arch(grad_input))
    _ce_scale_kernel[grid](
        grad_output.to(grad_input.dtype), grad_input,
        n * s, c, s,
        grad_input.stride(0), grad_input.stride(1), grad_input.stride(2),
        SPATIAL_WALK=spatial,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )
