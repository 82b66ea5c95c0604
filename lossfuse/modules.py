"""nn.Module drop-ins. Each subclasses the torch module it replaces, so ``isinstance`` checks, the
``weight`` buffer, ``state_dict`` keys and ``repr`` stay exactly torch's; only ``forward`` changes.
"""

from __future__ import annotations

import torch

from . import _backend, functional
from ._utils import check_reduction

__all__ = [
    "CrossEntropyLoss",
    "HuberLoss",
    "LinearCrossEntropyLoss",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "SoftmaxFocalLoss",
]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` running lossfuse's fused kernels.

    Same constructor, plus keyword-only ``backend`` ("auto", "cpu", "triton", "reference").
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _backend.check_backend_name(backend)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return functional.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, return_lse=self.return_lse, inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        extras = [f"{k}={getattr(self, k)!r}" for k in ("z_loss", "softcap", "return_lse", "inplace_backward")
                  if getattr(self, k) not in (0.0, None, False)]
        return ", ".join(extras + [f"backend={self.backend!r}"])


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused ``cross_entropy(input @ linear_weight.T + linear_bias, target)``; owns only its options.

    ``forward(input, linear_weight, target, linear_bias=None)``: pass the output layer's weight (and
    bias) in, e.g. ``criterion(hidden, model.lm_head.weight, labels)``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _backend.check_backend_name(backend)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input, linear_weight, target, linear_bias=None):
        return functional.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")
        return f"backend={self.backend!r}"


class _Backend:
    """The keyword-only ``backend`` ("auto", "cpu", "triton", "reference") a lossfuse module adds to the
    constructor of the torch module it replaces, checked at construction and shown in its repr."""

    def _set_backend(self, backend: str) -> None:
        _backend.check_backend_name(backend)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class HuberLoss(_Backend, torch.nn.HuberLoss):
    """Drop-in for :class:`torch.nn.HuberLoss` running lossfuse's fused kernels (same constructor, plus
    ``backend``)."""

    def __init__(self, reduction: str = "mean", delta: float = 1.0, *, backend: str = "auto") -> None:
        super().__init__(reduction, delta)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.huber_loss(input, target, reduction=self.reduction, delta=self.delta, backend=self.backend)


class SmoothL1Loss(_Backend, torch.nn.SmoothL1Loss):
    """Drop-in for :class:`torch.nn.SmoothL1Loss` running lossfuse's fused kernels (same constructor,
    plus ``backend``)."""

    def __init__(
        self, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0, *, backend: str = "auto"
    ) -> None:
        super().__init__(size_average, reduce, reduction, beta)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta, backend=self.backend)


class SigmoidFocalLoss(torch.nn.Module):
    """Module form of :func:`lossfuse.sigmoid_focal_loss` (torchvision has only the function).

    Note the default ``reduction="mean"``, the usual choice for a criterion (the function's default is
    torchvision's ``"none"``). Arguments are checked here, at construction.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", *, backend: str = "auto"):
        super().__init__()
        check_reduction(reduction)
        functional._check_gamma("SigmoidFocalLoss", gamma)
        functional._check_alpha_value("SigmoidFocalLoss", alpha, negative_disables=True)
        _backend.check_backend_name(backend)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.backend = backend

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.sigmoid_focal_loss(
            inputs, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"


class SoftmaxFocalLoss(torch.nn.Module):
    """Module form of :func:`lossfuse.softmax_focal_loss`. ``weight`` and a per-class ``alpha`` tensor
    are buffers (they move with ``.to()`` and are saved in the ``state_dict``), as
    :class:`torch.nn.CrossEntropyLoss` keeps its weight."""

    def __init__(
        self,
        alpha: float | torch.Tensor | None = None,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = "SoftmaxFocalLoss"
        check_reduction(reduction)
        functional._check_gamma(name, gamma)
        if alpha is not None and not torch.is_tensor(alpha):
            functional._check_alpha_value(name, alpha, negative_disables=False)
            alpha = float(alpha)
        _backend.check_backend_name(backend)
        self.register_buffer("weight", weight)
        if torch.is_tensor(alpha):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.softmax_focal_loss(
            input, target, alpha=self.alpha, gamma=self.gamma, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        alpha = "tensor" if torch.is_tensor(self.alpha) else self.alpha
        return (f"alpha={alpha}, gamma={self.gamma}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class DistillationLoss(_Backend, torch.nn.Module):
    """:func:`lossfuse.distillation_loss` as a module: ``DistillationLoss(temperature=1.0, beta=0.0,
    ignore_index=-100, reduction="batchmean", scale_by_t2=True, *, backend="auto")``, called as
    ``criterion(student_logits, teacher_logits, target=None)``."""

    def __init__(self, temperature: float = 1.0, beta: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean", scale_by_t2: bool = True, *, backend: str = "auto") -> None:
        super().__init__()
        functional._check_distill_options("DistillationLoss", temperature, beta, reduction)
        self._set_backend(backend)
        self.temperature, self.beta, self.ignore_index = temperature, beta, ignore_index
        self.reduction, self.scale_by_t2 = reduction, scale_by_t2

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        return functional.distillation_loss(
            student_logits, teacher_logits, temperature=self.temperature, beta=self.beta,
            ignore_index=self.ignore_index, target=target, reduction=self.reduction,
            scale_by_t2=self.scale_by_t2, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, reduction={self.reduction!r}, "
                f"scale_by_t2={self.scale_by_t2}, " + super().extra_repr())


__all__ += ["DistillationLoss"]


class KLDivLoss(_Backend, torch.nn.KLDivLoss):
    """Drop-in for :class:`torch.nn.KLDivLoss` running lossfuse's fused kernels (same constructor,
    plus ``backend``)."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False, *,
                 backend: str = "auto") -> None:
        super().__init__(size_average, reduce, reduction, log_target)
        self._set_backend(backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.kl_div(input, target, reduction=self.reduction, log_target=self.log_target,
                                 backend=self.backend)


__all__ += ["KLDivLoss"]
