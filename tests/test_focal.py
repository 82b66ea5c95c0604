"""Focal losses: parity with torchvision's sigmoid_focal_loss formula and the softmax focal definition,
gradients, saturated logits, mixed precision, ops, compile, bad input.

Every kernel result is compared with a float64 oracle computed on the same, freshly drawn random
inputs: lossfuse.reference (torchvision's formula / the softmax definition, gradients by autograd), or
where that formula itself breaks down (saturated logits) a log-space float64 formula written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import (CLASS_OPTIONS, CPU_BACKENDS, DTYPES, NARROW_ISAS, assert_close, backend_or_skip, cpu_kernels_or_skip,
                     float_lanes, forced_cpu_isa, ulps_apart)
from lossfuse import reference
from lossfuse.ops.focal import SigmoidFocalFunction, SoftmaxFocalFunction

GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def grad_output_for(loss):
    # Non-uniform per-element upstream gradients catch "every element scaled by grad_output[0]" bugs.
    return torch.rand_like(loss, dtype=torch.float64) + 0.5 if loss.dim() else torch.tensor(1.7, dtype=torch.float64)


def check_loss_and_grad(out, ref, x, xd, dtype, what="", nan_grad_is_zero=False):
    """out / ref: our loss and the float64 oracle's (both differentiable in x / xd).

    nan_grad_is_zero: the oracle's autograd forms 0 * inf where the true gradient is 0 (a single
    class: p_y = 1, the loss is identically 0, and gamma < 1)."""
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, f"{what} loss")
    go = grad_output_for(ref)
    (g,) = torch.autograd.grad(out, x, go.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xd, go)
    if nan_grad_is_zero:
        gr = torch.nan_to_num(gr, nan=0.0)
    assert g.dtype == x.dtype and g.shape == x.shape
    assert_close(g, gr, dtype, f"{what} grad")


# ================================================================================================
# Sigmoid focal loss
# ================================================================================================

SIG_SHAPES = [(7, 3), (129, 17), (5,), (2, 3, 4, 5)]
# The reference backend (plain PyTorch) needs fewer shapes than the kernels.
SIG_CASES = [
    (shape, backend, form)
    for shape, backend in [(shape, "cpu") for shape in SIG_SHAPES] + [((7, 3), "reference"), ((2, 3, 4, 5), "reference")]
    for form in ("hard", "soft", "index")
    if form != "index" or len(shape) == 2  # class indices are for (N, C) inputs
]
SIG_OPTIONS = {  # (alpha, gamma)
    "default": (0.25, 2.0),
    "no_alpha": (-1.0, 2.0),
    "gamma0": (0.25, 0.0),
    "gamma_half": (0.6, 0.5),
    "gamma5_alpha1": (1.0, 5.0),
    "gamma1_alpha0": (0.0, 1.0),
}
TARGET_FORMS = ["hard", "soft", "index"]


def sigmoid_case(shape, dtype, form, scale=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    if form == "index":
        n, c = shape
        return x, torch.randint(0, c + 1, (n,))  # c: background
    if form == "hard":
        return x, (torch.rand(shape) < 0.3).to(dtype)
    return x, torch.rand(shape, dtype=torch.float64).to(dtype)


def sigmoid_oracle(x, t, alpha, gamma, reduction):
    """torchvision's formula on float64 copies (class indices become their one-hot there)."""
    return reference.sigmoid_focal_loss(x, t if not t.is_floating_point() else t.double(), alpha, gamma, reduction)


def stable_sigmoid_focal_f64(x, t, alpha, gamma):
    """The same loss written with log-sigmoids, so that float64 autograd stays finite at any logit:
    log(1 - p_t) = logaddexp(log t + log sigma(-x), log(1 - t) + log sigma(x))."""
    t = t.double()
    ls_pos, ls_neg = F.logsigmoid(x), F.logsigmoid(-x)
    ce = -(t * ls_pos + (1 - t) * ls_neg)
    log_q = torch.logaddexp(torch.log(t) + ls_neg, torch.log1p(-t) + ls_pos)
    loss = ce * torch.exp(gamma * log_q)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


@pytest.mark.parametrize("option", list(SIG_OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,backend,form", SIG_CASES, ids=str)
def test_sigmoid_parity_with_torchvision(shape, backend, form, dtype, reduction, option):
    backend_or_skip(backend)
    alpha, gamma = SIG_OPTIONS[option]
    x, t = sigmoid_case(shape, dtype, form)
    x.requires_grad_(True)
    out = lossfuse.sigmoid_focal_loss(x, t, alpha, gamma, reduction, backend=backend)
    xd = x.detach().double().requires_grad_(True)
    ref = sigmoid_oracle(xd, t, alpha, gamma, reduction)
    assert out.dtype == x.dtype
    check_loss_and_grad(out, ref, x, xd, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("c", [80, 61])
def test_sigmoid_index_targets_equal_one_hot(c, reduction, backend):
    """Both target forms give the same loss and gradient: bit for bit on the C++ kernels, but for the
    order in which a reduction adds the elements (with 8 lanes, rows of C = 61 are walked as a group of
    four vectors, a pair, a single vector and a 5-lane tail, the flat float targets in groups of four;
    rows of a whole number of vector pairs add alike)."""
    backend_or_skip(backend)
    n, c = (300, c) if backend != "triton" else (9, c // 10)
    x = (torch.randn(n, c) * 4).requires_grad_(True)
    y = torch.randint(0, c + 1, (n,))
    y[:3] = torch.tensor([0, c - 1, c])  # first class, last class, background
    one_hot = F.one_hot(y, c + 1)[:, :c].float()
    a = lossfuse.sigmoid_focal_loss(x, y, reduction=reduction, backend=backend)
    b = lossfuse.sigmoid_focal_loss(x, one_hot, reduction=reduction, backend=backend)
    go = grad_output_for(a).float()
    (ga,) = torch.autograd.grad(a, x, go)
    (gb,) = torch.autograd.grad(b, x, go)
    if backend == "cpu":
        assert torch.equal(ga, gb)
        if reduction == "none" or c % (2 * float_lanes()) == 0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64], ids=str)
def test_sigmoid_mixed_target_dtype(dtype, target_dtype):
    """Targets in another float dtype (fp32 labels with fp16 logits): torch's type promotion."""
    cpu_kernels_or_skip()
    x, t = sigmoid_case((6, 11), dtype, "soft")
    t = t.to(target_dtype)
    x.requires_grad_(True)
    out = lossfuse.sigmoid_focal_loss(x, t, reduction="none")
    assert out.dtype == torch.promote_types(dtype, target_dtype)
    xd = x.detach().double().requires_grad_(True)
    check_loss_and_grad(out, sigmoid_oracle(xd, t, 0.25, 2.0, "none"), x, xd, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 100.0), (torch.float16, 60.0), (torch.bfloat16, 100.0)],
                         ids=["fp32", "fp16", "bf16"])
def test_sigmoid_saturated_logits_stay_finite(dtype, bound, gamma, backend):
    """Logits up to +-100 (fp32) / +-60 (fp16): no NaN or inf in loss or gradient for any gamma, the
    values of the float64 log-space formula, and the finite limit where torchvision's formula (in
    float64 too) produces NaN (gamma < 1 at p_t == 1: 0 * inf in the gradient of (1 - p_t)^gamma)."""
    backend_or_skip(backend)
    n = 81 if backend == "triton" else 401
    xs = torch.linspace(-bound, bound, n, dtype=torch.float64)
    xs = torch.cat([xs, torch.randn(40, dtype=torch.float64) * bound / 3])
    x = torch.stack([xs, xs]).to(dtype)  # row 0 with target 0, row 1 with target 1
    t = torch.stack([torch.zeros_like(xs), torch.ones_like(xs)]).to(dtype)
    xd = x.double().requires_grad_(True)
    ref = stable_sigmoid_focal_f64(xd, t, 0.25, gamma)
    go = torch.rand_like(ref) + 0.5
    (gr,) = torch.autograd.grad(ref, xd, go)
    assert torch.isfinite(ref).all() and torch.isfinite(gr).all()
    xr = x.clone().requires_grad_(True)
    out = lossfuse.sigmoid_focal_loss(xr, t, 0.25, gamma, "none", backend=backend)
    (g,) = torch.autograd.grad(out, xr, go.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert_close(out, ref, dtype, "loss")
    assert_close(g, gr, dtype, "grad")
    # The same elements with class indices: logits (N, 2) whose column 1 is the positive class.
    xi = x.t().contiguous().requires_grad_(True)
    y = torch.ones(xi.shape[0], dtype=torch.long)
    out = lossfuse.sigmoid_focal_loss(xi, y, 0.25, gamma, "none", backend=backend)
    (g,) = torch.autograd.grad(out, xi, go.t().to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert_close(out, ref.t(), dtype, "loss (class indices)")
    assert_close(g, gr.t(), dtype, "grad (class indices)")
    # Where torchvision's own formula is finite in float64 it agrees with the log-space oracle; for
    # 0 < gamma < 1 it is not finite everywhere, and there the kernels gave the finite limit above.
    xt = x.double().requires_grad_(True)
    tv = reference.sigmoid_focal_loss(xt, t.double(), 0.25, gamma, "none")
    (gtv,) = torch.autograd.grad(tv, xt, go)
    finite = torch.isfinite(gtv)
    assert_close(tv, ref.detach(), torch.float64, "torchvision formula, loss")
    assert_close(gtv[finite], gr[finite], torch.float64, "torchvision formula, grad")
    if 0 < gamma < 1:
        assert not finite.all()


def test_sigmoid_small_gradients_keep_relative_precision():
    """A confident, correct prediction's tiny gradient is not rounded to 0 (torchvision's sigma - t
    cancels in float32): here the gradient at x = 30, t = 1 is -1e-13-ish, not 0."""
    cpu_kernels_or_skip()
    x = torch.tensor([30.0, -30.0, 12.0, -25.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for gamma in (0.0, 2.0):
        (g,) = torch.autograd.grad(lossfuse.sigmoid_focal_loss(x, t, 0.25, gamma, "sum"), x)
        xd = x.detach().double().requires_grad_(True)
        (gr,) = torch.autograd.grad(stable_sigmoid_focal_f64(xd, t, 0.25, gamma).sum(), xd)
        assert (g != 0).all()
        assert ulps_apart(g, gr, torch.float32).max() <= 4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sigmoid_nan_propagates(backend):
    backend_or_skip(backend)
    x = torch.randn(4, 5)
    x[1, 2] = float("nan")
    t = (torch.rand(4, 5) < 0.5).float()
    xr = x.clone().requires_grad_(True)
    out = lossfuse.sigmoid_focal_loss(xr, t, backend=backend)
    assert torch.isnan(out[1, 2]) and torch.isfinite(out[~torch.isnan(x)]).all()
    (g,) = torch.autograd.grad(out.sum(), xr)
    assert torch.isnan(g[1, 2]) and torch.isfinite(g[~torch.isnan(x)]).all()
    assert torch.isnan(lossfuse.sigmoid_focal_loss(x, t, reduction="mean", backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sigmoid_empty(backend):
    backend_or_skip(backend)
    x = torch.randn(0, 5, requires_grad=True)
    for t in (torch.rand(0, 5), torch.zeros(0, dtype=torch.long)):
        assert torch.isnan(lossfuse.sigmoid_focal_loss(x, t, reduction="mean", backend=backend))
        s = lossfuse.sigmoid_focal_loss(x, t, reduction="sum", backend=backend)
        assert s.item() == 0
        assert lossfuse.sigmoid_focal_loss(x, t, backend=backend).shape == (0, 5)
        (g,) = torch.autograd.grad(s, x)
        assert g.shape == (0, 5)


def test_sigmoid_soft_targets_requiring_grad_use_the_reference():
    """The kernels differentiate the logits only; targets that require grad get torchvision's formula."""
    cpu_kernels_or_skip()
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.rand(5, 7, requires_grad=True)
    out = lossfuse.sigmoid_focal_loss(x, t, reduction="mean")
    gx, gt = torch.autograd.grad(out, (x, t))
    ref = reference.sigmoid_focal_loss(x, t, reduction="mean")
    rx, rt = torch.autograd.grad(ref, (x, t))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gt, rt)


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["hard_default", "soft_gamma_half", "index_no_alpha", "spatial_gamma0"])
def test_sigmoid_gradcheck_cpu_kernel(case, reduction, path):
    """float64 gradcheck; "fused" is the functional (for mean/sum the forward writes the gradient),
    "unfused" the autograd Function with the separate backward kernel."""
    cpu_kernels_or_skip()
    form, opt = case.split("_", 1)
    alpha, gamma = {"default": (0.25, 2.0), "gamma_half": (0.6, 0.5), "no_alpha": (-1.0, 2.0),
                    "gamma0": (0.4, 0.0)}[opt]
    shape = (2, 3, 4) if form == "spatial" else (6, 5)
    x, t = sigmoid_case(shape, torch.float64, "index" if form == "index" else ("hard" if form != "soft" else "soft"),
                        scale=2.0)
    x.requires_grad_(True)
    if path == "fused":
        def fn(x):
            return lossfuse.sigmoid_focal_loss(x, t, alpha, gamma, reduction, backend="cpu")
    else:
        def fn(x):
            return SigmoidFocalFunction.apply(x, t, alpha, gamma, reduction, "cpu", False)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


# ================================================================================================
# Softmax focal loss
# ================================================================================================

SM_SHAPES = [(7, 3), (13, 1000), (6, 1), (5,), (2, 5, 3, 4), (3, 7, 11)]
SM_CASES = [(shape, "cpu") for shape in SM_SHAPES] + [((7, 3), "reference"), ((2, 5, 3, 4), "reference")]
SM_OPTIONS = {
    **CLASS_OPTIONS,
    "alpha_float": {"alpha": 0.3},
    "alpha_tensor": {"alpha": "tensor"},
    "gamma0": {"gamma": 0.0},
    "gamma_half": {"gamma": 0.5},
    "all": {"weight": True, "ignore": -100, "alpha": "tensor", "gamma": 1.5},
}


def num_classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def softmax_case(shape, dtype, opts, scale=3.0):
    """Random logits, targets and keyword arguments for one grid cell."""
    c = num_classes(shape)
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    y = torch.randint(0, c, tshape)
    kw = {"gamma": opts.get("gamma", 2.0)}
    if "ignore" in opts:
        kw["ignore_index"] = opts["ignore"]
        if y.dim() and y.numel() > 1:
            y[torch.rand(tshape) < 0.3] = opts["ignore"]
    if opts.get("weight"):
        kw["weight"] = (torch.rand(c, dtype=torch.float64) + 0.1).to(dtype)
    if opts.get("alpha") == "tensor":
        kw["alpha"] = torch.rand(c, dtype=torch.float64).to(dtype)
    elif "alpha" in opts:
        kw["alpha"] = opts["alpha"]
    return x, y, kw


def softmax_oracle(x, y, reduction="mean", **kw):
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return reference.softmax_focal_loss(x.double() if not x.requires_grad else x, y, reduction=reduction, **kw)


def stable_softmax_focal_f64(x, y, gamma, alpha=1.0):
    """Softmax focal loss per row in float64 with nl = -log p_y formed as softplus(logsumexp_{c != y}
    (x_c - x_y)), exact also when p_y rounds to 1; autograd stays finite for every gamma."""
    c = x.shape[1]
    d = x - x.gather(1, y[:, None])
    others = d.masked_fill(F.one_hot(y, c).bool(), float("-inf"))
    nl = F.softplus(torch.logsumexp(others, 1))
    log_q = torch.log(-torch.expm1(-nl))
    return alpha * torch.exp(gamma * log_q) * nl


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,backend,option", [
    (shape, backend, option) for shape, backend in SM_CASES for option in SM_OPTIONS
    # ignore_index=1 only where class 1 exists
    if not (SM_OPTIONS[option].get("ignore") == 1 and num_classes(shape) < 2)], ids=str)
def test_softmax_parity_with_definition(shape, backend, option, dtype, reduction):
    backend_or_skip(backend)
    opts = SM_OPTIONS[option]
    x, y, kw = softmax_case(shape, dtype, opts)
    x.requires_grad_(True)
    out = lossfuse.softmax_focal_loss(x, y, reduction=reduction, backend=backend, **kw)
    xd = x.detach().double().requires_grad_(True)
    ref = softmax_oracle(xd, y, reduction, **kw)
    assert out.dtype == x.dtype
    check_loss_and_grad(out, ref, x, xd, dtype, nan_grad_is_zero=num_classes(shape) == 1 and backend != "reference")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "transposed", "spatial", "channels_last"])
def test_softmax_gamma0_is_cross_entropy_exactly(layout, dtype, reduction, backend):
    """gamma = 0 with alpha None: lossfuse.cross_entropy -- the loss bit for bit on the C++ kernels, the
    gradient within the dtype's tolerance (with class weights and ignored rows); within rounding on the
    other backends."""
    backend_or_skip(backend)
    small = backend == "triton"
    shape = {"rows": (64, 37) if not small else (6, 37), "transposed": (40, 9) if not small else (12, 9),
             "spatial": (3, 7, 5, 4) if not small else (2, 7, 3, 2), "channels_last": (2, 6, 5, 3)}[layout]
    x, y, kw = softmax_case(shape, dtype, {"weight": True, "ignore": -100})
    kw.pop("gamma")
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xa = x.clone().requires_grad_(True)
    a = lossfuse.softmax_focal_loss(xa, y, gamma=0.0, reduction=reduction, backend=backend, **kw)
    # loss.backward() for the reductions (the fused gradient is scaled after its rounding for any
    # other grad_output: within an ulp, tested above), per-row upstream gradients for "none".
    go = grad_output_for(a).to(a.dtype) if reduction == "none" else torch.ones((), dtype=a.dtype)
    (ga,) = torch.autograd.grad(a, xa, go)
    if backend == "triton":  # against float64 torch: Triton's own rounding differs from the C++ kernels'
        xd = x.double().requires_grad_(True)
        ref = F.cross_entropy(xd, y, reduction=reduction, weight=kw["weight"].double(), ignore_index=-100)
        assert_close(a, ref, dtype, "loss")
        (gr,) = torch.autograd.grad(ref, xd, go.double())
        assert_close(ga, gr, dtype, "grad")
        return
    xb = x.clone().requires_grad_(True)
    b = lossfuse.cross_entropy(xb, y, reduction=reduction, backend=backend, **kw)
    (gb,) = torch.autograd.grad(b, xb, go)
    if backend == "cpu":
        assert torch.equal(a, b)
        # The cross-entropy backward keeps its lse in float64 (split hi + lo), the focal one in the
        # accumulation type (as torch does): probabilities apart by the rounding of the lse, half an
        # ulp of |lse| relative -- a few ulps of the gradient, within the dtype's tolerance.
        assert_close(ga, gb, dtype, "gradient")
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed_2d", "sliced_classes", "strided_classes", "channels_last",
                                    "permuted_spatial"])
@pytest.mark.parametrize("shape", [(9, 37), (3, 6, 5, 7)], ids=str)
def test_softmax_strided_inputs(shape, layout, backend):
    """The kernels read strided views in place (or copy once) and give the same results."""
    backend_or_skip(backend)
    layouts = {
        "transposed_2d": lambda x: x.t().contiguous().t() if x.dim() == 2 else x,
        "sliced_classes": lambda x: torch.cat([x, x], dim=1)[:, : x.shape[1]],
        "strided_classes": lambda x: torch.repeat_interleave(x, 2, dim=1)[:, ::2],
        "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,
        "permuted_spatial": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 3 else x,
    }
    x0, y, kw = softmax_case(shape, torch.float32, {"weight": True, "alpha": "tensor", "gamma": 2.0})
    x = layouts[layout](x0.clone()).requires_grad_(True)
    assert torch.equal(x, x0)
    for reduction in ("none", "mean"):
        out = lossfuse.softmax_focal_loss(x, y, reduction=reduction, backend=backend, **kw)
        xd = x0.double().requires_grad_(True)
        check_loss_and_grad(out, softmax_oracle(xd, y, reduction, **kw), x, xd, torch.float32, layout)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_large_vocab(backend):
    """Rows that cross several of the kernel's summation blocks and its online-max rescaling."""
    backend_or_skip(backend)
    x = torch.randn(3, 100_003) * 4
    x[1, 70_000] = 30.0  # the max arrives late in the row
    x[2, :50_000] -= 40.0
    y = torch.tensor([5, 70_000, 99_999])
    xr = x.clone().requires_grad_(True)
    for reduction in ("none", "mean"):
        out = lossfuse.softmax_focal_loss(xr, y, gamma=1.5, reduction=reduction, backend=backend)
        xd = x.double().requires_grad_(True)
        check_loss_and_grad(out, softmax_oracle(xd, y, reduction, gamma=1.5), xr, xd, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 100.0), (torch.float16, 60.0)], ids=["fp32", "fp16"])
def test_softmax_saturated_logits_stay_finite(dtype, bound, gamma, backend):
    """Confident right and wrong rows at logits up to +-bound: finite loss and gradient for every
    gamma, equal to a float64 formula that stays exact there."""
    backend_or_skip(backend)
    c = 7
    n = 12
    x = (torch.rand(n, c, dtype=torch.float64) * 2 - 1) * bound
    y = torch.randint(0, c, (n,))
    x[0] = 0.0
    x[0, y[0]] = bound  # p_y rounds to 1
    x[1] = bound
    x[1, y[1]] = -bound  # p_y underflows
    x[2] = -bound
    x[2, y[2]] = bound
    x[3, y[3]] = 1.0
    x = x.to(dtype)
    xd = x.double().requires_grad_(True)
    ref = stable_softmax_focal_f64(xd, y, gamma)
    go = torch.rand(n, dtype=torch.float64) + 0.5
    (gr,) = torch.autograd.grad(ref, xd, go)
    assert torch.isfinite(ref).all() and torch.isfinite(gr).all()
    xr = x.clone().requires_grad_(True)
    out = lossfuse.softmax_focal_loss(xr, y, gamma=gamma, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(out, xr, go.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    rtol = torch.finfo(dtype).eps * bound * 4  # lse = bound + O(1) is known to eps * bound
    assert_close(out, ref, dtype, "loss", rtol=rtol)
    assert_close(g, gr, dtype, "grad", rtol=rtol)
    # The definition's own float64 gradient is NaN at the saturated row for 0 < gamma < 1.
    xt = x.double().requires_grad_(True)
    (gt,) = torch.autograd.grad(reference.softmax_focal_loss(xt, y, gamma=gamma, reduction="sum"), xt)
    if 0 < gamma < 1:
        assert not torch.isfinite(gt).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_nan_and_empty(backend):
    backend_or_skip(backend)
    x = torch.randn(4, 5)
    x[2, 1] = float("nan")
    y = torch.tensor([0, 1, 2, 3])
    out = lossfuse.softmax_focal_loss(x, y, reduction="none", backend=backend)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()
    empty = torch.randn(0, 5, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(lossfuse.softmax_focal_loss(empty, t, backend=backend))
    assert lossfuse.softmax_focal_loss(empty, t, reduction="sum", backend=backend).item() == 0
    xr = torch.randn(4, 5, requires_grad=True)
    ign = torch.full((4,), -100)
    assert torch.isnan(lossfuse.softmax_focal_loss(xr, ign, backend=backend))  # 0 / 0, as torch
    lossfuse.softmax_focal_loss(xr, ign, reduction="sum", backend=backend).backward()
    assert torch.equal(xr.grad, torch.zeros_like(xr))


GRADCHECK_SM = {
    "plain": ((6, 5), {}),
    "weight_alpha_tensor": ((6, 5), {"weight": True, "alpha": "tensor"}),
    "ignore_alpha_float": ((6, 5), {"ignore": -100, "alpha": 0.7}),
    "gamma0": ((6, 5), {"gamma": 0.0, "weight": True}),
    "gamma_half": ((6, 5), {"gamma": 0.5}),
    "spatial": ((2, 4, 3, 5), {"weight": True, "gamma": 3.0}),
    "one_dim": ((7,), {}),
}


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(GRADCHECK_SM))
def test_softmax_gradcheck_cpu_kernel(case, reduction, path):
    cpu_kernels_or_skip()
    shape, opts = GRADCHECK_SM[case]
    x, y, kw = softmax_case(shape, torch.float64, opts, scale=2.0)
    x.requires_grad_(True)
    if path == "fused":
        def fn(x):
            return lossfuse.softmax_focal_loss(x, y, reduction=reduction, backend="cpu", **kw)
    else:
        def fn(x):
            return SoftmaxFocalFunction.apply(x, y, kw.get("alpha"), kw["gamma"], kw.get("weight"),
                                              kw.get("ignore_index", -100), reduction, "cpu", False)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


# ================================================================================================
# Both losses: the fused gradient, mixed precision, portable kernels, Triton, ops, compile
# ================================================================================================


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_gradient_matches_backward_kernel(loss, dtype):
    """The fused forward's gradient equals the backward kernel's, also for a grad_output != 1 and
    again through a retained graph (where the fused gradient is used up)."""
    cpu_kernels_or_skip()
    if loss == "sigmoid":
        x, t = sigmoid_case((300, 40), dtype, "hard")
        fused = lambda x: lossfuse.sigmoid_focal_loss(x, t, reduction="mean")  # noqa: E731
        unfused = lambda x: SigmoidFocalFunction.apply(x, t, 0.25, 2.0, "mean", "cpu", False)  # noqa: E731
    else:
        x, y, kw = softmax_case((300, 40), dtype, {"weight": True, "ignore": -100, "alpha": "tensor"})
        fused = lambda x: lossfuse.softmax_focal_loss(x, y, reduction="mean", **kw)  # noqa: E731
        unfused = lambda x: SoftmaxFocalFunction.apply(  # noqa: E731
            x, y, kw["alpha"], kw["gamma"], kw["weight"], -100, "mean", "cpu", False)
    x.requires_grad_(True)
    (g_unfused,) = torch.autograd.grad(unfused(x), x)
    out = fused(x)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 3.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out, x)
    assert_close(g1, g_unfused.double(), dtype, "fused")
    if loss == "softmax" and dtype == torch.float32:
        # The fused float32 row forms p_c = e^(x_c - m) / S from the exps it summed; the backward
        # kernel e^(x_c - lse) with a float32 lse: formulas apart by rounding. The fused one is the
        # closer of the two to float64 on average, and as close at worst (to the rounding of the
        # per-row focal factor both share).
        xd = x.detach().double().requires_grad_(True)
        (g64,) = torch.autograd.grad(lossfuse.reference.softmax_focal_loss(xd, y, reduction="mean", **kw), xd)
        fused_err, unfused_err = ulps_apart(g1, g64, dtype), ulps_apart(g_unfused, g64, dtype)
        assert fused_err.mean() <= unfused_err.mean()
        assert fused_err.max() <= unfused_err.max() + 4
    else:
        assert ulps_apart(g1, g_unfused.double(), dtype).max() <= 1
    assert torch.equal(g3, g_unfused)  # the retained graph's second use runs the backward kernel
    assert_close(g2, 3 * g_unfused.double(), dtype, "scaled")


def test_fused_gradient_is_adopted_without_a_copy():
    """loss.backward(): .grad is the very tensor the backward returned (the fused forward's buffer, no
    clone by autograd's accumulation), for both losses."""
    cpu_kernels_or_skip()
    x = torch.randn(64, 80, requires_grad=True)
    ptrs = []
    x.register_hook(lambda g: ptrs.append(g.data_ptr()))  # keeps no reference to the tensor
    lossfuse.sigmoid_focal_loss(x, (torch.rand(64, 80) < 0.1).float(), reduction="mean").backward()
    assert x.grad.data_ptr() == ptrs[-1]
    x.grad = None
    lossfuse.softmax_focal_loss(x, torch.randint(0, 80, (64,))).backward()
    assert x.grad.data_ptr() == ptrs[-1]


def _float64_grad(loss, x, target, scale, **kw):
    xd = x.detach().double().requires_grad_(True)
    if loss == "sigmoid":
        reference.sigmoid_focal_loss(xd, target.double(), reduction="mean", **kw).backward()
    else:
        reference.softmax_focal_loss(xd, target, **kw).backward()
    return xd.grad * scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_loss_scaling_under_autocast(loss, dtype, backend):
    """GradScaler's first step: autocast forward (fp32 loss), backward with grad_output 2^16. The
    gradient equals the float64 gradient x 2^16 rounded to the input's dtype within 1 ulp, with the
    same elements flushed to zero: the scale is applied in fp32 before the single cast."""
    backend_or_skip(backend)
    scale = 2.0 ** 16
    if loss == "sigmoid":
        n, c = 8192, 128  # mean over 2^20 elements: per-element gradients near fp16's smallest subnormal
        x = (torch.randn(n, c) * 2).to(dtype).requires_grad_(True)
        target = (torch.rand(n, c) < 0.05).to(dtype)
        fn = lambda: lossfuse.sigmoid_focal_loss(x, target, reduction="mean", backend=backend)  # noqa: E731
    else:
        n, c = 1024, 8192  # p_c / N mostly below fp16's smallest subnormal
        x = torch.randn(n, c, dtype=dtype).requires_grad_(True)
        target = torch.randint(0, c, (n,))
        fn = lambda: lossfuse.softmax_focal_loss(x, target, gamma=2.0, backend=backend)  # noqa: E731
    with torch.autocast("cpu", dtype=dtype):
        out = fn()
    assert out.dtype == torch.float32
    (out * scale).backward()
    expected = _float64_grad(loss, x, target, scale)
    ulps = ulps_apart(x.grad, expected, dtype)
    assert ulps.max().item() <= 1.0, f"max {ulps.max().item():.2f} ulp"
    assert torch.equal(x.grad == 0, expected.to(dtype) == 0), "different elements flushed to zero"
    if dtype == torch.float16:  # sharp: forming the gradient in fp16 and scaling afterwards fails it
        naive = (expected / scale).to(dtype).double() * scale
        assert not torch.equal(naive.to(dtype) == 0, expected.to(dtype) == 0)


@pytest.mark.parametrize("isa", NARROW_ISAS)
@pytest.mark.parametrize("loss", ["sigmoid_float", "sigmoid_index", "softmax_rows", "softmax_tiles"])
def test_narrower_isa_kernels_match(loss, isa):
    """The portable and AVX2 builds of the kernels, forced at run time, against the float64 oracle."""
    for dtype in (torch.float32, torch.bfloat16):
        if loss.startswith("sigmoid"):
            x, t = sigmoid_case((9, 37), dtype, "index" if loss.endswith("index") else "soft")
            fn = lambda x: lossfuse.sigmoid_focal_loss(x, t, 0.3, 1.5, "none")  # noqa: E731
            ref_fn = lambda xd: sigmoid_oracle(xd, t, 0.3, 1.5, "none")  # noqa: E731
        else:
            shape = (9, 37) if loss.endswith("rows") else (2, 6, 5, 3)
            x, y, kw = softmax_case(shape, dtype, {"weight": True, "alpha": "tensor", "ignore": -100})
            fn = lambda x: lossfuse.softmax_focal_loss(x, y, reduction="none", **kw)  # noqa: E731
            ref_fn = lambda xd: softmax_oracle(xd, y, "none", **kw)  # noqa: E731
        x.requires_grad_(True)
        xd = x.detach().double().requires_grad_(True)
        with forced_cpu_isa(isa):  # the backward inside too
            check_loss_and_grad(fn(x), ref_fn(xd), x, xd, dtype, isa)


@pytest.mark.triton
@pytest.mark.parametrize("form", TARGET_FORMS)
@pytest.mark.parametrize("option", ["default", "no_alpha", "gamma_half"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_sigmoid_parity(dtype, reduction, option, form):
    """The Triton kernels (under TRITON_INTERPRET=1 on CPU tensors; small shapes)."""
    backend_or_skip("triton")
    alpha, gamma = SIG_OPTIONS[option]
    shape = (37, 29) if form != "index" else (41, 31)  # several programs of 1024, masked tails
    x, t = sigmoid_case(shape, dtype, form)
    x.requires_grad_(True)
    out = lossfuse.sigmoid_focal_loss(x, t, alpha, gamma, reduction, backend="triton")
    xd = x.detach().double().requires_grad_(True)
    check_loss_and_grad(out, sigmoid_oracle(xd, t, alpha, gamma, reduction), x, xd, dtype, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("option", ["plain", "ignore", "alpha_tensor", "gamma_half", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (5, 70), (2, 5, 3, 2)], ids=str)
def test_triton_softmax_parity(shape, dtype, reduction, option):
    backend_or_skip("triton")
    x, y, kw = softmax_case(shape, dtype, SM_OPTIONS[option])
    if shape == (2, 5, 3, 2):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = lossfuse.softmax_focal_loss(x, y, reduction=reduction, backend="triton", **kw)
    xd = x.detach().double().requires_grad_(True)
    check_loss_and_grad(out, softmax_oracle(xd, y, reduction, **kw), x, xd, dtype, "triton")


def test_triton_launchers_fused_gradient():
    """The Triton ops honour grad_scale as the C++ ones do (the backward kernel, launched at once)."""
    backend_or_skip("triton")
    from lossfuse.triton import focal as tf

    x, t = sigmoid_case((9, 13), torch.float32, "hard")
    loss, gx = tf.sigmoid_focal_fwd(x, t, 0.25, 2.0, 64, 0.5)
    torch.testing.assert_close(gx, tf.sigmoid_focal_bwd(torch.tensor(0.5), x, t, 0.25, 2.0))
    torch.testing.assert_close(loss.sum(), reference.sigmoid_focal_loss(x, t, reduction="sum"))
    x3 = torch.randn(4, 6, 1)
    y = torch.randint(0, 6, (4, 1))
    loss, lse, d, gx = tf.softmax_focal_fwd(x3, y, None, 1.0, 2.0, -100, 0.25)
    g = torch.full((4, 1), 0.25)
    torch.testing.assert_close(gx, tf.softmax_focal_bwd(g, x3, y, lse, d, -100))


def _sigmoid_op_args(index):
    x = torch.randn(6, 7)
    t = torch.randint(0, 8, (6,)) if index else torch.rand(6, 7)
    return x, t


@pytest.mark.parametrize("index", [False, True])
def test_opcheck_sigmoid(index):
    cpu_kernels_or_skip()
    x, t = _sigmoid_op_args(index)
    fwd = torch.ops.lossfuse.sigmoid_focal_fwd
    bwd = torch.ops.lossfuse.sigmoid_focal_bwd
    for sum_block in (0, 16, 4096):
        torch.library.opcheck(fwd, (x, t, 0.25, 2.0, sum_block, None))
    torch.library.opcheck(fwd, (x, t, -1.0, 0.5, 16, 0.125))
    torch.library.opcheck(bwd, (torch.tensor(0.5), x, t, 0.25, 2.0))
    torch.library.opcheck(bwd, (torch.rand(6, 7), x, t, 0.25, 0.5))


@pytest.mark.parametrize("layout", ["classes", "spatial"])
def test_opcheck_softmax(layout):
    cpu_kernels_or_skip()
    x = torch.randn(4, 7, 5)
    if layout == "classes":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    y = torch.randint(0, 7, (4, 5))
    y[0, 0] = -100
    scale = torch.rand(7) + 0.5
    fwd = torch.ops.lossfuse.softmax_focal_fwd
    bwd = torch.ops.lossfuse.softmax_focal_bwd
    torch.library.opcheck(fwd, (x, y, scale, 1.0, 2.0, -100, None))
    torch.library.opcheck(fwd, (x, y, None, 0.5, 0.0, -100, 0.25))
    _, lse, d, _ = fwd(x, y, scale, 1.0, 2.0, -100, None)
    torch.library.opcheck(bwd, (torch.rand(4, 5), x, y, lse, d, -100))
    torch.library.opcheck(bwd, (torch.tensor(0.5).expand(4, 5), x, y, lse, d, -100))


def test_ops_reject_out_of_range_targets_directly():
    """The ops are public: called directly, a bad class index raises instead of reading out of bounds."""
    cpu_kernels_or_skip()
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        torch.ops.lossfuse.sigmoid_focal_fwd(x, torch.tensor([0, 5, 4]), 0.25, 2.0, 0, None)
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        torch.ops.lossfuse.sigmoid_focal_bwd(torch.tensor(1.0), x, torch.tensor([0, -1, 4]), 0.25, 2.0)
    x3 = torch.randn(3, 4, 1)
    t = torch.tensor([[0], [4], [1]])
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        torch.ops.lossfuse.softmax_focal_fwd(x3, t, None, 1.0, 2.0, -100, None)
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        torch.ops.lossfuse.softmax_focal_bwd(torch.ones(3, 1), x3, t, torch.zeros(3, 1), torch.ones(3, 1), -100)


# ================================================================================================
# Bad input, modules, exports
# ================================================================================================

X = torch.randn(4, 5)
T = torch.rand(4, 5)
Y = torch.tensor([0, 1, 3, 2])

SIGMOID_BAD = [
    ("unknown reduction", ((X, T), {"reduction": "avg"}), ValueError, "avg is not a valid value for reduction"),
    ("negative gamma", ((X, T), {"gamma": -0.5}), ValueError, "gamma must be >= 0; got -0.5"),
    ("nan gamma", ((X, T), {"gamma": float("nan")}), ValueError, "gamma must be >= 0"),
    ("alpha > 1", ((X, T), {"alpha": 1.5}), ValueError, r"alpha must be in \[0, 1\]"),
    ("nan alpha", ((X, T), {"alpha": float("nan")}), ValueError, r"alpha must be in \[0, 1\]"),
    ("tensor alpha", ((X, T), {"alpha": torch.tensor(0.5)}), TypeError, "alpha must be a float"),
    ("target shape", ((X, torch.rand(4, 6)), {}), ValueError,
     r"Target size \(torch.Size\(\[4, 6\]\)\) must be the same as input size \(torch.Size\(\[4, 5\]\)\)"),
    ("int32 targets", ((X, Y.int()), {}), RuntimeError, "targets must be floating point .* got Int"),
    ("bool targets", ((X, T > 0.5), {}), RuntimeError, "got Bool"),
    ("index target length", ((X, Y[:3]), {}), ValueError, r"must have shape \(N,\) for inputs of shape \(N, C\)"),
    ("index targets for 1-d input", ((torch.randn(4), Y), {}), ValueError, r"must have shape \(N,\)"),
    ("index out of range", ((X, torch.tensor([0, 6, 1, 2])), {}), IndexError, r"Target 6 is out of bounds\."),
    ("negative index", ((X, torch.tensor([0, -1, 1, 2])), {}), IndexError, r"Target -1 is out of bounds\."),
    ("integer logits", ((X.long(), T), {}), NotImplementedError, "inputs must be a floating-point tensor"),
    ("targets on another device", ((X, T.to("meta")), {}), RuntimeError, "expected all tensors on the same device"),
    ("unknown backend", ((X, T), {"backend": "cuda"}), ValueError, "backend must be one of"),
]

SOFTMAX_BAD = [
    ("unknown reduction", ((X, Y), {"reduction": "avg"}), ValueError, "avg is not a valid value for reduction"),
    ("negative gamma", ((X, Y), {"gamma": -1.0}), ValueError, "gamma must be >= 0"),
    ("alpha > 1", ((X, Y), {"alpha": 1.2}), ValueError, r"alpha must be in \[0, 1\]"),
    ("negative alpha", ((X, Y), {"alpha": -0.5}), ValueError, r"alpha must be in \[0, 1\]"),
    ("alpha string", ((X, Y), {"alpha": "balanced"}), TypeError, "alpha must be a float"),
    ("alpha tensor length", ((X, Y), {"alpha": torch.rand(4)}), ValueError,
     r"one value for each of the 5 classes; got alpha of shape \[4\]"),
    ("alpha tensor values", ((X, Y), {"alpha": torch.tensor([0.1, 0.2, 1.5, 0.3, 0.4])}), ValueError,
     r"alpha values must be in \[0, 1\]; got 1.5"),
    ("integer alpha tensor", ((X, Y), {"alpha": torch.ones(5, dtype=torch.long)}), RuntimeError,
     "alpha must be a floating-point tensor"),
    ("target out of range", ((X, torch.tensor([0, 1, 7, 2])), {}), IndexError, r"Target 7 is out of bounds\."),
    ("negative target", ((X, torch.tensor([0, -3, 1, 2])), {}), IndexError, r"Target -3 is out of bounds\."),
    ("int32 target", ((X, Y.int()), {}), RuntimeError, "expected target dtype to be Long or Byte, but got Int"),
    ("target batch", ((X, Y[:3]), {}), ValueError, r"Expected input batch_size \(4\) to match target batch_size \(3\)\."),
    ("2d target", ((X, torch.zeros(4, 2, dtype=torch.long)), {}), RuntimeError, "0D or 1D target tensor expected"),
    ("spatial size", ((torch.randn(2, 5, 3, 4), torch.zeros(2, 3, 5, dtype=torch.long)), {}), RuntimeError,
     r"size mismatch \(got input: \[2, 5, 3, 4\] , target: \[2, 3, 5\]\)"),
    ("weight length", ((X, Y), {"weight": torch.ones(4)}), RuntimeError,
     r"weight tensor should be defined either for all 5 classes or no classes"),
    ("integer logits", ((X.long(), Y), {}), NotImplementedError, "input must be a floating-point tensor"),
    ("0-dim logits", ((torch.randn(()), torch.tensor(0)), {}), RuntimeError, "input must have a class dimension"),
    ("alpha on another device", ((X, Y), {"alpha": torch.rand(5, device="meta")}), RuntimeError,
     "expected all tensors on the same device"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,args,exc,match", SIGMOID_BAD, ids=[b[0] for b in SIGMOID_BAD])
def test_sigmoid_bad_input(name, args, exc, match, backend):
    backend_or_skip(backend)
    a, kw = args
    kw = {"backend": backend, **kw}
    with pytest.raises(exc, match=match):
        lossfuse.sigmoid_focal_loss(*a, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,args,exc,match", SOFTMAX_BAD, ids=[b[0] for b in SOFTMAX_BAD])
def test_softmax_bad_input(name, args, exc, match, backend):
    backend_or_skip(backend)
    a, kw = args
    with pytest.raises(exc, match=match):
        lossfuse.softmax_focal_loss(*a, backend=backend, **kw)


def test_module_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        lossfuse.SigmoidFocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="alpha must be in"):
        lossfuse.SigmoidFocalLoss(alpha=2.0)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        lossfuse.SoftmaxFocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        lossfuse.SoftmaxFocalLoss(backend="fast")


def test_sigmoid_module():
    cpu_kernels_or_skip()
    crit = lossfuse.SigmoidFocalLoss(alpha=0.3, gamma=1.5)
    assert crit.reduction == "mean" and "alpha=0.3, gamma=1.5" in repr(crit) and "backend='auto'" in repr(crit)
    x, t = sigmoid_case((10, 6), torch.float32, "hard")
    torch.testing.assert_close(crit(x, t), reference.sigmoid_focal_loss(x, t, 0.3, 1.5, "mean"))
    assert lossfuse.SigmoidFocalLoss(reduction="none")(x, t).shape == (10, 6)
    assert list(crit.state_dict()) == []


def test_softmax_module():
    cpu_kernels_or_skip()
    w, a = torch.rand(6) + 0.1, torch.rand(6)
    crit = lossfuse.SoftmaxFocalLoss(alpha=a, gamma=1.0, weight=w, ignore_index=2)
    assert set(crit.state_dict()) == {"weight", "alpha"}
    x = torch.randn(9, 6)
    y = torch.randint(0, 6, (9,))
    expected = reference.softmax_focal_loss(x, y, alpha=a, gamma=1.0, weight=w, ignore_index=2)
    torch.testing.assert_close(crit(x, y), expected)
    moved = crit.to(torch.float64)
    assert moved.weight.dtype == moved.alpha.dtype == torch.float64
    plain = lossfuse.SoftmaxFocalLoss()
    assert plain.weight is None and plain.alpha is None and list(plain.state_dict()) == []
    torch.testing.assert_close(lossfuse.SoftmaxFocalLoss(alpha=0.5, gamma=0.0)(x, y), 0.5 * F.cross_entropy(x, y))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_result_dtypes(backend):
    # Inputs of one dtype are the contract's (tests/contracts.py); integer targets and autocast are here.
    backend_or_skip(backend)
    y = torch.randint(0, 5, (4,))
    for dtype in DTYPES:
        assert lossfuse.sigmoid_focal_loss(torch.randn(4, 5, dtype=dtype), y, backend=backend).dtype == dtype
    for ac in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=ac):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(4, 5, dtype=dtype)
                assert lossfuse.softmax_focal_loss(x, y, backend=backend).dtype == torch.float32
                assert lossfuse.sigmoid_focal_loss(x, y, backend=backend).dtype == torch.float32
