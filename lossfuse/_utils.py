"""Argument handling shared by every loss: reductions, result dtypes, accumulation dtypes."""

from __future__ import annotations

import math
import struct

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """torch's handling of the deprecated ``size_average``/``reduce`` (same warning, same result)."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def check_float_input(name: str, t: torch.Tensor, what: str = "input") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"{name}: {what} must be a floating-point tensor (float32, float64, float16 or bfloat16); "
            f"got {t.dtype}"
        )


def check_same_device(name: str, *tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        listed = ", ".join(str(d) for d in sorted(devices, key=str))
        raise RuntimeError(f"{name}: expected all tensors on the same device; got tensors on {listed}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range once rounded: infinity, as a float32 cast
        return math.copysign(math.inf, x)


def reciprocal_as(n: int, dtype: torch.dtype) -> float:
    """1 / n exactly as ``torch.ones((), dtype=dtype) / n`` rounds it (a mean's scale, as the unfused
    backward forms it), computed on the host without a tensor, so without any device. float32: n and
    the quotient are each rounded to float32. Going through the double quotient is exact: with both
    significands at most 24 bits, 1 / n never lies close enough to a float32 rounding midpoint for the
    double's own rounding to tip it."""
    if dtype == torch.float64:
        return 1.0 / n
    return to_f32(1.0 / to_f32(float(n)))


def result_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype torch returns for a loss of a ``dtype`` input.

    Under autocast torch runs its losses in float32, so fp16/bf16 inputs give a float32 loss. We get
    the same result without the float32 copy of the input that torch's autocast makes.
    """
    if dtype in LOW_PRECISION and torch.is_autocast_enabled(device.type):
        return torch.float32
    return dtype


def weighted_result_dtype(loss_dtype: torch.dtype, loss_ndim: int, weight: torch.Tensor) -> torch.dtype:
    """The dtype of ``loss * weight`` under torch's promotion rules, for a floating ``loss`` with
    ``loss_ndim`` dims: an integer or bool weight never changes it, and a 0-dim weight counts only
    against a 0-dim loss (a dimensioned tensor outranks a 0-dim one of the same category)."""
    if not weight.is_floating_point():
        return loss_dtype
    if weight.dim() == 0 and loss_ndim > 0:
        return loss_dtype
    return torch.promote_types(loss_dtype, weight.dtype)
