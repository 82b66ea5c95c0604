"""The Triton backend's fused focal and Huber paths: a reducing forward that requires grad also writes
the gradient (sigmoid focal and Huber for grad_output / numel, softmax focal for 1 / denom read on the
device), and the backward decides on the device whether that gradient stands (lossfuse/ops/focal.py,
lossfuse/ops/huber.py, lossfuse/triton/focal.py, lossfuse/triton/huber.py).

As in test_triton_fused.py, the kernels run on CPU tensors in Triton's interpreter without a GPU.
Fused results are compared with the unfused kernels (bit for bit: the same expressions in the same
order, for grad_output 1, 0.37 and 2^16) and with the float64 reference.
"""

import pytest
import torch

from helpers import assert_close, triton_device_or_skip, ulps_apart

DEVICE = triton_device_or_skip()

import lossfuse  # noqa: E402
from lossfuse import reference  # noqa: E402
from lossfuse.ops import focal as ops_focal  # noqa: E402
from lossfuse.ops import huber as ops_huber  # noqa: E402
from lossfuse.triton import focal as tf  # noqa: E402
from lossfuse.triton import huber as th  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

GRAD_OUTPUTS = {"one": 1.0, "0.37": 0.37, "2^16": 2.0 ** 16}


class Case:
    """One loss configuration: ``call(operands, fused)`` runs its autograd Function on the Triton
    backend with the fused path asked for or not; ``reference(operands64)`` is the float64 loss;
    ``diff`` says how many leading operands are differentiated."""

    def __init__(self, name, make, call, ref, diff=1):
        self.name, self.make, self.call, self.ref, self.diff = name, make, call, ref, diff

    def __repr__(self):
        return self.name


def _sigmoid_index(dtype, reduction):
    def make():
        x = (torch.randn(23, 30) * 3).to(DEVICE, dtype)
        return [x, torch.randint(0, 31, (23,), device=DEVICE)]  # index 30: background rows

    def call(ops, fused):
        return ops_focal.SigmoidFocalFunction.apply(ops[0], ops[1], 0.25, 2.0, reduction, "triton", fused)

    def ref(ops):
        t = torch.nn.functional.one_hot(ops[1], 31)[:, :30].double()
        return reference.sigmoid_focal_loss(ops[0], t, 0.25, 2.0, reduction)

    return Case(f"sigmoid_index-{reduction}", make, call, ref)


def _sigmoid_soft(dtype, reduction):
    def make():
        x = (torch.randn(7, 5, 33) * 3).to(DEVICE, dtype)
        return [x, torch.rand(7, 5, 33, device=DEVICE).to(dtype)]

    def call(ops, fused):
        return ops_focal.SigmoidFocalFunction.apply(ops[0], ops[1], -1.0, 1.5, reduction, "triton", fused)

    def ref(ops):
        return reference.sigmoid_focal_loss(ops[0], ops[1], -1.0, 1.5, reduction)

    return Case(f"sigmoid_soft-{reduction}", make, call, ref)


def _softmax(dtype, reduction, shape):
    c = shape[1]

    def make():
        x = (torch.randn(shape) * 3).to(DEVICE, dtype)
        y = torch.randint(0, c, (shape[0],) + tuple(shape[2:]), device=DEVICE)
        y.view(-1)[::4] = -100
        return [x, y, (torch.rand(c) + 0.5).to(DEVICE)]

    def call(ops, fused):
        return ops_focal.SoftmaxFocalFunction.apply(ops[0], ops[1], 0.25, 2.0, ops[2], -100, reduction, "triton",
                                                   fused)

    def ref(ops):
        return reference.softmax_focal_loss(ops[0], ops[1], 0.25, 2.0, ops[2].double(), -100, reduction)

    return Case(f"softmax{list(shape)}-{reduction}", make, call, ref)


def _huber(dtype, reduction, mode, weighted):
    delta = 0.7 if mode != ops_huber.L1 else 0.0

    def make():
        x = torch.randn(9, 67).to(DEVICE, dtype)
        y = torch.randn(9, 67).to(DEVICE, dtype)
        return [x, y] + ([torch.rand(9, 67, device=DEVICE).to(dtype)] if weighted else [])

    def call(ops, fused):
        w = ops[2] if weighted else None
        # EAGER_GRADIENT is the Function's switch for the fused path (ops/huber.py)
        ops_huber.EAGER_GRADIENT = fused
        try:
            return ops_huber.HuberFunction.apply(ops[0], ops[1], w, mode, delta, reduction, ops[0].dtype, "triton")
        finally:
            ops_huber.EAGER_GRADIENT = True

    def ref(ops):
        w = ops[2] if weighted else None
        if mode == ops_huber.HUBER:
            return reference.huber_loss(ops[0], ops[1], reduction, delta, w)
        return reference.smooth_l1_loss(ops[0], ops[1], reduction, delta)  # unweighted cases only

    name = {ops_huber.HUBER: "huber", ops_huber.SMOOTH_L1: "smooth_l1", ops_huber.L1: "l1"}[mode]
    return Case(f"{name}{'-weighted' if weighted else ''}-{reduction}", make, call, ref, diff=2)


def _cases(dtype):
    return [
        _sigmoid_index(dtype, "mean"), _sigmoid_soft(dtype, "sum"),
        _softmax(dtype, "mean", (6, 45)), _softmax(dtype, "sum", (2, 37, 3, 4)),
        _huber(dtype, "mean", ops_huber.HUBER, True), _huber(dtype, "sum", ops_huber.SMOOTH_L1, False),
        _huber(dtype, "mean", ops_huber.L1, False),
    ]


MATRIX = [(case, dtype) for dtype in (torch.float32, torch.bfloat16) for case in _cases(dtype)]


def _is_fused(out):
    fn = out.grad_fn
    return getattr(fn, "fused_grad", None) is not None or getattr(fn, "eager_grads", None) is not None


def _leaves(operands, diff):
    return [o.clone().requires_grad_(i < diff) for i, o in enumerate(operands)]


@pytest.mark.parametrize("case,dtype", MATRIX, ids=lambda v: str(v).replace("torch.", ""))
def test_fused_matches_unfused_and_float64(case, dtype):
    """Loss and gradients of the fused path for each grad_output: the unfused kernels' bits, and
    float64's values."""
    operands = case.make()
    ref_ops = [o.double().requires_grad_(i < case.diff) if o.is_floating_point() else o
               for i, o in enumerate(operands)]
    ref = case.ref(ref_ops)
    for name, go in GRAD_OUTPUTS.items():
        fused_in, plain_in = _leaves(operands, case.diff), _leaves(operands, case.diff)
        out = case.call(fused_in, True)
        assert _is_fused(out), "the fused path was not taken"
        unfused = case.call(plain_in, False)
        assert not _is_fused(unfused)
        assert torch.equal(out, unfused), "fused and unfused losses differ"
        go_t = torch.tensor(go, dtype=out.dtype, device=DEVICE)
        grads = torch.autograd.grad(out, fused_in[:case.diff], go_t)
        grads_unfused = torch.autograd.grad(unfused, plain_in[:case.diff], go_t)
        grads64 = torch.autograd.grad(ref, ref_ops[:case.diff], torch.tensor(go, dtype=torch.float64),
                                      retain_graph=True)
        for i, (g, gu, g64) in enumerate(zip(grads, grads_unfused, grads64)):
            assert g.dtype == operands[i].dtype and g.shape == operands[i].shape
            assert torch.equal(g, gu), f"grad_output {name}, operand {i}: fused and unfused gradients differ"
            assert_close(g.cpu(), g64.cpu(), dtype, f"grad_output {name}, operand {i}")
    assert_close(out.cpu(), ref.detach().cpu(), dtype, "loss")


@pytest.mark.parametrize("case", _cases(torch.bfloat16), ids=repr)
def test_bfloat16_gradient_is_scaled_before_its_one_cast(case):
    """A loss scale of 2^16 (what GradScaler passes): the bf16 gradient is the float64 gradient
    rounded once -- within one bf16 ulp -- so the scale went in before the cast, not after a first
    rounding (which, multiplied by 2^16, would leave the errors of the small values)."""
    operands = case.make()
    leaves = _leaves(operands, case.diff)
    out = case.call(leaves, True)
    assert _is_fused(out)
    go = 2.0 ** 16
    (g,) = torch.autograd.grad(out, leaves[0], torch.tensor(go, dtype=out.dtype, device=DEVICE))
    ref_ops = [o.double().requires_grad_(i == 0) if o.is_floating_point() else o for i, o in enumerate(operands)]
    (g64,) = torch.autograd.grad(case.ref(ref_ops), ref_ops[0], torch.tensor(go, dtype=torch.float64))
    # 1 ulp of slack for the fp32 math inside (exp, log1p) on top of the one rounding
    assert ulps_apart(g.cpu(), g64.cpu(), torch.bfloat16).max() <= 1.0


@pytest.mark.parametrize("case", _cases(torch.float32), ids=repr)
def test_forward_gradient_is_handed_over_and_rewritten_only_when_needed(monkeypatch, case):
    """grad_output 1: the gradient is the forward's own buffer, untouched (a sentinel written into it
    survives), and no unfused backward kernel runs; grad_output 2: every element of that buffer is
    rewritten (filled with NaN first, it then equals the unfused gradient)."""
    operands = case.make()
    two = torch.tensor(2.0, device=DEVICE)
    plain = _leaves(operands, case.diff)
    expected = torch.autograd.grad(case.call(plain, False), plain[:case.diff], two)
    for name in ("sigmoid_focal_bwd", "softmax_focal_bwd"):
        monkeypatch.setattr(tf, name, lambda *a, _n=name: pytest.fail(f"the unfused {_n} ran"))
    monkeypatch.setattr(th, "huber_bwd", lambda *a: pytest.fail("the unfused huber_bwd ran"))
    for go, check in ((None, "sentinel"), (two, "rewritten")):
        leaves = _leaves(operands, case.diff)
        out = case.call(leaves, True)
        fn = out.grad_fn
        buffers = [fn.fused_grad] if hasattr(fn, "fused_grad") else list(fn.eager_grads)
        for buf in buffers:
            buf.fill_(float("nan"))
        grads = torch.autograd.grad(out, leaves[:case.diff], go)
        for g, e, buf in zip(grads, expected, buffers):
            assert g.data_ptr() == buf.data_ptr(), "the forward's gradient was copied"
            if check == "sentinel":
                assert bool(g.isnan().all()), "grad_output 1 recomputed the gradient"
            else:
                assert torch.equal(g, e), "grad_output 2: the gradient was not rewritten exactly"


@pytest.mark.parametrize("case", _cases(torch.float32)[:3] + _cases(torch.float32)[4:5], ids=repr)
def test_retained_graph_second_backward_recomputes(case):
    """The forward's buffer is handed out once: a retained graph's second backward runs the unfused
    kernel and gets the unfused gradient for its grad_output."""
    operands = case.make()
    leaves = _leaves(operands, case.diff)
    out = case.call(leaves, True)
    (g1,) = torch.autograd.grad(out, leaves[0], retain_graph=True)
    (g2,) = torch.autograd.grad(out, leaves[0], torch.tensor(3.0, dtype=out.dtype))
    plain = _leaves(operands, case.diff)
    (e1,) = torch.autograd.grad(case.call(plain, False), plain[0])
    plain = _leaves(operands, case.diff)
    (e2,) = torch.autograd.grad(case.call(plain, False), plain[0], torch.tensor(3.0, dtype=out.dtype))
    assert torch.equal(g1, e1) and torch.equal(g2, e2)


def test_public_functions_take_the_fused_path_for_their_dtypes():
    """Through the public functions: float32 and bfloat16 fuse when a reduced loss requires grad;
    float16 (GradScaler's dtype: grad_output is rarely 1), reduction='none' and no grad do not."""
    x = (torch.randn(6, 45) * 3).to(DEVICE)
    y = torch.randint(0, 45, (6,), device=DEVICE)
    t = torch.randn(6, 45, device=DEVICE)
    calls = {
        "sigmoid": lambda x, red: lossfuse.sigmoid_focal_loss(x, torch.rand_like(x), reduction=red, backend="triton"),
        "softmax": lambda x, red: lossfuse.softmax_focal_loss(x, y, reduction=red, backend="triton"),
        "huber": lambda x, red: lossfuse.huber_loss(x, t.to(x.dtype), reduction=red, backend="triton"),
    }
    for name, call in calls.items():
        for dtype, red, grad, fused in ((torch.float32, "mean", True, True), (torch.bfloat16, "sum", True, True),
                                        (torch.float16, "mean", True, False), (torch.float32, "none", True, False),
                                        (torch.float32, "mean", False, False)):
            leaf = x.to(dtype).requires_grad_(grad)
            out = call(leaf, red)
            assert (out.grad_fn is not None and _is_fused(out)) == fused, (name, dtype, red, grad)


def test_no_host_sync_on_the_fused_path(monkeypatch):
    """Structural: nothing on the fused path reads a tensor's value on the host (on CUDA that would be
    a sync and would break graph capture). Tensor.item / __float__ / __int__ / __bool__ / tolist raise
    during forward and backward; the functional layer's CPU-only target check is stubbed out."""
    monkeypatch.setattr(reference, "check_targets_in_range", lambda *a, **k: None)

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return f

    for dtype in (torch.float32, torch.bfloat16):
        for case in _cases(dtype):
            operands = case.make()
            leaves = _leaves(operands, case.diff)
            go = torch.tensor(0.37, dtype=dtype, device=DEVICE)
            with monkeypatch.context() as m:
                for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
                    m.setattr(torch.Tensor, name, refuse(name))
                out = case.call(leaves, True)
                fused = _is_fused(out)
                grads = torch.autograd.grad(out.to(dtype), leaves[:case.diff], go)
            assert fused, case
            plain = _leaves(operands, case.diff)
            expected = torch.autograd.grad(case.call(plain, False).to(dtype), plain[:case.diff], go)
            for g, e in zip(grads, expected):
                assert torch.equal(g, e), case


@pytest.mark.skipif(DEVICE == "cuda", reason="the ops' CPU key exists only under the interpreter")
def test_opcheck_new_ops():
    ops = torch.ops.lossfuse
    go = torch.tensor(2.0)  # != 1: the backward ops write their mutable arguments
    x = torch.randn(5, 40) * 3
    y = torch.randint(0, 41, (5,))
    _, gx = ops.sigmoid_focal_fwd(x, y, 0.25, 2.0, 4096, 0.5)
    torch.library.opcheck(ops.sigmoid_focal_fused_bwd, (go, torch.tensor(1.0), gx.clone(), x, y, 0.25, 2.0))

    x3 = torch.randn(4, 40, 3) * 3
    y3 = torch.randint(0, 40, (4, 3))
    y3[1, 0] = -100
    scale = torch.rand(40) + 0.5
    torch.library.opcheck(ops.softmax_focal_fused_scaled, (x3, y3, scale, 0.25, 2.0, -100, torch.tensor(0.25)))
    torch.library.opcheck(ops.softmax_focal_fused_scaled, (x3, y3, None, 1.0, 0.0, -100, None))
    loss, lse, dscale, gx3 = ops.softmax_focal_fused_scaled(x3, y3, scale, 0.25, 2.0, -100, None)
    torch.library.opcheck(ops.softmax_focal_fused_bwd,
                          (go, torch.full((4, 3), 0.5), gx3.clone(), x3, y3, lse, dscale, -100))
    # The fake kernel's layout is the launcher's (torch.compile relies on it).
    for xx in (x3, torch.randn(2, 40, 6), torch.randn(6, 40, 1)):
        yy = torch.randint(0, 40, (xx.shape[0], xx.shape[2]))
        real = ops.softmax_focal_fused_scaled(xx, yy, None, 1.0, 2.0, -100, None)
        fake = ops_focal._softmax_fused_scaled_fake(xx, yy, None, 1.0, 2.0, -100, None)
        for a, b in zip(real, fake):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())

    xh, yh, wh = torch.randn(6, 50), torch.randn(6, 50), torch.rand(6, 50)
    _, ghx, ghy = ops.huber_fwd_grad(xh, yh, wh, ops_huber.HUBER, 0.7, ops_huber.PARTIAL_BLOCK, 0.5, True, True)
    torch.library.opcheck(ops.huber_fused_bwd,
                          (go, torch.tensor(1.0), ghx.clone(), ghy.clone(), xh, yh, wh, ops_huber.HUBER, 0.7))


def test_launchers_refuse_bad_arguments():
    x = torch.randn(5, 40, device=DEVICE)
    y = torch.randint(0, 41, (5,), device=DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="one value"):
        tf.sigmoid_focal_fused_bwd(torch.ones(2, device=DEVICE), one, torch.empty_like(x), x, y, 0.25, 2.0)
    with pytest.raises(ValueError, match="grad_input"):
        tf.sigmoid_focal_fused_bwd(one, one, torch.empty(5, 39, device=DEVICE), x, y, 0.25, 2.0)
    with pytest.raises(ValueError, match="one value"):
        tf.softmax_focal_fused_scaled(x.view(5, 40, 1), y.view(5, 1).clamp_max(39), None, 1.0, 2.0, -100,
                                      torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="block"):
        th.huber_fwd_grad(x, x, None, ops_huber.HUBER, 1.0, 0, 1.0, True, False)
    with pytest.raises(ValueError, match="elements"):
        th.huber_fused_bwd(one, one, torch.empty(3, device=DEVICE), torch.empty(0, device=DEVICE), x, x, None,
                           ops_huber.HUBER, 1.0)


def test_host_mean_scale_is_the_unfused_division():
    """The fused forwards' 1 / numel, formed on the host without a tensor, has the bits of the
    unfused backward's ``grad_output / numel`` (float32: numel itself rounds above 2^24)."""
    from lossfuse._utils import reciprocal_as

    gen = torch.Generator().manual_seed(0)
    ns = [1, 2, 3, 7, 1000, 2 ** 24 - 1, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 31 - 1, 3 ** 30]
    ns += torch.randint(1, 2 ** 40, (3000,), generator=gen).tolist()
    for dtype in (torch.float32, torch.float64):
        one = torch.ones((), dtype=dtype)
        bad = [n for n in ns if reciprocal_as(n, dtype) != float(one / n)]
        assert not bad, f"{dtype}: {bad[:5]}"
