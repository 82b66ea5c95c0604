"""DTensor inputs to :func:`lossfuse.cross_entropy` and :func:`lossfuse.linear_cross_entropy`.

Logits as torch.distributed hands them to a loss (``torch.distributed.tensor.DTensor``), per mesh
dimension one of

- ``Replicate()``: every rank computes the whole loss locally, no communication;
- ``Shard(d)``, d a batch or spatial dim: each rank computes the loss of its rows; ``"none"`` stays
  sharded like the target, ``"sum"`` is ``Partial("sum")`` over that mesh dim, as torch's DTensor
  cross-entropy gives, and ``"mean"`` is ``Partial("sum")`` of the local sums divided by the GLOBAL
  denominator (one all-reduce of a scalar; none for probability targets, whose denominator is the
  global row count). torch returns ``Partial("avg")`` of the local means there, which is the mean only
  when every shard has the same denominator (no ignored rows, no class weights, even shards);
- ``Shard(class dim)``: the vocab-parallel algorithm of lossfuse/distributed.py over that mesh dim's
  group (local statistics, one all-gather of a few floats per row, no gather of the logits); the
  loss is ``Replicate()`` over that mesh dim and the logits' gradient ``Shard(class dim)``, as
  ``torch.nn.functional.cross_entropy`` under ``torch.distributed.tensor.parallel.loss_parallel()``
  gives -- and here also with class weights, probability targets, label smoothing, z-loss and
  soft-capping, which torch's loss_parallel does not support.

Targets: a DTensor on the same mesh, redistributed (it is small) to the placements the logits imply:
class indices like the logits without the class dim (``Replicate`` where the classes are sharded),
probabilities exactly like the logits. A plain tensor is taken as the global target only where
those placements are all ``Replicate``; elsewhere it would be ambiguous (local rows or global?), and
it is refused as torch's loss_parallel refuses it. Class weights: a plain tensor of all C classes or a
DTensor (gathered); each rank uses the slice of its classes.

Only ``Shard`` and ``Replicate`` placements are taken; ``Partial`` logits must be reduced first.
``inplace_backward`` applies where the loss is computed locally (no class sharding); the
vocab-parallel path writes its gradient into a buffer of its own.

For linear_cross_entropy the lm_head weight is the DTensor (see ``linear_cross_entropy`` below).

This module is imported only when a DTensor reaches lossfuse: the plain-tensor path never imports
torch.distributed.tensor.
"""

from __future__ import annotations

import sys

import torch

from ._utils import check_reduction, legacy_reduction

__all__ = ["is_dtensor", "cross_entropy", "linear_cross_entropy"]


def is_dtensor(t) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _placement_kinds(x, class_dim: int, what: str):
    """(tensor-parallel mesh dim or None, batch-sharded mesh dims) of the DTensor ``x``."""
    from torch.distributed.tensor import Replicate, Shard

    tp, batch = [], []
    for i, p in enumerate(x.placements):
        if type(p) is Shard:
            (tp if p.dim % max(x.dim(), 1) == class_dim % max(x.dim(), 1) else batch).append(i)
        elif type(p) is not Replicate:
            raise NotImplementedError(
                f"lossfuse: {what} DTensor placements must be Shard or Replicate on every mesh dim; got "
                f"{tuple(x.placements)} (reduce Partial placements first)"
            )
    if len(tp) > 1:
        raise NotImplementedError(
            f"lossfuse: the class dim of the {what} is sharded over {len(tp)} mesh dims "
            f"({tuple(x.placements)}); at most one is supported"
        )
    return (tp[0] if tp else None), batch


def _row_placements(placements, class_dim: int, ndim: int):
    """The placements of a tensor of the logits' shape without ``class_dim`` (targets, per-row losses)."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in placements:
        if type(p) is Shard:
            d = p.dim % ndim  # ColwiseParallel's Shard(-1)
            out.append(Replicate() if d == class_dim else Shard(d - (d > class_dim)))
        else:
            out.append(Replicate())
    return tuple(out)


def _local_target(target, mesh, placements, what: str):
    """The local part of ``target`` in ``placements`` (redistributed if it is a DTensor elsewhere)."""
    from torch.distributed.tensor import Replicate

    if is_dtensor(target):
        if target.device_mesh != mesh:
            raise ValueError(f"lossfuse: the {what} DTensor must be on the logits' device mesh")
        if tuple(target.placements) != tuple(placements):
            target = target.redistribute(mesh, placements)
        return target.to_local()
    if any(p != Replicate() for p in placements):
        raise ValueError(
            f"lossfuse: with logits placed {tuple(placements)} on the mesh, pass the {what} as a DTensor "
            f"(placements {tuple(placements)}): a plain tensor is taken as the global {what} only where "
            f"those placements are all Replicate"
        )
    return target


def _full(t):
    """A DTensor's global value (an all-gather), or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def _sum_over(t, mesh, mesh_dims):
    """``t`` summed over the ranks of each mesh dim in ``mesh_dims`` (functional collectives)."""
    import torch.distributed._functional_collectives as funcol

    for i in mesh_dims:
        t = funcol.wait_tensor(funcol.all_reduce(t, "sum", (mesh, i)))
    return t


def _class_slice(num_classes: int, mesh, tp_dim: int):
    """(sizes of every rank of the mesh dim, this rank's start), as DTensor's Shard splits C."""
    from torch.distributed.tensor import Shard

    k = mesh.size(tp_dim)
    sizes = [Shard.local_shard_size_and_offset(num_classes, k, r)[0] for r in range(k)]
    coord = mesh.get_local_rank(tp_dim)
    return sizes, sum(sizes[:coord])


def _wrap(local, mesh, placements, shape):
    from torch.distributed.tensor import DTensor

    shape = torch.Size(shape)
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _kept_weight_sum(t_local, w_full, ignore_index, acc):
    keep = t_local != ignore_index
    if w_full is None:
        return keep.sum().to(acc)
    return torch.where(keep, w_full.to(acc)[torch.where(keep, t_local, 0).long()], 0).sum()


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None, return_lse=False,
                  inplace_backward=False, backend="auto"):
    """:func:`lossfuse.cross_entropy` of DTensor logits (the module docstring gives the placements)."""
    from torch.distributed.tensor import Partial, Replicate

    from . import distributed, functional
    from ._utils import acc_dtype

    reduction = legacy_reduction(size_average, reduce, reduction)
    check_reduction(reduction)
    mesh = input.device_mesh
    class_dim = 0 if input.dim() == 1 else 1
    tp_dim, batch_dims = _placement_kinds(input, class_dim, "logits")
    prob = (target.dtype.is_floating_point and tuple(target.shape) == tuple(input.shape))
    row_pl = _row_placements(input.placements, class_dim, input.dim())
    from torch.distributed.tensor import Shard

    same_pl = tuple(Shard(p.dim % input.dim()) if type(p) is Shard else p for p in input.placements)
    t_local = _local_target(target, mesh, same_pl if prob else row_pl, "target")
    w_full = None if weight is None else _full(weight)
    x_local = input.to_local()  # its gradient comes back with the logits' placements
    num_classes = input.shape[class_dim]
    row_shape = tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1:])
    # A batch-sharded mean: local sums over the GLOBAL denominator (the module docstring says why).
    split_mean = reduction == "mean" and bool(batch_dims)
    local_red = "sum" if split_mean else reduction
    kw = dict(ignore_index=ignore_index, reduction=local_red, label_smoothing=label_smoothing,
              z_loss=z_loss, softcap=softcap, backend=backend)

    if tp_dim is None:
        loss, lse = functional.cross_entropy(x_local, t_local, w_full, return_lse=True,
                                             inplace_backward=inplace_backward, **kw)
    else:
        sizes, start = _class_slice(num_classes, mesh, tp_dim)
        w_local = None if w_full is None else w_full[start:start + x_local.shape[class_dim]]
        x2, t2 = x_local, t_local
        if input.dim() == 1:  # (C,): one row
            x2, t2 = x_local.unsqueeze(0), t_local.unsqueeze(0) if prob else t_local.reshape(1)
        loss, lse = distributed.vocab_parallel_cross_entropy(
            x2, t2, weight=w_local, group=mesh.get_group(tp_dim), return_lse=True, vocab_sizes=sizes, **kw)
        if input.dim() == 1:
            loss = loss.reshape(()) if local_red == "none" else loss
            lse = lse.reshape(())
    if split_mean:
        acc = acc_dtype(x_local.dtype)
        if prob:
            denom = float(torch.Size(row_shape).numel())
        else:
            denom = _sum_over(_kept_weight_sum(t_local, w_full, ignore_index, acc), mesh, batch_dims)
        loss = (loss.to(acc) / denom).to(loss.dtype)

    lse = _wrap(lse, mesh, row_pl, row_shape)
    if reduction == "none":
        loss = _wrap(loss, mesh, row_pl, row_shape)
    else:
        pl = tuple(Partial("sum") if i in batch_dims else Replicate() for i in range(mesh.ndim))
        loss = _wrap(loss, mesh, pl, ())
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None,
                         backend="auto"):
    """:func:`lossfuse.linear_cross_entropy` with a DTensor ``linear_weight`` (V, H):

    - ``input`` a plain tensor (data parallel: each rank's own rows), the weight sharded or replicated
      on its mesh (FSDP2's ``fully_shard``): the weight is gathered for the call as FSDP2 gathers it
      for a forward, the loss is this rank's (a plain tensor), and the weight's gradient comes back
      in its placements, averaged over the mesh -- FSDP2's own gradient reduction (a reduce-scatter),
      so a training step equals FSDP2 running the lm_head module itself;
    - ``input`` a ``Replicate()`` DTensor, the weight ``Shard(0)`` on one mesh dim (a column-parallel,
      vocab-sharded lm_head): :func:`lossfuse.distributed.vocab_parallel_linear_cross_entropy` over
      that mesh dim's group, the loss a ``Replicate()`` DTensor, the weight gradient ``Shard(0)``,
      the input gradient ``Replicate()``. Probability targets are then a DTensor sharded on their last
      (class) dim like the weight.

    The logits are never whole on any rank: rows go through the output layer in chunks. The gathered
    weight keeps the parameter's dtype (an FSDP2 ``MixedPrecisionPolicy`` cast is not applied here).
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    from . import distributed, functional

    check_reduction(reduction)
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
              softcap=softcap, chunk_size=chunk_size, backend=backend)
    if not is_dtensor(linear_weight):
        raise NotImplementedError(
            "lossfuse.linear_cross_entropy: a DTensor input needs a DTensor linear_weight (a vocab-sharded "
            "lm_head); pass input.to_local() for a plain weight")
    mesh = linear_weight.device_mesh
    if not is_dtensor(input):
        full = (Replicate(),) * mesh.ndim
        avg = (Partial("avg"),) * mesh.ndim

        def gathered(p):
            if not is_dtensor(p):
                return p
            _placement_kinds(p, -1, "linear_weight")
            return p.redistribute(p.device_mesh, full).to_local(grad_placements=avg)

        if is_dtensor(target):
            raise ValueError("lossfuse.linear_cross_entropy: with a plain input, the target is this rank's "
                             "own, a plain tensor")
        return functional.linear_cross_entropy(input, gathered(linear_weight), target,
                                               linear_bias=gathered(linear_bias), weight=_full(weight), **kw)

    tp, others = _placement_kinds(linear_weight, 0, "linear_weight")
    if tp is None or others or any(type(p) is not Replicate for p in input.placements):
        raise NotImplementedError(
            "lossfuse.linear_cross_entropy: with a DTensor input, the supported layout is tensor parallel: "
            "input Replicate() and linear_weight Shard(0) on one mesh dim (Replicate() on the others); got "
            f"input {tuple(input.placements)} and linear_weight {tuple(linear_weight.placements)}")
    if input.device_mesh != mesh:
        raise ValueError("lossfuse.linear_cross_entropy: input and linear_weight must be on the same device mesh")
    num_classes = linear_weight.shape[0]
    sizes, start = _class_slice(num_classes, mesh, tp)
    v_local = sizes[mesh.get_local_rank(tp)]
    replicated = (Replicate(),) * mesh.ndim
    if target.dtype.is_floating_point:
        t_pl = tuple(Shard(target.dim() - 1) if i == tp else Replicate() for i in range(mesh.ndim))
        t_local = _local_target(target, mesh, t_pl, "probability target")
    else:
        t_local = _local_target(target, mesh, replicated, "target")
    if linear_bias is None:
        b_local = None
    elif is_dtensor(linear_bias):
        b_local = linear_bias.redistribute(mesh, linear_weight.placements).to_local()
    else:
        raise ValueError("lossfuse.linear_cross_entropy: the bias of a vocab-sharded linear_weight must be a "
                         "DTensor sharded like it")
    w_full = None if weight is None else _full(weight)
    w_local = None if w_full is None else w_full[start:start + v_local]
    loss = distributed.vocab_parallel_linear_cross_entropy(
        input.to_local(), linear_weight.to_local(), t_local, local_bias=b_local, weight=w_local,
        group=mesh.get_group(tp), vocab_sizes=sizes, **kw)
    shape = tuple(input.shape[:-1]) if reduction == "none" else ()
    return _wrap(loss, mesh, replicated, shape)
