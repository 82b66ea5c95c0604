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

Limits: class-index targets only, no class weights, no z_loss/softcap. The slice statistics travel
as float32 log-sum-exps, so probabilities carry the relative error eps * |lse| of a float32 lse, as in
torch (single-process lossfuse keeps its lse in float64 for the backward; sending float64 statistics
here would remove this too, at twice the collective's bytes).
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
from .functional import _check_class_index_target
from ._layout import RowShapes, empty_like_layout
from .ops._common import reduce_rows, row_grads
from .ops.cross_entropy import CE_FWD
from .reference import check_targets_in_range

__all__ = ["vocab_parallel_cross_entropy", "VocabParallelCrossEntropyFunction"]

# Local target of a row this rank does not score (ignored, or owned by another rank). Negative, so it
# can never collide with a local class index -- unlike the user's ignore_index, which may be >= 0.
_NOT_OWNED = -1

# The float32 scratch of the low-precision backward is computed in row chunks of at most this many
# elements (16 MiB), so bf16/fp16 logits never need an N x V float32 copy.
_GRAD_CHUNK = 1 << 22


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    vocab_sizes: Sequence[int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of ``group``.

    The result equals :func:`torch.nn.functional.cross_entropy` (and :func:`lossfuse.cross_entropy`)
    of the logits concatenated along the class dimension in group-rank order, and is the same on every
    rank; ``backward`` gives each rank the gradient of its own slice, without communication.

    Args:
        local_logits: ``(N, V_local)`` or ``(N, V_local, d1, ..., dk)`` logits of this rank's classes
            ``[start, start + V_local)`` (float32/64, float16, bfloat16); slices may differ in size.
            Classes on dim 1, as torch: Megatron's ``(s, b, V_local)`` logits go in as
            ``logits.view(-1, V_local)`` with ``target.view(-1)``.
        target: class indices into the GLOBAL vocabulary, ``(N)`` or ``(N, d1, ..., dk)``, int64 or
            uint8, the same on every rank.
        group: the process group the vocabulary is split over (default: the default group).
        ignore_index: target value whose rows contribute 0 to the loss and the gradient.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``, as torch (mean divides by the number of
            rows not ignored; all ignored gives NaN).
        label_smoothing: eps in [0, 1]; the uniform part is eps / C with C the GLOBAL class count.
        vocab_sizes: ``V_r`` of every rank of ``group`` in group-rank order, the same list on every
            rank (a Megatron-style model knows its partition: ``[partition_vocab_size] * tp_size``, or
            the uneven split it built its output layer with). Checked against this rank's
            ``V_local``. When None, the sizes are exchanged with one extra ``all_gather`` per call.
        backend: how each rank computes its slice's statistics: ``"auto"``, ``"cpu"``, ``"triton"``
            or ``"reference"``, as for :func:`lossfuse.cross_entropy`.

    Communication per call: one ``all_gather`` (R x 3 floats per rank; R x 4 with label smoothing)
    in forward, none in backward; plus one ``all_gather`` of one int64 when ``vocab_sizes`` is None.
    Every rank of ``group`` must call it with the same ``target``, options and ``vocab_sizes``.
    """
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input("vocab_parallel_cross_entropy", local_logits)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    check_same_device("vocab_parallel_cross_entropy", local_logits, target)
    if local_logits.dim() < 2:
        raise ValueError(
            "vocab_parallel_cross_entropy: local_logits must be (N, V_local) or (N, V_local, d1, ...); "
            f"got shape {list(local_logits.shape)}"
        )
    if target.is_floating_point():
        raise NotImplementedError(
            "vocab_parallel_cross_entropy: class-index targets only (probability targets are not "
            "supported)"
        )
    _check_class_index_target(local_logits, target)
    backend = _backend.resolve(backend, local_logits.device)

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("vocab_parallel_cross_entropy: this process is not a member of `group`")
    v_local = local_logits.shape[1]
    acc = acc_dtype(local_logits.dtype)
    device = local_logits.device

    if vocab_sizes is not None:
        sizes = _check_vocab_sizes(vocab_sizes, world, rank, v_local)
        start, num_classes = sum(sizes[:rank]), sum(sizes)
        sizes_acc = _sizes_tensor(sizes, device, acc)
    else:
        # One extra collective; a fill kernel rather than a host-to-device copy of the size.
        mine = torch.full((1,), v_local, dtype=torch.int64, device=device)
        all_sizes = torch.empty(world, dtype=torch.int64, device=device)
        _all_gather(all_sizes, mine, group, world)
        if device.type == "cpu":
            sizes = all_sizes.tolist()
            start, num_classes = sum(sizes[:rank]), sum(sizes)
        else:  # device scalars: a host sync here would stall the GPU
            start, num_classes = all_sizes[:rank].sum(), all_sizes.sum()
        sizes_acc = all_sizes.to(acc)

    y = target if target.dtype == torch.int64 else target.long()
    # Every rank holds the same targets, so every rank raises here, before the forward's collective.
    if device.type == "cpu":
        check_targets_in_range(y, num_classes, ignore_index)
    else:  # no host sync on the hot path: a device-side assert, as torch's own CUDA kernel does
        ok = ((y >= 0) & (y < num_classes)) | (y == ignore_index)
        torch._assert_async(ok.all(), "vocab_parallel_cross_entropy: a target is out of bounds [0, C)")

    return VocabParallelCrossEntropyFunction.apply(
        local_logits, y, start, num_classes, sizes_acc, group, world, ignore_index, reduction,
        float(label_smoothing), backend,
    )


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of :func:`vocab_parallel_cross_entropy`, whose checked arguments it takes:
    ``apply(local_logits, target_int64, start, num_classes, sizes_acc, group, world, ignore_index,
    reduction, label_smoothing, backend)`` with ``start``/``num_classes`` ints or 0-dim int64 tensors
    and ``sizes_acc`` the (world,) slice sizes in the accumulation dtype, on the logits' device."""

    @staticmethod
    def forward(ctx, x, target, start, num_classes, sizes_acc, group, world, ignore_index, reduction,
                eps, backend):
        shapes = RowShapes(x)
        x3 = shapes.input3d(x)  # (N, V, S): a view except for layouts the kernels cannot walk
        y = shapes.rows2d(target)  # (N, S)
        acc = acc_dtype(x.dtype)
        v_local = x3.shape[1]

        keep = y != ignore_index
        y_loc = y - start
        owned = keep & (y_loc >= 0) & (y_loc < v_local)
        stats = _local_stats(x3, y_loc, owned, eps, acc, backend)  # (N, S, k)

        rows, k = stats.shape[0] * stats.shape[1], stats.shape[2]
        gathered = stats.new_empty((world * rows, k))
        if rows > 0:  # every rank has the same rows: all skip, or none does
            _all_gather(gathered, stats.reshape(rows, k), group, world)
        gathered = gathered.view(world, rows, k)
        lse, nll, loss = _combine(gathered, sizes_acc, num_classes, eps)
        lse, nll = lse.view_as(y), nll.view_as(y)
        loss = torch.where(keep, loss.view_as(y), 0)

        denom = keep.sum().to(acc) if reduction == "mean" else None
        out = reduce_rows(loss, reduction, denom, shapes.row_shape())

        ctx.shapes = shapes
        ctx.reduction = reduction
        ctx.eps = eps
        ctx.eps_c = eps / num_classes if eps > 0 else 0.0  # a device scalar when C is one
        ctx.save_for_backward(x3, torch.where(owned, y_loc, _NOT_OWNED), keep, lse, nll, denom)
        return out.to(result_dtype(x.dtype, x.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        x3, y_own, keep, lse, nll, denom = ctx.saved_tensors
        g_rows = row_grads(grad_out, ctx.reduction, denom, lse.shape, lse.dtype)
        g_rows = torch.where(keep, g_rows, 0)
        gx3 = _local_grad(x3, lse, nll, g_rows, y_own, ctx.eps, ctx.eps_c)
        return (ctx.shapes.from3d(gx3),) + (None,) * 10


# ----------------------------------------------------------------------------------------------
# The pieces.
# ----------------------------------------------------------------------------------------------


def _local_stats(x3, y_loc, owned, eps, acc, backend):
    """Per row of this rank's slice: (l_r, owned, nll_r, [S_r]) as an (N, S, 3 or 4) ``acc`` tensor."""
    n, v, s = x3.shape
    if v == 0:  # a rank without classes contributes exp(-inf) = 0 to every sum
        lse = x3.new_full((n, s), -math.inf, dtype=acc)
        nll = smooth = x3.new_zeros((n, s), dtype=acc)
    elif backend == "reference":
        xf = x3.to(acc)
        m = xf.amax(1, keepdim=True)
        lse = (m + torch.log(torch.exp(xf - m).sum(1, keepdim=True))).squeeze(1)
        x_y = xf.gather(1, torch.where(owned, y_loc, 0).unsqueeze(1)).squeeze(1)
        nll = lse - x_y
        smooth = (lse.unsqueeze(1) - xf).sum(1)
    elif eps == 0:
        # The kernel scores the owned targets itself: nll_r = (m_r - x_y) + log sum exp(x - m_r),
        # exact when the target holds the slice's max (a confident prediction), where l_r - x_y
        # would keep only the rounding of l_r.
        y_k = torch.where(owned, y_loc, _NOT_OWNED)
        nll, lse = CE_FWD(backend, x3, y_k, None, _NOT_OWNED, 0.0, 0.0, 0.0)
        lse = lse.to(acc)  # the kernel's lse is float64; the collective packs one dtype
        smooth = None
    else:
        # label_smoothing=1 turns the kernel's loss into (1/V) sum_c (l_r - x_c), for every row (each
        # gets a valid target: the owned one, else class 0, which label_smoothing=1 weighs by 0).
        # Smoothing's own term is then at least eps/C * sum_c (lse - x_c), so nll_r = l_r - x_y, with
        # the rounding of l_r, stays far below the loss's float32 resolution.
        y_k = torch.where(owned, y_loc, 0)
        mean_gap, lse = CE_FWD(backend, x3, y_k, None, _NOT_OWNED, 1.0, 0.0, 0.0)
        lse = lse.to(acc)
        x_y = x3.gather(1, y_k.unsqueeze(1)).squeeze(1).to(acc)
        nll = lse - x_y
        # A -inf logit makes the sum +inf; the kernel's 0 x (m - x_y) turned it into NaN.
        smooth = torch.where(x_y == -math.inf, math.inf, mean_gap * v)
    cols = [lse, owned.to(acc), torch.where(owned, nll, 0)]
    if eps > 0:
        cols.append(smooth)
    return torch.stack(cols, dim=-1)


def _combine(gathered, sizes_acc, num_classes, eps):
    """Every rank's (l_r, owned, nll_r, [S_r]) rows -> global (lse, lse - x_y, loss) per row, (R,)."""
    l_r = gathered[..., 0]
    # lse - l_r = (L - l_r) + log(1 + sum over the other ranks of exp(l_q - L)), L the largest l_q:
    # with log1p, a target on the rank holding L keeps its tiny loss of a confident prediction,
    # which lse - l_r, both rounded near L, would turn into rounding noise.
    top, top_rank = l_r.max(0)
    ranks = torch.arange(l_r.shape[0], device=l_r.device).unsqueeze(1)
    log_s = torch.log1p(torch.where(ranks == top_rank, 0, torch.exp(l_r - top)).sum(0))
    lse = top + log_s
    gap = (top - l_r) + log_s  # lse - l_r, >= 0
    owned = gathered[..., 1] != 0
    nll = torch.where(owned, gap + gathered[..., 2], 0).sum(0)
    if eps == 0:
        return lse, nll, nll
    sizes = sizes_acc.unsqueeze(1)
    # A select, not V_r x gap: an empty slice has l_r = -inf, and 0 x inf is NaN.
    smooth = (torch.where(sizes > 0, sizes * gap, 0) + gathered[..., 3]).sum(0)
    return lse, nll, (1 - eps) * nll + (eps / num_classes) * smooth


def _local_grad(x3, lse, nll, g_rows, y_own, eps, eps_c):
    """g * (exp(x - lse) - eps/C - (1 - eps) [c = y]), in ``lse``'s dtype, cast to x's once."""
    out = empty_like_layout(x3)
    n, v, s = x3.shape
    if out.numel() == 0:
        return out
    acc = lse.dtype
    # In the accumulation dtype the gradient is formed in its own buffer; otherwise in a float32
    # scratch of a few row blocks, so bf16/fp16 logits never get a full float32 copy.
    step = n if x3.dtype == acc else max(1, _GRAD_CHUNK // max(1, v * s))
    # At the target, p_y - 1 + eps - eps/C with p_y - 1 = expm1(-(lse - x_y)) from the forward's
    # nll: exp(x_y - lse) - 1 would cancel to rounding noise for a confident prediction (p_y ~ 1).
    owned = (y_own >= 0).unsqueeze(1)
    target_idx = y_own.clamp_min(0).unsqueeze(1)
    target_grad = (g_rows * (torch.expm1(-nll) + (eps - eps_c))).unsqueeze(1)
    for i in range(0, n, step):
        rows = slice(i, i + step)
        if x3.dtype == acc:
            p = torch.sub(x3[rows], lse[rows].unsqueeze(1), out=out[rows])
        else:
            p = x3[rows] - lse[rows].unsqueeze(1)  # promotes to float32: a fresh scratch
        p.exp_()
        if eps > 0:
            p.sub_(eps_c)
        p.mul_(g_rows[rows].unsqueeze(1))
        idx = target_idx[rows]
        # Rows without an owned target write class 0's own value back.
        p.scatter_(1, idx, torch.where(owned[rows], target_grad[rows], p.gather(1, idx)))
        if x3.dtype != acc:
            out[rows].copy_(p)
    return out


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, world: int) -> None:
    """``out`` (world * inp.shape[0], *inp.shape[1:]), contiguous <- every rank's ``inp``, in
    group-rank order (the concatenated form: gloo accepts no other)."""
    if world == 1:
        out.copy_(inp)
        return
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor (now deprecated).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp.contiguous(), group=group)


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
