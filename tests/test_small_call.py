"""The small-call path (lossfuse/_small_call.py, csrc/small_call.cpp) against the general path.

The C++ entry points run the same kernels with the same reductions as the general path, so the two
must agree bit for bit -- loss, gradient, dtype and shape -- on fresh random inputs; the float64
comparisons with torch live in the contract tests, which go through the same public calls. Here also:
which calls the path takes and which it leaves to the general path, the autograd node's contract
(version check, retained graphs, grad_output other than 1, once-differentiable) and the errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import lossfuse
from lossfuse import _small_call

from helpers import cpu_kernels_or_skip

pytestmark = pytest.mark.usefixtures("_needs_kernels")


@pytest.fixture
def _needs_kernels():
    cpu_kernels_or_skip()


def _loss_and_grads(fn, tensors, grad_output=None, **kw):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves, **kw)
    wrt = [t for t in leaves if t.requires_grad]
    go = grad_output if grad_output is not None else torch.ones_like(out)
    grads = torch.autograd.grad(out, wrt, go)
    return out.detach(), grads, out.grad_fn.name()


def _both_ways(monkeypatch, fn, tensors, **kw):
    fast = _loss_and_grads(fn, tensors, **kw)
    monkeypatch.setattr(_small_call, "ENABLED", False)
    general = _loss_and_grads(fn, tensors, **kw)
    monkeypatch.setattr(_small_call, "ENABLED", True)
    return fast, general


def _assert_same_bits(fast, general):
    (lf, gf, name_f), (lg, gg, name_g) = fast, general
    assert "(lossfuse)" in name_f, f"the small-call path was not taken: {name_f}"
    assert "(lossfuse)" not in name_g
    assert lf.dtype == lg.dtype and lf.shape == lg.shape
    assert torch.equal(lf.nan_to_num(7.0), lg.nan_to_num(7.0)), (lf, lg)
    for a, b in zip(gf, gg):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROWS = [(1, 10), (8, 10), (64, 10), (7, 1), (32, 1000), (5,)]


def _row_case(shape, dtype, weighted, ignore_index):
    x = torch.randn(shape).to(dtype)
    c = shape[-1]
    y = torch.randint(0, c, shape[:-1])
    if y.dim() and ignore_index is not None:
        y[torch.rand(y.shape) < 0.3] = ignore_index
    w = (torch.rand(c) + 0.1).to(dtype) if weighted else None
    return x, y, w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROWS, ids=str)
def test_cross_entropy_same_bits_as_general_path(monkeypatch, shape, dtype, reduction):
    for weighted, smoothing, ignore in itertools.product([False, True], [0.0, 0.1], [None, 2]):
        x, y, w = _row_case(shape, dtype, weighted, ignore)
        kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
        if ignore is not None:
            kw["ignore_index"] = ignore
        _assert_same_bits(*_both_ways(monkeypatch, lossfuse.cross_entropy, [x, y], **kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROWS, ids=str)
def test_softmax_focal_same_bits_as_general_path(monkeypatch, shape, dtype, reduction):
    for weighted, alpha, ignore in itertools.product([False, True], [None, 0.25], [None, 2]):
        x, y, w = _row_case(shape, dtype, weighted, ignore)
        kw = dict(weight=w, reduction=reduction, alpha=alpha, gamma=1.5)
        if ignore is not None:
            kw["ignore_index"] = ignore
        _assert_same_bits(*_both_ways(monkeypatch, lossfuse.softmax_focal_loss, [x, y], **kw))


ELEMENTWISE = {
    "huber": lambda x, y, **kw: lossfuse.huber_loss(x, y, delta=0.7, **kw),
    "smooth_l1": lambda x, y, **kw: lossfuse.smooth_l1_loss(x, y, beta=0.5, **kw),
    "l1": lambda x, y, **kw: lossfuse.smooth_l1_loss(x, y, beta=0.0, **kw),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (100,), (10, 1000), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("loss", sorted(ELEMENTWISE))
def test_elementwise_same_bits_as_general_path(monkeypatch, loss, shape, dtype, reduction):
    x, y = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    x.view(-1)[0] = y.view(-1)[0]  # d = 0: the L1 gradient's 0
    _assert_same_bits(*_both_ways(monkeypatch, ELEMENTWISE[loss], [x, y], reduction=reduction))


def test_strided_rows_and_targets(monkeypatch):
    base = torch.randn(16, 24)
    x = base[:, 3:13]  # row stride 24, class stride 1
    y = torch.randint(0, 10, (32,))[::2]  # target stride 2
    _assert_same_bits(*_both_ways(monkeypatch, lossfuse.cross_entropy, [x, y]))


def _path(out) -> str:
    return "small" if "(lossfuse)" in out.grad_fn.name() else "general"


def test_calls_left_to_the_general_path():
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    assert _path(lossfuse.cross_entropy(x, y)) == "small"
    assert _path(lossfuse.cross_entropy(x, y, z_loss=1e-4)) == "general"
    assert _path(lossfuse.cross_entropy(x, y, softcap=30.0)) == "general"
    assert _path(lossfuse.cross_entropy(x, y, backend="reference")) == "general"
    assert _path(lossfuse.cross_entropy(x, torch.softmax(torch.randn(8, 5), 1))) == "general"
    assert _path(lossfuse.cross_entropy(x.t().contiguous().t(), y)) == "general"  # class stride 8
    assert _path(lossfuse.cross_entropy(x.view(8, 5, 1), y.view(8, 1))) == "general"
    assert _path(lossfuse.cross_entropy(torch.randn(600, 500, requires_grad=True), torch.zeros(600, dtype=torch.long))) == "general"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _path(lossfuse.cross_entropy(x, y)) == "general"
    assert _path(lossfuse.softmax_focal_loss(x, y, alpha=torch.rand(5))) == "general"
    assert _path(lossfuse.huber_loss(x, torch.randn(8, 5), weight=torch.rand(8, 5))) == "general"
    with pytest.warns(UserWarning, match="different to the input size"):
        assert _path(lossfuse.huber_loss(x, torch.randn(5))) == "general"  # broadcast
    assert _path(lossfuse.smooth_l1_loss(x, torch.randn(8, 5).double())) == "general"


def test_environment_backend_is_obeyed(monkeypatch):
    x = torch.randn(8, 5, requires_grad=True)
    monkeypatch.setenv("LOSSFUSE_BACKEND", "reference")
    assert _path(lossfuse.cross_entropy(x, torch.randint(0, 5, (8,)))) == "general"


@pytest.mark.parametrize("bad", [
    (torch.randn(4, 5), torch.tensor([1, 2, 7, 0]), {}),
    (torch.randn(4, 5), torch.tensor([1, 2, 3]), {}),
    (torch.randn(4, 5), torch.tensor([1.0, 2, 3, 0]), {}),
    (torch.randn(4, 5), torch.tensor([1, 2, 3, 0]), {"reduction": "avg"}),
    (torch.randn(4, 5), torch.tensor([1, 2, 3, 0]), {"label_smoothing": 1.5}),
    (torch.randn(4, 5), torch.tensor([1, 2, 3, 0]), {"weight": torch.rand(4)}),
    (torch.randn(4, 5), torch.tensor([1, -3, 3, 0]), {"weight": torch.rand(5)}),
], ids=["target range", "batch size", "float target", "reduction", "smoothing", "weight size", "weighted range"])
def test_errors_are_the_general_paths(monkeypatch, bad):
    x, y, kw = bad

    def message():
        try:
            lossfuse.cross_entropy(x, y, **kw)
        except Exception as exc:  # noqa: BLE001 -- the type is what is compared
            return type(exc), str(exc)
        return None

    fast = message()
    monkeypatch.setattr(_small_call, "ENABLED", False)
    assert fast is not None and fast == message()


def test_modified_logits_are_refused():
    x = torch.randn(8, 5, requires_grad=True)
    z = x * 1.0
    loss = lossfuse.cross_entropy(z, torch.randint(0, 5, (8,)))
    assert _path(loss) == "small"
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_retained_graph_and_scaled_grad_output(monkeypatch, dtype):
    x, y, _ = _row_case((16, 7), dtype, False, None)
    for fn in (lossfuse.cross_entropy, lossfuse.softmax_focal_loss):
        results = []
        for enabled in (True, False):
            monkeypatch.setattr(_small_call, "ENABLED", enabled)
            leaf = x.clone().requires_grad_(True)
            out = fn(leaf, y)
            g1 = torch.autograd.grad(out, leaf, retain_graph=True)[0]  # the forward's gradient
            g2 = torch.autograd.grad(out, leaf, torch.tensor(3.0, dtype=dtype), retain_graph=True)[0]
            g3 = torch.autograd.grad(out, leaf)[0]
            results.append((g1, g2, g3))
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_double_backward_is_refused():
    x = torch.randn(6, 4, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    for loss in (lossfuse.cross_entropy(x, torch.randint(0, 4, (6,))), lossfuse.huber_loss(x, torch.randn(6, 4))):
        assert _path(loss) == "small"
        (g,) = torch.autograd.grad(loss * s, x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.sum().backward()


def test_huber_gradients_reach_the_target(monkeypatch):
    x, y = torch.randn(50), torch.randn(50)
    for fn in ELEMENTWISE.values():
        fast, general = _both_ways(monkeypatch, fn, [x, y])
        assert len(fast[1]) == 2
        _assert_same_bits(fast, general)
