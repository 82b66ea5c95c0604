"""Cross-entropy: the custom ops, their fake kernels, the layout rules and the autograd Function.

Three ops carry the work, over logits viewed as (N, C, S) -- S the product of any spatial dims:

  lossfuse::cross_entropy_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
      -> (loss[N, S] float32 (float64 for float64 input), lse[N, S] float64)
  lossfuse::cross_entropy_bwd(grad[N, S], input, target, weight, lse, ignore_index, label_smoothing,
                              z_loss, softcap, input_grad, target_grad)
      -> (grad_input like input, grad_target like target)   a 0-element tensor where not requested
  lossfuse::cross_entropy_bwd_inplace(grad, input!, target, weight, lse, ignore_index,
                                      label_smoothing, z_loss, softcap, target_grad) -> grad_target
      the input gradient written over the logits (no second N x C buffer)
  lossfuse::cross_entropy_fused(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                grad_scale) -> (loss, lse, grad_input)
      the forward, and from the same walk the input gradient for the upstream gradient grad_scale on
      every row: the logits are read from memory once instead of twice (the fused path, below)
  lossfuse::cross_entropy_fused_scaled(input, target, weight, grad_scale, ignore_index, label_smoothing,
                                       z_loss, softcap) -> (loss, lse, grad_input)
  lossfuse::cross_entropy_fused_scaled_inplace(input!, target, weight, grad_scale, ...) -> (loss, lse)
      the same for class-index targets with grad_scale a 0-dim device tensor (None: 1), so that the
      mean's 1 / denom never goes through the host; the in-place form writes the gradient over the
      logits. Triton (CUDA) only -- and the Triton interpreter on CPU tensors, for testing.
  lossfuse::cross_entropy_fused_bwd(grad_output, grad, grad_input!, input, target, weight, lse,
                                    ignore_index, label_smoothing, z_loss, softcap) -> ()
      the backward of cross_entropy_fused_scaled: grad_input is left as it is when the 0-dim
      grad_output is 1, else rewritten for the per-row upstream gradient grad; read on the device
  lossfuse::cross_entropy_scale_inplace(grad_output, grad_input!) -> ()
      grad_input *= grad_output unless it is 1, read on the device (float32/float64 only)

``target`` is int64 (N, S) class indices or a floating (N, C, S) probability target. ``softcap`` 0
means none. lse is saved in float64 so that the backward can form x - lse without the rounding of a
float32 lse (half an ulp of |lse|). CPU kernels are C++ (csrc/cross_entropy.cpp), CUDA kernels Triton
(lossfuse/triton/cross_entropy.py). Reductions and their denominators are computed here, once, for
every backend.

The fused path (CPU backend, class-index targets, mean or sum, float32 / float64 / bfloat16 logits
requiring grad, not in place, not under torch.compile): the forward calls cross_entropy_fused with
the gradient's scale for grad_output = 1, and backward() hands that tensor back when grad_output is
1 (``loss.backward()``, a training loop without a GradScaler). Any other grad_output: float32 and
float64 scale it (one extra rounding in the accumulation type), bfloat16 -- whose gradient must be
scaled before its one cast (DESIGN.md section 3) -- discards it and runs the backward kernel.
float16 never takes the path: its users scale the loss (GradScaler), and the work would be wasted.

The fused path on CUDA (Triton backend; same conditions, float32 / bfloat16, both walk orders, not
under torch.compile): one kernel per row block computes the row's statistics and, with the row
still in registers or L2, writes the gradient for grad_output = 1 (lossfuse/triton/cross_entropy.py
gives the memory-traffic argument): the logits are read from memory once and the gradient written
once -- two passes over N x C per training step instead of three. Nothing is read back to the host:
the mean's denominator (the weighted count of kept rows) and 1 / denom are device tensors the
kernel reads, and backward() launches cross_entropy_fused_bwd unconditionally; the kernel reads
grad_output and returns at once when it is 1, otherwise it recomputes the gradient from the logits
and the lse for grad_output / denom, in fp32 before its one cast -- exact for any grad_output, the
unfused backward's bits. (A GradScaler or a divided loss thus pays one extra pass: four instead of
three.) No data-dependent allocation or branch on the host, so a step can be captured in a CUDA
graph. The forward's buffer is handed out once; a retained graph's second backward runs the
unfused kernel on the logits.

In place on CUDA: float32 fuses, and the forward writes the gradient over the logits -- they hold the
gradient as soon as the loss is computed (read them before the loss call; their version counter is
bumped there, so autograd refuses any node that saved them). A grad_output other than 1 then scales
that gradient in fp32 (cross_entropy_scale_inplace: one fp32 rounding more than a recompute, which
the logits no longer allow). bfloat16 in place does not fuse: a gradient already rounded to bfloat16
could not be scaled without a second rounding, so its logits stay intact until backward(), which
writes the exact gradient over them (three passes, one N x C buffer). float16 does not fuse, as on
the CPU. Probability targets and reduction='none' (the only way to a per-row grad_output) never fuse.
Under torch.compile the Function takes the unfused ops (the hand-over above is eager bookkeeping);
the new ops themselves have fake kernels and trace under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._backend import triton_interpreting
from .._utils import acc_dtype, result_dtype
from ._common import register_triton, run, triton_kernel

_lib = torch.library.Library("lossfuse", "FRAGMENT")
_lib.define(
    "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)"
)
_lib.define(
    "cross_entropy_bwd(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool input_grad, "
    "bool target_grad) -> (Tensor, Tensor)"
)
_lib.define(
    "cross_entropy_fused(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float grad_scale) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "cross_entropy_bwd_inplace(Tensor grad, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool target_grad) -> Tensor"
)
# The CUDA fused path (see the module docstring): the gradient's scale is a device tensor, and the
# backward decides on the device whether the forward's gradient stands.
_lib.define(
    "cross_entropy_fused_scaled(Tensor input, Tensor target, Tensor? weight, Tensor? grad_scale, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "cross_entropy_fused_scaled_inplace(Tensor(a!) input, Tensor target, Tensor? weight, Tensor? grad_scale, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)"
)
_lib.define(
    "cross_entropy_fused_bwd(Tensor grad_output, Tensor grad, Tensor(a!) grad_input, Tensor input, Tensor target, "
    "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap) -> ()"
)
_lib.define("cross_entropy_scale_inplace(Tensor grad_output, Tensor(a!) grad_input) -> ()")


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


def _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    n, _, s = input.shape
    return input.new_empty((n, s), dtype=acc_dtype(input.dtype)), input.new_empty((n, s), dtype=torch.float64)


def _target_grad_fake(input, target, target_grad):
    if target_grad and target.is_floating_point():
        return empty_like_layout(input, dtype=target.dtype)
    return target.new_empty((0,), dtype=target.dtype if target.is_floating_point() else input.dtype)


def _bwd_fake(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, input_grad,
              target_grad):
    gi = empty_like_layout(input) if input_grad else input.new_empty((0,))
    return gi, _target_grad_fake(input, target, target_grad)


def _bwd_inplace_fake(grad, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                      target_grad):
    return _target_grad_fake(input, target, target_grad)


def _fused_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    return _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap) + (empty_like_layout(input),)


def _fused_scaled_fake(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _fused_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, 1.0)


def _fused_scaled_inplace_fake(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)


def _fused_bwd_fake(grad_output, grad, grad_input, input, target, weight, lse, ignore_index, label_smoothing, z_loss,
                    softcap):
    return None


def _scale_inplace_fake(grad_output, grad_input):
    return None


torch.library.register_fake("lossfuse::cross_entropy_fwd", _fwd_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_fused_scaled", _fused_scaled_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_fused_scaled_inplace", _fused_scaled_inplace_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_fused_bwd", _fused_bwd_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_scale_inplace", _scale_inplace_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_fused", _fused_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_bwd", _bwd_fake, lib=_lib)
torch.library.register_fake("lossfuse::cross_entropy_bwd_inplace", _bwd_inplace_fake, lib=_lib)

register_triton(_lib, "cross_entropy_fwd", "cross_entropy", "cross_entropy_fwd")
register_triton(_lib, "cross_entropy_bwd", "cross_entropy", "cross_entropy_bwd")
register_triton(_lib, "cross_entropy_bwd_inplace", "cross_entropy", "cross_entropy_bwd_inplace")
register_triton(_lib, "cross_entropy_fused", "cross_entropy", "cross_entropy_fused")
_CUDA_FUSED_OPS = ("cross_entropy_fused_scaled", "cross_entropy_fused_scaled_inplace", "cross_entropy_fused_bwd",
                   "cross_entropy_scale_inplace")
for _op in _CUDA_FUSED_OPS:
    register_triton(_lib, _op, "cross_entropy", _op)
    # These ops have no C++ kernel. Under Triton's interpreter their CPU key is the Triton launcher, so
    # that opcheck and torch.compile can exercise them on CPU tensors in CI.
    if triton_interpreting():
        _lib.impl(_op, triton_kernel("cross_entropy", _op), "CPU")


# ----------------------------------------------------------------------------------------------
# From the user's shapes to (N, C, S) views and back.
# ----------------------------------------------------------------------------------------------


# Short rows (few classes, class stride 1: (N, C) with small C, channels-last segmentation) cost the
# C++ row walk more per row than per class; the tile walk is vectorised across rows instead. For such
# inputs the CPU backend reads them once into the tile layout (a copy, ~0.1 ns per element) and gains
# several times that. Triton handles short rows by putting many in one program.
TILE_MAX_CLASSES = 64

# The Triton backend's fused path (module docstring): the dtypes whose forward writes the gradient,
# and those among them whose in-place forward writes it over the logits (the ones where scaling
# that gradient by a grad_output != 1 afterwards is a rounding in the accumulation type, not a
# second rounding to a narrower type).
TRITON_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
TRITON_INPLACE_FUSED_DTYPES = (torch.float32, torch.float64)
TILE_MIN_ROWS = 512


class _Shapes:
    """How the user's input maps onto (N, C, S), and back (all views where the layout allows)."""

    def __init__(self, input: torch.Tensor, prefer_tiles: bool = False):
        self.shape = input.shape
        self.transposed = False  # a (N, C) input whose rows are strided: seen as (1, C, N)
        self.retile = False  # short rows copied into the tile layout (see TILE_MAX_CLASSES)
        if input.dim() == 1:
            self.n, self.c, self.s = 1, input.shape[0], 1
        elif input.dim() == 2:
            self.n, self.c, self.s = input.shape[0], input.shape[1], 1
            self.transposed = input.shape[1] > 1 and input.stride(1) != 1 and input.stride(0) == 1
        else:
            self.n, self.c, self.s = input.shape[0], input.shape[1], _prod(input.shape[2:])
        short_rows = 1 < self.c <= TILE_MAX_CLASSES and self.n * self.s >= TILE_MIN_ROWS
        if prefer_tiles and short_rows and input.dim() >= 2 and not self.transposed and input.stride(1) == 1:
            self.retile = True
            self.transposed = input.dim() == 2

    def input3d(self, x: torch.Tensor) -> torch.Tensor:
        if self.retile:  # classes on dim 1, rows contiguous on the last: the tile walk
            if self.transposed:
                return x.t().contiguous().unsqueeze(0)
            return x.flatten(2).contiguous()
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


def _prod(xs) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


# ----------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------


def fused_gradient(backend: str, reduction: str, input: torch.Tensor,
                   dtypes=(torch.float32, torch.float64), triton_dtypes=()) -> bool:
    """Whether a forward should also write the gradient (the fused paths here and in ops/focal.py).
    Called outside the autograd Function: inside its forward grad mode is always off. The Triton
    backend fuses only for ``triton_dtypes`` (cross-entropy's, whose backward checks grad_output on
    the device: a host-side check would be a sync); the other losses keep it CPU-only."""
    return (
        ((backend == "cpu" and input.dtype in dtypes) or (backend == "triton" and input.dtype in triton_dtypes))
        and reduction != "none"
        and input.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def take_fused_gradient(ctx, grad_out):
    """The gradient the fused forward wrote, for this grad_output; None when there is none (not fused,
    already used by an earlier backward through a retained graph, or a float16/bfloat16 gradient
    that grad_output would have to scale after its cast: the caller then runs the backward kernel)."""
    gx = ctx.fused_grad
    if gx is None:
        return None
    ctx.fused_grad = None  # ours was the last reference: autograd can adopt it as .grad without a copy
    if grad_out.item() == 1.0:  # CPU only: no device sync
        return gx
    if gx.dtype in (torch.float32, torch.float64):
        return gx * grad_out.to(gx.dtype)
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy as an autograd Function.

    ``loss, lse = CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, inplace_backward, backend)`` takes arguments already checked
    by :func:`lossfuse.cross_entropy` (use that unless you compose Functions yourself): ``softcap``
    0.0 for none, ``backend`` a resolved name ("cpu" or "triton"). ``lse`` is the per-row
    log-sum-exp of the (soft-capped) logits in float32 (float64 for float64 input), shaped like the
    unreduced loss, non-differentiable.

    Gradients: ``input``, and a floating-point ``target`` when it requires grad. The gradient is
    formed in float32 as grad_output x d(loss)/d(input) and cast to the input's dtype once, so a
    GradScaler's loss scale cannot underflow in fp16 before it is applied. With
    ``inplace_backward`` the input gradient is written over the logits (their version counter is
    bumped, so autograd refuses any later use of the overwritten values).
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, backend, fused=False):
        shapes = _Shapes(input, prefer_tiles=backend == "cpu")
        x3 = shapes.input3d(input)
        prob = target.is_floating_point()
        acc = acc_dtype(input.dtype)
        if prob:
            t = target if target.dtype in (input.dtype, acc) else target.to(acc)
            t3 = shapes.target3d(t, x3)
        else:
            t3 = shapes.rows2d(target if target.dtype == torch.int64 else target.long())
        # The fused walk pays off where rows are walked along their classes (and is only asked for
        # class-index targets: see the module docstring).
        # On Triton both walk orders fuse, and in place too for TRITON_INPLACE_FUSED_DTYPES (see the
        # module docstring: the gradient then goes over the logits in the forward).
        triton_fused = backend == "triton" and bool(fused) and not prob and (
            not inplace_backward or input.dtype in TRITON_INPLACE_FUSED_DTYPES)
        fused = (backend != "triton" and bool(fused) and not prob and not inplace_backward and classes_contiguous(x3)
                 and not shapes.retile)
        denom = _mean_denominator(t3, weight, ignore_index, prob, acc) if reduction == "mean" else None
        opts = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
        ctx.fused_grad = None
        ctx.triton_fused = triton_fused
        if triton_fused:
            # 1 / denom on the device (IEEE division, the value the unfused backward scales by): the
            # kernel reads it from memory, the host never waits for the count of kept rows.
            scale = torch.reciprocal(denom) if denom is not None else None
            if inplace_backward:
                loss, lse = run(backend, "cross_entropy_fused_scaled_inplace", "cross_entropy",
                                "cross_entropy_fused_scaled_inplace", x3.device, x3, t3, weight, scale, *opts)
                # The logits hold their gradient from here on: a node that saved them and runs
                # later is refused by autograd instead of computing with overwritten values.
                torch.autograd.graph.increment_version(x3)
                # Saved as a plain alias: a view made under no_grad whose base was then bumped would
                # make autograd refuse to unpack it.
                x3 = x3.detach()
                ctx.fused_grad = x3
            else:
                loss, lse, ctx.fused_grad = run(backend, "cross_entropy_fused_scaled", "cross_entropy",
                                                "cross_entropy_fused_scaled", x3.device, x3, t3, weight, scale, *opts)
        elif fused:
            # 1 / denom in the accumulation type: the value the unfused backward would scale by.
            grad_scale = float(torch.ones((), dtype=acc) / denom) if denom is not None else 1.0
            loss, lse, ctx.fused_grad = run(backend, "cross_entropy_fused", "cross_entropy", "cross_entropy_fused",
                                            x3.device, x3, t3, weight, *opts, grad_scale)
        else:
            loss, lse = run(backend, "cross_entropy_fwd", "cross_entropy", "cross_entropy_fwd", x3.device,
                            x3, t3, weight, *opts)

        if reduction == "none":
            out = loss.reshape(shapes.row_shape())
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom

        if prob:
            out_dtype = torch.promote_types(input.dtype, target.dtype)
            if torch.is_autocast_enabled(input.device.type):
                out_dtype = torch.float32 if out_dtype != torch.float64 else out_dtype
        else:
            out_dtype = result_dtype(input.dtype, input.device)

        ctx.shapes = shapes
        ctx.reduction = reduction
        ctx.opts = opts
        ctx.inplace = bool(inplace_backward)
        ctx.backend = backend
        ctx.prob = prob
        ctx.target_dtype = target.dtype
        ctx.save_for_backward(x3, t3, weight, lse, denom)
        lse_rows = lse.to(acc).reshape(shapes.row_shape())
        ctx.mark_non_differentiable(lse_rows)
        return out.to(out_dtype), lse_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x3, t3, weight, lse, denom = ctx.saved_tensors
        shapes = ctx.shapes
        need_input = ctx.needs_input_grad[0]
        need_target = ctx.prob and ctx.needs_input_grad[1]
        none = (None,) * 9
        if not (need_input or need_target):
            return (None, None) + none
        gx3 = take_fused_gradient(ctx, grad_out) if need_input and not ctx.triton_fused else None
        if gx3 is not None:  # the fused path: class-index targets, so no target gradient
            return (shapes.from3d(gx3), None) + none
        acc = acc_dtype(x3.dtype)
        g = grad_out.to(acc)
        n, s = lse.shape
        if ctx.reduction == "none":
            grad_rows = g.reshape(n, s)
        elif ctx.reduction == "sum":
            grad_rows = g.expand(n, s)
        else:
            # float32 division: the cast to the input's dtype happens once, inside the kernel.
            grad_rows = (g / denom).expand(n, s)
        gx3 = None
        if ctx.triton_fused and need_input:
            gx3, ctx.fused_grad = ctx.fused_grad, None  # handed out once; a retained graph's next use recomputes
        if gx3 is not None:
            # The Triton fused path. Whether grad_output is 1 -- the forward's gradient stands -- is
            # decided by the kernels on the device: the host launches the same work either way.
            if ctx.inplace:
                run(ctx.backend, "cross_entropy_scale_inplace", "cross_entropy", "cross_entropy_scale_inplace",
                    x3.device, g, x3)
                torch.autograd.graph.increment_version(x3)  # a retained graph's next use is refused
            else:
                run(ctx.backend, "cross_entropy_fused_bwd", "cross_entropy", "cross_entropy_fused_bwd", x3.device,
                    g, grad_rows, gx3, x3, t3, weight, lse, *ctx.opts)
            return (shapes.from3d(gx3), None) + none
        if ctx.inplace and need_input:
            gt3 = run(ctx.backend, "cross_entropy_bwd_inplace", "cross_entropy", "cross_entropy_bwd_inplace",
                      x3.device, grad_rows, x3, t3, weight, lse, *ctx.opts, need_target)
            # The logits now hold their gradient. Bumping their version makes autograd refuse any
            # node that saved them and runs later, instead of computing with overwritten values.
            torch.autograd.graph.increment_version(x3)
            gx3 = x3
        else:
            gx3, gt3 = run(ctx.backend, "cross_entropy_bwd", "cross_entropy", "cross_entropy_bwd", x3.device,
                           grad_rows, x3, t3, weight, lse, *ctx.opts, need_input, need_target)
        gx = shapes.from3d(gx3) if need_input else None
        gt = shapes.from3d(gt3).to(ctx.target_dtype) if need_target else None
        return (gx, gt) + none


def _mean_denominator(t3, weight, ignore_index, prob, acc):
    """torch's mean denominators: rows for probability targets, the summed weight of kept rows else."""
    if prob:
        return torch.tensor(t3.shape[0] * t3.shape[2], dtype=acc, device=t3.device)
    keep = t3 != ignore_index
    if weight is None:
        return keep.sum().to(acc)
    w = weight.to(acc)
    wy = w[torch.where(keep, t3, 0)]
    return torch.where(keep, wy, 0).sum()
