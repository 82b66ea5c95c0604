"""lossfuse: fused loss kernels for PyTorch (C++/OpenMP on the CPU, Triton on CUDA).

Drop-in replacements for torch's losses: same signatures, same results, less time and memory.

    import lossfuse
    criterion = lossfuse.CrossEntropyLoss()          # was torch.nn.CrossEntropyLoss()
    loss = lossfuse.cross_entropy(logits, target)    # was torch.nn.functional.cross_entropy
    loss = lossfuse.sigmoid_focal_loss(logits, targets, reduction="mean")  # was torchvision.ops.sigmoid_focal_loss
"""

from ._version import __version__
from . import ops  # noqa: F401  (defines the lossfuse:: custom ops; loads lossfuse._C)
from ._backend import available_backends, cpu_kernels_available
from .functional import (
    cross_entropy,
    distillation_loss,
    huber_loss,
    kl_div,
    linear_cross_entropy,
    linear_distillation_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)
from .modules import (
    CrossEntropyLoss,
    DistillationLoss,
    HuberLoss,
    KLDivLoss,
    LinearCrossEntropyLoss,
    SigmoidFocalLoss,
    SmoothL1Loss,
    SoftmaxFocalLoss,
)
from .ops.cross_entropy import CrossEntropyFunction
from .ops.distillation import DistillationFunction
from .ops.focal import SigmoidFocalFunction, SoftmaxFocalFunction
from .ops.huber import HuberFunction
from .ops.kl_div import KLDivFunction
from .ops.linear_cross_entropy import LinearCrossEntropyFunction
from .ops.linear_distillation import LinearDistillationFunction

__all__ = [
    "__version__",
    "available_backends",
    "cpu_kernels_available",
    "cross_entropy",
    "CrossEntropyLoss",
    "CrossEntropyFunction",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyFunction",
    "huber_loss",
    "smooth_l1_loss",
    "HuberLoss",
    "SmoothL1Loss",
    "HuberFunction",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "SigmoidFocalFunction",
    "SoftmaxFocalFunction",
    "distillation_loss",
    "DistillationLoss",
    "DistillationFunction",
    "kl_div",
    "KLDivLoss",
    "KLDivFunction",
    "linear_distillation_loss",
    "LinearDistillationFunction",
]


def __getattr__(name):
    # `lossfuse.distributed` (vocab-parallel losses) on first use, so `import lossfuse` alone never
    # pulls in process-group machinery.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
