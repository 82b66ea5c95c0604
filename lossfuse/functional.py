"""Functional API: drop-in replacements for the torch / torchvision loss functions.

Every argument check lives here, once, for every backend: the kernels below trust their inputs
(the C++ ones re-check only what protects memory).
"""

from __future__ import annotations

import warnings

import torch

from . import _backend, _small_call, reference
from ._utils import (
    FLOAT_DTYPES,
    REDUCTIONS,
    acc_dtype,
    check_float_input,
    check_reduction,
    check_same_device,
    legacy_reduction,
    result_dtype,
    weighted_result_dtype,
)
from .ops import huber as _huber
from .ops._common import TRITON_FUSED_DTYPES, fused_gradient
from .ops.cross_entropy import CrossEntropyFunction
from .ops.linear_cross_entropy import LinearCrossEntropyFunction, default_chunk_size
from .ops.focal import SigmoidFocalFunction, SoftmaxFocalFunction
from .ops import distillation as _distill
from .ops import kl_div as _kl
from .ops import linear_distillation as _ldistill

__all__ = [
    "cross_entropy",
    "distillation_loss",
    "kl_div",
    "linear_distillation_loss",
    "huber_loss",
    "linear_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "softmax_focal_loss",
]

# torch's names for scalar types, as its error messages print them.
_TORCH_TYPE_NAMES = {
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
    torch.uint8: "Byte", torch.bool: "Bool", torch.float32: "Float", torch.float64: "Double",
    torch.float16: "Half", torch.bfloat16: "BFloat16", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


# The backends whose calls lossfuse/_small_call.py may take whole (it runs the C++ kernels).
_SMALL_CALL_BACKENDS = ("auto", "cpu")

# Tensor types that are never a DTensor (an FSDP2 parameter is a DTensor, not an nn.Parameter): one
# type() check per call keeps torch.distributed.tensor out of the plain-tensor path.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _type_name(dtype: torch.dtype) -> str:
    return _TORCH_TYPE_NAMES.get(dtype, str(dtype))


def _check_class_weight(weight, num_classes: int, prefix: str = "") -> None:
    if weight is None:
        return
    if not weight.is_floating_point():
        raise RuntimeError(f"{prefix}weight must be a floating-point tensor; got {weight.dtype}")
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {num_classes} classes or no "
            f"classes but got weight tensor of shape: {list(weight.shape)}"
        )


def _check_class_index_target(input: torch.Tensor, target: torch.Tensor) -> None:
    """The shape rules of torch's nll_loss_nd, with its messages (shape first, then dtype, as torch)."""
    _check_class_index_shape(input, target)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")


def _check_class_index_shape(input: torch.Tensor, target: torch.Tensor) -> None:
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise ValueError(
                f"Expected a single class index (0-dim or 1-element target) for an input of shape "
                f"{list(input.shape)}; got target of shape {list(target.shape)}"
            )
        return
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input.dim() > 2 and target.dim() != input.dim() - 1:
        raise RuntimeError(
            f"only batches of spatial targets supported ({input.dim() - 1}D tensors) but got targets "
            f"of dimension: {target.dim()}"
        )
    if input.shape[0] != target.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    if input.dim() > 2 and input.shape[2:] != target.shape[1:]:
        raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)})")


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Fused log-softmax cross-entropy; same arguments and results as
    :func:`torch.nn.functional.cross_entropy`.

    ``input`` is ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits (float32/64, float16, bfloat16);
    ``target`` holds class indices (int64 or uint8, the input's shape without dim 1) or class
    probabilities (floating point, the input's shape). ``backend`` is ``"auto"``, ``"cpu"``,
    ``"triton"`` or ``"reference"``; the environment variable ``LOSSFUSE_BACKEND`` overrides
    ``"auto"``.

    Keyword-only extras for language models:

    - ``z_loss``: adds ``z_loss * lse**2`` per non-ignored row (PaLM), reduced like the loss.
    - ``softcap``: logits pass through ``softcap * tanh(x / softcap)`` inside the kernel (Gemma); the
      gradient includes the tanh's derivative.
    - ``return_lse``: also return the per-row log-sum-exp (float32, float64 for float64 input;
      non-differentiable; of the soft-capped logits), shaped like the unreduced loss.
    - ``inplace_backward``: the gradient is written into the logits' own storage -- no second
      N x C buffer. The logits are marked modified, so autograd refuses any later use of them; read
      what you need from them before ``backward()`` -- on the Triton backend with float32 logits that
      require grad (and a mean or sum), before this call: its forward writes the gradient over them.
      The reference backend ignores it.

    DTensor logits (tensor, sequence or data parallelism) are handled as lossfuse/_dtensor.py says.
    """
    if (backend in _SMALL_CALL_BACKENDS and size_average is None and reduce is None and not z_loss
            and softcap is None and not return_lse and not inplace_backward):
        out = _small_call.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        if out is not None:
            return out
    if type(input) not in _PLAIN_TYPES:
        from . import _dtensor

        if _dtensor.is_dtensor(input):
            return _dtensor.cross_entropy(
                input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                z_loss=z_loss, softcap=softcap, return_lse=return_lse, inplace_backward=inplace_backward,
                backend=backend)
    reduction = legacy_reduction(size_average, reduce, reduction)
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input("cross_entropy", input)
    _check_lm_options("cross_entropy", label_smoothing, z_loss, softcap)
    check_same_device("cross_entropy", input, target, weight)
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have a class dimension; got a 0-dim tensor")
    num_classes = input.shape[0 if input.dim() == 1 else 1]

    if input.shape == target.shape:  # torch's rule: same shape means class probabilities
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, got "
                f"{_type_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        _check_class_weight(weight, num_classes, "cross_entropy: ")
    else:
        _check_class_index_target(input, target)
        _check_class_weight(weight, num_classes)

    requested = backend
    backend = _backend.resolve(backend, input.device)
    if backend == "triton" and input.dtype == torch.float64 and input.device.type == "cuda" and requested == "auto":
        backend = "reference"  # the Triton kernels compute in fp32; float64 users want float64 math
    if backend == "reference":
        out = reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                      z_loss=z_loss, softcap=softcap, return_lse=return_lse)
        return out
    if not target.is_floating_point():
        if input.device.type == "cuda":
            # No host sync on the hot path: a device-side assert, as torch's own CUDA kernel does.
            ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
            torch._assert_async(ok.all(), "cross_entropy: a target is out of bounds [0, C)")
        elif backend != "cpu":  # the C++ kernels check targets themselves
            reference.check_targets_in_range(target, num_classes, ignore_index)
    # float16 is left out of the fused path: its users scale the loss (see ops/cross_entropy.py).
    fused = not target.is_floating_point() and fused_gradient(
        backend, reduction, input, (torch.float32, torch.float64, torch.bfloat16), TRITON_FUSED_DTYPES)
    loss, lse = CrossEntropyFunction.apply(
        input, target, weight, ignore_index, reduction, label_smoothing, float(z_loss),
        float(softcap or 0.0), bool(inplace_backward), backend, fused, bool(return_lse),
    )
    return (loss, lse) if return_lse else loss


def _check_lm_options(name: str, label_smoothing, z_loss, softcap) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0):
        raise ValueError(f"{name}: z_loss must be a number >= 0; got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"{name}: softcap must be None or a number > 0; got {softcap!r}")


def _check_linear_head(name, input, head, target, bias, weight, reduction, ignore_index, label_smoothing, z_loss,
                       softcap, chunk_size, backend, *, local=False):
    """Checks ``input @ head.T + bias`` against ``target`` for the linear + cross-entropy entry points.

    ``local`` is the vocabulary-parallel spelling: ``head`` is this rank's slice of the rows, the
    names in the messages say so, and a mixed dtype is an error even under autocast (the ranks'
    slices would each be cast on their own). Returns (V, H, input's leading shape, whether the targets are
    probabilities).
    """
    head_name, bias_name, v_name = ("local_weight", "local_bias", "V_local") if local else (
        "linear_weight", "linear_bias", "V")
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input(name, input)
    check_float_input(name, head, head_name)
    _check_lm_options(name, label_smoothing, z_loss, softcap)
    check_same_device(name, input, head, target, bias, weight)
    if input.dim() < 1 or head.dim() != 2 or input.shape[-1] != head.shape[1]:
        raise RuntimeError(
            f"{name}: input (..., H) and {head_name} ({v_name}, H) do not match: got {list(input.shape)} and "
            f"{list(head.shape)}"
        )
    if input.dtype != head.dtype and (local or not torch.is_autocast_enabled(input.device.type)):
        raise RuntimeError(
            f"{name}: expected input and {head_name} to have the same dtype, but got {input.dtype} and "
            f"{head.dtype}"
        )
    V, H = head.shape
    if bias is not None and tuple(bias.shape) != (V,):
        raise RuntimeError(f"{name}: {bias_name} must have shape ({V},); got {list(bias.shape)}")
    lead = tuple(input.shape[:-1])
    prob = target.is_floating_point()
    if prob:
        if tuple(target.shape) != lead + (V,):
            if local:
                raise ValueError(f"{name}: probability targets are this rank's slice, of shape "
                                 f"{list(lead + (V,))}; got {list(target.shape)}")
            raise RuntimeError(f"{name}: probability targets must have shape {list(lead + (V,))}; "
                               f"got {list(target.shape)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
    elif tuple(target.shape) != lead:
        raise ValueError(f"{name}: target must have shape {list(lead)} (input without its last dim); "
                         f"got {list(target.shape)}")
    elif target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
    _check_class_weight(weight, V, f"{name}: local " if local else "")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name}: chunk_size must be a positive int or None; got {chunk_size!r}")
    return V, H, lead, prob


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target, ...)`` computed in row chunks, so
    the full (tokens, vocab) logits never exist -- the same result as
    :func:`torch.nn.functional.linear_cross_entropy`.

    ``input`` is (..., H), ``linear_weight`` (V, H), ``target`` class indices of shape ``input.shape[:-1]``
    or probabilities of shape ``input.shape[:-1] + (V,)``. Options as :func:`cross_entropy`
    (``weight`` are class weights). ``chunk_size`` rows per chunk (default: about 2^22 logits per
    chunk). Gradients flow to ``input``, ``linear_weight`` (accumulated in float32 across chunks),
    ``linear_bias`` and probability targets.

    A DTensor ``linear_weight`` (FSDP2-sharded or vocab-sharded) is handled as lossfuse/_dtensor.py says.
    """
    if type(linear_weight) not in _PLAIN_TYPES or type(input) not in _PLAIN_TYPES:
        from . import _dtensor

        if _dtensor.is_dtensor(linear_weight) or _dtensor.is_dtensor(input):
            return _dtensor.linear_cross_entropy(
                input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                chunk_size=chunk_size, backend=backend)
    name = "linear_cross_entropy"
    V, H, lead, prob = _check_linear_head(
        name, input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, z_loss,
        softcap, chunk_size, backend)

    backend = _backend.resolve(backend, input.device)
    if backend == "triton" and input.dtype == torch.float64 and input.device.type == "cuda":
        backend = "reference"
    if backend == "reference":
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        if input.dim() > 1:  # cross_entropy wants classes on dim 1
            logits = logits.reshape(-1, V)
            target = target.reshape(-1, V) if prob else target.reshape(-1)
        out = reference.cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                                      z_loss=z_loss, softcap=softcap)
        return out.reshape(lead) if reduction == "none" else out
    x2 = input.reshape(-1, H).contiguous()
    t2 = (target.reshape(-1, V) if prob else target.reshape(-1).long()).contiguous()
    n = x2.shape[0]
    if not prob:
        if input.device.type == "cuda":
            ok = ((t2 >= 0) & (t2 < V)) | (t2 == ignore_index)
            torch._assert_async(ok.all(), "linear_cross_entropy: a target is out of bounds [0, V)")
        elif backend != "cpu":
            reference.check_targets_in_range(t2, V, ignore_index)
    chunk = chunk_size or default_chunk_size(n, V)
    out = LinearCrossEntropyFunction.apply(
        x2, linear_weight, t2, linear_bias, weight, reduction, ignore_index, label_smoothing,
        float(z_loss), float(softcap or 0.0), chunk, backend,
    )
    return out.reshape(lead) if reduction == "none" else out


# ------------------------------------------------------------------------------------------------
# Huber and SmoothL1 (SmoothL1 with beta = 0 is L1). The checks run in torch's order, so an input
# with several faults raises what torch raises.
# ------------------------------------------------------------------------------------------------

_SIZE_WARNING = (
    "Using a target size ({}) that is different to the input size ({}). This will likely lead to "
    "incorrect results due to broadcasting. Please ensure they have the same size."
)


def _warn_sizes_differ(input: torch.Tensor, target: torch.Tensor) -> None:
    # Dynamo cannot trace warnings.warn (torch's own functional escapes this by being a graph leaf);
    # under torch.compile the warning is skipped rather than breaking the graph.
    if not torch.compiler.is_compiling():
        warnings.warn(_SIZE_WARNING.format(target.size(), input.size()), stacklevel=3)


def _check_huber_dtypes(input: torch.Tensor, target: torch.Tensor) -> None:
    """torch computes in the promoted dtype and writes the result in the input's (empty_like(input))."""
    common = torch.promote_types(input.dtype, target.dtype)
    if input.dtype in FLOAT_DTYPES and common in FLOAT_DTYPES:
        return
    if common != input.dtype:
        raise RuntimeError(
            f"result type {_type_name(common)} can't be cast to the desired output type {_type_name(input.dtype)}"
        )
    check_float_input("huber_loss", input)


def _check_real_weight(name: str, weight: torch.Tensor | None) -> None:
    if weight is not None and weight.is_complex():
        raise NotImplementedError(f"{name}: weight must be a real tensor; got {weight.dtype}")


def _storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as the kernels read it: in ``dtype`` (the input's) or its accumulation type, else converted."""
    acc = acc_dtype(dtype)
    return t if t.dtype in (dtype, acc) else t.to(acc)


def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused Huber loss; same arguments and results as :func:`torch.nn.functional.huber_loss`.

    ``0.5 d^2`` where ``|d| < delta``, ``delta (|d| - delta / 2)`` elsewhere, ``d = input - target``
    (broadcast as torch, with its warning when the sizes differ). ``weight`` (the input's shape)
    multiplies the elementwise loss; ``mean`` still divides by the number of elements, as torch.
    Gradients reach input, target and weight. ``backend``: ``"auto"``, ``"cpu"``, ``"triton"`` or
    ``"reference"``; the environment variable ``LOSSFUSE_BACKEND`` overrides ``"auto"``.
    """
    if weight is None and backend in _SMALL_CALL_BACKENDS:
        out = _small_call.huber(input, target, _huber.HUBER, delta, reduction)
        if out is not None:
            return out
    _backend.check_backend_name(backend)
    if target.size() != input.size():
        _warn_sizes_differ(input, target)
    x, y = torch.broadcast_tensors(input, target)  # views; raises torch's error for incompatible sizes
    if weight is None:
        check_reduction(reduction)
    elif weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    if not delta > 0:  # also NaN
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    _check_huber_dtypes(input, target)
    _check_real_weight("huber_loss", weight)
    check_same_device("huber_loss", input, target, weight)
    if weight is not None and reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")

    backend = _backend.resolve(backend, input.device)
    if backend == "reference":
        return reference.huber_loss(input, target, reduction, delta, weight)
    out_dtype = result_dtype(input.dtype, input.device)
    if weight is not None:
        out_dtype = weighted_result_dtype(out_dtype, x.dim(), weight)
    if target.dtype not in (input.dtype, acc_dtype(input.dtype)):
        y = _storage(target, input.dtype).expand(x.shape)  # convert before expanding: no N-element copy
    w = None if weight is None else _storage(weight, input.dtype).expand(x.shape)
    return _huber.HuberFunction.apply(x, y, w, _huber.HUBER, float(delta), reduction, out_dtype, backend)


def smooth_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused Smooth L1 loss; same arguments and results as :func:`torch.nn.functional.smooth_l1_loss`.

    ``0.5 d^2 / beta`` where ``|d| < beta``, ``|d| - beta / 2`` elsewhere; ``beta = 0`` is exactly L1,
    with gradient sign(d) (0 at d = 0). Broadcasting, dtype promotion and the deprecated
    ``size_average``/``reduce`` as torch. ``backend`` as :func:`huber_loss`.
    """
    if backend in _SMALL_CALL_BACKENDS and size_average is None and reduce is None:
        out = _small_call.huber(input, target, _huber.L1 if beta == 0.0 else _huber.SMOOTH_L1, beta, reduction)
        if out is not None:
            return out
    _backend.check_backend_name(backend)
    if target.size() != input.size():
        _warn_sizes_differ(input, target)
    reduction = legacy_reduction(size_average, reduce, reduction)
    x, y = torch.broadcast_tensors(input, target)
    check_reduction(reduction)
    l1 = beta == 0.0
    if not l1 and not beta >= 0:  # also NaN
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    common = torch.promote_types(input.dtype, target.dtype)
    if common not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"smooth_l1_loss: input and target must promote to a floating-point dtype (float32, float64, "
            f"float16 or bfloat16); got {input.dtype} and {target.dtype}"
        )
    check_same_device("smooth_l1_loss", input, target)

    backend = _backend.resolve(backend, input.device)
    if backend == "reference":
        return reference.smooth_l1_loss(input, target, reduction, beta)
    out_dtype = torch.promote_types(result_dtype(input.dtype, input.device), result_dtype(target.dtype, input.device))
    if input.dtype not in FLOAT_DTYPES or acc_dtype(common) != acc_dtype(input.dtype):
        # an integer input, or a float64 target: compute in the promoted dtype, as torch
        x = input.to(common).expand(x.shape)
    if target.dtype not in (x.dtype, acc_dtype(x.dtype)):
        y = _storage(target, x.dtype).expand(x.shape)
    mode = _huber.L1 if l1 else _huber.SMOOTH_L1
    return _huber.HuberFunction.apply(x, y, None, mode, float(beta), reduction, out_dtype, backend)


def _check_gamma(name: str, gamma) -> None:
    if not gamma >= 0:  # NaN fails too
        raise ValueError(f"{name}: gamma must be >= 0; got {gamma}")


def _check_alpha_value(name: str, alpha, negative_disables: bool) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name}: alpha must be a float; got {type(alpha).__name__}")
    if negative_disables and alpha < 0:
        return
    if not 0 <= alpha <= 1:
        hint = " (a negative alpha disables the alpha term)" if negative_disables else ""
        raise ValueError(f"{name}: alpha must be in [0, 1]{hint}; got {alpha}")


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused sigmoid focal loss (RetinaNet); same arguments and results as
    :func:`torchvision.ops.sigmoid_focal_loss`, without its NaN gradients at saturated logits.

    ``inputs`` are logits of any shape (float32/64, float16, bfloat16). ``targets`` is either a float
    tensor of the same shape (binary labels or soft targets in [0, 1]) or, for ``(N, C)`` inputs, an
    int64 tensor of ``N`` class indices in ``[0, C]``, index ``C`` meaning background (every class
    negative): the kernels then never build the one-hot. Both forms give the same result.
    ``alpha`` in [0, 1] weights positives (``alpha * t + (1 - alpha) * (1 - t)``); a negative alpha
    disables it. ``gamma >= 0``. ``reduction``: ``"none"`` | ``"mean"`` | ``"sum"``.

    Float targets that require grad are differentiated through the reference backend (torchvision's
    formula in plain PyTorch); the kernels compute the gradient of ``inputs`` only.
    """
    name = "sigmoid_focal_loss"
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input(name, inputs, "inputs")
    _check_gamma(name, gamma)
    _check_alpha_value(name, alpha, negative_disables=True)
    check_same_device(name, inputs, targets)
    index = not targets.is_floating_point()
    if not index:
        if targets.shape != inputs.shape:  # torch's binary_cross_entropy_with_logits message
            raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    elif targets.dtype != torch.int64:
        raise RuntimeError(
            f"{name}: targets must be floating point (the inputs' shape) or int64 class indices of shape "
            f"(N,); got {_type_name(targets.dtype)}"
        )
    elif inputs.dim() != 2 or targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{name}: int64 class-index targets must have shape (N,) for inputs of shape (N, C); got "
            f"inputs of shape {list(inputs.shape)} and targets of shape {list(targets.shape)}"
        )

    backend = _backend.resolve(backend, inputs.device)
    if backend == "reference" or (not index and targets.requires_grad and torch.is_grad_enabled()):
        return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    if index:
        num_classes = inputs.shape[1]
        if inputs.device.type == "cuda":
            ok = (targets >= 0) & (targets <= num_classes)
            torch._assert_async(ok.all(), f"{name}: a class index is out of bounds [0, C]")
        elif backend != "cpu":  # the C++ kernels check the indices themselves
            reference.check_targets_in_range(targets, num_classes + 1)
    fused = fused_gradient(backend, reduction, inputs, triton_dtypes=TRITON_FUSED_DTYPES)
    return SigmoidFocalFunction.apply(inputs, targets, float(alpha), float(gamma), reduction, backend, fused)


def _check_focal_alpha_tensor(name: str, alpha: torch.Tensor, num_classes: int) -> None:
    if not alpha.is_floating_point():
        raise RuntimeError(f"{name}: alpha must be a floating-point tensor; got {alpha.dtype}")
    if alpha.dim() != 1 or alpha.numel() != num_classes:
        raise ValueError(
            f"{name}: a per-class alpha must have one value for each of the {num_classes} classes; got "
            f"alpha of shape {list(alpha.shape)}"
        )
    outside = (alpha < 0) | (alpha > 1) | torch.isnan(alpha)
    if alpha.device.type == "cuda" or torch.compiler.is_compiling():  # no host sync / graph break
        torch._assert_async(~outside.any(), f"{name}: alpha values must be in [0, 1]")
    elif bool(outside.any()):
        raise ValueError(f"{name}: alpha values must be in [0, 1]; got {alpha[outside][0].item()}")


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor | None = None,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused multi-class (softmax) focal loss:
    ``loss_n = alpha_y * w_y * (1 - p_y)**gamma * (-log p_y)``, ``p = softmax(input)`` over dim 1.

    ``input`` is ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits, ``target`` class indices
    (int64 or uint8), ``weight`` per-class weights and ``ignore_index`` exactly as in
    :func:`torch.nn.functional.cross_entropy`. ``alpha``: None (1), a float in [0, 1], or a length-C
    tensor of per-class values in [0, 1]. ``gamma >= 0``. ``reduction="mean"`` divides by the summed
    weight of the targets not ignored, so ``gamma=0, alpha=None`` is exactly
    :func:`lossfuse.cross_entropy`.
    """
    if backend in _SMALL_CALL_BACKENDS:
        out = _small_call.softmax_focal_loss(input, target, alpha, gamma, weight, ignore_index, reduction)
        if out is not None:
            return out
    name = "softmax_focal_loss"
    check_reduction(reduction)
    _backend.check_backend_name(backend)
    check_float_input(name, input)
    _check_gamma(name, gamma)
    alpha_tensor = torch.is_tensor(alpha)
    if alpha is not None and not alpha_tensor:
        _check_alpha_value(name, alpha, negative_disables=False)
    check_same_device(name, input, target, weight, alpha if alpha_tensor else None)
    if input.dim() == 0:
        raise RuntimeError(f"{name}: input must have a class dimension; got a 0-dim tensor")
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    _check_class_index_target(input, target)
    _check_class_weight(weight, num_classes)
    if alpha_tensor:
        _check_focal_alpha_tensor(name, alpha, num_classes)

    backend = _backend.resolve(backend, input.device)
    if backend == "reference":
        return reference.softmax_focal_loss(input, target, alpha, gamma, weight, ignore_index, reduction)
    if input.device.type == "cuda":
        ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
        torch._assert_async(ok.all(), f"{name}: a target is out of bounds [0, C)")
    elif backend != "cpu":  # the C++ kernels check targets themselves
        reference.check_targets_in_range(target, num_classes, ignore_index)
    fused = fused_gradient(backend, reduction, input, triton_dtypes=TRITON_FUSED_DTYPES)
    return SoftmaxFocalFunction.apply(
        input, target, alpha, float(gamma), weight, ignore_index, reduction, backend, fused
    )


# ------------------------------------------------------------------------------------------------
# Distillation: KL divergence / generalised JSD between the softmax of two sets of logits.
# ------------------------------------------------------------------------------------------------

def _check_distill_options(name: str, temperature, beta, reduction: str) -> None:
    if reduction not in _distill.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name}: temperature must be a number > 0; got {temperature!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be a number in [0, 1]; got {beta!r}")


def _check_distill_logits(name: str, student: torch.Tensor, teacher: torch.Tensor, target) -> None:
    check_float_input(name, student, "student_logits")
    check_float_input(name, teacher, "teacher_logits")
    check_same_device(name, student, teacher, target)
    if student.dim() < 2:
        raise ValueError(f"{name}: logits must be (N, V) or (N, V, d1, ..., dk); got shape {list(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student_logits and teacher_logits must have the same shape; got "
                         f"{list(student.shape)} and {list(teacher.shape)}")
    if target is not None:
        rows = (student.shape[0],) + tuple(student.shape[2:])
        if tuple(target.shape) != rows:
            raise ValueError(f"{name}: target must have the logits' shape without dim 1, {list(rows)}; got "
                             f"{list(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long, Int or Byte, but got {_type_name(target.dtype)}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    ignore_index: int = -100,
    target: torch.Tensor | None = None,
    reduction: str = "batchmean",
    scale_by_t2: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Knowledge-distillation loss on logits, fused: the log-softmax of both at ``temperature`` is
    computed inside the kernel, neither log-softmax tensor exists.

    ``beta=0``: forward KL(teacher || student) -- ``kl_div(log_softmax(s / T), log_softmax(t / T),
    log_target=True)``; ``beta=1``: reverse KL(student || teacher); ``0 < beta < 1``: the generalised
    JSD ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (liger-kernel's
    definition; p the teacher's distribution, q the student's). Logits are ``(N, V)`` or
    ``(N, V, d1, ..., dk)`` (classes on dim 1). Rows whose ``target`` (the logits' shape without dim
    1, e.g. the labels) equals ``ignore_index`` count nowhere. ``reduction``: ``"batchmean"`` (sum /
    rows kept), ``"mean"`` (sum / (rows kept x V), kl_div's element mean), ``"sum"``, ``"none"`` (per
    row). ``scale_by_t2`` multiplies the loss by T^2 (Hinton et al.), keeping gradient magnitudes
    independent of T. The teacher gets a gradient only if it requires one.
    """
    name = "distillation_loss"
    _backend.check_backend_name(backend)
    _check_distill_options(name, temperature, beta, reduction)
    _check_distill_logits(name, student_logits, teacher_logits, target)
    backend = _backend.resolve(backend, student_logits.device)
    if backend == "triton" and student_logits.dtype == torch.float64 and student_logits.device.type == "cuda":
        backend = "reference"
    if backend == "reference":
        return reference.distillation_loss(student_logits, teacher_logits, float(temperature), float(beta),
                                           ignore_index, target, reduction, bool(scale_by_t2))
    # The fused path when either logits will be differentiated (fused_gradient's conditions, for two inputs).
    wants_grad = student_logits.requires_grad or teacher_logits.requires_grad
    fused = (backend == "cpu" and reduction != "none" and wants_grad and torch.is_grad_enabled()
             and student_logits.dtype in _distill.FUSED_DTYPES and not torch.compiler.is_compiling())
    return _distill.DistillationFunction.apply(
        student_logits, teacher_logits, target, int(ignore_index), float(temperature), float(beta), reduction,
        bool(scale_by_t2), backend, bool(fused),
    )


# ------------------------------------------------------------------------------------------------
# kl_div: torch.nn.functional.kl_div, elementwise, fused forward and backward.
# ------------------------------------------------------------------------------------------------

_KL_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused KL divergence; same arguments and results as :func:`torch.nn.functional.kl_div`.

    ``input`` holds log-probabilities, ``target`` probabilities (log-probabilities with
    ``log_target=True``); the pointwise loss is ``target * (log(target) - input)`` with torch's
    ``0 * log 0 = 0``. Reductions as torch's: ``"mean"`` over every element (with torch's warning),
    ``"batchmean"`` the sum over the first dim's size, ``"sum"``, ``"none"``; the legacy
    ``size_average``/``reduce``. Operands broadcast as torch's (a copy where their shapes or dtypes
    differ, or they are not contiguous). Gradients reach both; the target's at a zero of a non-log
    target is NaN, as torch's autograd gives. ``backend`` as :func:`huber_loss`.
    """
    name = "kl_div"
    _backend.check_backend_name(backend)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce, reduction)
    elif reduction == "mean" and not torch.compiler.is_compiling():
        warnings.warn(_KL_MEAN_WARNING, stacklevel=2)
    if reduction not in _kl.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    check_float_input(name, input)
    check_float_input(name, target, "target")
    check_same_device(name, input, target)
    x, t = torch.broadcast_tensors(input, target)  # raises torch's error for incompatible sizes

    backend = _backend.resolve(backend, input.device)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if backend == "triton" and dtype == torch.float64 and input.device.type == "cuda":
        backend = "reference"
    if backend == "reference":
        return reference.kl_div(input, target, reduction, bool(log_target))
    x = x.to(dtype).contiguous()
    t = t.to(dtype).contiguous()
    batch = input.shape[0] if input.dim() > 0 else 1
    return _kl.KLDivFunction.apply(x, t, bool(log_target), reduction, batch,
                                   result_dtype(dtype, input.device), backend)


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_lm_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_weight: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    scale_by_t2: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`distillation_loss` of ``student_hidden @ student_lm_weight.T`` and ``teacher_hidden @
    teacher_lm_weight.T`` computed in row chunks: neither model's (tokens, vocab) logits exist whole.

    ``student_hidden`` (..., H_s), ``student_lm_weight`` (V, H_s), ``teacher_hidden`` (..., H_t) with the
    same leading dims, ``teacher_lm_weight`` (V, H_t); ``target`` (the leading dims) masks the rows equal
    to ``ignore_index``. Options as :func:`distillation_loss`; ``chunk_size`` rows per chunk (default
    about 1/40 of the logits). Gradients flow to the student's hidden state and weight (the weight's
    accumulated in float32 across chunks); the teacher gets none.
    """
    name = "linear_distillation_loss"
    _backend.check_backend_name(backend)
    _check_distill_options(name, temperature, beta, reduction)
    xs, Ws, xt, Wt = student_hidden, student_lm_weight, teacher_hidden, teacher_lm_weight
    for what, t in (("student_hidden", xs), ("student_lm_weight", Ws), ("teacher_hidden", xt),
                    ("teacher_lm_weight", Wt)):
        check_float_input(name, t, what)
    check_same_device(name, xs, Ws, xt, Wt, target)
    if xs.dim() < 1 or Ws.dim() != 2 or xs.shape[-1] != Ws.shape[1]:
        raise RuntimeError(f"{name}: student_hidden (..., H) and student_lm_weight (V, H) do not match: got "
                           f"{list(xs.shape)} and {list(Ws.shape)}")
    if xt.dim() < 1 or Wt.dim() != 2 or xt.shape[-1] != Wt.shape[1]:
        raise RuntimeError(f"{name}: teacher_hidden (..., H) and teacher_lm_weight (V, H) do not match: got "
                           f"{list(xt.shape)} and {list(Wt.shape)}")
    if Ws.shape[0] != Wt.shape[0]:
        raise ValueError(f"{name}: student and teacher vocabularies differ: {Ws.shape[0]} and {Wt.shape[0]}")
    if xs.shape[:-1] != xt.shape[:-1]:
        raise ValueError(f"{name}: student_hidden and teacher_hidden must have the same leading dims; got "
                         f"{list(xs.shape)} and {list(xt.shape)}")
    if xs.dtype != Ws.dtype and not torch.is_autocast_enabled(xs.device.type):
        raise RuntimeError(f"{name}: expected student_hidden and student_lm_weight to have the same dtype, but got "
                           f"{xs.dtype} and {Ws.dtype}")
    lead = tuple(xs.shape[:-1])
    if target is not None:
        if tuple(target.shape) != lead:
            raise ValueError(f"{name}: target must have shape {list(lead)}; got {list(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long, Int or Byte, but got {_type_name(target.dtype)}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name}: chunk_size must be a positive int or None; got {chunk_size!r}")

    backend = _backend.resolve(backend, xs.device)
    if backend == "triton" and xs.dtype == torch.float64 and xs.device.type == "cuda":
        backend = "reference"
    V = Ws.shape[0]
    if backend == "reference":
        s = torch.nn.functional.linear(xs, Ws).reshape(-1, V)
        with torch.no_grad():
            t = torch.nn.functional.linear(xt, Wt).reshape(-1, V)
        y = None if target is None else target.reshape(-1)
        out = reference.distillation_loss(s, t, float(temperature), float(beta), ignore_index, y, reduction,
                                          bool(scale_by_t2))
        return out.reshape(lead) if reduction == "none" else out
    # Under autocast, the projections run in the autocast dtype, as torch's linear would.
    compute = xs.dtype
    if torch.is_autocast_enabled(xs.device.type) and xs.dtype in (torch.float32, torch.float16, torch.bfloat16):
        compute = torch.get_autocast_dtype(xs.device.type)
    x2 = xs.reshape(-1, xs.shape[-1]).to(compute).contiguous()
    W2 = Ws.to(compute)
    t2 = xt.reshape(-1, xt.shape[-1]).detach()
    y = None if target is None else target.reshape(-1).long().contiguous()
    chunk = chunk_size or _ldistill.default_chunk_size(x2.shape[0], V)
    out = _ldistill.LinearDistillationFunction.apply(
        x2, W2, t2.to(compute), Wt.detach().to(compute), y, int(ignore_index), float(temperature), float(beta),
        reduction, bool(scale_by_t2), chunk, backend)
    return out.reshape(lead) if reduction == "none" else out
