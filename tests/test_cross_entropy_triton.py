"""Cross-entropy Triton kernels against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, which
conftest.py sets before triton or lossfuse is imported): slow, so the shapes are small -- and the interpreter's block
sizes are small too (see _INTERPRET_* in lossfuse/triton/cross_entropy.py), so these shapes still go
through several class chunks, the online max rescaling, masked tails and multi-row tiles. With a GPU
the same tests run on CUDA tensors.
"""

import pytest
import torch

from helpers import triton_device_or_skip

DEVICE = triton_device_or_skip()

import lossfuse  # noqa: E402
from lossfuse import reference  # noqa: E402
from lossfuse.ops import cross_entropy as ops_ce  # noqa: E402

from lossfuse.triton import cross_entropy as tk  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # The interpreter runs the kernels in numpy, which warns on the inf/NaN the extreme cases (and
    # masked lanes) are meant to produce.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) per dtype, for the loss (rounded once to the dtype) and the input gradient.
TOL = {
    torch.float64: {"loss": (1e-10, 1e-7), "grad": (1e-12, 1e-7)},
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-6, 1e-5)},
    torch.float16: {"loss": (1e-3, 2e-3), "grad": (1e-5, 2e-3)},
    torch.bfloat16: {"loss": (1e-2, 1.6e-2), "grad": (1e-4, 1.6e-2)},
}


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def assert_close(actual, expected, atol, rtol, what="value"):
    """Elementwise |a - e| <= atol + rtol |e|; NaN matches NaN and inf matches the same inf. On
    failure lists which elements differ."""
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    ok = (a.isnan() & e.isnan()) | (a == e) | ((a - e).abs() <= atol + rtol * e.abs())
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    finite = ~ok & a.isfinite() & e.isfinite()
    worst = float((a - e)[finite].abs().max()) if bool(finite.any()) else float("nan")
    lines = []
    for i in bad[:12].tolist():
        lines.append(f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}")
    more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
    pytest.fail(
        f"{what}: {len(bad)} of {a.numel()} elements differ (atol={atol}, rtol={rtol}, "
        f"max finite |diff|={worst:.3g}):\n" + "\n".join(lines) + more
    )


def rand_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def rand_targets(shape, num_classes, ignore_index=None, frac_ignored=0.3):
    """Random class indices; with ignore_index, a random ~30% of the rows ignored (at least one row
    kept, so a mean has a nonzero denominator)."""
    y = torch.randint(0, num_classes, shape)
    if ignore_index is not None and y.numel() > 1:
        drop = torch.rand(shape) < frac_ignored
        drop.view(-1)[torch.randint(0, y.numel(), ())] = False
        y = torch.where(drop, torch.full_like(y, ignore_index), y)
    return y.to(DEVICE)


def rand_weight(c):
    return (torch.rand(c) + 0.5).to(DEVICE)


def class_dim(x):
    return 0 if x.dim() == 1 else 1


def check_api(x, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              target_grad=False, tol_dtype=None):
    """lossfuse.cross_entropy(backend="triton"): loss, input gradient (and the target's, for a
    probability target that requires grad) against the reference on the same values in float64."""
    tol = TOL[tol_dtype or x.dtype]
    x = x.detach().requires_grad_()
    prob = target.is_floating_point()
    t = target.detach().requires_grad_(target_grad) if prob else target
    out = lossfuse.cross_entropy(x, t, weight, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, backend="triton")

    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(target_grad) if prob else t
    w64 = None if weight is None else weight.double()
    ref = reference.cross_entropy(x64, t64, w64, ignore_index, reduction, label_smoothing)

    want_dtype = torch.promote_types(x.dtype, t.dtype) if prob else x.dtype
    assert out.dtype == want_dtype
    assert_close(out, ref, *tol["loss"], "loss")

    # A non-uniform upstream gradient for 'none', a non-unit scalar otherwise.
    go = torch.randn(out.shape) if reduction == "none" else torch.tensor(1.75)
    go = go.to(device=DEVICE, dtype=out.dtype)
    inputs, inputs64 = [x], [x64]
    if prob and target_grad:
        inputs.append(t)
        inputs64.append(t64)
    grads = torch.autograd.grad(out, inputs, go)
    grads64 = torch.autograd.grad(ref, inputs64, go.double())
    assert grads[0].dtype == x.dtype and grads[0].shape == x.shape
    assert_close(grads[0], grads64[0], *tol["grad"], "grad input")
    if len(grads) > 1:
        assert grads[1].dtype == t.dtype and grads[1].shape == t.shape
        assert_close(grads[1], grads64[1], *TOL[t.dtype]["grad"], "grad target")
    return out, grads


# ----------------------------------------------------------------------------------------------
# Class-index targets through the public API: the grid.
# ----------------------------------------------------------------------------------------------

SHAPES = [(7, 3), (5, 33), (4, 1000), (2, 5, 3, 4), (5,), (6, 1)]
OPTIONS = [  # (weight, ignore rows, label_smoothing)
    (False, False, 0.0),
    (True, True, 0.0),
    (False, True, 0.1),
    (True, False, 0.1),
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"w{int(o[0])}-ign{int(o[1])}-ls{o[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_class_index(shape, options, dtype, reduction):
    use_w, ignore, ls = options
    c = shape[class_dim(torch.empty(shape))]
    x = rand_logits(shape, dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    y = rand_targets(tshape, c, -100 if ignore else None)
    w = rand_weight(c) if use_w else None
    check_api(x, y, weight=w, reduction=reduction, label_smoothing=ls)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignore_index_inside_class_range(dtype):
    """An ignore_index that is a valid class (here 2) still drops its rows."""
    x = rand_logits((9, 6), dtype)
    y = rand_targets((9,), 6)
    y[::3] = 2
    check_api(x, y, weight=rand_weight(6), ignore_index=2, reduction="mean", label_smoothing=0.1)


# ----------------------------------------------------------------------------------------------
# Layouts: the walk order follows the strides; nothing is transposed into a copy.
# ----------------------------------------------------------------------------------------------


def _layouts():
    def transposed(dtype):  # (N, C) whose classes are strided: seen as (1, C, N), spatial walk
        return rand_logits((11, 7), dtype).t()

    def channels_last(dtype):  # classes contiguous, S = H * W
        return rand_logits((2, 6, 3, 5), dtype).contiguous(memory_format=torch.channels_last)

    def seg_multi_tile(dtype):  # (N, C, H, W): several spatial tiles and class chunks per row
        return rand_logits((2, 40, 5, 7), dtype)

    def class_stride_2(dtype):  # (N, C) with class stride 2
        return rand_logits((5, 18), dtype)[:, ::2]

    return {"transposed": transposed, "channels_last": channels_last, "seg_multi_tile": seg_multi_tile,
            "class_stride_2": class_stride_2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_layouts_class_index(layout, dtype, ls):
    x = _layouts()[layout](dtype)
    c = x.shape[1]
    y = rand_targets((x.shape[0],) + tuple(x.shape[2:]), c, -100)
    check_api(x, y, weight=rand_weight(c), reduction="none", label_smoothing=ls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(_layouts()))
def test_layouts_probability(layout, dtype):
    x = _layouts()[layout](dtype)
    t = torch.softmax(torch.randn(x.shape), dim=1).to(device=DEVICE, dtype=dtype)
    check_api(x, t, weight=rand_weight(x.shape[1]), reduction="sum", label_smoothing=0.1, target_grad=True)


@pytest.mark.parametrize(
    "make,walk",
    [
        (lambda: torch.randn(2, 6, 3, 5).flatten(2), "spatial"),  # (N, C, H, W)
        (lambda: torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last).flatten(2), "rows"),
        (lambda: torch.randn(4, 9).unsqueeze(2), "rows"),  # (N, C)
        (lambda: torch.randn(4, 9).unsqueeze(0), "spatial"),  # what ops makes of a transposed (N, C)
        (lambda: torch.randn(5, 8)[:, ::2].unsqueeze(2), "rows"),  # class stride 2, S = 1
    ],
)
def test_walk_order_and_output_layout(make, walk):
    """The launcher walks the (N, C, S) view in place, and its outputs have exactly the fake
    kernel's shapes, dtypes and strides (torch.compile relies on it)."""
    x3 = make().to(DEVICE)
    assert tk._spatial_walk(x3) == (walk == "spatial")
    n, c, s = x3.shape
    y = rand_targets((n, s), c, -100)
    t = torch.softmax(torch.randn(n, c, s), 1).to(DEVICE)
    for target in (y, t):
        loss, lse = tk.cross_entropy_fwd(x3, target, None, -100, 0.0, 0.0, 0.0)
        fl, fs = ops_ce._fwd_fake(x3, target, None, -100, 0.0, 0.0, 0.0)
        for got, want in ((loss, fl), (lse, fs)):
            assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
        g = torch.rand(n, s, device=DEVICE)
        for ig, tg in ((True, True), (True, False), (False, True), (False, False)):
            args = (g, x3, target, None, lse, -100, 0.0, 0.0, 0.0, ig, tg)
            for got, want in zip(tk.cross_entropy_bwd(*args), ops_ce._bwd_fake(*args)):
                assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())


# ----------------------------------------------------------------------------------------------
# Probability targets.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_dtype", ["same", "float32"])
@pytest.mark.parametrize("options", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.1)],
                         ids=lambda o: f"w{int(o[0])}-ls{o[1]}")
@pytest.mark.parametrize("shape", [(7, 3), (5, 33), (3, 100), (2, 5, 3, 4), (5,)], ids=str)
def test_probability(shape, options, target_dtype, dtype, reduction):
    use_w, ls = options
    c = shape[class_dim(torch.empty(shape))]
    x = rand_logits(shape, dtype)
    tdt = dtype if target_dtype == "same" else torch.float32
    if len(shape) > 1 and shape[0] % 2:  # normalised distributions; otherwise any nonnegative values
        t = torch.softmax(torch.randn(shape) * 2, dim=class_dim(x))
    else:
        t = torch.rand(shape)
    t = t.to(device=DEVICE, dtype=tdt)
    w = rand_weight(c) if use_w else None
    check_api(x, t, weight=w, reduction=reduction, label_smoothing=ls, target_grad=True)


def test_probability_target_grad_only():
    """Only the target requires grad: the kernel computes grad_target alone."""
    x = rand_logits((4, 10), torch.float32)
    t = torch.softmax(torch.randn(4, 10), 1).to(DEVICE).requires_grad_()
    out = lossfuse.cross_entropy(x, t, reduction="sum", label_smoothing=0.1, backend="triton")
    (gt,) = torch.autograd.grad(out, t)
    t64 = t.detach().double().requires_grad_()
    ref = reference.cross_entropy(x.double(), t64, reduction="sum", label_smoothing=0.1)
    (gt64,) = torch.autograd.grad(ref, t64)
    assert_close(gt, gt64, 1e-5, 1e-5, "grad target")


# ----------------------------------------------------------------------------------------------
# The launchers called directly.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 13, 1), (3, 5, 7), (1, 4, 9)], ids=str)
def test_launchers_direct(shape, dtype):
    """Per-row loss and lse from the forward launcher, the gradient from the backward one with a
    strided target and an expanded scalar upstream gradient."""
    n, c, s = shape
    x3 = rand_logits(shape, dtype)
    y = rand_targets((n, 2 * s), c, -100)[:, ::2]  # a strided (N, S) target
    w = rand_weight(c).half()  # any float dtype: converted by the launcher
    loss, lse = tk.cross_entropy_fwd(x3, y, w, -100, 0.1, 0.0, 0.0)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float64 and loss.shape == lse.shape == (n, s)

    x64 = x3.detach().double().requires_grad_()
    ref = reference.cross_entropy(x64, y, w.double(), -100, "none", 0.1)
    tol = TOL[torch.float32]
    assert_close(loss, ref, *tol["loss"], "loss")
    assert_close(lse, torch.logsumexp(x3.double(), dim=1), *tol["loss"], "lse")

    g = torch.tensor(0.37, device=DEVICE).expand(n, s)
    gi, gt = tk.cross_entropy_bwd(g, x3, y, w, lse, -100, 0.1, 0.0, 0.0, True, False)
    assert gi.dtype == dtype and gt.numel() == 0
    (g64,) = torch.autograd.grad(ref, x64, g.double())
    assert_close(gi, g64, *TOL[dtype]["grad"], "grad input")


def test_out_of_range_target_gives_nan_row():
    """A target outside [0, C) that is not ignore_index never reads out of bounds: its row's loss and
    gradient are NaN (the functional layer raises before this on the CPU)."""
    c = 5
    x3 = rand_logits((7, c, 1), torch.float32)
    y = torch.tensor([[0], [7], [2], [-3], [-100], [4], [1 << 40]], device=DEVICE)
    loss, lse = tk.cross_entropy_fwd(x3, y, rand_weight(c), -100, 0.1, 0.0, 0.0)
    bad = torch.tensor([0, 1, 0, 1, 0, 0, 1], dtype=torch.bool, device=DEVICE)
    assert bool(loss[bad].isnan().all())
    assert bool(loss[~bad].isfinite().all()) and float(loss[4]) == 0.0
    assert_close(lse, torch.logsumexp(x3.double(), 1), 1e-5, 1e-5, "lse")
    gi, _ = tk.cross_entropy_bwd(torch.ones(7, 1, device=DEVICE), x3, y, None, lse, -100, 0.1, 0.0, 0.0, True, False)
    assert bool(gi[bad].isnan().all())
    assert bool(gi[~bad].isfinite().all()) and bool((gi[4] == 0).all())


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU path of the functional layer")
def test_out_of_range_target_raises_through_api():
    x = rand_logits((3, 4), torch.float32)
    with pytest.raises(IndexError, match="out of bounds"):
        lossfuse.cross_entropy(x, torch.tensor([0, 4, 1]), backend="triton")


def test_empty_rows_and_zero_classes():
    # N * S == 0: empty outputs, nothing launched; torch's mean of nothing is NaN.
    x = rand_logits((0, 4), torch.float32).requires_grad_()
    y = torch.empty(0, dtype=torch.long, device=DEVICE)
    out = lossfuse.cross_entropy(x, y, backend="triton")
    assert bool(out.isnan())
    (gx,) = torch.autograd.grad(lossfuse.cross_entropy(x, y, reduction="sum", backend="triton"), x)
    assert gx.shape == (0, 4)
    y0 = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    loss, lse = tk.cross_entropy_fwd(rand_logits((2, 3, 0), torch.float32), y0, None, -100, 0.0, 0.0, 0.0)
    assert loss.shape == lse.shape == (2, 0)
    # C == 0: lse = -inf; probability rows 0; class-index rows 0 if ignored, else NaN (out of range).
    x0 = rand_logits((3, 0, 1), torch.float32)
    loss, lse = tk.cross_entropy_fwd(x0, torch.tensor([[-100], [0], [-100]], device=DEVICE), None, -100, 0.1, 0.0, 0.0)
    assert bool((lse == float("-inf")).all())
    assert loss[0].item() == 0 and loss[2].item() == 0 and loss[1].isnan()
    loss, _ = tk.cross_entropy_fwd(x0, torch.empty(3, 0, 1, device=DEVICE), None, -100, 0.0, 0.0, 0.0)
    assert bool((loss == 0).all())
    gi, gt = tk.cross_entropy_bwd(torch.ones(3, 1, device=DEVICE), x0, torch.empty(3, 0, 1, device=DEVICE),
                                  None, lse, -100, 0.0, 0.0, 0.0, True, True)
    assert gi.shape == gt.shape == (3, 0, 1)


def test_all_rows_ignored():
    """mean over no kept rows is 0/0 = NaN, as torch; every gradient element is an exact zero."""
    x = rand_logits((4, 6), torch.float32).requires_grad_()
    y = torch.full((4,), -100, device=DEVICE)
    out = lossfuse.cross_entropy(x, y, backend="triton")
    assert bool(out.isnan())
    out = lossfuse.cross_entropy(x, y, reduction="sum", label_smoothing=0.1, backend="triton")
    assert out.item() == 0
    (gx,) = torch.autograd.grad(out, x)
    assert bool((gx == 0).all())


# ----------------------------------------------------------------------------------------------
# Numerics: extreme logits, NaN / inf, confident predictions, mixed precision.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_extreme_logits_match_torch(dtype, ls):
    """+-1e4 logits: finite, and equal to torch's float64 cross-entropy. With label smoothing the sum
    of (lse - x_c) over 1e4-sized logits must not cancel."""
    n, c = 6, 40
    x = torch.randn(n, c) * 3
    x[torch.rand(n, c) < 0.2] = 1e4
    x[torch.rand(n, c) < 0.2] = -1e4
    x[0] = -1e4  # every logit equal: uniform
    x = x.to(DEVICE, dtype)
    y = rand_targets((n,), c)
    y[1] = int(x[1].float().argmax())  # the target holds the max: loss ~0
    y[2] = int(x[2].float().argmin())  # and the min: loss ~2e4
    w = rand_weight(c)
    x64 = x.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, y, w.double(), reduction="none", label_smoothing=ls)
    assert bool(ref.isfinite().all())
    xt = x.detach().requires_grad_()
    out = lossfuse.cross_entropy(xt, y, w, reduction="none", label_smoothing=ls, backend="triton")
    atol, rtol = TOL[dtype]["loss"]
    # the loss is stored in the input dtype: 2e4 in bfloat16 has an ulp of 128.
    assert_close(out, ref, atol, rtol, "loss")
    go = torch.rand(n, device=DEVICE, dtype=dtype)
    (gx,) = torch.autograd.grad(out, xt, go)
    (g64,) = torch.autograd.grad(ref, x64, go.double())
    # Backward recomputes p = exp(x - lse) from the saved fp32 lse, and an fp32 lse near 1e4 is only
    # good to half an ulp of 1e4 (4.9e-4): p carries that relative error (torch's log_softmax keeps
    # x - max exact instead). The op's contract (fp32 lse) sets this limit, for logits this large.
    atol, rtol = TOL[dtype]["grad"]
    assert_close(gx, g64, atol, max(rtol, 1e-3), "grad input")


def test_nan_inf_propagate_as_torch():
    """NaN anywhere in a row, or a +inf logit, makes the row NaN; -inf logits off the target are
    probabilities of 0; -inf at the target is an infinite loss; an all -inf row is NaN. Compared
    with torch's float64 cross-entropy, loss and gradient."""
    c = 7
    x = torch.randn(6, c) * 2
    y = torch.randint(0, c, (6,))
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2, [1, 4]] = float("-inf")
    y[2] = 0
    x[3, 5] = float("-inf")
    y[3] = 5
    x[4] = float("-inf")
    x, y = x.to(DEVICE), y.to(DEVICE)
    for ls in (0.0, 0.1):
        x64 = x.double().requires_grad_()
        ref = torch.nn.functional.cross_entropy(x64, y, reduction="none", label_smoothing=ls)
        xt = x.clone().requires_grad_()
        out = lossfuse.cross_entropy(xt, y, reduction="none", label_smoothing=ls, backend="triton")
        assert_close(out, ref, 1e-5, 1e-5, f"loss (ls={ls})")
        assert out[0].isnan() and out[1].isnan() and out[3].isinf() and out[4].isnan()
        # -inf logits off the target: finite without smoothing, inf with it (eps/C * (lse - -inf)).
        assert bool(out[5].isfinite()) and bool(out[2].isfinite()) == (ls == 0.0)
        go = torch.rand(6, device=DEVICE)
        (gx,) = torch.autograd.grad(out, xt, go)
        (g64,) = torch.autograd.grad(ref, x64, go.double())
        assert_close(gx, g64, 1e-6, 1e-5, f"grad input (ls={ls})")


@pytest.mark.parametrize("use_w", [False, True])
def test_masked_vocabulary(use_w):
    """Rows whose first class chunks are all -inf (a masked vocabulary) and whose finite logits are
    large and negative: the online rescaling must neither compute -inf - -inf nor 0 * exp(1e4)."""
    c = 100
    x = torch.randn(4, c) * 2
    x[:, :70] = float("-inf")
    x[1, 70:] -= 1e4
    x[2, ::2] = float("-inf")
    x[3, 90:] = float("-inf")
    y = torch.tensor([75, 99, 71, 80])
    x, y = x.to(DEVICE), y.to(DEVICE)
    w = rand_weight(c) if use_w else None
    x64 = x.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, y, None if w is None else w.double(), reduction="none")
    assert bool(ref.isfinite().all())
    xt = x.clone().requires_grad_()
    out = lossfuse.cross_entropy(xt, y, w, reduction="none", backend="triton")
    assert_close(out, ref, 1e-5, 1e-5, "loss")
    go = torch.rand(4, device=DEVICE)
    (gx,) = torch.autograd.grad(out, xt, go)
    (g64,) = torch.autograd.grad(ref, x64, go.double())
    assert_close(gx, g64, 1e-6, 1e-3, "grad input")  # rtol: the fp32 lse near -1e4 (see above)
    # The lse the launcher returns, against torch.logsumexp.
    _, lse = tk.cross_entropy_fwd(x.unsqueeze(2), y.unsqueeze(1), None, -100, 0.0, 0.0, 0.0)
    assert_close(lse.squeeze(1), torch.logsumexp(x.double(), 1), 1e-5, 1e-7, "lse")


def test_ignored_rows_exact_zero_despite_nan_inf():
    """Ignored rows give exact zeros whatever their logits hold (a select, never 0 * inf)."""
    x = torch.randn(4, 5)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    x = x.to(DEVICE).requires_grad_()
    y = torch.tensor([1, -100, -100, -100], device=DEVICE)
    w = rand_weight(5)
    out = lossfuse.cross_entropy(x, y, w, reduction="none", label_smoothing=0.1, backend="triton")
    assert bool((out[1:] == 0).all()) and out[0].isfinite()
    (gx,) = torch.autograd.grad(out, x, torch.ones(4, device=DEVICE))
    assert bool((gx[1:] == 0).all()) and bool(gx[0].isfinite().all())


def test_expm1_helper():
    """The kernels' expm1 on both sides of its |d| < 0.5 switch, against torch.expm1 in float64."""
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(d_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        d = tl.load(d_ptr + i, mask=i < n, other=0.0)
        tl.store(out_ptr + i, tk._expm1(d), mask=i < n)

    d = torch.tensor([0.0, -1e-30, 1e-12, -1e-7, 3e-6, -9.08e-5, 1e-3, -0.0123, 0.2, -0.3, 0.4999, -0.4999,
                      0.5, -0.5001, 0.7, -2.0, 5.0, -30.0, -1e4, float("-inf"), float("inf"), float("nan")])
    for dtype in ([torch.float32] if DEVICE == "cuda" else [torch.float32, torch.float64]):
        dd = d.to(DEVICE, dtype)
        out = torch.empty_like(dd)
        _kernel[(1,)](dd, out, dd.numel(), BLOCK=32)
        want = torch.expm1(dd.double())
        assert_close(out, want, 0.0, 4e-7 if dtype == torch.float32 else 1e-14, f"expm1 {dtype}")


def test_confident_prediction_gradient():
    """p_y - 1 of a confident, correct prediction keeps its digits (as far as the fp32 lse holds
    them): exp(d) - 1 of d = x_y - lse would lose them to the rounding of exp(d) near 1."""
    c = 3
    x = torch.zeros(4, c)
    x[0, 1:] = -10.0
    x[1, 1:] = -6.0
    x[2, 1:] = -3.0
    x[3, 1:] = -0.25
    y = torch.zeros(4, dtype=torch.long)
    x, y = x.to(DEVICE), y.to(DEVICE)
    xt = x.clone().requires_grad_()
    out = lossfuse.cross_entropy(xt, y, reduction="sum", backend="triton")
    (gx,) = torch.autograd.grad(out, xt)
    x64 = x.double().requires_grad_()
    (g64,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x64, y, reduction="sum"), x64)
    assert bool((gx[:, 0] < 0).all())
    # ~1e-7 absolute is what log(sum exp) in fp32 keeps of p_y - 1 = -9e-5 in row 0.
    assert_close(gx, g64, 2e-7, 1e-5, "gradient")


def test_mixed_precision_loss_scale():
    """Forward under autocast (loss in fp32, logits read as fp16), backward with GradScaler's 2^16:
    the fp16 gradient is the float64 gradient x 2^16 rounded to fp16, within 1 ulp, with the same
    elements flushed to zero."""
    n, c = 24, 70
    x = (torch.randn(n, c) * 6).half().to(DEVICE).requires_grad_()
    y = rand_targets((n,), c, -100)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = lossfuse.cross_entropy(x, y, label_smoothing=0.05, backend="triton")
    assert out.dtype == torch.float32
    (gx,) = torch.autograd.grad(out, x, torch.tensor(65536.0, device=DEVICE))
    x64 = x.detach().double().requires_grad_()
    ref = reference.cross_entropy(x64, y, None, -100, "mean", 0.05)
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(65536.0, dtype=torch.float64, device=DEVICE))
    want = g64.half()
    inf = torch.tensor(float("inf"), dtype=torch.half, device=DEVICE)
    ulp = (torch.nextafter(want.abs(), inf) - want.abs()).double()
    diff = (gx.double() - want.double()).abs()
    if not bool((diff <= ulp).all()):
        assert_close(gx, want, 0.0, 0.0, "fp16 gradient x 2^16 (1 ulp)")
    assert bool(((gx == 0) == (want == 0)).all())
    assert bool((gx == 0).any()) and bool((gx != 0).any())


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 runs only under the interpreter")
@pytest.mark.parametrize("prob", [False, True])
def test_float64_interpreter(prob):
    x = rand_logits((2, 9, 3), torch.float64)
    if prob:
        t = torch.rand(2, 9, 3, dtype=torch.float64)
    else:
        t = rand_targets((2, 3), 9, -100)
    check_api(x, t, weight=rand_weight(9).double(), reduction="none", label_smoothing=0.1, target_grad=prob)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only")
def test_float64_cuda_raises():
    x = rand_logits((2, 9, 1), torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        tk.cross_entropy_fwd(x, torch.zeros(2, 1, dtype=torch.long, device=DEVICE), None, -100, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Tilings: the same results for other block sizes; the GPU launch configuration.
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter block sizes")
@pytest.mark.parametrize("blocks", [(4, 8, 4), (128, 1024, 64)], ids=["tiny", "large"])
@pytest.mark.parametrize("prob", [False, True])
def test_other_block_sizes(monkeypatch, blocks, prob):
    max_c, tile, max_s = blocks
    monkeypatch.setattr(tk, "_INTERPRET_MAX_BLOCK_C", max_c)
    monkeypatch.setattr(tk, "_INTERPRET_TILE", tile)
    monkeypatch.setattr(tk, "_INTERPRET_MAX_BLOCK_S", max_s)
    for shape in [(9, 37), (2, 7, 5, 3)]:
        x = rand_logits(shape, torch.float32)
        if prob:
            t = torch.rand(shape).to(DEVICE)
        else:
            t = rand_targets((shape[0],) + shape[2:], shape[1], -100)
        check_api(x, t, weight=rand_weight(shape[1]), reduction="none", label_smoothing=0.1, target_grad=prob)


def test_gpu_launch_config():
    """Powers of two, capped; every row covered; 4-16 warps."""
    for n, c, s, spatial in [(8, 128256, 1, False), (4096, 32000, 1, False), (1 << 20, 10, 1, False),
                             (7, 3, 1, False), (8, 21, 512 * 512, True), (2, 150, 37, True),
                             (1, 5, 1 << 33, True)]:
        grid, br, bc, nw = tk._launch_config(n, c, s, spatial, interpret=False)
        assert br & (br - 1) == 0 and bc & (bc - 1) == 0
        assert bc <= tk._MAX_BLOCK_C and br * bc <= max(tk._TILE, bc)
        assert 4 <= nw <= 16
        if spatial:
            assert grid[0] == n * -(-s // br) and br <= tk._MAX_BLOCK_S
        else:
            assert grid[0] * br >= n * s and (grid[0] - 1) * br < n * s


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("shape", [(37, 19), (5, 1000), (3, 37, 20)], ids=str)
def test_confident_rows_keep_their_tiny_loss(shape, prob):
    """As the CPU kernel's test: log1p of the terms below the max, not log of 1 + their rounding."""
    from test_cross_entropy import confident_rows

    x, y = confident_rows(shape)
    t = torch.nn.functional.one_hot(y, shape[1]).movedim(-1, 1).float() if prob else y
    ref = torch.nn.functional.cross_entropy(x.double(), t.double() if prob else t, reduction="none")
    out = lossfuse.cross_entropy(x.to(DEVICE), t.to(DEVICE), reduction="none", backend="triton").cpu()
    assert ref.min() < 1e-3
    rel = ((out.double() - ref) / ref).abs().max().item()
    assert rel < 4e-6, f"worst relative error {rel:.3g}"


def test_fused_op_is_the_two_kernels():
    """lossfuse::cross_entropy_fused on CUDA (asked for only on the CPU by the autograd Function, but
    public): the forward, and the backward kernel for grad_scale on every row."""
    x3 = torch.randn(5, 11, 1, device=DEVICE) * 3
    y = torch.randint(0, 11, (5, 1), device=DEVICE)
    y[2, 0] = -100
    w = torch.rand(11, device=DEVICE) + 0.5
    loss, lse, gx = tk.cross_entropy_fused(x3, y, w, -100, 0.1, 1e-3, 0.0, 0.25)
    loss2, lse2 = tk.cross_entropy_fwd(x3, y, w, -100, 0.1, 1e-3, 0.0)
    gx2, _ = tk.cross_entropy_bwd(torch.full((5, 1), 0.25, device=DEVICE), x3, y, w, lse2, -100, 0.1, 1e-3, 0.0,
                                  True, False)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2) and torch.equal(gx, gx2)
    xd = x3.double().squeeze(2).requires_grad_(True)
    ref = reference.cross_entropy(xd, y.squeeze(1), w.double(), -100, "sum", 0.1, z_loss=1e-3)
    (g64,) = torch.autograd.grad(ref * 0.25, xd)
    assert_close(gx.squeeze(2), g64, *TOL[torch.float32]["grad"], "grad")
