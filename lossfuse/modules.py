"""nn.Module drop-ins. Each subclasses the torch module it replaces, so ``isinstance`` checks, the
``weight`` buffer, ``state_dict`` keys and ``repr`` stay exactly torch's; only ``forward`` changes.
"""

from __future__ import annotations

import torch

from . import _backend, functional

__all__ = ["CrossEntropyLoss", "HuberLoss", "SmoothL1Loss"]


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
        backend: str = "auto",
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        _backend.check_backend_name(backend)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class HuberLoss(torch.nn.HuberLoss):
    """Drop-in for :class:`torch.nn.HuberLoss` running lossfuse's fused kernels.

    Same constructor, plus keyword-only ``backend`` ("auto", "cpu", "triton", "reference").
    """

    def __init__(self, reduction: str = "mean", delta: float = 1.0, *, backend: str = "auto") -> None:
        super().__init__(reduction, delta)
        _backend.check_backend_name(backend)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.huber_loss(input, target, reduction=self.reduction, delta=self.delta, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """Drop-in for :class:`torch.nn.SmoothL1Loss` running lossfuse's fused kernels.

    Same constructor, plus keyword-only ``backend`` ("auto", "cpu", "triton", "reference").
    """

    def __init__(
        self, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0, *, backend: str = "auto"
    ) -> None:
        super().__init__(size_average, reduce, reduction, beta)
        _backend.check_backend_name(backend)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
