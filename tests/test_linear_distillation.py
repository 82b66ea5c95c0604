"""linear_distillation_loss: the chunked projections + distillation against the full logits' reference,
every beta, reductions, chunkings and dtypes; float64 gradcheck of the student's hidden state and
weight; the teacher without a gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import lossfuse
from helpers import assert_close, cpu_kernels_or_skip


def _inputs(n=37, hs=12, ht=9, v=50, dtype=torch.float64, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    xs = torch.randn(n, hs, generator=gen, dtype=torch.float64)
    Ws = torch.randn(v, hs, generator=gen, dtype=torch.float64) * 0.5
    xt = torch.randn(n, ht, generator=gen, dtype=torch.float64)
    Wt = torch.randn(v, ht, generator=gen, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (n,), generator=gen)
    y[::4] = -100
    return [t.to(dtype) for t in (xs, Ws, xt, Wt)] + [y]


@pytest.mark.parametrize("beta,reduction,chunk", list(itertools.product(
    [0.0, 0.5, 1.0], ["batchmean", "sum", "mean", "none"], [None, 1, 8, 100])))
def test_matches_the_full_logits(beta, reduction, chunk):
    cpu_kernels_or_skip()
    xs, Ws, xt, Wt, y = _inputs()
    a = [xs.clone().requires_grad_(True), Ws.clone().requires_grad_(True)]
    b = [xs.clone().requires_grad_(True), Ws.clone().requires_grad_(True)]
    out = lossfuse.linear_distillation_loss(a[0], a[1], xt, Wt, target=y, beta=beta, temperature=2.0,
                                            reduction=reduction, chunk_size=chunk, backend="cpu")
    ref = lossfuse.distillation_loss(b[0] @ b[1].t(), xt @ Wt.t(), target=y, beta=beta, temperature=2.0,
                                     reduction=reduction, backend="reference")
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert_close(out, ref.detach(), torch.float64, "loss")
    assert_close(a[0].grad, b[0].grad, torch.float64, "grad hidden")
    assert_close(a[1].grad, b[1].grad, torch.float64, "grad weight")


def test_gradcheck_student():
    cpu_kernels_or_skip()
    xs, Ws, xt, Wt, y = _inputs(n=9, hs=4, ht=3, v=7)
    xs.requires_grad_(True)
    Ws.requires_grad_(True)
    for beta in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: lossfuse.linear_distillation_loss(
            a, b, xt, Wt, target=y, beta=beta, temperature=2.0, chunk_size=4), (xs, Ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes_against_float64(dtype):
    cpu_kernels_or_skip()
    xs, Ws, xt, Wt, y = _inputs(n=64, hs=16, ht=16, v=300, seed=3)
    low = [t.to(dtype) for t in (xs, Ws, xt, Wt)]
    a = [low[0].clone().requires_grad_(True), low[1].clone().requires_grad_(True)]
    out = lossfuse.linear_distillation_loss(a[0], a[1], low[2], low[3], target=y, chunk_size=16)
    out.backward(torch.tensor(3.0, dtype=out.dtype))
    b = [low[0].double().requires_grad_(True), low[1].double().requires_grad_(True)]
    ref = lossfuse.distillation_loss(b[0] @ b[1].t(), low[2].double() @ low[3].double().t(), target=y,
                                     backend="reference")
    (3.0 * ref).backward()
    assert out.dtype == dtype
    # The logits themselves are rounded to the dtype by the projection: a few roundings of them.
    rtol = {torch.float32: None, torch.bfloat16: 2**-5, torch.float16: 2**-8}[dtype]
    assert_close(out, ref.detach(), dtype, "loss", rtol=rtol)
    assert_close(a[0].grad, b[0].grad, dtype, "grad hidden", rtol=rtol)
    assert_close(a[1].grad, b[1].grad, dtype, "grad weight", rtol=rtol)


def test_teacher_gets_no_gradient_and_second_backward_raises():
    cpu_kernels_or_skip()
    xs, Ws, xt, Wt, y = [t.float() if t.is_floating_point() else t for t in _inputs()]
    xs.requires_grad_(True)
    xt.requires_grad_(True)
    out = lossfuse.linear_distillation_loss(xs, Ws, xt, Wt, target=y)
    out.backward(retain_graph=True)
    assert xt.grad is None and xs.grad is not None
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()


def test_bad_arguments():
    xs, Ws, xt, Wt, y = _inputs()
    with pytest.raises(RuntimeError, match="do not match"):
        lossfuse.linear_distillation_loss(xs, Ws[:, :3], xt, Wt)
    with pytest.raises(ValueError, match="vocabularies differ"):
        lossfuse.linear_distillation_loss(xs, Ws, xt, Wt[:10])
    with pytest.raises(ValueError, match="leading dims"):
        lossfuse.linear_distillation_loss(xs, Ws, xt[:5], Wt)
    with pytest.raises(ValueError, match="chunk_size"):
        lossfuse.linear_distillation_loss(xs, Ws, xt, Wt, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        lossfuse.linear_distillation_loss(xs, Ws, xt, Wt, beta=2.0)
