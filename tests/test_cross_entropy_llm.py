"""Cross-entropy options for language models: z-loss, soft-capping, returned lse, in-place backward,
and tensors past 2^31 elements. Every backend against torch in float64 on fresh random inputs."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import HAS_TRITON, assert_close, backend_or_skip, cpu_kernels_or_skip, ulps_apart

BACKENDS = ["cpu", "reference"] + (["triton"] if HAS_TRITON else [])


def torch_llm_f64(x, y, *, reduction="mean", z_loss=0.0, softcap=None, ignore_index=-100, **kw):
    """The definition: torch's cross_entropy of the soft-capped logits, plus z_loss * lse^2 on kept rows."""
    xd = x.double()
    cdim = 1 if x.dim() > 1 else 0
    if softcap:
        xd = softcap * torch.tanh(xd / softcap)
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    t = y.double() if y.is_floating_point() else y
    rows = F.cross_entropy(xd, t, reduction="none", ignore_index=ignore_index, **kw)
    lse = torch.logsumexp(xd, cdim)
    if z_loss:
        zt = z_loss * lse * lse
        rows = rows + (zt if y.is_floating_point() else torch.where(y != ignore_index, zt, 0))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif y.is_floating_point():
        out = rows.sum() / rows.numel()
    else:
        keep = y != ignore_index
        w = kw.get("weight")
        denom = keep.sum() if w is None else torch.where(keep, w[torch.where(keep, y, 0)], 0).sum()
        out = rows.sum() / denom
    return out, lse


CASES = {
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "both+smooth+weight": {"z_loss": 1e-2, "softcap": 3.0, "label_smoothing": 0.1, "weight": True},
    "both+ignore": {"z_loss": 5e-3, "softcap": 2.5, "ignore": True},
    "prob+both": {"z_loss": 1e-3, "softcap": 3.0, "prob": True},
}
SHAPES = [(9, 37), (2, 6, 3, 5)]


def _case(shape, dtype, opts):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    kw = {k: v for k, v in opts.items() if k in ("z_loss", "softcap", "label_smoothing")}
    if opts.get("prob"):
        y = torch.softmax(torch.randn(shape, dtype=torch.float64), 1).to(dtype)
    else:
        y = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
        if opts.get("ignore"):
            y[torch.rand(y.shape) < 0.3] = -100
    if opts.get("weight"):
        kw["weight"] = (torch.rand(C, dtype=torch.float64) + 0.2).to(dtype)
    return x, y, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_options_match_definition(shape, case, dtype, reduction, inplace, backend):
    backend_or_skip(backend)
    x, y, kw = _case(shape, dtype, CASES[case])
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1  # a non-leaf, as a model's logits are; in place overwrites this one
    out, lse = lossfuse.cross_entropy(logits, y, reduction=reduction, return_lse=True,
                                      inplace_backward=inplace, backend=backend, **kw)
    xd = x.double().requires_grad_(True)
    ref, lse_ref = torch_llm_f64(xd, y, reduction=reduction, **kw)
    assert_close(out, ref, dtype, "loss")
    assert lse.dtype == torch.float32 and not lse.requires_grad
    assert_close(lse, lse_ref, torch.float32 if dtype == torch.float32 else torch.bfloat16, "lse")
    go = torch.rand_like(ref) + 0.5 if ref.dim() else torch.tensor(1.3, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, leaf, go.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xd, go)
    assert_close(g, gr, dtype, "grad")


@pytest.mark.parametrize("case", ["zloss", "softcap", "both+smooth+weight", "both+ignore", "prob+both"])
def test_gradcheck_options(case):
    cpu_kernels_or_skip()
    x, y, kw = _case((5, 7), torch.float64, CASES[case])
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lossfuse.cross_entropy(x, y, backend="cpu", **kw), (x,))
    x4, y4, kw4 = _case((2, 4, 3, 2), torch.float64, CASES[case])
    x4.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lossfuse.cross_entropy(x, y4, reduction="none", backend="cpu", **kw4), (x4,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_uses_every_rows_grad_output(backend):
    """A known bug elsewhere: every row scaled by grad_output[0]."""
    backend_or_skip(backend)
    x = torch.randn(6, 11, requires_grad=True)
    y = torch.randint(0, 11, (6,))
    go = torch.tensor([0.0, 1.0, -2.0, 3.5, 1e-3, 7.0])
    out = lossfuse.cross_entropy(x, y, reduction="none", z_loss=1e-3, backend=backend)
    (g,) = torch.autograd.grad(out, x, go)
    xd = x.detach().double().requires_grad_(True)
    ref, _ = torch_llm_f64(xd, y, reduction="none", z_loss=1e-3)
    (gr,) = torch.autograd.grad(ref, xd, go.double())
    assert_close(g, gr, torch.float32, "grad")
    assert torch.equal(g[0], torch.zeros(11))


# ------------------------------------------------------------------------------------------------
# In-place backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("layout", ["rows", "spatial", "transposed"])
def test_inplace_writes_the_gradient_into_the_logits(backend, layout):
    backend_or_skip(backend)
    if layout == "spatial":
        base = torch.randn(2, 7, 4, 3)
        y = torch.randint(0, 7, (2, 4, 3))
    else:
        base = torch.randn(9, 7) if layout == "rows" else torch.randn(7, 9).t()
        y = torch.randint(0, 7, (9,))
    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1
    if layout == "transposed":
        logits = (leaf.t() * 1).t()
    ptr = logits.data_ptr()
    loss = lossfuse.cross_entropy(logits, y, label_smoothing=0.1, inplace_backward=True, backend=backend)
    grads = {}
    logits.register_hook(lambda g: grads.setdefault("g", g))
    loss.backward()
    assert grads["g"].data_ptr() == ptr, "the gradient must live in the logits' storage"
    assert logits._version > 0
    ref = base.double().requires_grad_(True)
    F.cross_entropy(ref, y, label_smoothing=0.1).backward()
    assert_close(leaf.grad, ref.grad, torch.float32, "grad")
    assert torch.equal(logits.detach(), leaf.grad), "logits now hold their gradient"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_inplace_refuses_later_use_of_the_logits(backend):
    backend_or_skip(backend)
    h = torch.randn(8, 16, requires_grad=True)
    W = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (8,))
    logits = h @ W.t()
    squares = (logits ** 2).mean()  # saves the logits; runs after the loss node in backward
    loss = squares + lossfuse.cross_entropy(logits, y, inplace_backward=True, backend=backend)
    if backend == "reference":  # plain autograd: in place is ignored, nothing is overwritten
        loss.backward()
        return
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_inplace_keeps_the_loss_scale(dtype):
    """In place changes where the gradient goes, not how it is formed: grad_output x d(loss)/dx in
    fp32, cast once -- the 1-ulp loss-scaling check passes for bf16 and for fp16 (no scale hint needed)."""
    cpu_kernels_or_skip()
    N, C, scale = 1024, 32000, 2.0 ** 16
    base = torch.randn(N, C, dtype=dtype)
    leaf = base.clone().requires_grad_(True)
    y = torch.randint(0, C, (N,))
    with torch.autocast("cpu", dtype=dtype):
        loss = lossfuse.cross_entropy(leaf * 1, y, inplace_backward=True)
    (loss * scale).backward()
    xd = base.double().requires_grad_(True)
    F.cross_entropy(xd, y).backward()
    expected = xd.grad * scale
    assert ulps_apart(leaf.grad, expected, dtype).max().item() <= 1.0
    assert torch.equal(leaf.grad == 0, expected.to(dtype) == 0)


def test_inplace_under_compile():
    cpu_kernels_or_skip()
    torch._dynamo.reset()
    h = torch.randn(16, 8)
    W = torch.randn(40, 8, requires_grad=True)
    y = torch.randint(0, 40, (16,))

    def step(h, W, y):
        return lossfuse.cross_entropy(h @ W.t(), y, z_loss=1e-3, softcap=5.0, inplace_backward=True)

    loss = torch.compile(step, fullgraph=True)(h, W, y)
    loss.backward()
    g = W.grad.clone()
    W.grad = None
    step(h, W, y).backward()
    torch.testing.assert_close(g, W.grad)


def test_compile_return_lse_and_options():
    cpu_kernels_or_skip()
    torch._dynamo.reset()
    x = torch.randn(12, 30, requires_grad=True)
    y = torch.randint(0, 30, (12,))

    def step(x, y):
        loss, lse = lossfuse.cross_entropy(x, y, z_loss=1e-3, softcap=4.0, return_lse=True)
        return loss, lse

    loss_c, lse_c = torch.compile(step, fullgraph=True)(x, y)
    loss_e, lse_e = step(x, y)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(lse_c, lse_e)


def test_module_options():
    cpu_kernels_or_skip()
    crit = lossfuse.CrossEntropyLoss(z_loss=1e-3, softcap=4.0, return_lse=True)
    x = torch.randn(5, 9)
    y = torch.randint(0, 9, (5,))
    loss, lse = crit(x, y)
    ref, lse_ref = torch_llm_f64(x, y, z_loss=1e-3, softcap=4.0)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(lse, lse_ref, torch.float32, "lse")
    assert "z_loss=0.001" in repr(crit) and "softcap=4.0" in repr(crit)


@pytest.mark.parametrize("kw,match", [
    ({"z_loss": -1.0}, "z_loss must be a number >= 0"),
    ({"softcap": 0.0}, "softcap must be None or a number > 0"),
    ({"softcap": -3.0}, "softcap must be None or a number > 0"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        lossfuse.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 9000), (2, 4, 3)], ids=str)
def test_lse_of_an_all_minus_inf_row(backend, shape):
    """lse = -inf as torch.logsumexp (a vocabulary shard fully masked for a row); the loss is NaN, as torch's."""
    backend_or_skip(backend)
    x = torch.randn(shape)
    x[1] = -float("inf")
    y = torch.zeros((shape[0],) + tuple(shape[2:]), dtype=torch.long)
    out, lse = lossfuse.cross_entropy(x, y, reduction="none", return_lse=True, backend=backend)
    ref = torch.logsumexp(x.double(), 1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)) and torch.isneginf(lse[1]).all()
    assert_close(lse[0], ref[0], torch.float32, "finite rows")
    assert torch.isnan(out[1]).all() and torch.isnan(F.cross_entropy(x, y, reduction="none")[1]).all()


def test_lse_precision_for_large_logits():
    """The saved lse is a double: with logits near 1e4 the probabilities carry no fp32 rounding of lse."""
    cpu_kernels_or_skip()
    x = (torch.randn(4, 300, dtype=torch.float64) + 1e4).float()
    y = torch.randint(0, 300, (4,))
    leaf = x.clone().requires_grad_(True)
    lossfuse.cross_entropy(leaf, y, reduction="sum").backward()
    xd = x.double().requires_grad_(True)
    F.cross_entropy(xd, y, reduction="sum").backward()
    # x - lse is exact here up to the fp32 log-sum, so the fp32 gradient is accurate to ~1e-6,
    # where a float32 lse (ulp 1e-3 at 1e4) would give errors near 1e-3.
    assert_close(leaf.grad, xd.grad, torch.float32, "grad", rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Past 2^31 elements: int64 offsets everywhere
# ------------------------------------------------------------------------------------------------


@pytest.mark.large
def test_more_than_2_pow_31_elements():
    """bf16 logits of 65600 x 32768 (2.15e9 elements, 4.3 GB); rows past element 2^31 are checked."""
    cpu_kernels_or_skip()
    N, C = 65600, 32768
    assert N * C > 2 ** 31
    x = torch.empty(N, C, dtype=torch.bfloat16)
    rows = torch.randn(64, C, dtype=torch.bfloat16) * 3  # tiled: a full randn would dominate the test
    x.view(N // 64, 64, C).copy_(rows.expand(N // 64, 64, C))
    y = torch.randint(0, C, (N,))
    x.requires_grad_(True)
    loss = lossfuse.cross_entropy(x, y, reduction="none")
    loss.sum().backward()
    sample = torch.tensor([0, 1, 32_800, 65_536, 65_537, N - 2, N - 1])  # 65536 * 32768 = 2^31
    xd = x.detach()[sample].double().requires_grad_(True)
    ref = F.cross_entropy(xd, y[sample], reduction="none")
    ref.sum().backward()
    assert_close(loss[sample], ref, torch.bfloat16, "loss")
    assert_close(x.grad[sample], xd.grad, torch.bfloat16, "grad")
    del x, loss
    gc.collect()
