"""Cross-entropy: parity with torch.nn.functional.cross_entropy, gradients, ops, compile, bad input.

Every kernel result is compared with torch (or lossfuse.reference) computed in float64 on the same,
freshly drawn random inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import (CLASS_OPTIONS, CPU_BACKENDS, DTYPES, NARROW_ISAS, assert_close, backend_or_skip, cpu_kernels_or_skip,
                     forced_cpu_isa, ulps_apart)

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

SHAPES = [(7, 3), (33, 1000), (4, 32001), (6, 1), (5,), (2, 5, 3, 4), (3, 7, 11), (2, 3, 2, 3, 2)]

OPTIONS = {
    **CLASS_OPTIONS,
    "smooth": {"label_smoothing": 0.1},
    "all": {"weight": True, "ignore": -100, "label_smoothing": 0.25},
    "prob": {"prob": True},
    "prob_all": {"prob": True, "weight": True, "label_smoothing": 0.2},
}


def num_classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


# Every shape with every option, but ignore_index=1 only where class 1 exists.
SHAPE_OPTIONS = [(shape, option) for shape in SHAPES for option in OPTIONS
                 if not (OPTIONS[option].get("ignore") == 1 and num_classes(shape) < 2)]


def make_case(shape, dtype, opts, device="cpu", scale=3.0):
    """Random logits, targets and weights for one grid cell."""
    C = num_classes(shape)
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    kw = {}
    if opts.get("prob"):
        cdim = 0 if len(shape) == 1 else 1
        target = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, dim=cdim).to(dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
        target = torch.randint(0, C, tshape)
        if "ignore" in opts:
            ign = opts["ignore"]
            kw["ignore_index"] = ign
            if target.dim() and target.numel() > 1:
                target[torch.rand(tshape) < 0.3] = ign
    if opts.get("weight"):
        kw["weight"] = (torch.rand(C, dtype=torch.float64) + 0.1).to(dtype)
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    return x.to(device), target.to(device), {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}


def torch_f64(x, target, reduction="mean", **kw):
    """torch's cross_entropy on float64 copies: the exact values a kernel should round."""
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    t = target.double() if target.is_floating_point() else target
    return F.cross_entropy(x.double(), t, reduction=reduction, **kw)


def grad_output_for(loss):
    # Non-uniform per-row upstream gradients catch "every row scaled by grad_output[0]" bugs.
    return torch.rand_like(loss, dtype=torch.float64) + 0.5 if loss.dim() else torch.tensor(1.7, dtype=torch.float64)


def check_grads(out, ref, leaves, leaves_ref, dtype):
    """The gradients of ``out`` for ``leaves`` (the input, then a probability target) against those of
    the float64 ``ref`` for ``leaves_ref``, under random per-row upstream gradients; returns them."""
    go = grad_output_for(ref)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, leaves_ref, go)
    for name, g, gr in zip(("input", "target"), grads, grads_ref):
        assert_close(g, gr, dtype, f"grad {name}")
    return grads


def rows_against_torch(x, y, label_smoothing, backend):
    """Per-row losses of float32 ``x`` against torch's in float64, checked; (leaf, loss, leaf64, ref)."""
    xr = x.clone().requires_grad_(True)
    out = lossfuse.cross_entropy(xr, y, reduction="none", label_smoothing=label_smoothing, backend=backend)
    xd = x.double().requires_grad_(True)
    ref = F.cross_entropy(xd, y, reduction="none", label_smoothing=label_smoothing)
    assert_close(out, ref, torch.float32, "loss")
    return xr, out, xd, ref


# ------------------------------------------------------------------------------------------------
# Parity grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,option", SHAPE_OPTIONS, ids=str)
def test_parity_with_torch(shape, option, dtype, reduction, backend):
    backend_or_skip(backend)
    opts = OPTIONS[option]
    x, target, kw = make_case(shape, dtype, opts)
    x.requires_grad_(True)
    prob = target.is_floating_point()
    if prob:
        target.requires_grad_(True)

    out = lossfuse.cross_entropy(x, target, reduction=reduction, backend=backend, **kw)
    xd = x.detach().double().requires_grad_(True)
    td = target.detach().double().requires_grad_(True) if prob else target
    ref = torch_f64(xd, td, reduction, **kw)

    assert out.dtype == (torch.promote_types(x.dtype, target.dtype) if prob else x.dtype)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "loss")

    grads = check_grads(out, ref, (x, target) if prob else (x,), (xd, td) if prob else (xd,), dtype)
    assert grads[0].dtype == x.dtype and grads[0].shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_and_cpu_agree_on_large_vocab(backend):
    """A wide row crosses several of the kernel's summation blocks and its online-max rescaling."""
    backend_or_skip(backend)
    x = torch.randn(3, 100_003) * 4
    x[1, 70_000] = 30.0  # the max arrives late in the row: the running sum must be rescaled
    x[2, :50_000] -= 40.0
    y = torch.tensor([5, 70_000, 99_999])
    for ls in (0.0, 0.3):
        xr, out, xd, ref = rows_against_torch(x, y, ls, backend)
        check_grads(out, ref, (xr,), (xd,), torch.float32)


# ------------------------------------------------------------------------------------------------
# Layouts: the kernels read strided views in place
# ------------------------------------------------------------------------------------------------

LAYOUTS = {
    "contiguous": lambda x: x,
    "transposed_2d": lambda x: x.t().contiguous().t() if x.dim() == 2 else x,
    "sliced_classes": lambda x: torch.cat([x, x], dim=1)[:, : x.shape[1]],
    "strided_classes": lambda x: torch.repeat_interleave(x, 2, dim=1)[:, ::2],  # class stride 2: copied once
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,
    "permuted_spatial": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() >= 3 else x,
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(9, 37), (3, 6, 5, 7)], ids=str)
@pytest.mark.parametrize("prob", [False, True])
def test_strided_inputs(shape, layout, prob, backend):
    backend_or_skip(backend)
    x0, target, kw = make_case(shape, torch.float32, {"prob": prob, "weight": True, "label_smoothing": 0.1})
    x = LAYOUTS[layout](x0.clone()).requires_grad_(True)
    assert torch.equal(x, x0)
    if prob:
        target = LAYOUTS[layout](target.clone()).requires_grad_(True)
    out = lossfuse.cross_entropy(x, target, reduction="none", backend=backend, **kw)
    xd = x0.double().requires_grad_(True)
    td = target.detach().double().requires_grad_(True) if prob else target
    ref = torch_f64(xd, td, "none", **kw)
    assert_close(out, ref, torch.float32, "loss")
    check_grads(out, ref, (x, target) if prob else (x,), (xd, td) if prob else (xd,), torch.float32)


@pytest.mark.parametrize("layout", ["rows", "channels_last", "transposed_rows"])
@pytest.mark.parametrize("opts", [{}, {"weight": True, "label_smoothing": 0.1, "ignore": -100}, {"prob": True, "weight": True}],
                         ids=["plain", "weight_smooth_ignore", "prob"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("classes", [2, 11, 32, 33])
def test_short_rows_gathered_into_tiles(layout, opts, inplace, classes):
    """Rows of few classes (class stride 1, C <= 32: kShortRowMaxClasses in csrc/walk.h)
    run the tile kernels on per-tile transposed copies; 33 classes take the row walk. Row counts that
    leave a partial last tile, every option, both target kinds, in place."""
    cpu_kernels_or_skip()
    shape = (701, classes) if layout != "channels_last" else (3, classes, 16, 15)
    x0, target, kw = make_case(shape, torch.float32, opts)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
        if target.is_floating_point():
            target = target.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed_rows":  # class stride != 1: the spatial tile walk, nothing gathered
        x0 = x0.t().contiguous().t()
    leaf = x0.clone().requires_grad_(True)
    prob = target.is_floating_point()
    tgt = target.clone().requires_grad_(True) if prob else target
    out = lossfuse.cross_entropy(leaf * 1, tgt, reduction="none", inplace_backward=inplace, backend="cpu", **kw)
    xd = x0.double().requires_grad_(True)
    td = target.double().requires_grad_(True) if prob else target
    ref = torch_f64(xd, td, "none", **kw)
    assert_close(out, ref, torch.float32, "loss")
    check_grads(out, ref, (leaf, tgt) if prob else (leaf,), (xd, td) if prob else (xd,), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "channels_last"])
def test_short_rows_gathered_on_every_thread(layout, dtype):
    """Enough short rows for every thread (the gathered tiles split in dynamic chunks; the fused
    loss.backward() path and a per-row upstream gradient), against float64 torch."""
    cpu_kernels_or_skip()
    shape = (30001, 10) if layout == "rows" else (5, 10, 77, 81)
    x0, target, kw = make_case(shape, dtype, {"ignore": -100})
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    xd = x0.double().requires_grad_(True)
    for reduction in ("mean", "none"):
        leaf = x0.clone().requires_grad_(True)
        out = lossfuse.cross_entropy(leaf, target, reduction=reduction, backend="cpu", **kw)
        ref = torch_f64(xd, target, reduction, **kw)
        assert_close(out, ref, dtype, f"{reduction} loss")
        go = torch.rand_like(ref) if reduction == "none" else torch.ones((), dtype=torch.float64)
        out.backward(go.to(out.dtype))
        (gref,) = torch.autograd.grad(ref, xd, go)
        assert_close(leaf.grad, gref, dtype, f"{reduction} grad")


def test_gradient_keeps_channels_last_layout():
    cpu_kernels_or_skip()
    x = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    lossfuse.cross_entropy(x, torch.randint(0, 5, (2, 4, 3))).backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_extreme_logits(dtype, backend):
    backend_or_skip(backend)
    big = 1e4 if dtype != torch.float16 else 3e4  # fp16 tops out at 65504
    x = ((torch.rand(6, 50, dtype=torch.float64) * 2 - 1) * big).to(dtype)
    x[0] = big  # all equal: uniform softmax
    x[1, 3] = big * 2  # one-hot softmax
    y = torch.randint(0, 50, (6,))
    y[1] = 3
    for ls in (0.0, 0.1):
        xr = x.clone().requires_grad_(True)
        out = lossfuse.cross_entropy(xr, y, reduction="none", label_smoothing=ls, backend=backend)
        xd = x.double().requires_grad_(True)
        ref = F.cross_entropy(xd, y, reduction="none", label_smoothing=ls)
        assert torch.isfinite(out).all()
        # lse = 1e4 + O(1) is itself only known to eps * 1e4 in the input's precision, and every
        # probability inherits that relative error -- in torch as here.
        rtol = torch.finfo(dtype).eps * big * 2
        assert_close(out, ref, dtype, "loss", rtol=max(rtol, 2 ** -7 if dtype == torch.bfloat16 else 0))
        go = torch.rand(6, dtype=torch.float64)
        (g,) = torch.autograd.grad(out, xr, go.to(dtype))
        (gr,) = torch.autograd.grad(ref, xd, go)
        assert_close(g, gr, dtype, "grad", rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_probabilities_are_not_flushed(backend):
    """Softmax values below the normal range survive into the gradient (exact subnormals or zeros)."""
    backend_or_skip(backend)
    x = torch.zeros(4, 64, dtype=torch.float64)
    x[:, 1:] = -torch.linspace(80, 120, 63, dtype=torch.float64)  # p down to e^-120, partly subnormal
    x = x.float().requires_grad_(True)
    y = torch.zeros(4, dtype=torch.long)
    lossfuse.cross_entropy(x, y, reduction="sum", backend=backend).backward()
    ref = torch.softmax(x.detach().double(), 1)
    ref[:, 0] = -ref[:, 1:].sum(1)  # p_0 - 1: in float64 1 - 3.8e-35 would round to exactly 0
    expected = ref.float()  # the float64 value rounded once to fp32
    assert (expected[:, 1:] != 0).any() and (expected[:, 1:] < 1.17e-38).any()
    # The reference is plain torch autograd: like torch, it returns exactly 0 at the target (p_0 - 1
    # cancels in fp32). The kernels keep -3.8e-35 there.
    cols = slice(1, None) if backend == "reference" else slice(None)
    assert torch.equal(x.grad[:, cols] == 0, expected[:, cols] == 0), "elements flushed to zero"
    assert ulps_apart(x.grad[:, cols], ref[:, cols], torch.float32).max() <= 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_propagate_as_torch(backend):
    backend_or_skip(backend)
    nan, inf = float("nan"), float("inf")
    x = torch.randn(6, 5)
    x[0, 2] = nan
    x[1, 0] = inf
    x[2, 4] = -inf  # finite loss, zero probability there
    x[3] = -inf  # whole row -inf: NaN
    y = torch.tensor([0, 1, 1, 2, 3, 0])
    for red in ("none", "sum"):
        out = lossfuse.cross_entropy(x, y, reduction=red, backend=backend)
        ref = F.cross_entropy(x.double(), y, reduction=red)
        assert_close(out, ref, torch.float32, red)
    xr = x.clone().requires_grad_(True)
    lossfuse.cross_entropy(xr, y, reduction="none", backend=backend).sum().backward()
    xd = x.double().requires_grad_(True)
    F.cross_entropy(xd, y, reduction="none").sum().backward()
    assert_close(xr.grad, xd.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_vocabulary_block(backend):
    """A whole block of -inf logits (a masked vocabulary tail) keeps the online max correct."""
    backend_or_skip(backend)
    x = torch.randn(3, 9000)
    x[:, :4096] = -float("inf")
    x[1, 8000:] = -float("inf")
    y = torch.tensor([5000, 4100, 8999])
    for ls in (0.0, 0.2):
        xr, out, xd, ref = rows_against_torch(x, y, ls, backend)
        if ls == 0.0:  # with smoothing the -inf logits make the loss inf
            check_grads(out, ref, (xr,), (xd,), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_all_ignored(backend):
    backend_or_skip(backend)
    empty = torch.randn(0, 5, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(lossfuse.cross_entropy(empty, t, backend=backend))
    assert lossfuse.cross_entropy(empty, t, reduction="sum", backend=backend).item() == 0
    assert lossfuse.cross_entropy(empty, t, reduction="none", backend=backend).shape == (0,)
    assert torch.isnan(lossfuse.cross_entropy(torch.randn(0, 5), torch.rand(0, 5), backend=backend))
    x = torch.randn(4, 5, requires_grad=True)
    ign = torch.full((4,), -100)
    out = lossfuse.cross_entropy(x, ign, backend=backend)
    assert torch.isnan(out)  # 0 / 0, as torch
    assert lossfuse.cross_entropy(x, ign, reduction="sum", backend=backend).item() == 0
    lossfuse.cross_entropy(x, ign, reduction="sum", backend=backend).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_ignored_rows_get_exact_zero_gradient_even_with_nan_logits():
    cpu_kernels_or_skip()
    for shape, y in [((3, 4), torch.tensor([1, -100, 2])), ((1, 4, 3), torch.tensor([[1, -100, 2]]))]:
        x = torch.randn(shape)
        if len(shape) == 3:
            x[0, :, 1] = float("nan")
        else:
            x[1] = float("nan")
        x.requires_grad_(True)
        lossfuse.cross_entropy(x, y, reduction="sum").backward()
        ignored = x.grad[1] if len(shape) == 2 else x.grad[0, :, 1]
        assert torch.equal(ignored, torch.zeros_like(ignored))


def test_confident_prediction_keeps_small_gradient():
    """p_y - 1 by expm1: a gradient of -1e-6 at the target does not cancel to 0."""
    cpu_kernels_or_skip()
    x = torch.tensor([[20.0, 0.0, 6.0]], requires_grad=True)
    y = torch.tensor([0])
    lossfuse.cross_entropy(x, y).backward()
    xd = x.detach().double().requires_grad_(True)
    F.cross_entropy(xd, y).backward()
    assert xd.grad[0, 0] < 0 and x.grad[0, 0] != 0
    assert_close(x.grad, xd.grad, torch.float32, "grad")


def confident_rows(shape, gen=None):
    """Logits whose target holds the row max by a margin of ~9 or more: losses of 1e-6 .. 1e-3, with
    a few rows of ties (every logit equal: the loss is log C) and one row of two maxima."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    n, c = shape[0], shape[1]
    y = torch.randint(0, c, (n,) + tuple(shape[2:]), generator=gen)
    x.scatter_(1, y.unsqueeze(1), 18.0)
    x[0] = 5.0
    x[1].select(0, (int(y.view(n, -1)[1, 0]) + 1) % c).fill_(18.0)
    return x.float(), y


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("shape", [(37, 19), (600, 23), (37, 1000), (4, 37, 20)], ids=str)
def test_confident_rows_keep_their_tiny_loss(shape, prob):
    """A confident prediction's loss log(1 + sum_{c != y} e^(x_c - x_y)) ~ 1e-6 to float32 precision
    (relative 1e-6), where 1 + rest summed in float32 keeps only its rounding: torch's float32 kernels
    miss such losses by up to 50%. Covers the row walk, short rows gathered into tiles, and the spatial tile walk."""
    cpu_kernels_or_skip()
    x, y = confident_rows(shape)
    t = F.one_hot(y, shape[1]).movedim(-1, 1).float() if prob else y
    ref = F.cross_entropy(x.double(), t.double() if prob else t, reduction="none")
    out = lossfuse.cross_entropy(x, t, reduction="none", backend="cpu")
    assert ref.min() < 1e-3  # the case is there
    rel = ((out.double() - ref) / ref).abs().max().item()
    assert rel < 4e-6, f"worst relative error {rel:.3g}"


# ------------------------------------------------------------------------------------------------
# Mixed precision: the loss scale is applied before the single cast
# ------------------------------------------------------------------------------------------------


def _float64_grad_scaled(x, y, scale):
    xd = x.detach().double().requires_grad_(True)
    F.cross_entropy(xd, y).backward()
    return xd.grad * scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_scaling_under_autocast(dtype, backend):
    """GradScaler's first step: autocast forward (fp32 loss), backward with grad_output 2^16.

    fp16 at N=1024, C=32000: softmax/N falls below fp16's smallest subnormal (6e-8) for most entries,
    so a kernel that divides by N or casts before applying the scale flushes them to zero.
    """
    backend_or_skip(backend)
    N, C, scale = 1024, 32000, 2.0 ** 16
    x = torch.randn(N, C, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, C, (N,))
    with torch.autocast("cpu", dtype=dtype):
        loss = lossfuse.cross_entropy(x, y, backend=backend)
    assert loss.dtype == torch.float32
    (loss * scale).backward()
    expected = _float64_grad_scaled(x, y, scale)
    ulps = ulps_apart(x.grad, expected, dtype)
    assert ulps.max().item() <= 1.0, f"max {ulps.max().item():.2f} ulp"
    assert torch.equal(x.grad == 0, expected.to(dtype) == 0), "different elements flushed to zero"
    # The check is sharp: forming the gradient in fp16 first and scaling afterwards fails it.
    if dtype == torch.float16:
        naive = (torch.softmax(x.detach().float(), 1) / N).to(dtype).double() * scale
        naive[torch.arange(N), y] = expected[torch.arange(N), y]
        assert not torch.equal(naive.to(dtype) == 0, expected.to(dtype) == 0)


# ------------------------------------------------------------------------------------------------
# float64 gradcheck of the CPU kernels, per option that changes the math
# ------------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "plain": ((6, 5), {}),
    "weight": ((6, 5), {"weight": True}),
    "ignore": ((6, 5), {"ignore": -100}),
    "smoothing": ((6, 5), {"label_smoothing": 0.3}),
    "weight_smoothing_ignore": ((6, 5), {"weight": True, "label_smoothing": 0.3, "ignore": -100}),
    "spatial": ((2, 4, 3, 5), {"weight": True, "label_smoothing": 0.2}),
    "one_dim": ((7,), {}),
    "prob": ((6, 5), {"prob": True}),
    "prob_weight_smoothing": ((6, 5), {"prob": True, "weight": True, "label_smoothing": 0.3}),
    "prob_spatial": ((2, 4, 3, 5), {"prob": True, "weight": True}),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_cpu_kernel(case, reduction):
    cpu_kernels_or_skip()
    shape, opts = GRADCHECK_CASES[case]
    x, target, kw = make_case(shape, torch.float64, opts)
    x.requires_grad_(True)
    inputs = (x,)
    if target.is_floating_point():
        target.requires_grad_(True)
        inputs = (x, target)

        def fn(x, t):
            return lossfuse.cross_entropy(x, t, reduction=reduction, backend="cpu", **kw)
    else:

        def fn(x):
            return lossfuse.cross_entropy(x, target, reduction=reduction, backend="cpu", **kw)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_transposed_and_channels_last():
    cpu_kernels_or_skip()
    x = torch.randn(5, 6, dtype=torch.float64).t().requires_grad_(True)  # (6, 5), class stride 6
    y = torch.randint(0, 5, (6,))
    assert torch.autograd.gradcheck(lambda x: lossfuse.cross_entropy(x, y, label_smoothing=0.1), (x,))
    z = torch.randn(2, 3, 4, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    z.requires_grad_(True)
    yz = torch.randint(0, 3, (2, 4, 2))
    assert torch.autograd.gradcheck(lambda z: lossfuse.cross_entropy(z, yz, reduction="none"), (z,))


# ------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------------


def _op_args(prob, layout):
    x = torch.randn(4, 7, 5)
    if layout == "classes":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if prob:
        t = torch.softmax(torch.randn(4, 7, 5), 1)
    else:
        t = torch.randint(0, 7, (4, 5))
        t[0, 0] = -100
    return x, t, torch.rand(7) + 0.5


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("layout", ["classes", "spatial"])
@pytest.mark.parametrize("extras", [(0.0, 0.0), (1e-3, 5.0)], ids=["plain", "zloss_softcap"])
def test_opcheck(prob, layout, extras):
    cpu_kernels_or_skip()
    x, t, w = _op_args(prob, layout)
    z, cap = extras
    fwd = torch.ops.lossfuse.cross_entropy_fwd
    bwd = torch.ops.lossfuse.cross_entropy_bwd
    torch.library.opcheck(fwd, (x, t, w, -100, 0.1, z, cap))
    torch.library.opcheck(fwd, (x, t, None, -100, 0.0, z, cap))
    _, lse = fwd(x, t, w, -100, 0.1, z, cap)
    g = torch.rand(4, 5)
    torch.library.opcheck(bwd, (g, x, t, w, lse, -100, 0.1, z, cap, True, prob))
    torch.library.opcheck(bwd, (torch.tensor(0.5).expand(4, 5), x, t, None, lse, -100, 0.0, z, cap, True, False))
    # The in-place backward mutates its logits argument, as its schema declares.
    torch.library.opcheck(torch.ops.lossfuse.cross_entropy_bwd_inplace,
                          (g, x.clone(), t, w, lse, -100, 0.1, z, cap, prob))


def test_ops_reject_out_of_range_target_directly():
    """The ops are public: even called directly, a bad target raises instead of reading out of bounds."""
    cpu_kernels_or_skip()
    x = torch.randn(3, 4, 1)
    t = torch.tensor([[0], [4], [1]])
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        torch.ops.lossfuse.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, 0.0)
    lse = torch.zeros(3, 1)
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        torch.ops.lossfuse.cross_entropy_bwd(torch.ones(3, 1), x, t, None, lse, -100, 0.0, 0.0, 0.0, True, False)


# ------------------------------------------------------------------------------------------------
# The fused path: the forward also writes the gradient (ops/cross_entropy.py)
# ------------------------------------------------------------------------------------------------

FUSED_OPTIONS = {
    "plain": {},
    "weight_ignore": {"weight": True, "ignore": -100},
    "zloss": {"z_loss": 1e-3},
    "smoothing": {"label_smoothing": 0.1, "weight": True},
    "softcap": {"softcap": 20.0},
}


def _unfused(x, y, reduction, kw):
    """The same loss through the autograd Function without the fused path: forward and backward kernels."""
    return lossfuse.CrossEntropyFunction.apply(
        x, y, kw.get("weight"), kw.get("ignore_index", -100), reduction, kw.get("label_smoothing", 0.0),
        float(kw.get("z_loss", 0.0)), float(kw.get("softcap") or 0.0), False, "cpu", False)[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", list(FUSED_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(300, 40), (24, 9000), (6, 3, 5), (2, 5, 8, 16), (600, 20)], ids=str)
def test_fused_gradient_matches_backward_kernel(shape, dtype, option, reduction):
    """The gradient the fused forward writes (loss.backward()) against the backward kernel's: float64
    bit for bit; float32 and bfloat16 -- whose short rows take one exp per element, p_c from the exps
    summed rather than from the lse -- as close to float64 as the backward kernel's, on average and at
    worst within a few ulps. grad_output != 1 and a retained graph's second use agree too."""
    cpu_kernels_or_skip()
    opts = dict(FUSED_OPTIONS[option])
    extra = {k: opts.pop(k) for k in ("z_loss", "softcap") if k in opts}
    x, y, kw = make_case(shape, dtype, opts)
    kw.update(extra)
    x.requires_grad_(True)
    (g_unfused,) = torch.autograd.grad(_unfused(x, y, reduction, kw), x)
    out = lossfuse.cross_entropy(x, y, reduction=reduction, **kw)
    if dtype == torch.float64:
        assert torch.equal(out.detach(), _unfused(x, y, reduction, kw).detach())
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 3.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out, x)
    (g_unfused3,) = torch.autograd.grad(_unfused(x, y, reduction, kw) * 3.0, x)
    if dtype == torch.float64:
        assert torch.equal(g1, g_unfused)
        assert torch.equal(g3, g_unfused)  # the retained graph's second use runs the backward kernel
    else:
        xd = x.detach().double().requires_grad_(True)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        ref = lossfuse.reference.cross_entropy(xd, y, kw64.get("weight"), kw64.get("ignore_index", -100), reduction,
                                               kw64.get("label_smoothing", 0.0), z_loss=kw64.get("z_loss", 0.0),
                                               softcap=kw64.get("softcap"))
        (g64,) = torch.autograd.grad(ref, xd)
        assert_close(g1, g64, dtype, "fused")
        unfused_err = ulps_apart(g_unfused, g64, dtype)
        fused_err = ulps_apart(g1, g64, dtype)
        assert fused_err.mean() <= unfused_err.mean() * 1.05 + 0.01
        assert fused_err.max() <= unfused_err.max() + 4
        # The retained graph's second use runs the backward kernel, on the fused forward's lse: up to
        # 4096 classes the unfused forward's bits; over it, summed against the row max rather than a
        # running one, an lse apart by rounding (the gradients then by as much as either is from float64).
        if shape[1] <= 4096:
            assert torch.equal(g3, g_unfused)
        else:
            assert ulps_apart(g3, g64, dtype).max() <= unfused_err.max() + 4
    if dtype == torch.bfloat16:
        # A bfloat16 gradient must be scaled before its one cast: grad_output 3 runs the backward kernel.
        if shape[1] <= 4096:
            assert torch.equal(g2, g_unfused3)
        else:
            assert_close(g2, g_unfused3.double(), dtype, "scaled")
    else:
        assert_close(g2, 3 * g_unfused.double(), dtype, "scaled")


def test_fused_gradient_keeps_the_losses_bits():
    """Rows of at most 4096 classes: the fused forward's statistics are the unfused forward's, so the
    loss is bit for bit the same (float32 and bfloat16; float64 everywhere)."""
    cpu_kernels_or_skip()
    for dtype in (torch.float32, torch.bfloat16):
        x, y, kw = make_case((257, 1000), dtype, {"weight": True, "ignore": -100})
        x.requires_grad_(True)
        assert torch.equal(lossfuse.cross_entropy(x, y, **kw), _unfused(x, y, "mean", kw))


@pytest.mark.parametrize("layout", ["spatial", "short_rows"])
def test_fused_tile_gradient_at_a_confident_target(layout):
    """The one-exp fused tiles form p_y - 1 from the forward's sums where the target holds the max
    (-(S - 1) / S from the other terms): a gradient of -1e-9 at a confident target keeps its relative
    precision instead of cancelling against 1. Ties for the max, targets off the max and ignored rows
    in the same tiles."""
    cpu_kernels_or_skip()
    g = torch.Generator().manual_seed(7)
    n, c, s = 3, 21, 200
    x = torch.randn(n, c, s, generator=g)
    y = torch.randint(0, c, (n, s), generator=g)
    margin = torch.linspace(2.0, 30.0, s)  # p_y - 1 from about -3 to -2e-12
    xs = x.permute(0, 2, 1)  # (n, s, c) view of the same storage
    for i in range(n):
        xs[i, torch.arange(s), y[i]] = margin + 1.0
    x[:, 0, ::7] = torch.gather(x, 1, y.unsqueeze(1))[:, 0, ::7]  # ties with the target every 7th position
    y[:, 3::11] = -100
    if layout == "short_rows":  # (N, C) rows of 21 classes: gathered into tiles
        x, y = x.permute(0, 2, 1).reshape(-1, c).contiguous(), y.reshape(-1)
    x.requires_grad_(True)
    lossfuse.cross_entropy(x, y, reduction="sum").backward()
    xd = x.detach().double().requires_grad_(True)
    F.cross_entropy(xd, y, reduction="sum").backward()
    assert_close(x.grad, xd.grad, torch.float32, "grad")
    # p_y - 1 in float64 without its cancellation (float64 autograd forms p_y, then subtracts 1, which
    # leaves 1e-4 relative error at p_y - 1 = -1e-12): -sum_{c != y} e_c / sum_c e_c.
    rows, grad = (xd.detach(), x.grad) if layout == "short_rows" else (xd.detach().transpose(1, 2), x.grad.transpose(1, 2))
    rows, grad, yr = rows.reshape(-1, c), grad.reshape(-1, c), y.reshape(-1)
    keep = yr != -100
    rows, grad, yr = rows[keep], grad[keep], yr[keep]
    e = (rows - rows.max(1, keepdim=True).values).exp()
    others = e.scatter(1, yr.unsqueeze(1), 0.0).sum(1)
    ref = -others / e.sum(1)
    got = grad.gather(1, yr.unsqueeze(1)).squeeze(1).double()
    rel = ((got - ref) / ref).abs()
    assert (ref > -1e-9).any() and (ref < -0.1).any()
    assert rel.max() < 8 * torch.finfo(torch.float32).eps, rel.max()


def test_fused_rows_with_a_spread_beyond_the_normal_range():
    """Logits spread by more than 87 (exps below float32's normal range) and rows of -inf: the fused
    walk hands such rows to the two-exp path, whose exact redo keeps the subnormal probabilities."""
    cpu_kernels_or_skip()
    x = torch.randn(16, 5000) * 3
    x[3, 7] = 95.0                       # every other exp of the row is subnormal or 0
    x[5, :100] = -100.0                  # some exps of the row underflow below the normal range
    x[9, 2000:] = float("-inf")          # a masked part of the vocabulary
    y = torch.randint(0, 2000, (16,))
    y[3] = 7
    x.requires_grad_(True)
    loss = lossfuse.cross_entropy(x, y)
    loss.backward()
    xd = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(xd, y)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(x.grad, xd.grad, torch.float32, "grad")
    tiny = torch.finfo(torch.float32).tiny
    nz = (xd.grad.abs() > tiny * 2.0**-20) & (xd.grad.abs() < tiny)  # subnormal in float32, not rounding to 0
    assert nz.any() and (x.grad[nz] != 0).all()  # subnormal gradients are kept, not flushed


def test_fused_path_reports_a_bad_target():
    cpu_kernels_or_skip()
    x = torch.randn(4, 10, requires_grad=True)
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        lossfuse.cross_entropy(x, torch.tensor([1, 10, 2, 3]))


def test_fused_gradient_is_adopted_without_a_copy():
    """loss.backward(): .grad is the very tensor the fused forward wrote (no clone by autograd)."""
    cpu_kernels_or_skip()
    x = torch.randn(64, 1000, requires_grad=True)
    ptrs = []
    x.register_hook(lambda g: ptrs.append(g.data_ptr()))  # keeps no reference to the tensor
    lossfuse.cross_entropy(x, torch.randint(0, 1000, (64,))).backward()
    assert x.grad.data_ptr() == ptrs[-1]


# Past csrc/cross_entropy.cpp's 65536-row blocks: rows, (N, C, S) with S split across blocks (one
# partial), and a channels-last (row walk) layout whose S is split too.
BLOCKED = {
    "rows": lambda: torch.randn(140001, 7),
    "spatial": lambda: torch.randn(3, 5, 70000),
    "channels-last": lambda: torch.randn(2, 4, 300, 250).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", list(BLOCKED))
def test_fused_sum_walks_blocks_as_one_call(layout):
    """Short rows take lossfuse::cross_entropy_fused_sum (no per-row loss or lse): its gradient is
    cross_entropy_fused's bit for bit, its sum the same losses summed, at every block boundary."""
    cpu_kernels_or_skip()
    x = BLOCKED[layout]()
    c = x.shape[1]
    shape = (x.shape[0],) + tuple(x.shape[2:])
    y = torch.randint(0, c, shape)
    y[torch.rand(shape) < 0.1] = -100
    w = torch.rand(c) + 0.5
    x3 = x.reshape(x.shape[0], c, -1)
    y2 = y.reshape(x.shape[0], -1)
    for weight, opts in ((None, (-100, 0.0, 0.0, 0.0)), (w, (-100, 0.1, 1e-3, 0.0)), (None, (-100, 0.0, 0.0, 3.0))):
        total, gx = torch.ops.lossfuse.cross_entropy_fused_sum(x3, y2, weight, *opts, 0.5)
        loss, _, gx_rows = torch.ops.lossfuse.cross_entropy_fused(x3, y2, weight, *opts, 0.5)
        assert torch.equal(gx, gx_rows) and gx.stride() == gx_rows.stride()
        assert total.dtype == torch.float32 and total.dim() == 0
        torch.testing.assert_close(total.double(), loss.double().sum(), rtol=1e-6, atol=0)
    # through the public function: the float64 reference
    xr = x.clone().requires_grad_(True)
    out = lossfuse.cross_entropy(xr, y, weight=w)
    out.backward()
    xd = x.double().requires_grad_(True)
    ref = F.cross_entropy(xd, y, weight=w.double())
    ref.backward()
    assert_close(out, ref, torch.float32, f"{layout} loss")
    assert_close(xr.grad, xd.grad, torch.float32, f"{layout} grad")
    # a bad target in the last block is reported, as torch does
    y.view(-1)[-1] = c
    with pytest.raises(IndexError, match=f"Target {c} is out of bounds"):
        lossfuse.cross_entropy(x.clone().requires_grad_(True), y)


@pytest.mark.parametrize("shape", [(0, 21), (4, 21, 0), (0, 21, 5), (3, 21, 1)], ids=str)
def test_fused_sum_of_empty_and_single_inputs(shape):
    """No rows, no spatial positions: torch's empty sum (0) and mean (NaN), and an empty gradient."""
    cpu_kernels_or_skip()
    y = torch.randint(0, 21, (shape[0],) + shape[2:])
    for reduction in ("mean", "sum"):
        x = torch.randn(*shape, requires_grad=True)
        out = lossfuse.cross_entropy(x, y, reduction=reduction)
        out.backward()
        xd = x.detach().double().requires_grad_(True)
        ref = F.cross_entropy(xd, y, reduction=reduction)
        ref.backward()
        torch.testing.assert_close(out.double(), ref, equal_nan=True)
        torch.testing.assert_close(x.grad.double(), xd.grad, equal_nan=True)


def test_fused_sum_backward_recomputes_the_lse():
    """No lse is kept for short rows: a bfloat16 gradient for grad_output != 1 and a retained graph's
    second backward recompute it, and equal the unfused backward bit for bit."""
    cpu_kernels_or_skip()
    for dtype in (torch.float32, torch.bfloat16):
        x, y, kw = make_case((2, 6, 40, 33), dtype, {"weight": True, "ignore": -100})
        x.requires_grad_(True)
        out = lossfuse.cross_entropy(x, y, **kw)
        assert out.grad_fn.saved_tensors[3] is None  # the (x3, t3, weight, lse, denom) the Function saved
        (g_first,) = torch.autograd.grad(out, x, retain_graph=True)
        (g_again,) = torch.autograd.grad(out * 3.0, x)
        (g_unfused,) = torch.autograd.grad(_unfused(x, y, "mean", kw) * 3.0, x)
        assert torch.equal(g_again, g_unfused)
        assert_close(g_first * 3.0, g_unfused.double(), dtype, "first backward")


def test_opcheck_fused_sum():
    cpu_kernels_or_skip()
    for layout in ("classes", "spatial"):
        x, t, w = _op_args(False, layout)
        op = torch.ops.lossfuse.cross_entropy_fused_sum
        torch.library.opcheck(op, (x, t, w, -100, 0.1, 1e-3, 0.0, 0.25))
        torch.library.opcheck(op, (x, t, None, -100, 0.0, 0.0, 5.0, 1.0))


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("layout", ["classes", "spatial"])
def test_opcheck_fused(prob, layout):
    cpu_kernels_or_skip()
    x, t, w = _op_args(prob, layout)
    op = torch.ops.lossfuse.cross_entropy_fused
    torch.library.opcheck(op, (x, t, w, -100, 0.1, 1e-3, 0.0, 0.25))
    torch.library.opcheck(op, (x, t, None, -100, 0.0, 0.0, 5.0, 1.0))
    loss, lse, gx = op(x, t, w, -100, 0.1, 1e-3, 0.0, 0.25)
    loss2, lse2 = torch.ops.lossfuse.cross_entropy_fwd(x, t, w, -100, 0.1, 1e-3, 0.0)
    gx2, _ = torch.ops.lossfuse.cross_entropy_bwd(torch.tensor(0.25).expand(4, 5), x, t, w, lse2, -100, 0.1, 1e-3,
                                                 0.0, True, False)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    torch.testing.assert_close(gx, gx2, atol=1e-6, rtol=1e-5)
    assert gx.stride() == gx2.stride()


# ------------------------------------------------------------------------------------------------
# Bad input: torch's exception type and message
# ------------------------------------------------------------------------------------------------

X = torch.randn(4, 5)
Y = torch.tensor([0, 1, 3, 2])

# (name, (args, kwargs), exception, message, torch raises the same exception type)
BAD_INPUTS = [
    ("target out of range", ((X, torch.tensor([0, 1, 7, 2])), {}), IndexError, r"Target 7 is out of bounds\.", True),
    ("negative target", ((X, torch.tensor([0, -3, 1, 2])), {}), IndexError, r"Target -3 is out of bounds\.", True),
    ("oob with reduction none", ((X, torch.tensor([0, 1, 5, 2])), {"reduction": "none"}), IndexError, "Target 5 is out of bounds", True),
    ("oob spatial", ((torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])), {}), IndexError, "Target 3 is out of bounds", True),
    ("int32 target", ((X, Y.int()), {}), RuntimeError, "expected target dtype to be Long or Byte, but got Int", True),
    ("bool target", ((X, Y.bool()), {}), RuntimeError, "but got Bool", True),
    ("target batch", ((X, Y[:3]), {}), ValueError, r"Expected input batch_size \(4\) to match target batch_size \(3\)\.", True),
    ("2d target for 2d input", ((X, torch.zeros(4, 2, dtype=torch.long)), {}), RuntimeError, "0D or 1D target tensor expected, multi-target not supported", True),
    ("prob target wrong shape", ((X, torch.rand(4, 6)), {}), RuntimeError, "0D or 1D target tensor expected", True),
    ("spatial target dims", ((torch.randn(2, 5, 3, 4), torch.zeros(2, 12, dtype=torch.long)), {}), RuntimeError, r"only batches of spatial targets supported \(3D tensors\) but got targets of dimension: 2", True),
    ("spatial size mismatch", ((torch.randn(2, 5, 3, 4), torch.zeros(2, 3, 5, dtype=torch.long)), {}), RuntimeError, r"size mismatch \(got input: \[2, 5, 3, 4\] , target: \[2, 3, 5\]\)", True),
    ("integer probabilities", ((X, torch.zeros(4, 5, dtype=torch.long)), {}), RuntimeError, "Expected floating point type for target with class probabilities, got Long", True),
    ("ignore_index with probabilities", ((X, torch.rand(4, 5)), {"ignore_index": 1}), RuntimeError, "ignore_index is not supported for floating point target", True),
    ("weight length", ((X, Y), {"weight": torch.ones(4)}), RuntimeError, r"weight tensor should be defined either for all 5 classes or no classes but got weight tensor of shape: \[4\]", True),
    ("weight 2d", ((X, Y), {"weight": torch.ones(1, 5)}), RuntimeError, r"got weight tensor of shape: \[1, 5\]", True),
    ("weight length prob", ((X, torch.rand(4, 5)), {"weight": torch.ones(3)}), RuntimeError, "cross_entropy: weight tensor should be defined either for all 5 classes", True),
    ("integer weight", ((X, Y), {"weight": torch.ones(5, dtype=torch.long)}), RuntimeError, "weight must be a floating-point tensor", True),
    ("label_smoothing > 1", ((X, Y), {"label_smoothing": 1.5}), RuntimeError, r"label_smoothing must be between 0\.0 and 1\.0\. Got: 1\.5", True),
    # torch silently treats a negative label_smoothing as 0; lossfuse refuses it.
    ("label_smoothing < 0", ((X, Y), {"label_smoothing": -0.1}), RuntimeError, "label_smoothing must be between 0.0 and 1.0", False),
    ("integer logits", ((torch.ones(4, 5, dtype=torch.long), Y), {}), NotImplementedError, "input must be a floating-point tensor", True),
    ("complex logits", ((torch.randn(4, 5, dtype=torch.complex64), Y), {}), NotImplementedError, "got torch.complex64", True),
    ("0-dim logits", ((torch.randn(()), torch.tensor(0)), {}), RuntimeError, "input must have a class dimension", True),
    ("unknown reduction", ((X, Y), {"reduction": "avg"}), ValueError, "avg is not a valid value for reduction", True),
    ("target on another device", ((X, Y.to("meta")), {}), RuntimeError, "expected all tensors on the same device", True),
]
BAD_IDS = [b[0] for b in BAD_INPUTS]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,args,exc,match,torch_same", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input(name, args, exc, match, torch_same, backend):
    backend_or_skip(backend)
    a, kw = args
    with pytest.raises(exc, match=match):
        lossfuse.cross_entropy(*a, backend=backend, **kw)


@pytest.mark.parametrize("name,args,exc,match,torch_same", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_exception_type_matches_torch(name, args, exc, match, torch_same):
    """Code that catches torch's exception catches ours: same type wherever torch raises too."""
    a, kw = args
    if not torch_same:
        # Documented differences: torch accepts these (or words them through another path).
        try:
            F.cross_entropy(*a, **kw)
        except Exception as e:  # noqa: BLE001
            assert not isinstance(e, exc)
        return
    with pytest.raises(exc):
        F.cross_entropy(*a, **kw)


# ------------------------------------------------------------------------------------------------
# Legacy arguments, autocast dtypes, the module
# ------------------------------------------------------------------------------------------------


def test_legacy_size_average_and_reduce():
    cpu_kernels_or_skip()
    x = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    for sa, red in [(False, None), (True, None), (None, False), (False, False)]:
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(x, y, size_average=sa, reduce=red)
        with pytest.warns(UserWarning):
            got = lossfuse.cross_entropy(x, y, size_average=sa, reduce=red)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_result_dtypes_match_torch(backend):
    backend_or_skip(backend)
    y = torch.randint(0, 5, (4,))
    for dtype in DTYPES:
        x = torch.randn(4, 5, dtype=dtype)
        assert lossfuse.cross_entropy(x, y, backend=backend).dtype == F.cross_entropy(x, y).dtype
        for tdtype in DTYPES:
            t = torch.rand(4, 5, dtype=tdtype)
            assert lossfuse.cross_entropy(x, t, backend=backend).dtype == F.cross_entropy(x, t).dtype
    for ac in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=ac):
            for dtype in DTYPES:
                x = torch.randn(4, 5, dtype=dtype)
                assert lossfuse.cross_entropy(x, y, backend=backend).dtype == F.cross_entropy(x, y).dtype


def test_uint8_targets():
    cpu_kernels_or_skip()
    x = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,), dtype=torch.uint8)
    torch.testing.assert_close(lossfuse.cross_entropy(x, y), F.cross_entropy(x, y))


def test_module_is_a_drop_in():
    cpu_kernels_or_skip()
    w = torch.rand(6)
    ours = lossfuse.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert torch.equal(ours.state_dict()["weight"], w)
    ours.load_state_dict({"weight": w * 2})
    theirs.load_state_dict({"weight": w * 2})
    x = torch.randn(9, 6, requires_grad=True)
    y = torch.randint(0, 6, (9,))
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    assert "backend='auto'" in repr(ours)
    moved = ours.to(torch.float64)
    assert moved.weight.dtype == torch.float64
    assert lossfuse.CrossEntropyLoss(reduction="sum")(x, y).shape == ()
    with pytest.warns(UserWarning):
        legacy = lossfuse.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


# ------------------------------------------------------------------------------------------------
# Backend selection and the fallback without the extension
# ------------------------------------------------------------------------------------------------


def test_env_overrides_auto(monkeypatch):
    x = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    monkeypatch.setenv("LOSSFUSE_BACKEND", "reference")
    out = lossfuse.cross_entropy(x, y)
    assert out.grad_fn is None or "CrossEntropyFunction" not in type(out.grad_fn).__name__
    x.requires_grad_(True)
    out = lossfuse.cross_entropy(x, y)
    assert "CrossEntropyFunction" not in type(out.grad_fn).__name__
    monkeypatch.setenv("LOSSFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LOSSFUSE_BACKEND must be one of"):
        lossfuse.cross_entropy(x, y)
    # An explicit backend is not overridden.
    if lossfuse.cpu_kernels_available():
        assert "CrossEntropyFunction" in type(lossfuse.cross_entropy(x, y, backend="cpu").grad_fn).__name__


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from helpers import HAS_TRITON

    expected = "runs on CUDA tensors" if HAS_TRITON else "needs the triton package"
    with pytest.raises(RuntimeError, match=expected):
        lossfuse.cross_entropy(X, Y, backend="triton")


def test_package_works_without_the_extension():
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import lossfuse
            x = torch.randn(5, 4, requires_grad=True); y = torch.tensor([0, 1, 2, 3, 0])
            a = lossfuse.cross_entropy(x, y); b = lossfuse.cross_entropy(x, y)
        msgs = [str(w.message) for w in caught if "falling back" in str(w.message)]
        assert len(msgs) == 1, msgs
        torch.testing.assert_close(a, torch.nn.functional.cross_entropy(x, y))
        a.backward()
        assert lossfuse.available_backends("cpu")[-1] == "reference"
        try:
            lossfuse.cross_entropy(x, y, backend="cpu")
        except RuntimeError as e:
            assert "lossfuse._C" in str(e)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("ok")
        """
    )
    env = dict(os.environ, LOSSFUSE_DISABLE_C="1")
    env.pop("LOSSFUSE_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("isa", NARROW_ISAS)
@pytest.mark.parametrize("case", ["index", "prob", "spatial"])
def test_narrower_isa_kernels_match(case, isa):
    """The portable and AVX2 builds of the kernels, forced at run time, against torch."""
    shape = (2, 6, 5, 3) if case == "spatial" else (5, 37)
    x, target, kw = make_case(shape, torch.bfloat16, {"prob": case == "prob", "weight": True, "label_smoothing": 0.1})
    x.requires_grad_(True)
    with forced_cpu_isa(isa):
        out = lossfuse.cross_entropy(x, target, reduction="none", **kw)
        (g,) = torch.autograd.grad(out.sum(), x)
    xd = x.detach().double().requires_grad_(True)
    ref = torch_f64(xd, target, "none", **kw)
    (gr,) = torch.autograd.grad(ref.sum(), xd)
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(g, gr, torch.bfloat16, "grad")
