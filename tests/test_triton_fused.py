"""The Triton backend's fused cross-entropy: the forward writes the input gradient, the backward
checks grad_output on the device (lossfuse/ops/cross_entropy.py, lossfuse/triton/cross_entropy.py).

Without a GPU the kernels run on CPU tensors in Triton's interpreter, with its small block sizes
(the shapes below go through one-chunk rows, multi-chunk rows and the spatial walk). Fused results
are compared with the unfused kernels (bit for bit: the same expressions in the same order) and with
the float64 reference.
"""

import pytest
import torch

from helpers import triton_device_or_skip

DEVICE = triton_device_or_skip()

import lossfuse  # noqa: E402
from lossfuse import reference  # noqa: E402
from lossfuse.ops import cross_entropy as ops_ce  # noqa: E402

from helpers import ulps_apart  # noqa: E402

from lossfuse.triton import cross_entropy as tk  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-4, 1.6e-2), torch.float64: (1e-12, 1e-9)}

# (name, shape): rows of one chunk (ONE_CHUNK), rows of several chunks (the interpreter's chunk is 32
# classes), the (N, C, H, W) spatial walk.
SHAPES = {"one_chunk": (9, 20), "chunks": (6, 45), "spatial": (2, 37, 3, 4)}
OPTIONS = {
    "plain": {},
    "weight_ignore_smoothing": {"weight": True, "ignore": True, "label_smoothing": 0.1},
    "zloss_softcap": {"z_loss": 1e-3, "softcap": 4.0, "ignore": True},
}


def _case(shape, dtype, opts):
    x = (torch.randn(shape) * 3).to(DEVICE, dtype)
    c = shape[1]
    y = torch.randint(0, c, (shape[0],) + tuple(shape[2:]), device=DEVICE)
    if opts.get("ignore"):
        y.view(-1)[::3] = -100
    kw = {"label_smoothing": opts.get("label_smoothing", 0.0), "z_loss": opts.get("z_loss", 0.0),
          "softcap": opts.get("softcap")}
    if opts.get("weight"):
        kw["weight"] = (torch.rand(c) + 0.5).to(DEVICE)
    return x, y, kw


def _fused(x, y, reduction, kw, inplace=False):
    return lossfuse.cross_entropy(x, y, reduction=reduction, inplace_backward=inplace, backend="triton", **kw)


def _unfused(x, y, reduction, kw):
    """The autograd Function without the fused path: the forward, then the backward kernel."""
    return lossfuse.CrossEntropyFunction.apply(
        x, y, kw.get("weight"), -100, reduction, kw["label_smoothing"], float(kw["z_loss"]),
        float(kw["softcap"] or 0.0), False, "triton", False)[0]


def _reference(x, y, reduction, kw):
    xd = x.detach().double().requires_grad_(True)
    w = kw.get("weight")
    out = reference.cross_entropy(xd, y, None if w is None else w.double(), -100, reduction, kw["label_smoothing"],
                                  z_loss=kw["z_loss"], softcap=kw["softcap"])
    return xd, out


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(e.abs().max().item(), 1e-3)
    bad = ~((a - e).abs() <= atol * scale + rtol * e.abs())
    assert not bad.any(), f"{what}: {int(bad.sum())} of {a.numel()} differ, worst {(a - e).abs().max().item():.3g}"


# grad_output 1: the forward's gradient handed over; others: rewritten by the backward kernel.
GRAD_OUTPUTS = {"one": 1.0, "0.37": 0.37, "2^16": 2.0 ** 16}
REDUCTION = {"plain": "sum", "weight_ignore_smoothing": "mean", "zloss_softcap": "mean"}


# Every shape with every option, in float32 or bfloat16 (the interpreter is slow: not the full product).
MATRIX = [(shape, option, dtype) for shape in SHAPES for option, dtype in (
    ("plain", torch.float32), ("weight_ignore_smoothing", torch.bfloat16), ("zloss_softcap", torch.float32))]
MATRIX += [("chunks", "plain", torch.bfloat16), ("spatial", "zloss_softcap", torch.bfloat16),
           ("one_chunk", "weight_ignore_smoothing", torch.float32)]


@pytest.mark.parametrize("shape,option,dtype", MATRIX, ids=lambda v: str(v).replace("torch.", ""))
def test_fused_matches_unfused_and_float64(shape, option, dtype):
    """Loss and gradient of the fused path for grad_output 1, 0.37 (and 2^16 for the first option):
    the unfused kernels' bits, and float64's values."""
    reduction = REDUCTION[option]
    x, y, kw = _case(SHAPES[shape], dtype, OPTIONS[option])
    x.requires_grad_(True)
    xd, ref = _reference(x, y, reduction, kw)
    unfused = _unfused(x, y, reduction, kw)
    gos = GRAD_OUTPUTS if option == "plain" else {k: v for k, v in GRAD_OUTPUTS.items() if k != "2^16"}
    for name, go in gos.items():
        out = _fused(x, y, reduction, kw)
        assert out.grad_fn.fused_grad is not None, "the fused path was not taken"
        assert torch.equal(out, unfused)
        go_t = torch.tensor(go, dtype=out.dtype, device=DEVICE)
        (g,) = torch.autograd.grad(out, x, go_t)
        (g_unfused,) = torch.autograd.grad(unfused, x, go_t, retain_graph=True)
        assert g.dtype == dtype and g.shape == x.shape
        assert torch.equal(g, g_unfused), f"grad_output {name}: fused and unfused gradients differ"
        (g64,) = torch.autograd.grad(ref, xd, go_t.double(), retain_graph=True)
        _assert_close(g, g64, dtype, f"grad_output {name}")
    _assert_close(out, ref, dtype, "loss")


def test_forward_gradient_is_handed_over_and_rewritten_only_when_needed(monkeypatch):
    """grad_output 1: the backward returns the forward's buffer untouched (a sentinel written into it
    survives, and .grad is that very tensor); grad_output 2: every element is rewritten. The unfused
    backward kernel never runs: the decision is the fused kernel's, on the device."""
    monkeypatch.setattr(tk, "cross_entropy_bwd", lambda *a: pytest.fail("the unfused backward ran"))
    for shape in SHAPES.values():
        x, y, kw = _case(shape, torch.float32, OPTIONS["weight_ignore_smoothing"])
        x.requires_grad_(True)
        out = _fused(x, y, "mean", kw)
        buf = out.grad_fn.fused_grad
        buf.fill_(float("nan"))
        ptrs = []
        h = x.register_hook(lambda g: ptrs.append(g.data_ptr()))
        out.backward()
        h.remove()
        assert bool(x.grad.isnan().all()), "grad_output 1 recomputed the gradient"
        assert x.grad.data_ptr() == ptrs[-1] == buf.data_ptr()
        x.grad = None

        out = _fused(x, y, "mean", kw)
        out.grad_fn.fused_grad.fill_(float("nan"))
        (g,) = torch.autograd.grad(out, x, torch.tensor(2.0, device=DEVICE))
        xd, ref = _reference(x, y, "mean", kw)
        (g64,) = torch.autograd.grad(ref * 2.0, xd)
        _assert_close(g, g64, torch.float32, "grad_output 2")


def test_retained_graph_second_backward_recomputes():
    """The forward's buffer is handed out once; a retained graph's second backward runs the unfused
    kernel on the (intact) logits."""
    x, y, kw = _case((7, 45), torch.bfloat16, OPTIONS["plain"])
    x.requires_grad_(True)
    out = _fused(x, y, "mean", kw)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    g1_copy = g1.clone()
    g1.zero_()  # what an optimizer may do to a .grad it was handed
    (g2,) = torch.autograd.grad(out, x, torch.tensor(3.0, dtype=out.dtype))
    (g_unfused,) = torch.autograd.grad(_unfused(x, y, "mean", kw), x, torch.tensor(3.0, dtype=out.dtype))
    assert torch.equal(g2, g_unfused)
    (g_one,) = torch.autograd.grad(_unfused(x, y, "mean", kw), x)
    assert torch.equal(g1_copy, g_one)


def test_reduction_none_per_row_gradient_is_unfused():
    """A per-row grad_output exists only for reduction='none', which never fuses."""
    for dtype in (torch.float32, torch.bfloat16):
        x, y, kw = _case((6, 45), dtype, OPTIONS["weight_ignore_smoothing"])
        x.requires_grad_(True)
        out = _fused(x, y, "none", kw)
        assert out.grad_fn.fused_grad is None
        go = torch.rand(out.shape, device=DEVICE).to(dtype)
        (g,) = torch.autograd.grad(out, x, go)
        xd, ref = _reference(x, y, "none", kw)
        (g64,) = torch.autograd.grad(ref, xd, go.double())
        _assert_close(g, g64, dtype, "per-row grad_output")


def test_float16_and_probability_targets_do_not_fuse():
    x = torch.randn(5, 40, device=DEVICE).half().requires_grad_(True)
    out = _fused(x, torch.randint(0, 40, (5,), device=DEVICE), "mean",
                 {"label_smoothing": 0.0, "z_loss": 0.0, "softcap": None})
    assert out.grad_fn.fused_grad is None  # GradScaler's dtype: grad_output is rarely 1
    t = torch.softmax(torch.randn(5, 40, device=DEVICE), 1)
    out = lossfuse.cross_entropy(x.detach().float().requires_grad_(True), t, backend="triton")
    assert out.grad_fn.fused_grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_scaling_under_autocast(dtype):
    """GradScaler's step on the Triton backend: autocast forward (fp32 loss), grad_output 2^16; every
    gradient element within 1 ulp of the float64 gradient x 2^16 rounded to the dtype, the same
    elements zero (bf16 takes the fused path and its backward rewrites the gradient; fp16 does not fuse)."""
    n, c, scale = 32, 160, 2.0 ** 16
    x = (torch.randn(n, c) * 6).to(DEVICE, dtype).requires_grad_(True)
    y = torch.randint(0, c, (n,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        loss = lossfuse.cross_entropy(x, y, backend="triton")
    assert loss.dtype == torch.float32
    assert (loss.grad_fn.fused_grad is not None) == (dtype == torch.bfloat16)
    (loss * scale).backward()
    xd = x.detach().double().requires_grad_(True)
    torch.nn.functional.cross_entropy(xd, y).backward()
    expected = xd.grad * scale
    ulps = ulps_apart(x.grad, expected, dtype)
    assert ulps.max().item() <= 1.0, f"max {ulps.max().item():.2f} ulp"
    assert torch.equal(x.grad == 0, expected.to(dtype) == 0), "different elements flushed to zero"


def test_ignored_rows_get_exact_zeros_on_the_fused_path():
    x = torch.randn(6, 45) * 3
    x[1, 4] = float("nan")
    x[3, 0] = float("inf")
    x[4] = float("-inf")
    y = torch.tensor([2, -100, 7, -100, -100, 44])
    x, y = x.to(DEVICE).requires_grad_(True), y.to(DEVICE)
    w = (torch.rand(45) + 0.5).to(DEVICE)
    for go in (1.0, 0.5):
        out = lossfuse.cross_entropy(x, y, w, label_smoothing=0.1, backend="triton")
        assert out.grad_fn.fused_grad is not None and bool(out.isfinite())
        (g,) = torch.autograd.grad(out, x, torch.tensor(go, device=DEVICE))
        assert bool((g[[1, 3, 4]] == 0).all()) and bool(g[[0, 2, 5]].isfinite().all())
        keep = torch.tensor([0, 2, 5])
        xd, ref = _reference(x[keep], y[keep], "sum", {"label_smoothing": 0.1, "z_loss": 0.0, "softcap": None,
                                                       "weight": w})
        (g64,) = torch.autograd.grad(ref * go / w[y[keep]].double().sum(), xd)
        _assert_close(g[keep], g64, torch.float32, "kept rows")


@pytest.fixture
def inplace_fusion(monkeypatch):
    """The fused in-place kernel, off for users (ops/cross_entropy.py, TRITON_INPLACE_FUSED_DTYPES),
    switched on to keep it tested."""
    monkeypatch.setattr(ops_ce, "TRITON_INPLACE_FUSED_DTYPES", (torch.float32, torch.float64))


def test_inplace_does_not_fuse_by_default():
    """In place keeps the logits intact until backward(), on a view of another tensor too (a hook on
    such a view after an in-place forward crashes torch), and the gradient is exact for any grad_output."""
    for dtype in (torch.float32, torch.bfloat16):
        x, y, kw = _case((6, 45), dtype, OPTIONS["weight_ignore_smoothing"])
        leaf = x.clone().requires_grad_(True)
        logits = (leaf.t() * 1.0).t()
        out = _fused(logits, y, "mean", kw, inplace=True)
        assert out.grad_fn.fused_grad is None and torch.equal(logits.detach(), x)
        logits.register_hook(lambda g: None)
        go = torch.tensor(0.37, dtype=out.dtype)
        (g,) = torch.autograd.grad(out, leaf, go)
        xd, ref = _reference(x, y, "mean", kw)
        (g64,) = torch.autograd.grad(ref, xd, go.double())
        _assert_close(g, g64, dtype, "in-place gradient")


@pytest.mark.parametrize("go", [1.0, 0.37])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_inplace_float32_fuses_over_the_logits(inplace_fusion, shape, go):
    """float32 in place: the forward writes the gradient over the logits; grad_output != 1 scales it
    in fp32 (one fp32 multiply of the grad_output-1 gradient: a rounding more than a recompute)."""
    x, y, kw = _case(SHAPES[shape], torch.float32, OPTIONS["weight_ignore_smoothing"])
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    out = _fused(logits, y, "mean", kw, inplace=True)
    assert out.grad_fn.fused_grad is not None
    xr = x.clone().requires_grad_(True)
    (g_one,) = torch.autograd.grad(_unfused(xr, y, "mean", kw), xr)
    assert torch.equal(logits.detach(), g_one), "the logits do not hold the gradient after the forward"
    go_t = torch.tensor(go, device=DEVICE)
    (g,) = torch.autograd.grad(out, leaf, go_t)
    assert torch.equal(g, g_one * go_t)
    xd, ref = _reference(x, y, "mean", kw)
    (g64,) = torch.autograd.grad(ref, xd, go_t.double())
    _assert_close(g, g64, torch.float32, "in-place gradient")


def test_inplace_refuses_later_use_of_the_logits(inplace_fusion):
    """A node that saved the logits and runs after the loss is refused (their version was bumped in
    the forward), as is a retained graph's second backward."""
    x, y, kw = _case((6, 45), torch.float32, OPTIONS["plain"])
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    other = (logits * logits).sum()  # saves logits
    out = _fused(logits, y, "sum", kw, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out + other).backward()
    logits = leaf * 1.0
    out = _fused(logits, y, "sum", kw, inplace=True)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_inplace_bfloat16_does_not_fuse(inplace_fusion):
    """bf16 in place: a gradient cast to bf16 in the forward could not be scaled exactly afterwards,
    so the logits stay intact until backward(), which writes the exact gradient over them."""
    x, y, kw = _case((6, 45), torch.bfloat16, OPTIONS["plain"])
    leaf = x.clone().requires_grad_(True)
    logits = leaf * 1.0
    out = _fused(logits, y, "mean", kw, inplace=True)
    assert out.grad_fn.fused_grad is None and torch.equal(logits.detach(), x)
    (g,) = torch.autograd.grad(out, leaf, torch.tensor(0.37, dtype=out.dtype))
    xr = x.clone().requires_grad_(True)
    (g_unfused,) = torch.autograd.grad(_unfused(xr, y, "mean", kw), xr, torch.tensor(0.37, dtype=out.dtype))
    assert torch.equal(g, g_unfused)


def test_no_host_sync_on_the_triton_path(monkeypatch, inplace_fusion):
    """Structural: nothing on the fused path reads a tensor's value on the host (on CUDA that would
    be a sync and would break graph capture). Tensor.item / __float__ / __int__ / __bool__ /
    tolist raise during forward and backward; the functional layer's CPU-only target check (CUDA
    uses a device-side assert instead) is stubbed out."""
    monkeypatch.setattr(reference, "check_targets_in_range", lambda *a, **k: None)

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return f

    cases = [((6, 45), torch.float32, False), ((2, 37, 3, 4), torch.bfloat16, False), ((6, 45), torch.float32, True)]
    for shape, dtype, inplace in cases:
        x, y, kw = _case(shape, dtype, OPTIONS["weight_ignore_smoothing"])
        leaf = x.clone().requires_grad_(True)
        go = torch.tensor(0.37, dtype=dtype, device=DEVICE)
        with monkeypatch.context() as m:
            for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
                m.setattr(torch.Tensor, name, refuse(name))
            out = _fused(leaf * 1.0 if inplace else leaf, y, "mean", kw, inplace=inplace)
            fused = out.grad_fn.fused_grad is not None
            (g,) = torch.autograd.grad(out, leaf, go)
        assert fused
        xd, ref = _reference(x, y, "mean", kw)
        (g64,) = torch.autograd.grad(ref, xd, go.double())
        _assert_close(g, g64, dtype, "gradient")


@pytest.mark.skipif(DEVICE == "cuda", reason="the ops' CPU key exists only under the interpreter")
def test_opcheck_new_ops():
    x3 = torch.randn(4, 40, 1) * 3
    y = torch.randint(0, 40, (4, 1))
    y[1, 0] = -100
    w = torch.rand(40) + 0.5
    scale = torch.tensor(0.25)
    ops = torch.ops.lossfuse
    torch.library.opcheck(ops.cross_entropy_fused_scaled, (x3, y, w, scale, -100, 0.1, 1e-3, 5.0))
    torch.library.opcheck(ops.cross_entropy_fused_scaled_inplace, (x3.clone(), y, None, None, -100, 0.0, 0.0, 0.0))
    loss, lse, gx = ops.cross_entropy_fused_scaled(x3, y, w, scale, -100, 0.1, 0.0, 0.0)
    go = torch.tensor(2.0)  # != 1: both ops write their mutable argument
    torch.library.opcheck(ops.cross_entropy_fused_bwd,
                          (go, torch.full((4, 1), 0.5), gx.clone(), x3, y, w, lse, -100, 0.1, 0.0, 0.0))
    torch.library.opcheck(ops.cross_entropy_scale_inplace, (go, gx.clone()))
    # The fake kernel's layout is the launcher's (torch.compile relies on it).
    for x in (x3, torch.randn(2, 40, 6)):
        yy = torch.randint(0, 40, (x.shape[0], x.shape[2]))
        real = ops.cross_entropy_fused_scaled(x, yy, None, None, -100, 0.0, 0.0, 0.0)
        fake = ops_ce._fused_scaled_fake(x, yy, None, None, -100, 0.0, 0.0, 0.0)
        for a, b in zip(real, fake):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


@pytest.mark.skipif(DEVICE == "cuda", reason="the ops' CPU key exists only under the interpreter")
def test_new_ops_under_torch_compile_fullgraph():
    """The fused forward and its device-checked backward traced by torch.compile(fullgraph=True)
    (fake kernels, declared mutations), with the same results as eager."""
    torch._dynamo.reset()
    ops = torch.ops.lossfuse

    def step(x3, y, w, go):
        denom = torch.where(y != -100, w[torch.where(y != -100, y, 0)], 0.0).sum()
        loss, lse, gx = ops.cross_entropy_fused_scaled(x3, y, w, torch.reciprocal(denom), -100, 0.1, 0.0, 0.0)
        rows = (go / denom).expand(y.shape)
        ops.cross_entropy_fused_bwd(go, rows, gx, x3, y, w, lse, -100, 0.1, 0.0, 0.0)
        return loss.sum() / denom, gx

    x3 = torch.randn(5, 40, 1) * 3
    y = torch.randint(0, 40, (5, 1))
    y[2, 0] = -100
    w = torch.rand(40) + 0.5
    # aot_eager: the fake kernels and the functionalised mutation are what is checked; inductor's
    # code generation would only add minutes of compile time to CI.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for go in (torch.tensor(1.0), torch.tensor(0.37)):
        le, ge = step(x3, y, w, go)
        lc, gc = compiled(x3, y, w, go)
        assert torch.equal(le, lc) and torch.equal(ge, gc)
        xd = x3.squeeze(2).double().requires_grad_(True)
        ref = reference.cross_entropy(xd, y.squeeze(1), w.double(), -100, "mean", 0.1)
        (g64,) = torch.autograd.grad(ref, xd, go.double())
        _assert_close(gc.squeeze(2), g64, torch.float32, "compiled gradient")


def test_fused_launch_config():
    """The GPU configurations: chunks of at most _FUSED_ONE_CHUNK_MAX classes (at 16384 ptxas spills),
    a row held in registers when it fits one, 8 warps for tiles of 64+ rows, the block's register
    ceiling stated; otherwise the forward's tiles."""
    for n, c, s, spatial in [(8192, 128256, 1, False), (4096, 32000, 1, False), (8192, 16384, 1, False),
                             (8192, 8192, 1, False), (65536, 1000, 1, False), (1 << 20, 10, 1, False),
                             (8, 21, 512 * 512, True), (2, 150, 37, True)]:
        grid, br, bc, nw, one, maxnreg = tk.fused_launch_config(n, c, s, spatial, interpret=False, arch=80)
        assert tk.fused_launch_config(n, c, s, spatial, interpret=False, arch=90) == (grid, br, bc, nw, one, None)
        grid0, br0, bc0, _ = tk._launch_config(n, c, s, spatial, interpret=False)
        assert (grid, br) == (grid0, br0) and bc == min(bc0, tk._FUSED_ONE_CHUNK_MAX)
        assert one == (c <= bc)
        assert nw >= (8 if br >= 64 else 4) and nw <= 16
        assert maxnreg * 32 * nw <= 65536 and maxnreg <= 255
