"""Huber and SmoothL1 (and L1 = SmoothL1 with beta 0): parity with torch.nn.functional.huber_loss /
smooth_l1_loss, gradients to input, target and weight, layouts, numerics, ops, compile, bad input.

Every kernel result is compared with torch computed in float64 on the same, freshly drawn random
inputs (the seed is per test, tests/conftest.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import (CPU_BACKENDS, DTYPES, HAS_TRITON, NARROW_ISAS, assert_close, backend_or_skip, cpu_kernels_or_skip,
                     forced_cpu_isa, spy_ops, ulps_apart)
from lossfuse._layout import empty_like_walk
from lossfuse.ops import huber as huber_ops

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

# (), odd sizes, several partial-sum blocks (129 x 77 > 2 x 4096), empty.
SHAPES = [(7,), (129, 77), (4, 5, 6), (), (2, 3, 1, 5), (0, 3)]
TRITON_SHAPES = [(7,), (33, 65), (2, 3, 1, 5)]  # the interpreter is slow: small shapes

# loss, threshold (delta or beta), weight. Thresholds 0.5 / 1.0 / 2.0 are exact in every dtype, so
# elements planted at |d| = threshold really sit on the switch; 0.35 is not exact in any dtype.
OPTIONS = {
    "huber": ("huber", 1.0, False),
    "huber_delta0.35": ("huber", 0.35, False),
    "huber_delta2_weight": ("huber", 2.0, True),
    "smooth_l1": ("smooth_l1", 1.0, False),
    "smooth_l1_beta0.5": ("smooth_l1", 0.5, False),
    "smooth_l1_beta0.35": ("smooth_l1", 0.35, False),
    "l1": ("smooth_l1", 0.0, False),
}


def make_case(shape, dtype, threshold, weight=False, tshape=None, scale=1.5):
    """Random input/target (and weight); about 1/8 of the elements planted at d = +-threshold and
    1/16 at d = 0 -- the switch between branches, and L1's kink -- in values exact in every dtype."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    y = torch.randn(shape if tshape is None else tshape, dtype=torch.float64) * scale
    if tshape is None and x.numel() > 0:
        grid = torch.round(x * 8) / 8  # multiples of 1/8 below 16: exact in bf16, fp16 and up
        u = torch.rand(shape, dtype=torch.float64)
        sign = torch.where(torch.rand(shape, dtype=torch.float64) < 0.5, -1.0, 1.0)
        tie = u < 1 / 8
        zero = (u >= 1 / 8) & (u < 3 / 16)
        x = torch.where(tie | zero, grid, x)
        y = torch.where(tie, grid - sign * threshold, y)
        y = torch.where(zero, grid, y)
    w = (torch.rand(shape, dtype=torch.float64) * 2).to(dtype) if weight else None
    return x.to(dtype), y.to(dtype), w


def call(loss, x, y, reduction, threshold, w=None, backend="auto", **kw):
    if loss == "huber":
        return lossfuse.huber_loss(x, y, reduction=reduction, delta=threshold, weight=w, backend=backend, **kw)
    return lossfuse.smooth_l1_loss(x, y, reduction=reduction, beta=threshold, backend=backend, **kw)


def torch_call(loss, x, y, reduction, threshold, w=None):
    if loss == "huber":
        return F.huber_loss(x, y, reduction=reduction, delta=threshold, weight=w)
    return F.smooth_l1_loss(x, y, reduction=reduction, beta=threshold)


def grad_output_for(out):
    """Non-uniform per-element upstream gradients catch "everything scaled by grad_output[0]" bugs;
    rounded to the output's dtype so that ours and the float64 reference see the same values."""
    if out.dim():
        g = torch.rand(out.shape, dtype=torch.float64) + 0.5
    else:
        g = torch.tensor(1.7, dtype=torch.float64)
    return g.to(out.dtype)


def check_against_torch(loss, x, y, reduction, threshold, w, backend, dtype, rtol=None):
    """Loss and gradients (input, target, weight) vs torch in float64 on the same values."""
    # detach(), not clone(): a clone of a sliced or expanded view would be contiguous.
    xs = x.detach().requires_grad_(True)
    ys = y.detach().requires_grad_(True)
    ws = None if w is None else w.detach().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcasting warning has its own test
        out = call(loss, xs, ys, reduction, threshold, ws, backend=backend)
        expected_dtype = torch_call(loss, x, y, reduction, threshold, w).dtype
        xd = x.detach().double().requires_grad_(True)
        yd = y.detach().double().requires_grad_(True)
        wd = None if w is None else w.detach().double().requires_grad_(True)
        ref = torch_call(loss, xd, yd, reduction, threshold, wd)
    assert out.dtype == expected_dtype
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "loss", rtol=rtol)
    go = grad_output_for(out)
    ins = [t for t in (xs, ys, ws) if t is not None]
    ins_ref = [t for t in (xd, yd, wd) if t is not None]
    grads = torch.autograd.grad(out, ins, go)
    grads_ref = torch.autograd.grad(ref, ins_ref, go.double())
    for name, g, gr, t in zip(("input", "target", "weight"), grads, grads_ref, ins):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, gr, dtype, f"grad {name}", rtol=rtol)
    return out, grads


# ------------------------------------------------------------------------------------------------
# Parity grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_torch(shape, dtype, reduction, option, backend):
    backend_or_skip(backend)
    loss, threshold, weighted = OPTIONS[option]
    x, y, w = make_case(shape, dtype, threshold, weighted)
    check_against_torch(loss, x, y, reduction, threshold, w, backend, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("option", ["huber", "huber_delta2_weight", "smooth_l1_beta0.5", "l1"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_parity_triton(shape, dtype, reduction, option):
    """The Triton kernels (on CPU tensors in Triton's interpreter unless a GPU is present)."""
    loss, threshold, weighted = OPTIONS[option]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, w = make_case(shape, dtype, threshold, weighted)
    x, y = x.to(device), y.to(device)
    w = None if w is None else w.to(device)
    check_against_torch(loss, x, y, reduction, threshold, w, "triton", dtype)


def test_threshold_ties_take_the_linear_branch():
    """|d| = delta exactly: the gradient is delta * sign(d) (Huber) or sign(d) (SmoothL1) -- equal to
    the quadratic branch's d (d / beta) there -- and the loss is delta^2 / 2 (beta / 2)."""
    cpu_kernels_or_skip()
    for backend in ["cpu", "reference"] + (["triton"] if HAS_TRITON else []):
        for dtype in DTYPES:
            x = (torch.round(torch.randn(64, dtype=torch.float64) * 8) / 8).to(dtype)
            s = torch.where(torch.rand(64) < 0.5, -1.0, 1.0).to(torch.float64)
            for delta in (0.5, 1.0, 2.0):
                y = (x.double() - s * delta).to(dtype)
                for loss in ("huber", "smooth_l1"):
                    xr = x.clone().requires_grad_(True)
                    out = call(loss, xr, y, "none", delta, backend=backend)
                    (g,) = torch.autograd.grad(out.sum(), xr)
                    if loss == "huber":
                        assert torch.equal(out.double(), torch.full((64,), delta * delta / 2, dtype=torch.float64))
                        assert torch.equal(g.double(), s * delta)
                    else:
                        assert torch.equal(out.double(), torch.full((64,), delta / 2, dtype=torch.float64))
                        assert torch.equal(g.double(), s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0, 2.0, 8.0, 0.35, 3.0, 1e-3])
def test_smooth_l1_rounds_as_torch_divides(beta, dtype):
    """The CPU kernel multiplies by 1 / beta where beta is a power of two (exact: the same rounding as
    torch's division) and divides otherwise. Per element, the loss and the gradient for grad_output 1
    (torch: x / beta) are torch's own bit for bit, for either kind of beta."""
    cpu_kernels_or_skip()
    x = torch.randn(4099, dtype=dtype) * beta * 3
    y = torch.randn(4099, dtype=dtype) * beta
    xr = x.clone().requires_grad_(True)
    out = lossfuse.smooth_l1_loss(xr, y, reduction="none", beta=beta, backend="cpu")
    (g,) = torch.autograd.grad(out, xr, torch.ones_like(out))
    xt = x.clone().requires_grad_(True)
    ref = F.smooth_l1_loss(xt, y, reduction="none", beta=beta)
    (gt,) = torch.autograd.grad(ref, xt, torch.ones_like(ref))
    assert ((x - y).abs() < beta).sum() > 100  # the quadratic branch, where the division is, is exercised
    assert torch.equal(out, ref)
    assert torch.equal(g, gt)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if HAS_TRITON else []))
def test_l1_gradient_is_sign_with_zero_at_zero(backend):
    """beta = 0 is L1: gradient sign(d), exactly 0 where d = 0 (no NaN from a 0/0)."""
    backend_or_skip(backend)
    x = torch.randn(50)
    y = x.clone()
    y[::2] += torch.randn(25)
    xr = x.clone().requires_grad_(True)
    yr = y.clone().requires_grad_(True)
    out = lossfuse.smooth_l1_loss(xr, yr, beta=0.0, reduction="sum", backend=backend)
    gx, gy = torch.autograd.grad(out, (xr, yr))
    expected = torch.sign(x - y)
    assert torch.equal(gx, expected) and torch.equal(gy, -expected)
    assert (gx[1::2] == 0).all()
    torch.testing.assert_close(out, F.l1_loss(x, y, reduction="sum"))


# ------------------------------------------------------------------------------------------------
# The gradient formed during the forward (CPU, float32/float64, mean/sum)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", ["huber", "huber_delta2_weight", "smooth_l1_beta0.35", "l1"])
def test_eager_gradient_matches_recompute(option, reduction, dtype, monkeypatch):
    """loss.backward() (grad_output 1, the path that returns the forward's gradient as it is), any other
    grad_output (scaled in place), target and weight, and the recomputing backward: all torch's."""
    cpu_kernels_or_skip()
    loss, threshold, weighted = OPTIONS[option]
    x, y, w = make_case((129, 77), dtype, threshold, weighted)
    xd, yd = x.double().clone().requires_grad_(True), y.double().clone().requires_grad_(True)
    ref = torch_call(loss, xd, yd, reduction, threshold, None if w is None else w.double())
    for eager in (True, False):
        monkeypatch.setattr(huber_ops, "EAGER_GRADIENT", eager)
        for go in (None, 0.37, -4.0):
            xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            out = call(loss, xr, yr, reduction, threshold, w, backend="cpu")
            assert_close(out, ref, dtype, "loss")
            out.backward(None if go is None else torch.tensor(go, dtype=dtype))
            gx, gy = torch.autograd.grad(ref * (1.0 if go is None else go), (xd, yd), retain_graph=True)
            assert_close(xr.grad, gx, dtype, f"grad input (eager={eager}, go={go})")
            assert_close(yr.grad, gy, dtype, f"grad target (eager={eager}, go={go})")


def test_eager_gradient_is_handed_out_once():
    """A second backward through a retained graph recomputes: it must not return (and so double) the
    buffer that the first backward already gave to x.grad."""
    cpu_kernels_or_skip()
    x = torch.randn(300, 7, requires_grad=True)
    y = torch.randn(300, 7)
    out = lossfuse.huber_loss(x, y, delta=0.4)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    xd = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.huber_loss(xd, y.double(), delta=0.4), xd)
    assert_close(first, expected, torch.float32, "first")
    assert_close(x.grad, 2 * expected, torch.float32, "accumulated")


def test_eager_gradient_only_where_it_applies(monkeypatch):
    """Not for fp16/bf16 (single cast after the loss scale), 'none', a weight that wants its gradient,
    inputs that need none, or other backends; and never under torch.compile (see the compile tests)."""
    cpu_kernels_or_skip()
    calls = []
    spy_ops(monkeypatch, huber_ops, calls)
    x, y, w = torch.randn(20, 3), torch.randn(20, 3), torch.rand(20, 3)
    cases = [
        ({}, True),
        ({"reduction": "sum"}, True),
        ({"reduction": "none"}, False),
        ({"weight": w}, True),
        ({"weight": w.clone().requires_grad_(True)}, False),
        ({"dtype": torch.bfloat16}, False),
        ({"dtype": torch.float16}, False),
        ({"no_grad": True}, False),
    ]
    for kw, expected in cases:
        calls.clear()
        dtype = kw.pop("dtype", torch.float32)
        xr = x.to(dtype).requires_grad_(not kw.pop("no_grad", False))
        lossfuse.huber_loss(xr, y.to(dtype), **kw)
        assert ("huber_fwd_grad" in [name for name, _ in calls]) == expected, kw


# ------------------------------------------------------------------------------------------------
# Layouts and broadcasting: views are read in place
# ------------------------------------------------------------------------------------------------

LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.transpose(0, -1),
    "sliced": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t,
    "permuted": lambda t: t.permute(*range(t.dim() - 1, -1, -1)).contiguous().permute(*range(t.dim() - 1, -1, -1)),
    "expanded": lambda t: t[..., :1].expand(t.shape),  # stride 0 along the last dim
    "offset_view": lambda t: torch.cat([t.flatten(), t.flatten()])[3 : 3 + t.numel()].view(t.shape),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(37, 9), (3, 6, 5, 7)], ids=str)
def test_strided_operands(shape, layout, backend):
    backend_or_skip(backend)
    x, y, w = make_case(shape, torch.float32, 0.5, weight=True)
    x = LAYOUTS[layout](x.clone())
    y = LAYOUTS["permuted" if layout == "contiguous" else layout](y.clone())  # mixed layouts too
    w = LAYOUTS[layout](w.clone())
    x, y, w = (t.detach() for t in (x, y, w))
    for reduction in ("none", "sum"):
        check_against_torch("huber", x, y, reduction, 0.5, w, backend, torch.float32)
        check_against_torch("smooth_l1", x, y, reduction, 0.5, None, backend, torch.float32)


def test_output_follows_the_input_layout():
    """A transposed or channels-last input gives a loss (and gradient) of the same layout, matching
    the fake kernel's -- which torch.compile relies on."""
    cpu_kernels_or_skip()
    for make in (lambda: torch.randn(40, 30).t(), lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        x = make().requires_grad_(True)
        y = torch.randn(x.shape)
        out = lossfuse.huber_loss(x, y, reduction="none")
        assert out.stride() == x.stride()
        out.sum().backward()
        assert x.grad.stride() == x.stride()
        fake = empty_like_walk(x.detach(), y, None, torch.float32)
        assert fake.stride() == out.stride()


def test_fake_strides_match_cpu_and_triton():
    """The Python layout rule (fake kernels, Triton) and the C++ one agree on awkward layouts."""
    cpu_kernels_or_skip()
    base = torch.randn(4, 1, 6, 5)
    cases = [
        (base, torch.randn(6, 1, 4, 5).transpose(0, 2)),
        (base.permute(3, 1, 0, 2), torch.randn(5, 1, 4, 6)),
        (base[:, :, ::2], torch.randn(1, 1, 3, 1).expand(4, 1, 3, 5)),
        (torch.randn(6, 1).expand(6, 7), torch.randn(1, 7).expand(6, 7)),
        (torch.randn(()), torch.randn(())),
    ]
    for x, y in cases:
        real = torch.ops.lossfuse.huber_fwd(x, y, None, huber_ops.HUBER, 1.0, 0)
        assert real.stride() == empty_like_walk(x, y, None, torch.float32).stride()
        gx, gy, _ = torch.ops.lossfuse.huber_bwd(torch.tensor(1.0), x, y, None, huber_ops.HUBER, 1.0, True, True, False)
        assert gx.stride() == gy.stride() == real.stride()
        if HAS_TRITON and not torch.cuda.is_available():
            from lossfuse.triton import huber as th

            assert th.huber_fwd(x, y, None, huber_ops.HUBER, 1.0, 0).stride() == real.stride()


def test_more_dims_than_the_triton_kernel_merges():
    """Five dims that cannot merge: the Triton launcher copies into iteration order (rare)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    x = torch.randn(2, 3, 4, 5, 6).permute(4, 2, 0, 3, 1)
    y = torch.randn(6, 4, 2, 5, 3)
    check_against_torch("huber", x, y, "none", 0.7, None, "triton", torch.float32)


BROADCASTS = [((4, 5), (5,)), ((5,), (4, 5)), ((4, 1), (1, 5)), ((3, 1, 6), (2, 1)), ((), (3, 4)), ((2, 3), ())]


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_broadcasting_warns_and_reduces_gradients(shapes, backend):
    backend_or_skip(backend)
    xs, ts = shapes
    x = torch.randn(xs, dtype=torch.float64)
    y = torch.randn(ts, dtype=torch.float64)
    w = torch.rand(xs, dtype=torch.float64)  # torch's rule: the weight has the input's shape
    for loss, threshold, weight in (("huber", 0.8, None), ("huber", 0.8, w), ("smooth_l1", 0.6, None), ("smooth_l1", 0.0, None)):
        with pytest.warns(UserWarning, match=r"Using a target size \(torch\.Size\(\[.*\]\)\) that is different to the input size"):
            call(loss, x, y, "mean", threshold, weight, backend=backend)
        for reduction in ("none", "mean"):
            check_against_torch(loss, x, y, reduction, threshold, weight, backend, torch.float64)


@pytest.mark.parametrize("eager_gradient", [False, True])
def test_broadcast_target_is_not_materialised(monkeypatch, eager_gradient):
    """A (1, C) target against an (N, C) input reaches the ops as a stride-0 view."""
    cpu_kernels_or_skip()
    monkeypatch.setattr(huber_ops, "EAGER_GRADIENT", eager_gradient)
    calls = []
    spy_ops(monkeypatch, huber_ops, calls)
    x = torch.randn(100, 7, requires_grad=True)
    y = torch.randn(1, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lossfuse.huber_loss(x, y).backward()
    seen = [args for _, args in calls]
    fwd_target = seen[0][1]
    assert fwd_target.stride(0) == 0 and fwd_target.data_ptr() == y.data_ptr()
    assert len(seen) == (1 if eager_gradient else 2)  # the gradient came with the forward
    if not eager_gradient:
        assert seen[1][2].stride(0) == 0


# ------------------------------------------------------------------------------------------------
# Dtypes: mixed, autocast, results
# ------------------------------------------------------------------------------------------------

MIXED = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.int64),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtypes", MIXED, ids=str)
def test_mixed_dtypes(dtypes, backend):
    """huber_loss returns the input's dtype, smooth_l1_loss the promoted one; gradients come back in
    each operand's own dtype."""
    backend_or_skip(backend)
    xd, yd = dtypes
    x = torch.randn(6, 7, dtype=torch.float64).to(xd)
    y = (torch.randn(6, 7, dtype=torch.float64) * 2).to(yd)
    # The coarsest floating dtype involved sets the tolerance; float32 at least (huber_loss reads a
    # float64 target for a float32 input in float32).
    tol_dtype = max([d for d in dtypes if d.is_floating_point] + [torch.float32], key=lambda d: torch.finfo(d).eps)
    for loss, threshold in (("huber", 0.9), ("smooth_l1", 0.9), ("smooth_l1", 0.0)):
        if yd.is_floating_point:
            check_against_torch(loss, x, y, "none", threshold, None, backend, tol_dtype)
        else:
            out = call(loss, x, y, "mean", threshold, backend=backend)
            ref = torch_call(loss, x, y, "mean", threshold)
            assert out.dtype == ref.dtype
            torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_result_dtypes_match_torch(backend):
    backend_or_skip(backend)
    for autocast in (None, torch.bfloat16, torch.float16):
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for xd in DTYPES:
                for yd in DTYPES:
                    for shapes in (((3, 4), (3, 4)), ((3, 4), ()), ((), ())):
                        x = torch.randn(shapes[0], dtype=xd)
                        y = torch.randn(shapes[1], dtype=yd)
                        for loss in ("huber", "smooth_l1"):
                            for red in ("none", "mean"):
                                a = call(loss, x, y, red, 1.0, backend=backend)
                                b = torch_call(loss, x, y, red, 1.0)
                                assert a.dtype == b.dtype, (autocast, xd, yd, shapes, loss, red)
                        for wd in (torch.float64, torch.bfloat16, torch.int64):
                            w = torch.ones(shapes[0], dtype=wd)
                            a = call("huber", x, y, "none", 1.0, w, backend=backend)
                            assert a.dtype == torch_call("huber", x, y, "none", 1.0, w).dtype, (autocast, xd, yd, wd)


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside Triton's interpreter: inf - inf
@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("loss,threshold", [("huber", 1.0), ("smooth_l1", 0.5), ("smooth_l1", 0.0)])
def test_nan_and_inf_propagate_as_torch(loss, threshold, backend):
    backend_or_skip(backend)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([nan, inf, -inf, inf, 1e30, 0.3, 2.0, nan, 3e38])
    y = torch.tensor([0.0, 0.0, 0.0, inf, -1e30, nan, -inf, nan, -3e38])
    for reduction in ("none", "sum"):
        xr = x.clone().requires_grad_(True)
        yr = y.clone().requires_grad_(True)
        xt = x.clone().requires_grad_(True)
        yt = y.clone().requires_grad_(True)
        out = call(loss, xr, yr, reduction, threshold, backend=backend)
        ref = torch_call(loss, xt, yt, reduction, threshold)
        torch.testing.assert_close(out, ref, equal_nan=True)
        go = torch.ones_like(ref) * 0.5
        torch.testing.assert_close(torch.autograd.grad(out, (xr, yr), go), torch.autograd.grad(ref, (xt, yt), go),
                                   equal_nan=True)


def _float64_grad_scaled(loss, x, y, threshold, scale):
    xd = x.detach().double().requires_grad_(True)
    out = torch_call(loss, xd, y.double(), "mean", threshold) * scale
    (g,) = torch.autograd.grad(out, xd)
    return g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss,threshold", [("huber", 1.0), ("smooth_l1", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_scaling_under_autocast(dtype, loss, threshold, backend):
    """GradScaler's first step: autocast forward (fp32 loss), backward with grad_output 2^16.

    Mean over N = 2^20 elements: slope / N falls below fp16's smallest subnormal (6e-8) wherever
    |slope| < 1/16, so a kernel that divides by N, or casts, before applying the scale flushes them.
    """
    backend_or_skip(backend)
    N, scale = 1 << 20, 2.0 ** 16
    x = torch.randn(1024, 1024, dtype=dtype).requires_grad_(True)
    y = torch.randn(1024, 1024, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = call(loss, x, y, "mean", threshold, backend=backend)
    assert out.dtype == torch.float32
    (out * scale).backward()
    expected = _float64_grad_scaled(loss, x, y, threshold, scale)
    ulps = ulps_apart(x.grad, expected, dtype)
    assert ulps.max().item() <= 1.0, f"max {ulps.max().item():.2f} ulp"
    assert torch.equal(x.grad == 0, expected.to(dtype) == 0), "different elements flushed to zero"
    if dtype == torch.float16:  # the check is sharp: scaling after an fp16 cast fails it
        naive = (expected / scale).to(dtype).double() * scale
        assert not torch.equal(naive.to(dtype) == 0, expected.to(dtype) == 0)
        assert N == x.numel()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", ["huber", "smooth_l1"])
def test_long_mean_is_as_accurate_as_torch(loss, reduction):
    """16M+ elements: the blocked sum (fp32 lanes, float64 block partials) is at least as accurate as
    torch's fp32 reduction, also where every term is large and alike (a running fp32 sum would lose
    ~3 digits there)."""
    cpu_kernels_or_skip()
    n = (1 << 24) + 4099
    x = torch.randn(n)
    y = torch.randn(n)
    if loss == "smooth_l1":
        x += 6.0  # large, alike terms: |d| - beta / 2 ~ 6 everywhere
    with torch.no_grad():
        ours = call(loss, x, y, reduction, 0.8, backend="cpu")
        theirs = torch_call(loss, x, y, reduction, 0.8)
        exact = torch_call(loss, x.double(), y.double(), reduction, 0.8)
    err_ours = abs(ours.double().item() - exact.item())
    err_torch = abs(theirs.double().item() - exact.item())
    ulp = (torch.nextafter(ours, torch.tensor(math.inf)) - ours).item()  # float32 spacing at the result
    # Ours is the float64 sum rounded once: at most half an ulp off (plus the per-element roundings,
    # ~1e-11 relative). torch's fp32 reduction can be no closer than the correctly rounded value.
    assert err_ours <= max(err_torch, 0.51 * ulp), (err_ours, err_torch, ulp)


# ------------------------------------------------------------------------------------------------
# float64 gradcheck of the CPU kernels, per option that changes the math
# ------------------------------------------------------------------------------------------------

# loss, threshold, weight, input shape, target shape
GRADCHECK_CASES = {
    "huber": ("huber", 1.0, False, (5, 4), (5, 4)),
    "huber_small_delta": ("huber", 0.3, False, (5, 4), (5, 4)),
    "huber_weight": ("huber", 0.7, True, (5, 4), (5, 4)),
    "huber_broadcast_input_weight": ("huber", 0.7, True, (1, 4), (5, 4)),
    "smooth_l1": ("smooth_l1", 0.5, False, (5, 4), (5, 4)),
    "smooth_l1_broadcast_target": ("smooth_l1", 1.5, False, (5, 4), (5, 1)),
    "l1": ("smooth_l1", 0.0, False, (5, 4), (5, 4)),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_cpu_kernel(case, reduction):
    cpu_kernels_or_skip()
    loss, threshold, weighted, xshape, yshape = GRADCHECK_CASES[case]
    # Keep every |d| away from the kinks (|d| = threshold, and 0 for L1): finite differences that
    # straddle a kink are not the derivative.
    for _ in range(20):
        x = torch.randn(xshape, dtype=torch.float64) * 2
        y = torch.randn(yshape, dtype=torch.float64) * 2
        d = (x - y).abs()
        if ((d - threshold).abs() > 1e-3).all() and (d > 1e-3).all():
            break
    inputs = [x.requires_grad_(True), y.requires_grad_(True)]
    if weighted:
        inputs.append((torch.rand(x.shape, dtype=torch.float64) + 0.5).requires_grad_(True))

    def fn(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(loss, args[0], args[1], reduction, threshold, args[2] if weighted else None, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_strided():
    cpu_kernels_or_skip()
    x = torch.randn(6, 5, dtype=torch.float64).t().requires_grad_(True)
    y = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)  # read through stride 0 below
    w = torch.rand(6, 5, dtype=torch.float64).t().requires_grad_(True)

    def fn(x, y, w):
        return lossfuse.huber_loss(x, y.expand(5, 6), "none", 0.4, w, backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, y, w))


# ------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------------


def _op_operands(layout):
    x = torch.randn(6, 5, 4)
    y = torch.randn(6, 5, 4)
    w = torch.rand(6, 5, 4)
    if layout == "transposed":
        x = x.transpose(0, 2)
        y = y.transpose(0, 2).contiguous()
        w = w.transpose(0, 2)
    elif layout == "broadcast":
        y = torch.randn(1, 5, 1).expand(6, 5, 4)
        w = torch.rand(6, 1, 4).expand(6, 5, 4)
    return x, y, w


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
def test_opcheck(layout):
    cpu_kernels_or_skip()
    x, y, w = _op_operands(layout)
    fwd = torch.ops.lossfuse.huber_fwd
    bwd = torch.ops.lossfuse.huber_bwd
    torch.library.opcheck(fwd, (x, y, w, huber_ops.HUBER, 0.5, 0))
    torch.library.opcheck(fwd, (x, y, None, huber_ops.SMOOTH_L1, 0.5, 32))
    torch.library.opcheck(fwd, (x.to(torch.bfloat16), y, w, huber_ops.L1, 0.0, 64))
    torch.library.opcheck(bwd, (torch.tensor(0.25), x, y, w, huber_ops.HUBER, 0.5, True, True, True))
    g = torch.rand(x.shape[::-1]).permute(2, 1, 0)  # a per-element grad with its own strides
    torch.library.opcheck(bwd, (g, x, y, None, huber_ops.SMOOTH_L1, 0.7, True, False, False))
    torch.library.opcheck(bwd, (torch.tensor(2.0), x.to(torch.float16), y, w.to(torch.float16), huber_ops.L1, 0.0,
                                False, True, True))
    fwd_grad = torch.ops.lossfuse.huber_fwd_grad
    torch.library.opcheck(fwd_grad, (x, y, w, huber_ops.HUBER, 0.5, 32, 1 / 120, True, True))
    torch.library.opcheck(fwd_grad, (x.double(), y.double(), None, huber_ops.SMOOTH_L1, 0.3, 64, 1.0, False, True))


def test_ops_reject_mismatched_operands_directly():
    """The ops are public: called directly with bad operands they raise instead of reading out of bounds."""
    cpu_kernels_or_skip()
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="target must have the input's"):
        torch.ops.lossfuse.huber_fwd(x, torch.randn(5), None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="weight must have the input's"):
        torch.ops.lossfuse.huber_fwd(x, x, torch.randn(4, 1), 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="target must be a CPU tensor of the input's dtype"):
        torch.ops.lossfuse.huber_fwd(x, x.double(), None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="grad must be a scalar or have the input's shape"):
        torch.ops.lossfuse.huber_bwd(torch.ones(5), x, x, None, 0, 1.0, True, False, False)
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.lossfuse.huber_fwd(x, x, None, 0, 0.0, 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    cpu_kernels_or_skip()
    torch._dynamo.reset()
    x, y, w = make_case((8, 33), torch.float32, 0.5, weight=True)

    def step(x, y, w):
        a = lossfuse.huber_loss(x, y, reduction=reduction, delta=0.5, weight=w)
        b = lossfuse.smooth_l1_loss(x, y, reduction=reduction, beta=0.3)
        c = lossfuse.smooth_l1_loss(x, y[0], reduction=reduction, beta=0.0)  # broadcast: no graph break
        return (a * 2 + b + c).sum()

    compiled = torch.compile(step, fullgraph=True)
    ins_e = [t.clone().requires_grad_(True) for t in (x, y, w)]
    ins_c = [t.clone().requires_grad_(True) for t in (x, y, w)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = step(*ins_e)
        out = compiled(*ins_c)
    torch.testing.assert_close(out, eager)
    eager.backward()
    out.backward()
    for a, b in zip(ins_c, ins_e):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# Bad input: torch's exception type (and, where torch words it, its message)
# ------------------------------------------------------------------------------------------------

X = torch.randn(4, 5)
Y = torch.randn(4, 5)
W = torch.rand(4, 5)

# (name, loss, (args, kwargs), exception, message regex, same message as torch)
BAD_INPUTS = [
    ("delta 0", "huber", ((X, Y), {"delta": 0.0}), RuntimeError, r"^huber_loss does not support non-positive values for delta\.$", True),
    ("delta < 0", "huber", ((X, Y), {"delta": -1.0}), RuntimeError, "non-positive values for delta", True),
    ("delta nan", "huber", ((X, Y), {"delta": float("nan")}), RuntimeError, "non-positive values for delta", True),
    ("delta 0 weighted", "huber", ((X, Y), {"delta": 0.0, "weight": W}), RuntimeError, "non-positive values for delta", True),
    ("beta < 0", "smooth_l1", ((X, Y), {"beta": -0.5}), RuntimeError, r"^smooth_l1_loss does not support negative values for beta\.$", True),
    ("beta nan", "smooth_l1", ((X, Y), {"beta": float("nan")}), RuntimeError, "negative values for beta", True),
    ("reduction huber", "huber", ((X, Y), {"reduction": "avg"}), ValueError, r"^avg is not a valid value for reduction$", True),
    ("reduction weighted", "huber", ((X, Y), {"reduction": "avg", "weight": W}), ValueError,
     r"^Invalid reduction mode: avg\. Expected one of 'none', 'mean', 'sum'\.$", True),
    ("reduction smooth_l1", "smooth_l1", ((X, Y), {"reduction": "avg"}), ValueError, "avg is not a valid value for reduction", True),
    ("reduction l1", "smooth_l1", ((X, Y), {"reduction": "avg", "beta": 0.0}), ValueError, "avg is not a valid value", True),
    ("reduction before beta", "smooth_l1", ((X, Y), {"reduction": "avg", "beta": -1.0}), ValueError, "avg is not a valid", True),
    ("weight shape", "huber", ((X, Y), {"weight": torch.rand(5)}), ValueError, r"^Weights and input must have the same size\.$", True),
    ("weight broadcast shape", "huber", ((X[:1], Y), {"weight": torch.rand(4, 5)}), ValueError, "Weights and input must have the same size", True),
    ("incompatible sizes", "huber", ((X, torch.randn(3, 5)), {}), RuntimeError,
     r"The size of tensor a \(4\) must match the size of tensor b \(3\) at non-singleton dimension 0", True),
    ("incompatible sizes sl1", "smooth_l1", ((X, torch.randn(4, 3)), {}), RuntimeError, "must match the size of tensor b", True),
    ("integer input", "huber", ((X.long(), Y.long()), {}), NotImplementedError, "huber_loss: input must be a floating-point tensor", False),
    ("integer input float target", "huber", ((X.long(), Y), {}), RuntimeError,
     r"^result type Float can't be cast to the desired output type Long$", True),
    ("complex target", "huber", ((X, Y.to(torch.complex64)), {}), RuntimeError, "result type ComplexFloat can't be cast", True),
    ("complex input", "huber", ((X.to(torch.complex64), Y.to(torch.complex64)), {}), NotImplementedError, "got torch.complex64", False),
    ("integer smooth_l1", "smooth_l1", ((X.int(), Y.int()), {}), NotImplementedError, "promote to a floating-point dtype", False),
    ("bool smooth_l1", "smooth_l1", ((X.bool(), Y.bool()), {}), NotImplementedError, "promote to a floating-point dtype", False),
    ("target on another device", "huber", ((X, Y.to("meta")), {}), RuntimeError, "expected all tensors on the same device", False),
    ("weight on another device", "huber", ((X, Y), {"weight": W.to("meta")}), RuntimeError, "expected all tensors on the same device", False),
    ("device smooth_l1", "smooth_l1", ((X, Y.to("meta")), {}), RuntimeError, "expected all tensors on the same device", False),
]
BAD_IDS = [b[0] for b in BAD_INPUTS]


def _call_named(fn_module, loss, args, kwargs):
    fn = fn_module.huber_loss if loss == "huber" else fn_module.smooth_l1_loss
    return fn(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,loss,args,exc,match,same_message", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input(name, loss, args, exc, match, same_message, backend):
    backend_or_skip(backend)
    a, kw = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            _call_named(lossfuse, loss, a, dict(kw, backend=backend))


@pytest.mark.parametrize("name,loss,args,exc,match,same_message", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_matches_torch(name, loss, args, exc, match, same_message):
    """Code that catches torch's exception catches ours: same type; the same words where marked."""
    a, kw = args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as theirs:
            _call_named(F, loss, a, kw)
        if same_message:
            with pytest.raises(exc) as ours:
                _call_named(lossfuse, loss, a, kw)
            assert str(ours.value) == str(theirs.value)


# ------------------------------------------------------------------------------------------------
# Legacy arguments, modules, exports, the portable kernels
# ------------------------------------------------------------------------------------------------


def test_legacy_size_average_and_reduce():
    cpu_kernels_or_skip()
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    for sa, red in [(False, None), (True, None), (None, False), (False, False)]:
        with pytest.warns(UserWarning):
            expected = F.smooth_l1_loss(x, y, size_average=sa, reduce=red, beta=0.5)
        with pytest.warns(UserWarning):
            got = lossfuse.smooth_l1_loss(x, y, size_average=sa, reduce=red, beta=0.5)
        torch.testing.assert_close(got, expected)


def test_modules_are_drop_ins():
    cpu_kernels_or_skip()
    x = torch.randn(9, 6, requires_grad=True)
    y = torch.randn(9, 6)
    for ours, theirs in (
        (lossfuse.HuberLoss(delta=0.4), torch.nn.HuberLoss(delta=0.4)),
        (lossfuse.HuberLoss(reduction="sum"), torch.nn.HuberLoss(reduction="sum")),
        (lossfuse.SmoothL1Loss(beta=0.3), torch.nn.SmoothL1Loss(beta=0.3)),
        (lossfuse.SmoothL1Loss(reduction="none", beta=0.0), torch.nn.SmoothL1Loss(reduction="none", beta=0.0)),
    ):
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        torch.testing.assert_close(ours(x, y), theirs(x, y))
        assert "backend='auto'" in repr(ours)
    assert lossfuse.HuberLoss(delta=0.25).delta == 0.25
    assert lossfuse.SmoothL1Loss(beta=0.25, backend="reference").backend == "reference"
    with pytest.warns(UserWarning):
        legacy = lossfuse.SmoothL1Loss(size_average=False)
    assert legacy.reduction == "sum"


@pytest.mark.parametrize("isa", NARROW_ISAS)
@pytest.mark.parametrize("case", ["contiguous", "strided", "weight_bf16_target_fp32", "float32_eager_gradient"])
def test_narrower_isa_kernels_match(case, isa):
    """The portable and AVX2 builds of the kernels, forced at run time, against torch."""
    dtype = torch.float32 if case == "float32_eager_gradient" else torch.bfloat16
    x, y, w = make_case((37, 21), dtype, 0.5, weight=True)
    if case == "float32_eager_gradient":
        w = w.detach()  # a weight without grad keeps the gradient-in-forward path
    if case == "strided":
        x, y, w = x.t(), y.t().contiguous(), w[:, :1].expand(37, 21).t()
    elif case == "weight_bf16_target_fp32":
        y = y.float()
    with forced_cpu_isa(isa):
        if case == "float32_eager_gradient":
            xr = x.clone().requires_grad_(True)
            lossfuse.huber_loss(xr, y, "sum", 0.5, w, backend="cpu").backward()
            xd = x.double().requires_grad_(True)
            (gr,) = torch.autograd.grad(F.huber_loss(xd, y.double(), reduction="sum", delta=0.5, weight=w.double()), xd)
            assert_close(xr.grad, gr, dtype, "grad input")
        for red in ("none", "mean"):
            check_against_torch("huber", x, y, red, 0.5, w, "cpu", dtype)
            check_against_torch("smooth_l1", x, y, red, 0.5, None, "cpu", dtype)
            check_against_torch("smooth_l1", x, y, red, 0.0, None, "cpu", dtype)
