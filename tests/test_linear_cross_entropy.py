"""Fused linear + cross-entropy against torch (F.linear_cross_entropy, and the float64 definition)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import HAS_TRITON, assert_close, backend_or_skip, cpu_kernels_or_skip

BACKENDS = ["cpu", "reference"] + (["triton"] if HAS_TRITON else [])


def definition_f64(x, W, y, b=None, *, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                   z_loss=0.0, softcap=None):
    """cross_entropy(x @ W.T + b, y) in float64 with z-loss and soft-capping as lossfuse defines them."""
    logits = F.linear(x.double(), W.double(), None if b is None else b.double())
    V = W.shape[0]
    logits = logits.reshape(-1, V)
    prob = y.is_floating_point()
    y2 = y.reshape(-1, V).double() if prob else y.reshape(-1)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, y2, weight=None if weight is None else weight.double(), reduction="none",
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, 1)
    keep = torch.ones_like(lse, dtype=torch.bool) if prob else y2 != ignore_index
    if z_loss:
        rows = rows + torch.where(keep, z_loss * lse * lse, 0)
    if reduction == "none":
        return rows.reshape(y.shape[:-1] if prob else y.shape)
    if reduction == "sum":
        return rows.sum()
    if prob:
        return rows.sum() / rows.numel()
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    return rows.sum() / torch.where(keep, w[torch.where(keep, y2, 0)], 0).sum()


def _inputs(lead, H, V, dtype, prob=False, ignore=True):
    x = torch.randn(*lead, H, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, H, dtype=torch.float64) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype)
    if prob:
        y = torch.softmax(torch.randn(*lead, V, dtype=torch.float64), -1).to(dtype)
    else:
        y = torch.randint(0, V, lead)
        if ignore:
            y[torch.rand(lead) < 0.2] = -100
    return x, W, b, y


OPTIONS = {
    "plain": {},
    "smooth_weight": {"label_smoothing": 0.1, "weight": True},
    "zloss_softcap": {"z_loss": 1e-3, "softcap": 5.0},
    "prob": {"prob": True},
    "prob_smooth_zloss": {"prob": True, "label_smoothing": 0.2, "z_loss": 1e-3},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_definition(option, dtype, reduction, chunk, backend):
    """mean/sum in fp32/bf16 compute gradients during the forward pass, reduction="none" and fp16
    recompute them in the backward pass: both schedules are covered."""
    backend_or_skip(backend)
    opts = dict(OPTIONS[option])
    prob = opts.pop("prob", False)
    x, W, b, y = _inputs((3, 11), 16, 53, dtype, prob=prob)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(53, dtype=dtype) + 0.2
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
    yv = y.clone().requires_grad_(True) if prob else y
    out = lossfuse.linear_cross_entropy(leaves[0], leaves[1], yv, linear_bias=leaves[2], reduction=reduction,
                                        chunk_size=chunk, backend=backend, **kw)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, W, b)]
    yd = y.double().requires_grad_(True) if prob else y
    ref = definition_f64(*ref_leaves[:2], yd, ref_leaves[2], reduction=reduction, **kw)
    assert out.shape == ref.shape
    # Low-precision logits are themselves rounded (as in torch's linear): compare the loss at the
    # dtype's tolerance times the logits' magnitude.
    assert_close(out, ref, dtype, "loss", rtol=None if dtype == torch.float32 else 2e-2)
    go = torch.rand_like(ref) + 0.5 if ref.dim() else torch.tensor(2.0 ** 4, dtype=torch.float64)
    wrt = leaves + ([yv] if prob else [])
    wrt_ref = ref_leaves + ([yd] if prob else [])
    grads = torch.autograd.grad(out, wrt, go.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, wrt_ref, go)
    for name, g, gr, t in zip(["input", "linear_weight", "linear_bias", "target"], grads, grads_ref, wrt):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, gr, dtype, f"grad {name}", rtol=None if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_linear_cross_entropy(reduction, with_bias):
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((36,), 12, 70, torch.float32)  # torch's takes (N, H) inputs only
    bias = b if with_bias else None
    a = [t.clone().requires_grad_(True) for t in (x, W)]
    c = [t.clone().requires_grad_(True) for t in (x, W)]
    ours = lossfuse.linear_cross_entropy(a[0], a[1], y, linear_bias=bias, reduction=reduction, label_smoothing=0.05)
    theirs = F.linear_cross_entropy(c[0], c[1], y, linear_bias=bias, reduction=reduction, label_smoothing=0.05)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    go = torch.rand_like(ours)
    for g1, g2 in zip(torch.autograd.grad(ours, a, go), torch.autograd.grad(theirs, c, go)):
        torch.testing.assert_close(g1, g2, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", ["index", "prob", "options"])
def test_gradcheck(case):
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((5,), 4, 9, torch.float64, prob=case == "prob")
    kw = {"z_loss": 1e-2, "softcap": 2.0, "label_smoothing": 0.1} if case == "options" else {}
    inputs = [t.requires_grad_(True) for t in (x, W, b)] + ([y.requires_grad_(True)] if case == "prob" else [])

    def fn(x, W, b, *t):
        return lossfuse.linear_cross_entropy(x, W, t[0] if t else y, linear_bias=b, chunk_size=2, **kw)

    assert torch.autograd.gradcheck(fn, inputs)

    def fn_none(x, W, b, *t):  # the recompute schedule
        return lossfuse.linear_cross_entropy(x, W, t[0] if t else y, linear_bias=b, chunk_size=2,
                                             reduction="none", **kw)

    assert torch.autograd.gradcheck(fn_none, inputs)


def test_second_backward_is_refused_not_doubled():
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((20,), 8, 30, torch.float32)
    Wl = W.clone().requires_grad_(True)
    loss = lossfuse.linear_cross_entropy(x, Wl, y)
    loss.backward(retain_graph=True)
    first = Wl.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    assert torch.equal(Wl.grad, first)
    # reduction="none" recomputes in the backward pass: repeated backward works and accumulates.
    Wl.grad = None
    loss = lossfuse.linear_cross_entropy(x, Wl, y, reduction="none").sum() / (y != -100).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(Wl.grad, 2 * first)


def test_forward_only_and_partial_gradients():
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((20,), 8, 30, torch.float32)
    with torch.no_grad():
        out = lossfuse.linear_cross_entropy(x, W, y, linear_bias=b)
    assert_close(out, definition_f64(x, W, y, b), torch.float32, "no-grad loss")
    Wl = W.clone().requires_grad_(True)  # only the weight needs a gradient
    lossfuse.linear_cross_entropy(x, Wl, y, linear_bias=b).backward()
    Wd = W.double().requires_grad_(True)
    definition_f64(x, Wd, y, b).backward()
    assert_close(Wl.grad, Wd.grad, torch.float32, "grad W")


def test_autocast_bf16():
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((32,), 16, 100, torch.float32)
    xl, Wl = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lossfuse.linear_cross_entropy(xl, Wl, y)
        ref = F.cross_entropy(F.linear(x.requires_grad_(True), W.requires_grad_(True)), y)
    assert out.dtype == torch.float32 == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.backward()
    ref.backward()
    assert xl.grad.dtype == torch.float32 and Wl.grad.dtype == torch.float32
    torch.testing.assert_close(Wl.grad, W.grad, rtol=5e-2, atol=5e-3)


def test_compile_fullgraph():
    cpu_kernels_or_skip()
    torch._dynamo.reset()
    x, W, b, y = _inputs((2, 8), 8, 40, torch.float32)
    Wl = W.clone().requires_grad_(True)

    def step(x, W, y):
        return lossfuse.linear_cross_entropy(x, W, y, z_loss=1e-3, chunk_size=5)

    loss = torch.compile(step, fullgraph=True)(x, Wl, y)
    loss.backward()
    g = Wl.grad.clone()
    Wl.grad = None
    loss_e = step(x, Wl, y)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, Wl.grad)


def test_module():
    cpu_kernels_or_skip()
    x, W, b, y = _inputs((6,), 8, 20, torch.float32)
    crit = lossfuse.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    assert list(crit.state_dict()) == [] and list(crit.parameters()) == []
    assert_close(crit(x, W, y, b), definition_f64(x, W, y, b, label_smoothing=0.1), torch.float32, "loss")


@pytest.mark.parametrize("args,kw,exc,match", [
    ((torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)), {}, RuntimeError, "do not match"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)), {}, ValueError, "target must have shape"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 10, 2])), {}, IndexError, "Target 10 is out of bounds"),
    ((torch.randn(4, 8), torch.randn(10, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), {}, RuntimeError, "same dtype"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), {"linear_bias": torch.randn(9)}, RuntimeError, "linear_bias must have shape"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), {"chunk_size": 0}, ValueError, "chunk_size"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), {"reduction": "avg"}, ValueError, "not a valid value"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.rand(4, 9)), {}, RuntimeError, "probability targets must have shape"),
    ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), {"weight": torch.ones(3)}, RuntimeError, "weight tensor should be defined"),
])
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        lossfuse.linear_cross_entropy(*args, **kw)
