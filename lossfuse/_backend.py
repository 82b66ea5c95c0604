"""Which implementation runs a call: backend names, the compiled extension, the environment override.

Backends:
  "cpu"        the C++/OpenMP kernels in ``lossfuse._C`` (CPU tensors)
  "triton"     the Triton kernels (CUDA tensors; CPU tensors too when TRITON_INTERPRET=1)
  "reference"  plain PyTorch, the same formulas; the test oracle and the fallback
  "auto"       "triton" on CUDA, "cpu" on the CPU; ``LOSSFUSE_BACKEND`` overrides it
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cpu", "triton", "reference")
ENV_VAR = "LOSSFUSE_BACKEND"

_C = None
_C_ERROR: BaseException | None = None
_warned_fallback = False


def load_extension() -> None:
    """Import ``lossfuse._C``, whose CPU kernels register themselves under the ``lossfuse::`` ops.

    Called once, after the op schemas are defined (lossfuse/ops/__init__.py). A missing or broken
    build leaves ``_C`` None: the package still works through the reference backend.
    """
    global _C, _C_ERROR
    if os.environ.get("LOSSFUSE_DISABLE_C", "0") not in ("", "0"):
        _C_ERROR = ImportError("disabled by LOSSFUSE_DISABLE_C")
        return
    try:
        from . import _C as ext
    except ImportError as exc:  # not built, or built against another torch
        _C_ERROR = exc
        return
    _C = ext


# os.environ.get costs microseconds when the variable is absent (a KeyError raised and caught inside);
# the small-call path asks on every call, so it looks in the mapping's own dict, which os.environ
# updates on every change made through it (putenv from outside Python is not seen by os.environ either).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def env_backend_set() -> bool:
    """Whether LOSSFUSE_BACKEND is set (possibly to the empty string)."""
    if _ENV_KEY is not None:
        return _ENV_KEY in _ENV_DATA
    return ENV_VAR in os.environ


def cpu_kernels_available() -> bool:
    """True when the C++ extension ``lossfuse._C`` is loaded."""
    return _C is not None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = []
    if device.type == "cpu" and cpu_kernels_available():
        out.append("cpu")
    if triton_installed() and (
        (device.type == "cuda" and torch.cuda.is_available())
        or (device.type == "cpu" and triton_interpreting())
    ):
        out.append("triton")
    out.append("reference")
    return out


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs on ``device``, or raise why it cannot."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env:
            if env not in BACKENDS:
                raise ValueError(
                    f"{ENV_VAR} must be one of {', '.join(map(repr, BACKENDS))}; got {env!r}"
                )
            backend = env
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_installed() else _fallback("Triton is not installed")
        if device.type == "cpu":
            return "cpu" if _C is not None else _fallback(f"lossfuse._C is not available ({_C_ERROR})")
        return "reference"
    if backend == "cpu":
        if _C is None:
            raise RuntimeError(
                "lossfuse: backend='cpu' needs the compiled extension lossfuse._C, which failed to "
                f"load: {_C_ERROR}. Reinstall with `pip install --no-build-isolation .` where torch "
                "is installed, or use backend='reference'."
            )
        if device.type != "cpu":
            raise ValueError(f"lossfuse: backend='cpu' runs on CPU tensors; got a tensor on {device}")
        return backend
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError("lossfuse: backend='triton' needs the triton package (pip install triton)")
        if device.type == "cuda":
            return backend
        if device.type == "cpu" and triton_interpreting():
            return backend
        raise RuntimeError(
            f"lossfuse: backend='triton' runs on CUDA tensors; got a tensor on {device}. "
            "(Set TRITON_INTERPRET=1 before importing lossfuse to run the Triton kernels on CPU "
            "tensors in Triton's interpreter, which is slow and meant for testing.)"
        )
    return backend


def _fallback(why: str) -> str:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"lossfuse: {why}; falling back to the reference backend (plain PyTorch).", stacklevel=4)
    return "reference"
