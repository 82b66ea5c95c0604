"""Reference implementations in plain PyTorch: the test oracle and the fallback backend.

Each function is written from the formulas in DESIGN.md section 2, independently of the kernels, and
its gradient comes from autograd rather than from a hand-derived backward -- so a test that compares
a kernel with it checks the kernel's derivative too. Inputs are assumed already validated by
``lossfuse.functional``; math runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ._utils import acc_dtype, result_dtype


def _class_view(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over the class dim of an ``ndim``-dim input."""
    if ndim == 1:
        return w
    return w.view((1, -1) + (1,) * (ndim - 2))


def _log_sum_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(x))) shifted by the row max, as log_softmax computes it: a +inf logit gives NaN
    (inf - inf), like torch's cross_entropy, where torch.logsumexp would return inf; a row of only
    -inf gives -inf, as torch.logsumexp (its cross-entropy is NaN either way)."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), 0.0, m)  # an all -inf row: lse = -inf, not -inf - -inf = NaN
    return m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))


def check_targets_in_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """torch's "Target 7 is out of bounds." for class indices outside [0, C) that are not ignored."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
):
    acc = acc_dtype(input.dtype)
    cdim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[cdim]
    x = input.to(acc)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    lse = _log_sum_exp(x, cdim)
    neg_logp = lse - x  # >= 0
    lse_rows = lse.squeeze(cdim)
    z_term = z_loss * lse_rows * lse_rows if z_loss else None
    lse_out = lse_rows.detach()
    w = None if weight is None else _class_view(weight.to(acc), input.dim())
    eps = float(label_smoothing)

    if target.is_floating_point():
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / num_classes
        wt = t if w is None else t * w
        rows = (wt * neg_logp).sum(cdim)
        if z_term is not None:
            rows = rows + z_term
        if reduction == "none":
            out = rows
        elif reduction == "sum":
            out = rows.sum()
        else:
            out = rows.sum() / rows.numel()  # the number of rows, not a weight sum; 0/0 = NaN
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if out_dtype != torch.float64 and torch.is_autocast_enabled(input.device.type):
            out_dtype = torch.float32
        return (out.to(out_dtype), lse_out) if return_lse else out.to(out_dtype)

    y = target.long()
    check_targets_in_range(y, num_classes, ignore_index)
    keep = y != ignore_index
    y_safe = torch.where(keep, y, 0).unsqueeze(cdim)
    nll = neg_logp.gather(cdim, y_safe).squeeze(cdim)
    if w is None:
        wy = torch.ones_like(nll)
    else:
        wy = weight.to(acc)[y_safe.squeeze(cdim)]
    rows = (1 - eps) * wy * nll
    if eps > 0:
        smooth = (neg_logp if w is None else neg_logp * w).sum(cdim)
        rows = rows + (eps / num_classes) * smooth
    if z_term is not None:
        rows = rows + z_term  # per kept row, unweighted (PaLM's z-loss), reduced like the loss
    rows = torch.where(keep, rows, 0)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / torch.where(keep, wy, 0).sum()
    out = out.to(result_dtype(input.dtype, input.device))
    return (out, lse_out) if return_lse else out
