"""What every loss's op module shares: the op declaration (schema, fake kernel and CUDA launcher in one
place, the object the autograd code calls) and the fused-gradient contract.

An op is declared once, where its schema is written::

    CE_FWD = Op(_lib, "cross_entropy_fwd(Tensor input, ...) -> (Tensor, Tensor)", _fwd_fake,
                triton="lossfuse.triton.cross_entropy.cross_entropy_fwd")
    loss, lse = CE_FWD(backend, x3, t3, ...)

Its CPU implementation is the C++ kernel the extension registers under the same name
(``TORCH_LIBRARY_IMPL(lossfuse, CPU, m)`` in csrc/); its CUDA implementation is the Triton launcher
named by ``triton``, imported on first use (importing triton costs time and CPU-only users never need
it). Backend "triton" on CPU tensors (``TRITON_INTERPRET=1``, tests only) calls the launcher directly,
since the op's CPU key belongs to the C++ kernel.
"""

from __future__ import annotations

import importlib
import sys

import torch


class Op:
    """One ``lossfuse::`` custom op: defines the schema, registers the fake kernel and the Triton
    launcher, and dispatches a call for a resolved backend name ("cpu" or "triton")."""

    def __init__(self, lib: torch.library.Library, schema: str, fake, *, triton: str | None = None):
        self.name = schema.split("(", 1)[0]
        lib.define(schema)
        torch.library.register_fake(f"lossfuse::{self.name}", fake, lib=lib)
        # The overload, not the packet: one attribute lookup less per call, which small inputs feel.
        self.overload = getattr(torch.ops.lossfuse, self.name).default
        self.triton = triton
        if triton is not None:
            op = self

            def cuda_impl(*args):
                return op.launcher()(*args)

            cuda_impl.__name__ = triton
            lib.impl(self.name, cuda_impl, "CUDA")

    def launcher(self):
        """The Triton launcher, looked up in its module on every call (imported on first use): a
        test that replaces the module's function is obeyed."""
        if self.triton is None:
            raise NotImplementedError(f"lossfuse::{self.name} has no Triton implementation")
        module, fn = self.triton.rsplit(".", 1)
        mod = sys.modules.get(module) or importlib.import_module(module)
        return getattr(mod, fn)

    def __call__(self, backend: str, *args):
        # Every op's first argument is a tensor on the device of the call.
        if backend == "triton" and args[0].device.type == "cpu":
            return self.launcher()(*args)
        return self.overload(*args)

    def __repr__(self) -> str:
        return f"Op(lossfuse::{self.name})"


def cuda_only(lib: torch.library.Library, *ops: Op) -> None:
    """Ops with a Triton launcher and no C++ kernel (the CUDA fused paths). Under Triton's interpreter
    their CPU key is the launcher, so that opcheck and torch.compile exercise them on CPU tensors in CI."""
    from .._backend import triton_interpreting

    if triton_interpreting():
        for op in ops:
            lib.impl(op.name, lambda *args, _op=op: _op.launcher()(*args), "CPU")


# ----------------------------------------------------------------------------------------------
# The fused-gradient contract (docs/design.md, "The fused gradient"). A forward that knows its loss will
# be reduced and differentiated may write the input gradient for grad_output = 1 in the same pass that
# computes the loss, and backward() hands it out instead of reading the input again.
# ----------------------------------------------------------------------------------------------


# The dtypes whose Triton forward writes the gradient (the losses whose backward checks grad_output on
# the device and recomputes when it is not 1, so the gradient is rounded once whatever it is). Not
# float16: its users scale the loss (GradScaler), grad_output is then never 1, and the forward's
# gradient would be a write wasted on every step.
TRITON_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def fused_gradient(backend: str, reduction: str, input: torch.Tensor,
                   dtypes=(torch.float32, torch.float64), triton_dtypes=()) -> bool:
    """Whether a forward should also write the gradient. Called outside the autograd Function: inside
    its forward grad mode is always off. The C++ backend fuses for ``dtypes`` (checking grad_output
    == 1 on the host is free for a CPU scalar); the Triton backend only for ``triton_dtypes``, the
    losses whose backward checks grad_output on the device (cross-entropy's): a host-side check would
    be a sync."""
    return (
        ((backend == "cpu" and input.dtype in dtypes) or (backend == "triton" and input.dtype in triton_dtypes))
        and reduction != "none"
        and input.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def take_fused_gradient(ctx, grad_out):
    """The gradient the fused forward wrote (kept as ``ctx.fused_grad``), for this grad_output; None
    when there is none (not fused, already used by an earlier backward through a retained graph, or a
    float16/bfloat16 gradient that grad_output would have to scale after its cast: the caller then
    runs the backward kernel)."""
    gx = ctx.fused_grad
    if gx is None:
        return None
    ctx.fused_grad = None  # ours was the last reference: autograd can adopt it as .grad without a copy
    if grad_out.item() == 1.0:  # CPU only (see fused_gradient): no device sync
        return gx
    if gx.dtype in (torch.float32, torch.float64):
        return gx * grad_out.to(gx.dtype)
    return None


def take_eager_grads(ctx, g: torch.Tensor, dtypes, message: str) -> list:
    """The gradients a chunked forward (linear_cross_entropy.py, linear_distillation.py) computed for
    grad_output = 1 and kept as ``ctx.eager_grads`` -- off save_for_backward, whose version checks
    would see this scaling -- times ``g`` (grad_output in their float32/float64 dtype), in place (no
    second copy of a weight gradient), then cast once to ``dtypes``. They are handed out once: a second
    backward through the same graph raises ``message`` rather than scale them twice."""
    grads, ctx.eager_grads = ctx.eager_grads, None
    if grads is None:
        raise RuntimeError(message)
    return [None if t is None else t.mul_(g).to(dt) for t, dt in zip(grads, dtypes)]


# ----------------------------------------------------------------------------------------------
# Reductions of per-row losses (cross-entropy, softmax focal, the vocab-parallel cross-entropy).
# ----------------------------------------------------------------------------------------------


def reduce_rows(loss: torch.Tensor, reduction: str, denom, row_shape) -> torch.Tensor:
    """The (N, S) per-row losses reduced as torch does; ``denom`` is the mean's denominator."""
    if reduction == "none":
        return loss.reshape(row_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denom


def row_grads(grad_out: torch.Tensor, reduction: str, denom, shape, dtype) -> torch.Tensor:
    """The upstream gradient of each of the (N, S) rows, in the accumulation ``dtype``. The mean's
    division happens here in that dtype; the cast to the input's dtype happens once, in the kernel
    (docs/design.md, "Mixed precision")."""
    g = grad_out.to(dtype)
    if reduction == "none":
        return g.reshape(shape)
    if reduction == "sum":
        return g.expand(shape)
    return (g / denom).expand(shape)
