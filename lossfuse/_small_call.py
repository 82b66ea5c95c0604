"""The small-call path: the common CPU calls taken whole by one C++ function (csrc/small_call.cpp).

At small shapes the time of a loss is its per-call overhead, not its kernel: a (64, 10) cross-entropy
spends about a microsecond in the kernel and, on the general path, tens of microseconds in Python
argument handling, the Python autograd Function, the small tensor ops of the reduction and the
mean's denominator, and the op dispatch. The entry points here hand the untouched arguments to C++,
which checks them, runs the same kernels (the ``lossfuse::`` ops' CPU implementations), reduces, and
attaches a C++ autograd node -- the numerics are the general path's (docs/design.md, "Mixed
precision", "The fused gradient").

Each returns None for a call it does not take (anything but plain CPU tensors of the shapes below,
autocast, a tensor subclass, more than 2^18 elements, a value the general path must reject), and
the caller goes the general way, which also raises the errors. Not under torch.compile (the general
path's ops trace; this C function would not), nor when ``LOSSFUSE_BACKEND`` picks another backend.
"""

from __future__ import annotations

import torch

from . import _backend

# False sends every call the general way (tests compare the two, and the op-level tests need it).
ENABLED = True

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_is_compiling = torch.compiler.is_compiling
_env_backend_set = _backend.env_backend_set


def _usable() -> bool:
    return ENABLED and _backend._C is not None and not _env_backend_set() and not _is_compiling()


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing):
    """(C) or (N, C) logits with class stride 1, int64 class indices, optional class weights, label
    smoothing, any reduction."""
    code = _REDUCTIONS.get(reduction) if type(reduction) is str else None
    if code is None or type(label_smoothing) not in (float, int) or not _usable():
        return None
    return _backend._C.cross_entropy_small(input, target, weight, ignore_index, code, float(label_smoothing))


def softmax_focal_loss(input, target, alpha, gamma, weight, ignore_index, reduction):
    """As :func:`cross_entropy`'s calls, with alpha None or a float (a per-class alpha goes the general way)."""
    code = _REDUCTIONS.get(reduction) if type(reduction) is str else None
    if alpha is None:
        alpha = 1.0
    if code is None or type(alpha) not in (float, int) or type(gamma) not in (float, int) or not _usable():
        return None
    return _backend._C.softmax_focal_small(input, target, float(alpha), float(gamma), weight, ignore_index, code)


def huber(input, target, mode, delta, reduction):
    """Huber (mode 0), SmoothL1 (1) or L1 (2) of contiguous input and target of one shape and dtype."""
    code = _REDUCTIONS.get(reduction) if type(reduction) is str else None
    if code is None or type(delta) not in (float, int) or not _usable():
        return None
    return _backend._C.huber_small(input, target, mode, float(delta), code)
