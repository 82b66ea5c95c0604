"""Vocab-parallel cross-entropy: the classes of the logits split across the ranks of a
``torch.distributed`` group (tensor parallelism, Megatron-style), the loss computed without ever
gathering the logits.

Rank r of the group holds the logits of a contiguous slice ``[start_r, start_r + V_r)`` of the
``C = sum_r V_r`` classes, ranks in group-rank order. Per row, each rank computes from its slice, in one
pass of lossfuse's cross-entropy kernel (``lossfuse::cross_entropy_fwd``, C++ on the CPU, Triton on CUDA):

    l_r   = log sum_{c in r} exp(x_c)         the slice's log-sum-exp
    nll_r = l_r - x_y                          on the rank that owns the target y only
    S_r   = sum_{c in r} (l_r - x_c)           with label smoothing only

ONE ``all_gather`` of these few numbers per row is the only communication (two when the slice sizes are
not given: see ``vocab_sizes``). Every rank then forms the same loss from them:

    lse                = logsumexp_r l_r                    shifted by the largest l_r: stable
    lse - x_y          = (lse - l_o) + nll_o                o the owner of y; both terms >= 0,
                                                            the first through log1p: see _combine
    sum_c (lse - x_c)  = sum_r [V_r (lse - l_r) + S_r]      every term >= 0: no cancellation
    loss               = (1 - eps) (lse - x_y) + eps / C * sum_c (lse - x_c)

which is the cross-entropy of docs/design.md ("What each loss computes") with the GLOBAL C. Backward needs no communication: with the global lse
saved, the gradient of the local slice is ``g * (exp(x - lse) - eps / C)``, and
``g * (expm1(-(lse - x_y)) + eps - eps / C)`` at an owned target, formed in float32 and cast to the
logits' dtype once.

Why one all_gather and not Megatron's max-then-sum all_reduces: the per-row statistics are a few floats
(R x 3 or R x 4 per rank, R the number of rows), so the collective's latency, not its bytes, is its
cost; an all_gather of every rank's partial log-sum-exp lets each rank reduce them itself, in one round.
The bytes received grow with the group size (R x 4 x P floats); for tensor-parallel groups (P <= 8-64)
that stays far below the logits.

Options (class weights, probability targets, z-loss, soft-capping) add per-row columns to the same
all_gather: the kernel computes each slice's l_r (of the soft-capped logits) and, with class weights w,
S_r = sum_{c in r} w_c (l_r - x_c) and W_r = sum_{c in r} w_c, with probability targets t
T_r = sum_{c in r} w_c t_c (l_r - x_c) and M_r = sum_{c in r} w_c t_c, from which
sum_c w_c t_c (lse - x_c) = sum_r [T_r + M_r (lse - l_r)]; z-loss needs only the global lse
(_local_grad gives the gradients). vocab_parallel_linear_cross_entropy is the same with the logits
computed a chunk of rows at a time from the rank's rows of the output layer; lossfuse/_dtensor.py maps
DTensor inputs onto both.

The slice statistics travel as float32 log-sum-exps (float64 for float64 logits), so probabilities
carry the relative error eps * |lse| of a float32 lse, as in torch (single-process lossfuse keeps its
lse in float64 for the backward; sending float64 statistics here would remove this too, at twice the
collective's bytes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _backend
from ._utils import acc_dtype, check_float_input, check_reduction, check_same_device, result_dtype
from .functional import _check_class_index_target, _check_class_weight, _check_linear_head, _check_lm_options
from ._layout import RowShapes, empty_like_layout
from .ops._common import reduce_rows, row_grads
from .ops.cross_entropy import CE_FWD
from .ops.linear_cross_entropy import _project, default_chunk_size
from .reference import check_targets_in_range

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "VocabParallelCrossEntropyFunction",
    "VocabParallelLinearCrossEntropyFunction",
]

# Local target of a row this rank does not score (ignored, or owned by another rank). Negative, so it
# can never collide with a local class index -- unlike the user's ignore_index, which may be >= 0.
_NOT_OWNED = -1

# The float32 scratch of the low-precision backward is computed in row chunks of at most this many
# elements (16 MiB), so bf16/fp16 logits never need an N x V float32 copy.
_GRAD_CHUNK = 1 << 22

# The input gradient of the vocab-parallel linear loss is all-reduced in blocks of this many elements.
_REDUCE_BLOCK = 1 << 20


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    vocab_sizes: Sequence[int] | None = None,
    backend: str = "auto",
):
    """Cross-entropy of logits whose classes are split across the ranks of ``group``.

    The result equals :func:`lossfuse.cross_entropy` (and :func:`torch.nn.functional.cross_entropy`
    where torch has the option) of the logits concatenated along the class dimension in group-rank
    order, with the class weights and probability targets concatenated the same way, and is the same
    on every rank; ``backward`` gives each rank the gradient of its own slice, without communication.

    Args:
        local_logits: ``(N, V_local)`` or ``(N, V_local, d1, ..., dk)`` logits of this rank's classes
            ``[start, start + V_local)`` (float32/64, float16, bfloat16); slices may differ in size.
            Classes on dim 1, as torch: Megatron's ``(s, b, V_local)`` logits go in as
            ``logits.view(-1, V_local)`` with ``target.view(-1)``.
        target: class indices into the GLOBAL vocabulary, ``(N)`` or ``(N, d1, ..., dk)``, int64 or
            uint8, the same on every rank; or class probabilities: a floating tensor of the local
            logits' shape, this rank's slice of the probability target (it gets a gradient when it
            requires one).
        weight: this rank's slice ``(V_local,)`` of the class weights (or None).
        group: the process group the vocabulary is split over (default: the default group).
        ignore_index, reduction, label_smoothing, z_loss, softcap, return_lse: as for
            :func:`lossfuse.cross_entropy`, with C the GLOBAL class count (the uniform part of
            label smoothing is eps / C; the mean's denominator is the summed weight of the kept rows,
            or the number of rows for probability targets). ``return_lse`` returns ``(loss, lse)``,
            the global per-row log-sum-exp of the (soft-capped) logits.
        vocab_sizes: ``V_r`` of every rank of ``group`` in group-rank order, the same list on every
            rank (a Megatron-style model knows its partition: ``[partition_vocab_size] * tp_size``, or
            the uneven split it built its output layer with). Checked against this rank's
            ``V_local``. When None, the sizes are exchanged with one extra ``all_gather`` per call
            (required under ``torch.compile``: pass them there).
        backend: how each rank computes its slice's statistics: ``"auto"``, ``"cpu"``, ``"triton"``
            or ``"reference"``, as for :func:`lossfuse.cross_entropy`.

    Communication per call: one ``all_gather`` (R x 3 to R x 6 floats per rank, R the number of rows)
    in forward, none in backward; plus one ``all_gather`` of one int64 when ``vocab_sizes`` is None.
    Every rank of ``group`` must call it with the same class-index ``target``, options and
    ``vocab_sizes``.
    """
    name = "vocab_parallel_cross_entropy"
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input(name, local_logits)
    _check_lm_options(name, label_smoothing, z_loss, softcap)
    check_same_device(name, local_logits, target, weight)
    if local_logits.dim() < 2:
        raise ValueError(
            f"{name}: local_logits must be (N, V_local) or (N, V_local, d1, ...); "
            f"got shape {list(local_logits.shape)}"
        )
    v_local = local_logits.shape[1]
    prob = target.is_floating_point()
    if prob:
        if target.shape != local_logits.shape:
            raise ValueError(
                f"{name}: probability targets are this rank's slice, of the local logits' shape "
                f"{list(local_logits.shape)}; got {list(target.shape)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
    else:
        _check_class_index_target(local_logits, target)
    _check_class_weight(weight, v_local, f"{name}: local ")
    backend = _backend.resolve(backend, local_logits.device)
    world, start, num_classes, sizes_acc = _slices(name, vocab_sizes, group, v_local, local_logits)

    y = target if prob else _checked_targets(name, target, num_classes, ignore_index)

    loss, lse = VocabParallelCrossEntropyFunction.apply(
        local_logits, y, start, num_classes, sizes_acc, group, world, ignore_index, reduction,
        float(label_smoothing), backend, weight, float(z_loss), float(softcap or 0.0),
    )
    return (loss, lse) if return_lse else loss


def _slices(name, vocab_sizes, group, v_local, like):
    """(the group's size, this rank's first class, C, the (world,) slice sizes in the accumulation dtype
    of ``like``, on its device) from ``vocab_sizes`` or one all_gather of the local sizes."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{name}: this process is not a member of `group`")
    device, acc = like.device, acc_dtype(like.dtype)
    if vocab_sizes is not None:
        sizes = _check_vocab_sizes(vocab_sizes, world, rank, v_local)
        # The cache is for eager calls; under torch.compile the copy is a graph constant anyway.
        make = _sizes_tensor.__wrapped__ if torch.compiler.is_compiling() else _sizes_tensor
        return world, sum(sizes[:rank]), sum(sizes), make(sizes, device, acc)
    # One extra collective; a fill kernel rather than a host-to-device copy of the size.
    mine = torch.full((1,), v_local, dtype=torch.int64, device=device)
    all_sizes = _all_gather(mine, group, world)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        sizes = all_sizes.tolist()
        start, num_classes = sum(sizes[:rank]), sum(sizes)
    else:  # device scalars: a host sync here would stall the GPU
        start, num_classes = all_sizes[:rank].sum(), all_sizes.sum()
    return world, start, num_classes, all_sizes.to(acc)


def _checked_targets(name, target, num_classes, ignore_index):
    """int64 class indices, checked against the GLOBAL C. Every rank holds the same targets, so every
    rank raises here, before the forward's collective."""
    y = target if target.dtype == torch.int64 else target.long()
    if y.device.type == "cpu" and not torch.compiler.is_compiling():
        check_targets_in_range(y, num_classes, ignore_index)
    else:  # no host sync on the hot path: a device-side assert, as torch's own CUDA kernel does
        ok = ((y >= 0) & (y < num_classes)) | (y == ignore_index)
        torch._assert_async(ok.all(), f"{name}: a target is out of bounds [0, C)")
    return y


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of :func:`vocab_parallel_cross_entropy`, whose checked arguments it takes:
    ``apply(local_logits, target, start, num_classes, sizes_acc, group, world, ignore_index,
    reduction, label_smoothing, backend, weight=None, z_loss=0.0, softcap=0.0) -> (loss, lse)`` with
    ``target`` int64 global class indices or this rank's floating probability slice,
    ``start``/``num_classes`` ints or 0-dim int64 tensors, ``sizes_acc`` the (world,) slice sizes in
    the accumulation dtype on the logits' device, ``weight`` this rank's class-weight slice and
    ``softcap`` 0.0 for none. ``lse`` (non-differentiable) is the global per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, x, target, start, num_classes, sizes_acc, group, world, ignore_index, reduction,
                eps, backend, weight=None, z_loss=0.0, softcap=0.0):
        shapes = RowShapes(x)
        x3 = shapes.input3d(x)  # (N, V, S): a view except for layouts the kernels cannot walk
        acc = acc_dtype(x.dtype)
        n, v_local, s = x3.shape
        prob = target.is_floating_point()
        w_acc = None if weight is None else weight.to(acc)
        if prob:
            t3 = shapes.target3d(target if target.dtype in (x.dtype, acc) else target.to(acc), x3)
            if eps > 0:  # smoothed with the GLOBAL C before the kernel sees it (which knows only V_local)
                t3 = t3.to(acc) * (1 - eps) + eps / num_classes
            keep = torch.ones((n, s), dtype=torch.bool, device=x.device)
            y_own = None
            stats = _prob_stats(x3, t3, weight, w_acc, softcap, acc, backend)
        else:
            t3 = None
            y = shapes.rows2d(target)  # (N, S)
            keep = y != ignore_index
            y_loc = y - start
            owned = keep & (y_loc >= 0) & (y_loc < v_local)
            y_own = torch.where(owned, y_loc, _NOT_OWNED)
            stats = _index_stats(x3, y_loc, owned, w_acc, eps, softcap, acc, backend)

        lse, nll, wy, coef, loss, denom = _global_rows(
            stats, keep, group, world, prob, weight is not None, sizes_acc, num_classes, eps, z_loss, reduction)
        out = reduce_rows(loss, reduction, denom, shapes.row_shape())

        ctx.shapes = shapes
        ctx.reduction = reduction
        ctx.opts = (eps, float(softcap), float(z_loss), num_classes, prob, target.dtype)
        ctx.save_for_backward(x3, y_own, t3, keep, lse, nll, wy, coef, w_acc, denom)
        if prob:
            out_dtype = torch.promote_types(x.dtype, target.dtype)
            if torch.is_autocast_enabled(x.device.type) and out_dtype != torch.float64:
                out_dtype = torch.float32
        else:
            out_dtype = result_dtype(x.dtype, x.device)
        lse_rows = lse.reshape(shapes.row_shape())
        ctx.mark_non_differentiable(lse_rows)
        return out.to(out_dtype), lse_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        none = (None,) * 12
        need_x = ctx.needs_input_grad[0]
        eps, softcap, z_loss, num_classes, prob, target_dtype = ctx.opts
        need_t = prob and ctx.needs_input_grad[1]
        if not (need_x or need_t):
            return (None, None) + none
        x3, y_own, t3, keep, lse, nll, wy, coef, w_acc, denom = ctx.saved_tensors
        g_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, lse.dtype)
        g_rows = torch.where(keep, g_rows, 0)
        gx3, gt3 = _local_grad(x3, lse, nll, g_rows, y_own, t3, wy, coef, w_acc, eps, softcap, z_loss,
                               num_classes, need_x, need_t)
        gx = ctx.shapes.from3d(gx3) if need_x else None
        gt = ctx.shapes.from3d(gt3).to(target_dtype) if need_t else None
        return (gx, gt) + none


# ----------------------------------------------------------------------------------------------
# The pieces. Per-row statistics of this rank's slice, as (N, S, k) columns in the accumulation
# dtype; the kernel computes what a pass over the logits must, Python the per-row rest.
#   class indices: l_r, owned, nll_r = l_r - x'_y, [w_y on the owner], [S_r, [W_r]] (smoothing)
#   probabilities: l_r, T_r = sum_c w_c t'_c (l_r - x'_c), M_r = sum_c w_c t'_c
# with x' the soft-capped logits, S_r = sum_{c in r} w_c (l_r - x'_c), W_r = sum_{c in r} w_c.
# ----------------------------------------------------------------------------------------------


def _capped(x, softcap):
    return softcap * torch.tanh(x / softcap) if softcap else x


def _torch_lse(xf):
    """(N, V, S) -> (N, S) log-sum-exp over dim 1, -inf for a row without a finite logit."""
    m = xf.amax(1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)
    return (m + torch.log(torch.exp(xf - m).sum(1, keepdim=True))).squeeze(1)


def _index_stats(x3, y_loc, owned, w_acc, eps, softcap, acc, backend):
    n, v, s = x3.shape
    y_k = torch.where(owned, y_loc, 0)
    if v == 0:  # a rank without classes contributes exp(-inf) = 0 to every sum
        lse = x3.new_full((n, s), -math.inf, dtype=acc)
        nll = smooth = x3.new_zeros((n, s), dtype=acc)
    elif backend == "reference":
        xf = _capped(x3.to(acc), softcap)
        lse = _torch_lse(xf)
        nll = lse - xf.gather(1, y_k.unsqueeze(1)).squeeze(1)
        gaps = lse.unsqueeze(1) - xf
        smooth = (gaps if w_acc is None else gaps * w_acc.view(1, -1, 1)).sum(1)
    elif eps == 0:
        # The kernel scores the owned targets itself: nll_r = (m_r - x_y) + log sum exp(x - m_r),
        # exact when the target holds the slice's max (a confident prediction), where l_r - x_y
        # would keep only the rounding of l_r. Unweighted: w_y is applied in _combine.
        nll, lse = CE_FWD(backend, x3, torch.where(owned, y_loc, _NOT_OWNED), None, _NOT_OWNED, 0.0, 0.0,
                          softcap)
        lse = lse.to(acc)  # the kernel's lse is float64; the collective packs one dtype
        smooth = None
    else:
        # label_smoothing=1 turns the kernel's loss into (1/V) sum_c w_c (l_r - x'_c), for every row
        # (each gets a valid target: the owned one, else class 0, which label_smoothing=1 weighs by 0).
        # Smoothing's own term is then at least eps/C * sum_c w_c (lse - x_c), so nll_r = l_r - x'_y,
        # with the rounding of l_r, stays far below the loss's float32 resolution.
        mean_gap, lse = CE_FWD(backend, x3, y_k, w_acc, _NOT_OWNED, 1.0, 0.0, softcap)
        lse = lse.to(acc)
        x_y = x3.gather(1, y_k.unsqueeze(1)).squeeze(1).to(acc)
        nll = lse - _capped(x_y, softcap)
        # A -inf logit makes the sum +inf; the kernel's 0 x (m - x_y) turned it into NaN.
        smooth = torch.where(x_y == -math.inf, math.inf, mean_gap * v)
    cols = [lse, owned.to(acc), torch.where(owned, nll, 0)]
    if w_acc is not None:
        cols.append(torch.where(owned, w_acc[y_k] if v > 0 else 0, 0))
    if eps > 0:
        cols.append(smooth)
        if w_acc is not None:
            cols.append(w_acc.sum().expand(n, s))
    return torch.stack(cols, dim=-1)


def _prob_stats(x3, t3, weight, w_acc, softcap, acc, backend):
    n, v, s = x3.shape
    wt = t3.to(acc) if w_acc is None else t3.to(acc) * w_acc.view(1, -1, 1)
    mass = wt.sum(1)
    if v == 0:
        lse = x3.new_full((n, s), -math.inf, dtype=acc)
        part = x3.new_zeros((n, s), dtype=acc)
    elif backend == "reference":
        xf = _capped(x3.to(acc), softcap)
        lse = _torch_lse(xf)
        part = (wt * (lse.unsqueeze(1) - xf)).sum(1)
    else:
        part, lse = CE_FWD(backend, x3, t3, weight, -100, 0.0, 0.0, softcap)
        lse = lse.to(acc)
    return torch.stack([lse, part.to(acc), mass], dim=-1)


def _global_rows(stats, keep, group, world, prob, weighted, sizes_acc, num_classes, eps, z_loss, reduction):
    """This rank's (N, S, k) statistics -> the global per-row (lse, nll, w_y, coef, loss) and the
    mean's denominator: the one collective of the forward pass."""
    n, s, k = stats.shape
    rows = n * s
    if rows > 0:  # every rank has the same rows: all skip, or none does
        gathered = _all_gather(stats.reshape(rows, k), group, world)
    else:
        gathered = stats.new_empty((world * rows, k))
    gathered = gathered.view(world, rows, k)
    lse, nll, wy, coef, loss = _combine(gathered, prob, weighted, sizes_acc, num_classes, eps, z_loss)
    lse, nll, coef, loss = (t.view(n, s) for t in (lse, nll, coef, loss))
    wy = None if wy is None else wy.view(n, s)
    loss = torch.where(keep, loss, 0)
    denom = None
    if reduction == "mean":
        if prob:
            denom = torch.full((), float(rows), dtype=stats.dtype, device=stats.device)
        else:
            denom = torch.count_nonzero(keep).to(stats.dtype) if wy is None else torch.where(keep, wy, 0).sum()
    return lse, nll, wy, coef, loss, denom


def _combine(gathered, prob, weighted, sizes_acc, num_classes, eps, z_loss):
    """Every rank's statistics -> global (lse, lse - x'_y, w_y, coef, loss) per row, (R,); ``coef`` is
    the per-row factor of p_c in the gradient (see _local_grad)."""
    l_r = gathered[..., 0]
    # lse - l_r = (L - l_r) + log(1 + sum over the other ranks of exp(l_q - L)), L the largest l_q:
    # with log1p, a target on the rank holding L keeps its tiny loss of a confident prediction,
    # which lse - l_r, both rounded near L, would turn into rounding noise.
    top, top_rank = l_r.max(0)
    ranks = torch.arange(l_r.shape[0], device=l_r.device).unsqueeze(1)
    log_s = torch.log1p(torch.where(ranks == top_rank, 0, torch.exp(l_r - top)).sum(0))
    lse = top + log_s
    gap = (top - l_r) + log_s  # lse - l_r, >= 0
    z_term = 2 * z_loss * lse
    if prob:
        mass = gathered[..., 2]
        # A select, not M_r x gap: a slice without mass may have l_r = -inf, and 0 x inf is NaN.
        loss = (gathered[..., 1] + torch.where(mass != 0, mass * gap, 0)).sum(0)
        coef = mass.sum(0) + z_term
        nll = wy = None
    else:
        owned = gathered[..., 1] != 0
        nll = torch.where(owned, gap + gathered[..., 2], 0).sum(0)
        wy = gathered[..., 3].sum(0) if weighted else None
        loss = (1 - eps) * (nll if wy is None else wy * nll)
        coef = (1 - eps) * (1.0 if wy is None else wy)
        if eps > 0:
            col = 4 if weighted else 3
            w_r = gathered[..., col + 1] if weighted else sizes_acc.unsqueeze(1)
            # A select, not W_r x gap: an empty slice has l_r = -inf, and 0 x inf is NaN.
            smooth = (torch.where(w_r != 0, w_r * gap, 0) + gathered[..., col]).sum(0)
            loss = loss + (eps / num_classes) * smooth
            coef = coef + (eps / num_classes) * w_r.sum(0)
        coef = coef + z_term
    if z_loss:
        loss = loss + z_loss * lse * lse
    coef = coef.expand_as(lse) if torch.is_tensor(coef) else torch.full_like(lse, coef)
    return lse, (nll if nll is not None else torch.zeros_like(lse)), wy, coef, loss


def _local_grad(x3, lse, nll, g_rows, y_own, t3, wy, coef, w_acc, eps, softcap, z_loss, num_classes,
                need_x, need_t, out=None):
    """This slice's gradients, formed in ``lse``'s dtype and cast to x's (the target's) once:

        d loss / d x'_c = g (coef p_c - b_c),  p_c = exp(x'_c - lse)
        class indices: coef = (1 - eps) w_y + eps/C W + 2 z lse,  b_c = (1 - eps) w_y [c = y] + eps/C w_c
        probabilities: coef = sum_k w_k t'_k + 2 z lse,          b_c = w_c t'_c

    times 1 - tanh(x_c / s)^2 under soft-capping; a probability target's gradient is
    g (1 - eps) w_c (lse - x'_c). ``out`` (x3 itself, for the chunks of the linear path) receives
    the logits' gradient: written over the logits."""
    n, v, s = x3.shape
    acc = lse.dtype
    gx = (empty_like_layout(x3) if out is None else out) if need_x else None
    gt = empty_like_layout(x3, dtype=t3.dtype) if need_t else None
    if n * v * s == 0:
        return gx, gt
    # In the accumulation dtype the gradient is formed in its own buffer; otherwise in a float32
    # scratch of a few row blocks, so bf16/fp16 logits never get a full float32 copy.
    direct = x3.dtype == acc and not softcap
    step = n if direct else max(1, _GRAD_CHUNK // max(1, v * s))
    w_c = None if w_acc is None else w_acc.view(1, -1, 1)
    eps_c = eps / num_classes if eps > 0 else 0.0
    if y_own is not None:
        # At the target, p_y - 1 is expm1(-(lse - x'_y)) from the forward's nll: exp(x_y - lse) - 1
        # would cancel to rounding noise for a confident prediction (p_y ~ 1).
        owned = (y_own >= 0).unsqueeze(1)
        target_idx = y_own.clamp_min(0).unsqueeze(1)
        w_y = 1.0 if wy is None else wy
        p_y = torch.exp(-nll)
        rest = coef - (1 - eps) * w_y  # the smoothing and z-loss part of coef
        target_grad = g_rows * ((1 - eps) * w_y * torch.expm1(-nll) + p_y * rest - eps_c * w_y)
        target_grad = target_grad.unsqueeze(1)
        if not torch.is_tensor(w_y) and w_c is None and not z_loss:
            coef = None  # (1 - eps) + eps/C * C = 1: nothing to multiply
    for i in range(0, n, step):
        rows = slice(i, i + step)
        xr = x3[rows]
        th = None
        if softcap:
            th = torch.tanh(xr.to(acc) / softcap)
            xr = th * softcap
        lse_r = lse[rows].unsqueeze(1)
        g_r = g_rows[rows].unsqueeze(1)
        if need_t:
            gap = lse_r - (xr if xr.dtype == acc else xr.to(acc))
            gt_r = gap.mul_(g_r * (1 - eps))
            if w_c is not None:
                gt_r.mul_(w_c)
            gt[rows].copy_(gt_r)
        if not need_x:
            continue
        if direct:
            p = torch.sub(xr, lse_r, out=gx[rows])
        else:
            p = xr - lse_r  # promotes to float32: a fresh scratch
        p.exp_()
        if coef is not None:
            p.mul_(coef[rows].unsqueeze(1))
        if t3 is not None:
            tr = t3[rows]
            p.sub_(tr if w_c is None else tr * w_c)
        elif eps > 0:
            p.sub_(eps_c if w_c is None else eps_c * w_c)
        p.mul_(g_r)
        if y_own is not None:
            idx = target_idx[rows]
            # Rows without an owned target write class 0's own value back.
            p.scatter_(1, idx, torch.where(owned[rows], target_grad[rows], p.gather(1, idx)))
        if th is not None:
            p.mul_(1 - th * th)
        if not direct:
            gx[rows].copy_(p)
    return gx, gt


# ----------------------------------------------------------------------------------------------
# Vocab-parallel linear + cross-entropy: the output layer's rows (the vocabulary) split across the
# group, the logits computed a chunk of rows at a time and never whole, not even per rank.
# ----------------------------------------------------------------------------------------------


def vocab_parallel_linear_cross_entropy(
    input: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    local_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    vocab_sizes: Sequence[int] | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``cross_entropy(input @ W.T + b, target)`` with the rows of the output layer ``W`` (V, H) --
    the vocabulary -- split across the ranks of ``group`` (a column-parallel lm_head): each rank holds
    ``local_weight`` (V_local, H) (and ``local_bias`` (V_local,)), the same ``input`` (..., H) and
    class-index ``target`` (the GLOBAL indices, ``input.shape[:-1]``), or its slice of probability
    targets (``input.shape[:-1] + (V_local,)``). Options as :func:`lossfuse.linear_cross_entropy`;
    ``weight`` is this rank's slice of the class weights, ``vocab_sizes`` as for
    :func:`vocab_parallel_cross_entropy`.

    Rows go through the local slice of the output layer in chunks (``chunk_size`` rows; by default
    1/P^2 of the rows single-process :func:`lossfuse.linear_cross_entropy` would take for the whole
    vocabulary, P the group size, at least 64), so a rank holds one chunk of its slice's logits at a
    time. Communication: one ``all_gather`` of a few floats per row in forward (plus one for the sizes without
    ``vocab_sizes``); in backward one ``all_reduce`` of the input gradient (every slice contributes
    to it), so ``input.grad`` is the full gradient on every rank. The weight (bias) gradient is the
    local slice's. The loss is the same on every rank.
    """
    name = "vocab_parallel_linear_cross_entropy"
    v_local, h, lead, prob = _check_linear_head(
        name, input, local_weight, target, local_bias, weight, reduction, ignore_index, label_smoothing, z_loss,
        softcap, chunk_size, backend, local=True)
    backend = _backend.resolve(backend, input.device)
    world, start, num_classes, sizes_acc = _slices(name, vocab_sizes, group, v_local, input)
    x2 = input.reshape(-1, h)
    n = x2.shape[0]
    t2 = target.reshape(n, v_local) if prob else _checked_targets(name, target.reshape(n), num_classes,
                                                                  ignore_index)
    chunk = chunk_size or _default_chunk(n, v_local, world)
    out = VocabParallelLinearCrossEntropyFunction.apply(
        x2, local_weight, t2, local_bias, weight, start, num_classes, sizes_acc, group, world, ignore_index,
        reduction, float(label_smoothing), float(z_loss), float(softcap or 0.0), chunk, backend)
    return out.reshape(lead) if reduction == "none" else out


def _default_chunk(n: int, v_local: int, world: int) -> int:
    """Rows per chunk: 1/world^2 of the rows single-process linear_cross_entropy takes for the whole
    vocabulary (at least 64). A rank's slice is already 1/world as wide, so its chunk buffer is then
    1/world^3 of the single-process one: what keeps a rank's peak memory within 1/world + 5% of
    single-process, since the input gradient (tokens x hidden) and the fixed costs it holds do not
    shrink with the group (bench/dist_memory.py measures it; at 2 ranks, 4096 x 512 x 32000 fp32, a
    chunk of 1/world of the rows gave 0.56). Each chunk re-reads the weight slice: smaller chunks
    cost memory traffic, which the slice's smaller size pays for."""
    return max(min(n, 64), default_chunk_size(n, v_local * world) // (world * world))


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of :func:`vocab_parallel_linear_cross_entropy`: ``apply(input2d (N, H),
    local_weight, target (N,) int64 or (N, V_local), local_bias, weight, start, num_classes, sizes_acc,
    group, world, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, backend)``.
    The backward recomputes each chunk's logits (the global lse is known only after the forward's
    collective) and writes their gradient over them."""

    @staticmethod
    def forward(ctx, x, W, target, bias, weight, start, num_classes, sizes_acc, group, world, ignore_index,
                reduction, eps, z_loss, softcap, chunk, backend):
        n, v_local = x.shape[0], W.shape[0]
        acc = acc_dtype(x.dtype)
        prob = target.is_floating_point()
        w_acc = None if weight is None else weight.to(acc)
        if prob:
            t = target if target.dtype in (x.dtype, acc) else target.to(acc)
            if eps > 0:
                t = t.to(acc) * (1 - eps) + eps / num_classes
            t3 = t.unsqueeze(2)
            keep = torch.ones((n, 1), dtype=torch.bool, device=x.device)
            y_own = y_loc = owned = None
            k = 3
        else:
            t3 = None
            y = target.view(n, 1)
            keep = y != ignore_index
            y_loc = y - start
            owned = keep & (y_loc >= 0) & (y_loc < v_local)
            y_own = torch.where(owned, y_loc, _NOT_OWNED)
            k = 3 + (weight is not None) + (eps > 0) * (1 + (weight is not None))
        stats = torch.empty((n, 1, k), dtype=acc, device=x.device)
        buf = x.new_empty((min(chunk, n), v_local))
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            l3 = _project(x[i0:i1], W, bias, buf[: i1 - i0]).unsqueeze(2)
            if prob:
                stats[i0:i1] = _prob_stats(l3, t3[i0:i1], weight, w_acc, softcap, acc, backend)
            else:
                stats[i0:i1] = _index_stats(l3, y_loc[i0:i1], owned[i0:i1], w_acc, eps, softcap, acc, backend)
        # The backward recomputes its chunks into the same buffer: freeing it here and allocating
        # another there would leave the allocator a hole of its size next to the gradients (a peak
        # higher by up to the buffer, measured: bench/dist_memory.py).
        ctx.buf = buf if any(ctx.needs_input_grad[:4]) else None
        lse, nll, wy, coef, loss, denom = _global_rows(
            stats, keep, group, world, prob, weight is not None, sizes_acc, num_classes, eps, z_loss, reduction)
        out = reduce_rows(loss, reduction, denom, (n,))
        ctx.opts = (eps, float(softcap), float(z_loss), num_classes, prob, target.dtype, reduction, chunk, group,
                    world)
        ctx.save_for_backward(x, W, bias, y_own, t3, keep, lse, nll, wy, coef, w_acc, denom)
        out_dtype = torch.promote_types(x.dtype, target.dtype) if prob else x.dtype
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        eps, softcap, z_loss, num_classes, prob, target_dtype, reduction, chunk, group, world = ctx.opts
        x, W, bias, y_own, t3, keep, lse, nll, wy, coef, w_acc, denom = ctx.saved_tensors
        need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_t = prob and ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]
        none = (None,) * 13
        if not (need_x or need_W or need_t or need_b):
            return (None,) * 4 + none
        n, v_local = x.shape[0], W.shape[0]
        acc = lse.dtype
        g_rows = torch.where(keep, row_grads(grad_out, reduction, denom, lse.shape, acc), 0)
        gx = torch.empty(x.shape, dtype=acc, device=x.device) if need_x else None
        gW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_W else None
        gb = torch.zeros(v_local, dtype=acc, device=W.device) if need_b else None
        gt = torch.empty((n, v_local), dtype=t3.dtype, device=x.device) if need_t else None
        buf, ctx.buf = ctx.buf, None  # a retained graph's next backward allocates its own
        if buf is None:
            buf = x.new_empty((min(chunk, n), v_local))
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            rows = slice(i0, i1)
            l3 = _project(x[rows], W, bias, buf[: i1 - i0]).unsqueeze(2)
            glog, gt_c = _local_grad(
                l3, lse[rows], nll[rows], g_rows[rows], None if y_own is None else y_own[rows],
                None if t3 is None else t3[rows], None if wy is None else wy[rows], coef[rows], w_acc, eps,
                softcap, z_loss, num_classes, True, need_t, out=l3)
            glog = glog.squeeze(2)  # now d loss / d logits of this chunk, over the logits
            if need_t:
                gt[rows] = gt_c.squeeze(2)
            if need_x:
                if x.dtype == acc:
                    torch.mm(glog, W, out=gx[rows])
                else:
                    gx[rows] = torch.mm(glog, W)
            if need_W:
                if x.dtype == acc:
                    gW.addmm_(glog.t(), x[rows])
                else:
                    gW.addmm_(glog.t().to(acc), x[rows].to(acc))
            if need_b:
                gb += glog.sum(0, dtype=acc)
        del buf
        if need_x:
            gx = _all_reduce_sum(gx, group, world).to(x.dtype)
        gt = gt.to(target_dtype) if need_t else None
        return (gx, None if gW is None else gW.to(W.dtype), gt, None if gb is None else gb.to(bias.dtype)) + none


def _all_reduce_sum(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """``t`` summed over the group, in place in eager. In blocks of ``_REDUCE_BLOCK`` elements: a
    collective's scratch buffers (gloo's are the tensor's size) then stay small next to the input
    gradient they reduce."""
    if world == 1:
        return t
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD if group is None else group))
    flat = t.view(-1)
    for i in range(0, flat.numel(), _REDUCE_BLOCK):
        dist.all_reduce(flat[i:i + _REDUCE_BLOCK], group=group)
    return t


def _all_gather(inp: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every rank's ``inp`` concatenated on dim 0 in group-rank order. Under torch.compile through
    the functional collectives (traceable); in eager through c10d, torch >= 2.13's all_gather_single
    (all_gather_into_tensor before it), the concatenated form, which gloo accepts."""
    if world == 1:
        return inp.clone()
    inp = inp.contiguous()
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_gather_tensor(inp, 0, dist.group.WORLD if group is None else group))
    out = inp.new_empty((world * inp.shape[0],) + tuple(inp.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)
    return out


def _check_vocab_sizes(vocab_sizes, world: int, rank: int, v_local: int) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in vocab_sizes)
    if len(sizes) != world or any(v < 0 for v in sizes):
        raise ValueError(
            f"vocab_parallel_cross_entropy: vocab_sizes must hold {world} sizes >= 0, one per rank of "
            f"the group; got {list(vocab_sizes)}"
        )
    if sizes[rank] != v_local:
        raise ValueError(
            f"vocab_parallel_cross_entropy: vocab_sizes[{rank}] = {sizes[rank]}, but this rank's "
            f"local_logits hold {v_local} classes (shape[1])"
        )
    return sizes


@functools.lru_cache(maxsize=32)
def _sizes_tensor(sizes: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The slice sizes on the device, made once per (sizes, device, dtype): a host-to-device copy."""
    return torch.tensor(sizes, dtype=dtype, device=device)
