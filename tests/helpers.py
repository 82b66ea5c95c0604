"""Shared test machinery: per-dtype tolerances and comparisons that say which elements differ."""

from __future__ import annotations

import contextlib
import importlib.util

import torch

import lossfuse
from lossfuse import catalog

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# The one tolerance table (lossfuse/catalog.py): tests, verify and the benchmark suite share it.
TOLERANCES = {dtype: (t.atol, t.rtol) for dtype, t in catalog.TOLERANCES.items()}

# The options every class-index loss's parity grid starts from (cross-entropy, softmax focal), read by
# each test file's make_case: class weights, an ignore_index outside and inside [0, C).
CLASS_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": -100},
    "ignore_pos": {"ignore": 1},
}

CPU_BACKENDS = ["cpu", "reference"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 rtol: float | None = None) -> None:
    """Compare ``actual`` (any dtype) with a float64 ``expected``; on failure list the worst elements."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad, err, tol = catalog.mismatches(actual, expected, dtype, rtol)
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if bad.any():
        idx = bad.nonzero()
        worst = err.masked_fill(~bad, 0).flatten().argsort(descending=True)[:8]
        lines = []
        for flat in worst.tolist():
            pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
            lines.append(f"  at {pos}: actual {a.flatten()[flat].item():.8g} expected {e.flatten()[flat].item():.8g}")
        raise AssertionError(
            f"{what}: {len(idx)} of {a.numel()} elements differ (dtype {dtype}, "
            f"{catalog.TOLERANCES[dtype]}, rtol used {rtol or catalog.TOLERANCES[dtype].rtol}); worst:\n" + "\n".join(lines)
        )


def cpu_kernels_or_skip():
    """Skip only where the extension was left out on purpose (LOSSFUSE_NO_EXT=1 at install time, or
    LOSSFUSE_DISABLE_C=1); a build that silently failed must fail the tests, not skip them."""
    import os

    import pytest

    if lossfuse.cpu_kernels_available():
        return
    if os.environ.get("LOSSFUSE_NO_EXT") == "1" or os.environ.get("LOSSFUSE_DISABLE_C") == "1":
        pytest.skip("lossfuse._C deliberately not built")
    from lossfuse import _backend

    pytest.fail(f"lossfuse._C failed to load: {_backend._C_ERROR}")


# Instruction sets below the widest a CPU may have, each a separate build of the same kernels
# (csrc/isa_instantiate.h) that a default run on a wider CPU never reaches.
NARROW_ISAS = ["base", "avx2"]


def float_lanes() -> int:
    """fp32 lanes per vector of the CPU kernels now in use (tests whose bits depend on the walk)."""
    from lossfuse import _backend

    return {"avx512": 16, "avx2": 8}.get(_backend._C.cpu_isa(), 1)


@contextlib.contextmanager
def forced_cpu_isa(isa: str):
    """The CPU kernels capped at instruction set `isa` inside the block; a skip where that is what the
    machine runs anyway (so the default run covers it) or where the CPU lacks it."""
    import pytest

    from lossfuse import _backend

    cpu_kernels_or_skip()
    ext = _backend._C
    if ext.cpu_isa() == isa:
        pytest.skip(f"{isa} is this CPU's widest instruction set: every other test runs it")
    try:
        ext.set_cpu_isa(isa)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        assert ext.cpu_isa() == isa
        yield
    finally:
        ext.set_cpu_isa("auto")


def backend_or_skip(backend: str) -> None:
    """Skip a test of ``backend`` (on CPU tensors) where that backend cannot run here: the C++ kernels
    left out on purpose (cpu_kernels_or_skip), or Triton not installed or its interpreter off."""
    if backend == "cpu":
        cpu_kernels_or_skip()
    elif backend == "triton" and "triton" not in lossfuse.available_backends("cpu"):
        import pytest

        pytest.skip("Triton is not installed or TRITON_INTERPRET is off")


def triton_device_or_skip() -> str:
    """The device the Triton tests run on: "cuda" with a GPU, else "cpu", whose tensors Triton's
    interpreter runs (TRITON_INTERPRET=1, which conftest.py sets before anything imports Triton).
    Called at a test module's top: skips the module where Triton is missing or the interpreter is off."""
    import os

    import pytest

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return "cpu"


def ulps_apart(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|actual - expected| in units of ``dtype``'s spacing at the expected value (subnormals included)."""
    info = torch.finfo(dtype)
    mag = expected64.to(dtype).abs().to(torch.float64).clamp_min(info.smallest_normal)
    spacing = torch.exp2(torch.floor(torch.log2(mag))) * info.eps
    return (actual.to(torch.float64) - expected64).abs() / spacing


def spy_ops(monkeypatch, module, calls: list) -> None:
    """Replace every ``lossfuse::`` op object of an ops module (lossfuse/ops/_common.py, Op) with a
    wrapper that records ``(op name, args)`` in ``calls`` and then runs the op. The small-call path
    (lossfuse/_small_call.py), which reaches the same CPU kernels from C++ without the op objects, is
    switched off meanwhile: the ops are what these tests examine."""
    from lossfuse import _small_call
    from lossfuse.ops._common import Op

    monkeypatch.setattr(_small_call, "ENABLED", False)
    for attr, op in list(vars(module).items()):
        if isinstance(op, Op):
            def spy(backend, *args, _op=op):
                calls.append((_op.name, args))
                return _op(backend, *args)

            monkeypatch.setattr(module, attr, spy)
