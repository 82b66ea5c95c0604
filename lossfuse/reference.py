"""Reference implementations in plain PyTorch: the test oracle and the fallback backend.

Each function is written from the formulas in docs/design.md ("What each loss computes"), independently of the kernels, and
its gradient comes from autograd rather than from a hand-derived backward -- so a test that compares
a kernel with it checks the kernel's derivative too. Inputs are assumed already validated by
``lossfuse.functional``; math runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ._utils import acc_dtype, result_dtype, weighted_result_dtype


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


def check_targets_in_range(target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """torch's "Target 7 is out of bounds." for class indices outside [0, C) that are not ignored."""
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _reduce_kept(rows, keep, wy, reduction):
    """Per-row losses of the kept rows reduced as torch does: the mean divides by their summed weight."""
    rows = torch.where(keep, rows, 0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / torch.where(keep, wy, 0).sum()


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
    out = _reduce_kept(rows, keep, wy, reduction)
    out = out.to(result_dtype(input.dtype, input.device))
    return (out, lse_out) if return_lse else out


def _robust_elementwise(input, target, weight, reduction, threshold, mode, out_dtype):
    """Huber ("huber"), SmoothL1 ("smooth_l1") or L1 ("l1") of d = input - target, broadcast."""
    x, y = torch.broadcast_tensors(input, target)
    acc = acc_dtype(torch.promote_types(torch.promote_types(x.dtype, y.dtype), out_dtype))
    d = x.to(acc) - y.to(acc)
    z = d.abs()
    if mode == "l1":
        loss = z  # abs's gradient is sgn(d): 0 at d = 0 (and at NaN), as torch's l1_loss
    else:
        # The quadratic branch never sees +-inf: where() hands it a zero gradient there, and 0 times
        # its local derivative inf would be NaN. A NaN d stays: torch's gradient at NaN is NaN.
        dq = torch.where(d.isinf(), 0, d)
        quad = 0.5 * dq * dq
        if mode == "huber":
            loss = torch.where(z < threshold, quad, threshold * (z - 0.5 * threshold))
        else:
            loss = torch.where(z < threshold, quad / threshold, z - 0.5 * threshold)
    if weight is not None:
        loss = loss * weight.to(acc)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()  # 0 / 0 = NaN for an empty input, as torch
    return loss.to(out_dtype)


def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/design.md: 0.5 d^2 if |d| < delta else delta (|d| - delta / 2), times the elementwise
    weight. Result in the input's dtype (float32 under autocast), promoted by a floating weight."""
    out_dtype = result_dtype(input.dtype, input.device)
    if weight is not None:
        out_dtype = weighted_result_dtype(out_dtype, max(input.dim(), target.dim()), weight)
    return _robust_elementwise(input, target, weight, reduction, float(delta), "huber", out_dtype)


def smooth_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    beta: float = 1.0,
) -> torch.Tensor:
    """docs/design.md: 0.5 d^2 / beta if |d| < beta else |d| - beta / 2; beta = 0 is L1. Result
    in the promoted dtype of input and target (float32 for fp16/bf16 under autocast)."""
    out_dtype = torch.promote_types(result_dtype(input.dtype, input.device), result_dtype(target.dtype, input.device))
    mode = "l1" if beta == 0 else "smooth_l1"
    return _robust_elementwise(input, target, None, reduction, float(beta), mode, out_dtype)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision itself need not be installed).

    Its formula exactly, NaN gradients included: at a saturated logit (p_t rounded to 1) with
    gamma < 1 autograd forms 0 * inf there; the kernels give the finite limit. Class-index targets
    (N,) of an (N, C) input become the one-hot they stand for, index C an all-zero row.
    """
    acc = acc_dtype(inputs.dtype)
    x = inputs.to(acc)
    if targets.is_floating_point():
        t = targets.to(acc)
        out_dtype = torch.promote_types(inputs.dtype, targets.dtype)
        if out_dtype != torch.float64 and torch.is_autocast_enabled(inputs.device.type):
            out_dtype = torch.float32
    else:
        num_classes = inputs.shape[1]
        check_targets_in_range(targets, num_classes + 1)
        t = torch.nn.functional.one_hot(targets.long(), num_classes + 1)[:, :num_classes].to(acc)
        out_dtype = result_dtype(inputs.dtype, inputs.device)
    p = torch.sigmoid(x)
    ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(out_dtype)


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor | None = None,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """loss_n = alpha_y w_y (1 - p_y)^gamma (-log p_y); mean divides by the summed w_y of the rows not
    ignored, so gamma = 0 with alpha None is cross_entropy."""
    acc = acc_dtype(input.dtype)
    cdim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[cdim]
    x = input.to(acc)
    logp = x - _log_sum_exp(x, cdim)
    y = target.long()
    check_targets_in_range(y, num_classes, ignore_index)
    keep = y != ignore_index
    y_safe = torch.where(keep, y, 0)
    logp_y = logp.gather(cdim, y_safe.unsqueeze(cdim)).squeeze(cdim)
    p_y = logp_y.exp()
    wy = torch.ones_like(logp_y) if weight is None else weight.to(acc)[y_safe]
    if alpha is None:
        k = wy
    elif torch.is_tensor(alpha):
        k = alpha.to(acc)[y_safe] * wy
    else:
        k = float(alpha) * wy
    rows = k * (1 - p_y) ** gamma * (-logp_y)
    out = _reduce_kept(rows, keep, wy, reduction)
    return out.to(result_dtype(input.dtype, input.device))


def distillation_loss(student, teacher, temperature=1.0, beta=0.0, ignore_index=-100, target=None,
                      reduction="batchmean", scale_by_t2=True):
    """Distillation loss between softmax(student / T) and softmax(teacher / T) over dim 1: beta 0 the
    forward KL(teacher || student), 1 the reverse KL, in between the generalised JSD
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (liger-kernel's definition).
    Rows whose ``target`` is ``ignore_index`` count nowhere; batchmean divides by the rows kept, mean
    by their elements; the loss is scaled by T^2 when ``scale_by_t2``."""
    acc = acc_dtype(student.dtype)
    s = torch.log_softmax(student.to(acc) / temperature, 1)  # a = log q
    t = torch.log_softmax(teacher.to(acc) / temperature, 1)  # b = log p
    q, p = s.exp(), t.exp()
    if beta == 0:
        elems = p * (t - s)
    elif beta == 1:
        elems = q * (s - t)
    else:
        log_m = torch.logaddexp(t + torch.log(torch.tensor(beta, dtype=acc)),
                                s + torch.log1p(torch.tensor(-beta, dtype=acc)))
        elems = beta * p * (t - log_m) + (1 - beta) * q * (s - log_m)
    rows = elems.sum(1) * (temperature * temperature if scale_by_t2 else 1.0)
    keep = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    rows = torch.where(keep, rows, 0)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        kept = keep.sum().to(acc)
        out = rows.sum() / (kept * student.shape[1] if reduction == "mean" else kept)
    return out.to(result_dtype(student.dtype, student.device))


def kl_div(input, target, reduction="mean", log_target=False):
    """torch.nn.functional.kl_div's pointwise term, ``target * (log(target) - input)`` with 0 log 0 = 0
    (``exp(target) * (target - input)`` for a log target), reduced as torch: mean over elements,
    batchmean over the first dim."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    acc = acc_dtype(dtype)
    x, t = input.to(acc), target.to(acc)
    elems = torch.exp(t) * (t - x) if log_target else torch.xlogy(t, t) - t * x
    if reduction == "none":
        out = elems
    elif reduction == "sum":
        out = elems.sum()
    elif reduction == "batchmean":
        out = elems.sum() / input.shape[0] if input.dim() > 0 else elems.sum()
    else:
        out = elems.mean()
    return out.to(result_dtype(dtype, input.device))
