"""What every loss's op module shares: one Library fragment per module, Triton kernels registered
lazily on the CUDA key, and the route into Triton's interpreter for CPU tensors (testing only)."""

from __future__ import annotations

import importlib

import torch


def triton_kernel(module: str, fn: str):
    """The launcher ``fn`` of ``lossfuse.triton.<module>``, imported on first call: importing triton
    costs time, and CPU-only users never need it."""

    def launch(*args):
        return getattr(importlib.import_module(f"lossfuse.triton.{module}"), fn)(*args)

    launch.__name__ = f"{module}.{fn}"
    return launch


def register_triton(lib: torch.library.Library, op: str, module: str, fn: str) -> None:
    """CUDA implementation of ``lossfuse::<op>``: the Triton launcher ``lossfuse.triton.<module>.<fn>``."""
    lib.impl(op, triton_kernel(module, fn), "CUDA")


def run(backend: str, op: str, module: str, fn: str, device: torch.device, *args):
    """Call ``lossfuse::<op>``; the dispatcher picks C++ (CPU) or Triton (CUDA). Backend "triton" on
    CPU tensors (TRITON_INTERPRET=1) calls the launcher directly: the op's CPU key is the C++ kernel."""
    if backend == "triton" and device.type == "cpu":
        return triton_kernel(module, fn)(*args)
    return getattr(torch.ops.lossfuse, op)(*args)
