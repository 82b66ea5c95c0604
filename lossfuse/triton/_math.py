"""Elementary functions Triton's core ``tl`` lacks, written with core ops only (valid on Triton 3.x,
compiled or interpreted) and accurate in fp32 and fp64."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(u):
    """log(1 + u) for u > -1, accurate also for tiny u: the rounding of w = 1 + u is undone by the
    factor u / (w - 1) (exact where w - 1 == 0: log1p(u) = u there)."""
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def expm1(d):
    """exp(d) - 1 without the cancellation of exp(d) - 1 near 0.

    For |d| < 1/2 the Taylor series to degree 17 in Horner form (truncation below 1e-19 relative,
    so fp64 too); elsewhere exp(d) - 1 has no cancellation to speak of.
    """
    p = 1.0 + d * (1.0 / 17.0)
    p = 1.0 + d * (1.0 / 16.0) * p
    p = 1.0 + d * (1.0 / 15.0) * p
    p = 1.0 + d * (1.0 / 14.0) * p
    p = 1.0 + d * (1.0 / 13.0) * p
    p = 1.0 + d * (1.0 / 12.0) * p
    p = 1.0 + d * (1.0 / 11.0) * p
    p = 1.0 + d * (1.0 / 10.0) * p
    p = 1.0 + d * (1.0 / 9.0) * p
    p = 1.0 + d * (1.0 / 8.0) * p
    p = 1.0 + d * (1.0 / 7.0) * p
    p = 1.0 + d * (1.0 / 6.0) * p
    p = 1.0 + d * (1.0 / 5.0) * p
    p = 1.0 + d * (1.0 / 4.0) * p
    p = 1.0 + d * (1.0 / 3.0) * p
    p = 1.0 + d * 0.5 * p
    return tl.where(tl.abs(d) < 0.5, d * p, tl.exp(d) - 1.0)
