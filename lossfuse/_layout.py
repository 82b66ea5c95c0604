"""The layout layer: how the user's tensors map onto the views the kernels walk, and back.

Every backend (C++ in csrc/, Triton in lossfuse/triton/, the fake kernels of lossfuse/ops/) and every
loss shares these rules, so this module depends on nothing but torch: the kernel layer imports it,
and it imports neither the kernels nor the autograd layer. docs/design.md section "Layouts" gives the
reasoning.

Row losses (cross-entropy, softmax focal, the vocab-parallel cross-entropy) see their logits as
(N, C, S): N batch rows, C classes, S the product of any spatial dims. Elementwise losses (Huber,
SmoothL1, L1; sigmoid focal is always contiguous) see their operands as one broadcast iteration
space collapsed to as few dims as the strides allow.
"""

from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------
# Layout. Kernels walk a row either along the classes (class stride 1: (N, C), channels-last) or
# across 8..BLOCK neighbouring rows at once (spatial stride 1: the usual (N, C, H, W)). Any other
# layout is copied once into one of these. Outputs follow the same rule, so every backend and the
# fake kernels agree on strides.
# ----------------------------------------------------------------------------------------------


def classes_contiguous(t: torch.Tensor) -> bool:
    """True when a (N, C, S) tensor is walked along classes; False when across spatial positions."""
    return t.shape[1] == 1 or t.stride(1) == 1


def supported_layout(t: torch.Tensor) -> bool:
    return classes_contiguous(t) or t.shape[2] == 1 or t.stride(2) == 1


def empty_like_layout(ref: torch.Tensor, *, dtype=None) -> torch.Tensor:
    """An uninitialised (N, C, S) tensor laid out the way the kernels walk ``ref``."""
    n, c, s = ref.shape
    dtype = ref.dtype if dtype is None else dtype
    if classes_contiguous(ref):
        return torch.empty((n, s, c), dtype=dtype, device=ref.device).transpose(1, 2)
    return torch.empty((n, c, s), dtype=dtype, device=ref.device)


# ----------------------------------------------------------------------------------------------
# From the user's shapes to (N, C, S) views and back.
# ----------------------------------------------------------------------------------------------


class RowShapes:
    """How the user's input maps onto (N, C, S), and back (all views where the layout allows)."""

    def __init__(self, input: torch.Tensor):
        self.shape = input.shape
        self.transposed = False  # a (N, C) input whose rows are strided: seen as (1, C, N)
        if input.dim() == 1:
            self.n, self.c, self.s = 1, input.shape[0], 1
        elif input.dim() == 2:
            self.n, self.c, self.s = input.shape[0], input.shape[1], 1
            self.transposed = input.shape[1] > 1 and input.stride(1) != 1 and input.stride(0) == 1
        else:
            self.n, self.c, self.s = input.shape[0], input.shape[1], prod(input.shape[2:])

    def input3d(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            x3 = x.t().unsqueeze(0)
        elif x.dim() == 1:
            x3 = x.view(1, self.c, 1)
        elif x.dim() == 2:
            x3 = x.unsqueeze(2)
        else:
            x3 = x.flatten(2)  # a view unless the spatial dims cannot be merged
        return x3 if supported_layout(x3) else x3.contiguous()

    def rows2d(self, y: torch.Tensor) -> torch.Tensor:
        """Class-index target or per-row values (shape of input without the class dim) -> (N, S)."""
        if self.transposed:
            return y.reshape(1, self.n)
        return y.reshape(self.n, self.s)

    def target3d(self, t: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """A probability target in the same walk order as ``x3`` (copied only if it differs)."""
        t3 = self.input3d_nocopy(t)
        if classes_contiguous(x3):
            if not classes_contiguous(t3):
                t3 = t3.transpose(1, 2).contiguous().transpose(1, 2)
        elif not (t3.shape[2] == 1 or t3.stride(2) == 1):
            t3 = t3.contiguous()
        return t3

    def input3d_nocopy(self, t: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return t.t().unsqueeze(0)
        if t.dim() == 1:
            return t.view(1, self.c, 1)
        if t.dim() == 2:
            return t.unsqueeze(2)
        return t.flatten(2)

    def from3d(self, g3: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return g3.squeeze(0).t()
        return g3.reshape(self.shape)

    def row_shape(self):
        """Shape of reduction='none' output: the input's shape without the class dim."""
        if len(self.shape) == 1:
            return ()
        return (self.shape[0],) + tuple(self.shape[2:])


def prod(xs) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


def mean_denominator(t3, weight, ignore_index, prob, acc):
    """torch's mean denominators: rows for probability targets, the summed weight of kept rows else."""
    if prob:
        return torch.tensor(t3.shape[0] * t3.shape[2], dtype=acc, device=t3.device)
    keep = t3 != ignore_index
    if weight is None:
        # count_nonzero reads the mask as it is; sum() would first widen it to an int64 copy (8 bytes a row).
        return torch.count_nonzero(keep).to(acc)
    w = weight.to(acc)
    wy = w[torch.where(keep, t3, 0)]
    return torch.where(keep, wy, 0).sum()


# ----------------------------------------------------------------------------------------------
# Layout. The kernels walk the elements in an order fixed by the operands' strides, and write every
# per-element output dense in that order: a transposed or channels-last input gives an output of the
# same layout, read and written sequentially. csrc/huber.cpp implements the same rule; keep the two in step.
# ----------------------------------------------------------------------------------------------


def iteration_order(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> list[int]:
    """Dims outermost first: decreasing stride of the first of (input, target, weight) whose stride in
    that dim is nonzero; size-1 and all-zero-stride dims innermost; ties keep their order (stable)."""
    keys = []
    for d in range(x.dim()):
        k = 0
        if x.shape[d] != 1:
            for t in (x, y, w):
                if t is not None and t.stride(d) != 0:
                    k = t.stride(d)
                    break
        keys.append(k)
    return sorted(range(x.dim()), key=lambda d: -keys[d])


def dense_strides(shape, order: list[int]) -> list[int]:
    """Strides of a tensor of ``shape`` stored densely in ``order`` (outermost first)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step = step * max(shape[d], 1)
    return strides


def empty_like_walk(x, y, w, dtype) -> torch.Tensor:
    """An uninitialised tensor of the operands' shape, dense in their iteration order."""
    return x.new_empty_strided(x.shape, dense_strides(x.shape, iteration_order(x, y, w)), dtype=dtype)


def empty_grads_like_walk(x, y, w, want_x: bool, want_y: bool, want_w: bool):
    """Gradient buffers of an elementwise loss's operands, each in its operand's dtype and laid out as
    empty_like_walk; a 0-element tensor where not wanted (a weight gradient needs a weight)."""
    gx = empty_like_walk(x, y, w, x.dtype) if want_x else x.new_empty((0,))
    gy = empty_like_walk(x, y, w, y.dtype) if want_y else y.new_empty((0,))
    if w is not None and want_w:
        gw = empty_like_walk(x, y, w, w.dtype)
    else:
        gw = (w if w is not None else x).new_empty((0,))
    return gx, gy, gw


def collapse(x, y, w=None, g=None):
    """The iteration space as the kernels see it: (sizes, [strides of x, y, w, g]), outermost dim first,
    size-1 dims dropped and neighbours merged wherever every operand steps over them evenly. Absent
    operands (and a 0-dim g) get zero strides."""
    order = iteration_order(x, y, w)
    ops = [x, y, w, g if g is not None and g.dim() > 0 else None]
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in ops]  # innermost first while building
    for d in reversed(order):
        n = x.shape[d]
        if n == 1:
            continue
        st = [t.stride(d) if t is not None else 0 for t in ops]
        if sizes and all(s == ss[-1] * sizes[-1] for s, ss in zip(st, strides)):
            sizes[-1] *= n
            continue
        sizes.append(n)
        for s, ss in zip(st, strides):
            ss.append(s)
    if not sizes:
        sizes = [x.numel()]
        strides = [[0] for _ in ops]
    return sizes[::-1], [ss[::-1] for ss in strides]
