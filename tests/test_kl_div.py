"""kl_div beyond the contract (tests/test_contracts.py, TestKLDiv): torch's function on fresh random
inputs for every reduction (legacy arguments included) and both log_target values, the loss and both
gradients, zeros in a probability target, broadcasting, dtypes, torch's warning and errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import DTYPES, assert_close, backend_or_skip, cpu_kernels_or_skip

REDUCTIONS = ["none", "mean", "batchmean", "sum"]


def _operands(shape, log_target, zeros, dtype=torch.float64, gen=None):
    gen = gen or torch.Generator().manual_seed(torch.seed() % (2**31))
    x = torch.log_softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, -1)
    t = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, -1)
    if zeros:
        t = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3, 0.0, t)
    if log_target:
        t = t.log()  # zeros become -inf: exp(-inf) * (-inf - x) is NaN in torch too
    return x.to(dtype), t.to(dtype)


def _both(fn_a, fn_b, x, t, grad_t=True):
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ts = [t.clone().requires_grad_(grad_t) for _ in range(2)]
    outs = [fn_a(xs[0], ts[0]), fn_b(xs[1], ts[1])]
    w = torch.randn_like(outs[1]) if outs[1].dim() else torch.tensor(1.7, dtype=outs[1].dtype)
    for o in outs:
        (o * w).sum().backward()
    return outs, xs, ts


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction,log_target,zeros", [
    (r, lt, z) for r, lt, z in itertools.product(REDUCTIONS, [False, True], [False, True]) if not (lt and z)])
def test_matches_torch_float64(backend, reduction, log_target, zeros):
    backend_or_skip(backend)
    x, t = _operands((7, 13), log_target, zeros)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out, ref), xs, ts = _both(
            lambda x, t: lossfuse.kl_div(x, t, reduction=reduction, log_target=log_target, backend=backend),
            lambda x, t: F.kl_div(x, t, reduction=reduction, log_target=log_target), x, t)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref.detach(), torch.float64, "loss")
    assert_close(xs[0].grad, xs[1].grad, torch.float64, "input grad")
    # The target's gradient at a zero of a probability target is NaN in torch: the same elements here.
    assert_close(ts[0].grad, ts[1].grad, torch.float64, "target grad")
    if zeros:
        assert torch.isnan(ts[1].grad).any() and torch.equal(torch.isnan(ts[0].grad), torch.isnan(ts[1].grad))
        assert torch.isfinite(out).all(), "0 log 0 must be 0"


@pytest.mark.parametrize("size_average,reduce", [(None, False), (True, None), (False, None), (True, True),
                                                 (False, True)])
def test_legacy_arguments(size_average, reduce):
    cpu_kernels_or_skip()
    x, t = _operands((4, 6), False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lossfuse.kl_div(x, t, size_average=size_average, reduce=reduce)
        ref = F.kl_div(x, t, size_average=size_average, reduce=reduce)
    assert_close(out, ref, torch.float64, "legacy")


def test_gradcheck_both_operands():
    cpu_kernels_or_skip()
    x, t = _operands((5, 6), False, False)
    x.requires_grad_(True)
    t.requires_grad_(True)
    for reduction, lt in itertools.product(["none", "batchmean", "sum"], [False, True]):
        tt = (t.detach().log() if lt else t.detach()).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda x, t: lossfuse.kl_div(x, t, reduction=reduction, log_target=lt, backend="cpu"), (x, tt))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log_target", [False, True])
def test_dtypes_against_float64(dtype, log_target):
    cpu_kernels_or_skip()
    x, t = _operands((33, 70), log_target, not log_target, dtype=dtype)
    (out, _), xs, ts = _both(lambda x, t: lossfuse.kl_div(x, t, reduction="sum", log_target=log_target),
                             lambda x, t: F.kl_div(x, t, reduction="sum", log_target=log_target), x, t,
                             grad_t=False)
    xd = x.double().requires_grad_(True)
    ref = F.kl_div(xd, t.double(), reduction="sum", log_target=log_target)
    (ref * 1.7).backward()
    assert out.dtype == dtype
    assert_close(out, ref.detach(), dtype, "loss")
    assert_close(xs[0].grad, xd.grad, dtype, "input grad")


def test_broadcasting_and_mixed_dtypes():
    cpu_kernels_or_skip()
    x, t = _operands((4, 5, 6), False, False)
    t1 = t[:1]  # broadcast over the batch
    for xx, tt in ((x, t1), (x.float(), t), (x[:, :, :1], t)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (out, ref), xs, ts = _both(lambda a, b: lossfuse.kl_div(a, b, reduction="batchmean"),
                                       lambda a, b: F.kl_div(a, b, reduction="batchmean"), xx, tt)
        assert out.dtype == ref.dtype
        dt = ref.dtype
        assert_close(out, ref.detach(), dt, "loss")
        assert_close(xs[0].grad, xs[1].grad.double(), dt, "input grad")
        assert_close(ts[0].grad, ts[1].grad.double(), dt, "target grad")


def test_mean_warns_as_torch_and_bad_arguments():
    x, t = _operands((3, 4), False, False)
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        lossfuse.kl_div(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lossfuse.kl_div(x, t, reduction="batchmean")  # no warning
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        lossfuse.kl_div(x, t, reduction="avg")
    with pytest.raises(RuntimeError):
        lossfuse.kl_div(x, t[:, :3])
    with pytest.raises(NotImplementedError, match="must be a floating-point tensor"):
        lossfuse.kl_div(x.long(), t)


def test_module_is_torchs():
    crit = lossfuse.KLDivLoss(reduction="batchmean", log_target=True)
    assert isinstance(crit, torch.nn.KLDivLoss)
    x, t = _operands((3, 4), True, False)
    torch.testing.assert_close(crit(x, t), F.kl_div(x, t, reduction="batchmean", log_target=True))
