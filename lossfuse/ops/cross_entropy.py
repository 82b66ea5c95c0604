"""Cross-entropy: the custom ops, their fake kernels and the autograd Function.

The ops work over logits viewed as (N, C, S) -- S the product of any spatial dims, laid out as
lossfuse/_layout.py says:

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
      every row: the logits are read from memory once instead of twice (the fused path, below; the
      contract is docs/design.md, "The fused gradient")
  lossfuse::cross_entropy_fused_sum(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                    grad_scale) -> (loss summed over the rows [0-dim], grad_input)
      the same for class-index targets without the per-row loss and lse, for short rows (CPU only;
      _sums_only below): their 12 bytes a row would cost more than 1% of the logits
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
scaled before its one cast (docs/design.md, "Mixed precision") -- discards it and runs the backward kernel.
float16 never takes the path: its users scale the loss (GradScaler), and the work would be wasted.
Short rows (segmentation's 21 classes) call cross_entropy_fused_sum instead, unless the lse is asked
for: the loss comes back summed, no lse is kept, and the rare backward that needs one (bfloat16 with
grad_output != 1, a retained graph's second use) recomputes it with cross_entropy_fwd.

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

In place on CUDA does not fuse by default (TRITON_INPLACE_FUSED_DTYPES says why): the logits stay
intact until backward(), which writes the exact gradient over them (three passes, one N x C buffer).
With the switch on, float32 would fuse -- the forward writes the gradient over the logits, and a
grad_output other than 1 then scales it in fp32 (cross_entropy_scale_inplace: one fp32 rounding more
than a recompute, which the logits no longer allow); bfloat16 never would, since a gradient already
rounded to bfloat16 could not be scaled without a second rounding. float16 does not fuse, as on
the CPU. Probability targets and reduction='none' (the only way to a per-row grad_output) never fuse.
Under torch.compile the Function takes the unfused ops (the hand-over above is eager bookkeeping);
the new ops themselves have fake kernels and trace under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._layout import RowShapes, empty_like_layout, mean_denominator
from .._utils import acc_dtype, result_dtype
from ._common import TRITON_FUSED_DTYPES, Op, cuda_only, reduce_rows, row_grads, take_fused_gradient

_lib = torch.library.Library("lossfuse", "FRAGMENT")


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


def _fused_sum_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    return input.new_empty((), dtype=acc_dtype(input.dtype)), empty_like_layout(input)


def _fused_scaled_fake(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _fused_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, 1.0)


def _fused_scaled_inplace_fake(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _fwd_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)


def _fused_bwd_fake(grad_output, grad, grad_input, input, target, weight, lse, ignore_index, label_smoothing, z_loss,
                    softcap):
    return None


def _scale_inplace_fake(grad_output, grad_input):
    return None


def _op(schema: str, fake) -> Op:
    name = schema.split("(", 1)[0]
    return Op(_lib, schema, fake, triton="lossfuse.triton.cross_entropy." + name)


CE_FWD = _op(
    "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)",
    _fwd_fake,
)
CE_BWD = _op(
    "cross_entropy_bwd(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool input_grad, "
    "bool target_grad) -> (Tensor, Tensor)",
    _bwd_fake,
)
CE_FUSED = _op(
    "cross_entropy_fused(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float grad_scale) -> (Tensor, Tensor, Tensor)",
    _fused_fake,
)
# The CPU's fused path for short rows, whose per-row loss and lse would cost more than 1% of the
# logits (see _sums_only): the sum of the rows' losses instead of each row's, and no saved lse.
CE_FUSED_SUM = Op(
    _lib,
    "cross_entropy_fused_sum(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float grad_scale) -> (Tensor, Tensor)",
    _fused_sum_fake,
)
CE_BWD_INPLACE = _op(
    "cross_entropy_bwd_inplace(Tensor grad, Tensor(a!) input, Tensor target, Tensor? weight, Tensor lse, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap, bool target_grad) -> Tensor",
    _bwd_inplace_fake,
)
# The CUDA fused path (see the module docstring): the gradient's scale is a device tensor, and the
# backward decides on the device whether the forward's gradient stands.
CE_FUSED_SCALED = _op(
    "cross_entropy_fused_scaled(Tensor input, Tensor target, Tensor? weight, Tensor? grad_scale, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)",
    _fused_scaled_fake,
)
CE_FUSED_SCALED_INPLACE = _op(
    "cross_entropy_fused_scaled_inplace(Tensor(a!) input, Tensor target, Tensor? weight, Tensor? grad_scale, "
    "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)",
    _fused_scaled_inplace_fake,
)
CE_FUSED_BWD = _op(
    "cross_entropy_fused_bwd(Tensor grad_output, Tensor grad, Tensor(a!) grad_input, Tensor input, Tensor target, "
    "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap) -> ()",
    _fused_bwd_fake,
)
CE_SCALE_INPLACE = _op("cross_entropy_scale_inplace(Tensor grad_output, Tensor(a!) grad_input) -> ()",
                       _scale_inplace_fake)

cuda_only(_lib, CE_FUSED_SCALED, CE_FUSED_SCALED_INPLACE, CE_FUSED_BWD, CE_SCALE_INPLACE)

# The Triton backend's fused path (module docstring): the dtypes whose forward writes the gradient
# (TRITON_FUSED_DTYPES, ops/_common.py), and those among them whose in-place forward writes it over
# the logits (the ones where scaling that gradient by a grad_output != 1 afterwards is a rounding in
# the accumulation type, not a second rounding to a narrower type).
# Empty: writing the gradient over the logits inside the forward is off. The Function does not return
# the logits marked dirty (ctx.mark_dirty), and torch 2.13 then crashes (a segfault, not an error) when
# a hook is registered on a view of logits that a forward modified in place -- and a user reading the
# logits between the loss and backward() would read gradients. In place therefore writes the gradient
# in backward() on every backend (three passes, one N x C buffer). The fused in-place kernel is kept
# and tested with this set to (torch.float32, torch.float64); enabling it for users needs the forward
# to mark the logits dirty and return them.
TRITON_INPLACE_FUSED_DTYPES = ()


def _sums_only(x3: torch.Tensor) -> bool:
    """Whether a row's loss and lse (12 bytes) would cost more than 1% of its logits: short rows,
    where the fused forward sums the losses block by block instead (CE_FUSED_SUM)."""
    return x3.shape[1] * x3.element_size() < 1200


# ----------------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy as an autograd Function.

    ``loss, lse = CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
    label_smoothing, z_loss, softcap, inplace_backward, backend)`` takes arguments already checked
    by :func:`lossfuse.cross_entropy` (use that unless you compose Functions yourself): ``softcap``
    0.0 for none, ``backend`` a resolved name ("cpu" or "triton"). ``lse`` is the per-row
    log-sum-exp of the (soft-capped) logits in float32 (float64 for float64 input), shaped like the
    unreduced loss, non-differentiable; with ``want_lse=False`` (the functional's default, which drops it)
    a zero expanded to that shape takes its place, so the forward makes no (N, S) copy of it.

    Gradients: ``input``, and a floating-point ``target`` when it requires grad. The gradient is
    formed in float32 as grad_output x d(loss)/d(input) and cast to the input's dtype once, so a
    GradScaler's loss scale cannot underflow in fp16 before it is applied. With
    ``inplace_backward`` the input gradient is written over the logits (their version counter is
    bumped, so autograd refuses any later use of the overwritten values).
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                inplace_backward, backend, fused=False, want_lse=True):
        shapes = RowShapes(input)
        x3 = shapes.input3d(input)
        prob = target.is_floating_point()
        acc = acc_dtype(input.dtype)
        if prob:
            t = target if target.dtype in (input.dtype, acc) else target.to(acc)
            t3 = shapes.target3d(t, x3)
        else:
            t3 = shapes.rows2d(target if target.dtype == torch.int64 else target.long())
        # Both CPU walk orders fuse (the tile walk takes each tile's gradient while it is in L1); only
        # class-index targets are asked for (see the module docstring).
        # On Triton both walk orders fuse, and in place too for TRITON_INPLACE_FUSED_DTYPES (see the
        # module docstring: the gradient then goes over the logits in the forward).
        triton_fused = backend == "triton" and bool(fused) and not prob and (
            not inplace_backward or input.dtype in TRITON_INPLACE_FUSED_DTYPES)
        fused = backend != "triton" and bool(fused) and not prob and not inplace_backward
        denom = mean_denominator(t3, weight, ignore_index, prob, acc) if reduction == "mean" else None
        opts = (ignore_index, float(label_smoothing), float(z_loss), float(softcap))
        ctx.fused_grad = None
        ctx.triton_fused = triton_fused
        if triton_fused:
            # 1 / denom on the device (IEEE division, the value the unfused backward scales by): the
            # kernel reads it from memory, the host never waits for the count of kept rows.
            scale = torch.reciprocal(denom) if denom is not None else None
            if inplace_backward:
                loss, lse = CE_FUSED_SCALED_INPLACE(backend, x3, t3, weight, scale, *opts)
                # The logits hold their gradient from here on: a node that saved them and runs
                # later is refused by autograd instead of computing with overwritten values.
                torch.autograd.graph.increment_version(x3)
                # Saved as a plain alias: a view made under no_grad whose base was then bumped would
                # make autograd refuse to unpack it.
                x3 = x3.detach()
                ctx.fused_grad = x3
            else:
                loss, lse, ctx.fused_grad = CE_FUSED_SCALED(backend, x3, t3, weight, scale, *opts)
        elif fused:
            # 1 / denom in the accumulation type: the value the unfused backward would scale by.
            grad_scale = float(torch.ones((), dtype=acc) / denom) if denom is not None else 1.0
            if not want_lse and _sums_only(x3):
                total, ctx.fused_grad = CE_FUSED_SUM(backend, x3, t3, weight, *opts, grad_scale)
                loss = lse = None  # a backward that needs the lse recomputes it (_saved_lse)
            else:
                loss, lse, ctx.fused_grad = CE_FUSED(backend, x3, t3, weight, *opts, grad_scale)
        else:
            loss, lse = CE_FWD(backend, x3, t3, weight, *opts)

        if loss is None:
            out = total if reduction == "sum" else total / denom
        else:
            out = reduce_rows(loss, reduction, denom, shapes.row_shape())

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
        if want_lse:  # (so lse is not None: CE_FUSED_SUM is only taken without want_lse)
            lse_rows = lse.to(acc).reshape(shapes.row_shape())
        else:  # the caller drops it: one value standing for every row, not a copy of the lse
            lse_rows = x3.new_zeros((), dtype=acc).expand(shapes.row_shape())
        ctx.mark_non_differentiable(lse_rows)
        # backward() ignores the lse's gradient: autograd is not to fill an (N, S) tensor with zeros for it.
        ctx.set_materialize_grads(False)
        return out.to(out_dtype), lse_rows

    @staticmethod
    def _saved_lse(ctx, x3, t3, weight, lse):
        """The saved lse, or recomputed where the forward kept none (CE_FUSED_SUM): a bfloat16 gradient
        for grad_output != 1, or a retained graph's second backward."""
        return lse if lse is not None else CE_FWD(ctx.backend, x3, t3, weight, *ctx.opts)[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x3, t3, weight, lse, denom = ctx.saved_tensors
        shapes = ctx.shapes
        need_input = ctx.needs_input_grad[0]
        need_target = ctx.prob and ctx.needs_input_grad[1]
        none = (None,) * 10
        # grad_out is None when only the lse reached backward (grads are not materialised): zero.
        if grad_out is None or not (need_input or need_target):
            return (None, None) + none
        gx3 = take_fused_gradient(ctx, grad_out) if need_input and not ctx.triton_fused else None
        if gx3 is not None:  # the fused path: class-index targets, so no target gradient
            return (shapes.from3d(gx3), None) + none
        g = grad_out.to(acc_dtype(x3.dtype))
        lse = CrossEntropyFunction._saved_lse(ctx, x3, t3, weight, lse)
        grad_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, acc_dtype(x3.dtype))
        gx3 = None
        if ctx.triton_fused and need_input:
            gx3, ctx.fused_grad = ctx.fused_grad, None  # handed out once; a retained graph's next use recomputes
        if gx3 is not None:
            # The Triton fused path. Whether grad_output is 1 -- the forward's gradient stands -- is
            # decided by the kernels on the device: the host launches the same work either way.
            if ctx.inplace:
                CE_SCALE_INPLACE(ctx.backend, g, x3)
                torch.autograd.graph.increment_version(x3)  # a retained graph's next use is refused
            else:
                CE_FUSED_BWD(ctx.backend, g, grad_rows, gx3, x3, t3, weight, lse, *ctx.opts)
            return (shapes.from3d(gx3), None) + none
        if ctx.inplace and need_input:
            gt3 = CE_BWD_INPLACE(ctx.backend, grad_rows, x3, t3, weight, lse, *ctx.opts, need_target)
            # The logits now hold their gradient. Bumping their version makes autograd refuse any
            # node that saved them and runs later, instead of computing with overwritten values.
            torch.autograd.graph.increment_version(x3)
            gx3 = x3
        else:
            gx3, gt3 = CE_BWD(ctx.backend, grad_rows, x3, t3, weight, lse, *ctx.opts, need_input, need_target)
        gx = shapes.from3d(gx3) if need_input else None
        gt = shapes.from3d(gt3).to(ctx.target_dtype) if need_target else None
        return (gx, gt) + none

