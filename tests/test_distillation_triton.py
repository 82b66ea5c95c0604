"""The Triton kernels of distillation_loss and kl_div (lossfuse/triton/distillation.py, kl_div.py), run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py) against the float64
reference, at small shapes; on a CUDA machine the same checks run them for real."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import HAS_TRITON, assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=gen) * 2).to(dtype).to(DEVICE)
    t = (torch.randn(n, v, generator=gen) * 2).to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::3] = -100
    return s, t, y.to(DEVICE)


def _check_loss_and_grads(out, ref, a, b, names):
    """float32 ``out`` against the float64 ``ref``, and the gradients of the leaves ``a`` against those of
    ``b``, for random per-element upstream gradients (one scale for a reduced loss)."""
    w = torch.randn(ref.shape, dtype=torch.float64)
    (out * w.to(out)).sum().backward()
    (ref * w).sum().backward()
    assert_close(out, ref.detach(), torch.float32, "loss")
    for name, x, xd in zip(names, a, b):
        assert_close(x.grad, xd.grad, torch.float32, f"{name} grad")


@pytest.mark.parametrize("beta,temperature,reduction,v", [
    (b, T, r, v) for (b, T), r, v in itertools.product(
        [(0.0, 1.0), (0.0, 2.0), (1.0, 4.0), (0.5, 2.0), (0.25, 1.0)], ["batchmean", "none"], [37, 300])])
def test_distillation_triton_float32(beta, temperature, reduction, v):
    s, t, y = _inputs(6, v, torch.float32, seed=v + int(10 * beta))
    a = [s.clone().requires_grad_(True), t.clone().requires_grad_(True)]
    out = lossfuse.distillation_loss(a[0], a[1], temperature=temperature, beta=beta, target=y, reduction=reduction,
                                     backend="triton")
    b = [s.double().cpu().requires_grad_(True), t.double().cpu().requires_grad_(True)]
    ref = lossfuse.distillation_loss(b[0], b[1], temperature=temperature, beta=beta, target=y.cpu(),
                                     reduction=reduction, backend="reference")
    _check_loss_and_grads(out, ref, a, b, ("student", "teacher"))
    keep = y.cpu() != -100
    assert torch.equal(a[0].grad.cpu()[~keep], torch.zeros_like(a[0].grad.cpu()[~keep]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_distillation_triton_low_precision(dtype):
    s, t, y = _inputs(5, 50, dtype, seed=3)
    a = s.clone().requires_grad_(True)
    out = lossfuse.distillation_loss(a, t, target=y, backend="triton")
    out.backward()
    b = s.double().cpu().requires_grad_(True)
    ref = lossfuse.distillation_loss(b, t.double().cpu(), target=y.cpu(), backend="reference")
    ref.backward()
    assert out.dtype == dtype
    assert_close(out, ref.detach(), dtype, "loss")
    assert_close(a.grad, b.grad, dtype, "student grad")


@pytest.mark.parametrize("reduction,log_target,zeros", [
    ("mean", False, True), ("batchmean", False, True), ("sum", True, False), ("none", False, False),
    ("none", True, False)])
def test_kl_div_triton(reduction, log_target, zeros):
    gen = torch.Generator().manual_seed(7)
    x = torch.log_softmax(torch.randn(9, 130, generator=gen), -1).to(DEVICE)
    t = torch.softmax(torch.randn(9, 130, generator=gen), -1)
    if zeros:
        t = torch.where(torch.rand(9, 130, generator=gen) < 0.3, 0.0, t)
    t = (t.log() if log_target else t).to(DEVICE)
    a = [x.clone().requires_grad_(True), t.clone().requires_grad_(True)]
    b = [x.double().cpu().requires_grad_(True), t.double().cpu().requires_grad_(True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lossfuse.kl_div(a[0], a[1], reduction=reduction, log_target=log_target, backend="triton")
        ref = F.kl_div(b[0], b[1], reduction=reduction, log_target=log_target)
    _check_loss_and_grads(out, ref, a, b, ("input", "target"))


def test_linear_distillation_triton():
    gen = torch.Generator().manual_seed(11)
    xs, Ws = torch.randn(10, 8, generator=gen), torch.randn(40, 8, generator=gen) * 0.5
    xt, Wt = torch.randn(10, 6, generator=gen), torch.randn(40, 6, generator=gen) * 0.5
    y = torch.randint(0, 40, (10,), generator=gen)
    y[::4] = -100
    a = [xs.clone().to(DEVICE).requires_grad_(True), Ws.clone().to(DEVICE).requires_grad_(True)]
    out = lossfuse.linear_distillation_loss(a[0], a[1], xt.to(DEVICE), Wt.to(DEVICE), target=y.to(DEVICE), beta=0.5,
                                            temperature=2.0, chunk_size=3, backend="triton")
    out.backward()
    b = [xs.double().requires_grad_(True), Ws.double().requires_grad_(True)]
    ref = lossfuse.distillation_loss(b[0] @ b[1].t(), xt.double() @ Wt.double().t(), target=y, beta=0.5,
                                     temperature=2.0, backend="reference")
    ref.backward()
    assert_close(out, ref.detach(), torch.float32, "loss")
    assert_close(a[0].grad, b[0].grad, torch.float32, "grad hidden")
    assert_close(a[1].grad, b[1].grad, torch.float32, "grad weight")
