"""distillation_loss beyond the contract (tests/test_contracts.py, TestDistillation): every beta and
temperature in float64 gradcheck with ignored rows, the teacher's gradient, every reduction, layouts,
the fused path's hand-over, long rows, and bad arguments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lossfuse
from helpers import DTYPES, assert_close, backend_or_skip, cpu_kernels_or_skip

BETAS = [0.0, 0.5, 1.0]
TEMPERATURES = [1.0, 2.0, 4.0]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]


def _liger_jsd_rows(s, t, beta, temperature):
    """The loss per row from the definitions, written independently of lossfuse.reference: KL(p || q),
    KL(q || p), or liger-kernel's generalised JSD beta KL(p || m) + (1 - beta) KL(q || m)."""
    q = torch.softmax(s / temperature, 1)
    p = torch.softmax(t / temperature, 1)

    def kl(a, b):  # KL(a || b), 0 log 0 = 0
        return torch.xlogy(a, a).sum(1) - (a * torch.log(b)).sum(1)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _inputs(n=6, v=11, dtype=torch.float64, ignore=True, gen=None):
    gen = gen or torch.Generator().manual_seed(torch.seed() % (2**31))
    s = torch.randn(n, v, generator=gen, dtype=torch.float64).mul(2).to(dtype)
    t = torch.randn(n, v, generator=gen, dtype=torch.float64).mul(2).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        y[::3] = -100
    return s, t, y


@pytest.mark.parametrize("beta,temperature", list(itertools.product(BETAS, TEMPERATURES)))
def test_gradcheck_student_and_teacher_with_ignored_rows(beta, temperature):
    cpu_kernels_or_skip()
    s, t, y = _inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = lambda s, t: lossfuse.distillation_loss(s, t, temperature=temperature, beta=beta, target=y,  # noqa: E731
                                                 backend="cpu")
    assert torch.autograd.gradcheck(fn, (s, t))
    fn_none = lambda s, t: lossfuse.distillation_loss(s, t, temperature=temperature, beta=beta, target=y,  # noqa: E731
                                                      reduction="none", backend="cpu")
    assert torch.autograd.gradcheck(fn_none, (s, t))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("beta,temperature", list(itertools.product(BETAS, TEMPERATURES)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_the_definitions_in_float64(backend, beta, temperature, reduction):
    backend_or_skip(backend)
    s, t, y = _inputs(n=9, v=23)
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = lossfuse.distillation_loss(s, t, temperature=temperature, beta=beta, target=y, reduction=reduction,
                                     backend=backend)
    rows = _liger_jsd_rows(s, t, beta, temperature) * temperature**2
    keep = y != -100
    rows = torch.where(keep, rows, 0)
    ref = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / keep.sum(),
           "mean": rows.sum() / (keep.sum() * s.shape[1])}[reduction]
    w = torch.randn_like(ref)
    gs, gt = torch.autograd.grad((out * w).sum(), (s, t))
    rs, rt = torch.autograd.grad((ref * w).sum(), (s, t))
    assert_close(out, ref.detach(), torch.float64, "loss")
    assert_close(gs, rs, torch.float64, "student grad")
    assert_close(gt, rt, torch.float64, "teacher grad")
    assert torch.equal(gs[~keep], torch.zeros_like(gs[~keep])), "an ignored row's gradient is not exactly 0"


def test_beta0_is_the_usual_kl_div_code():
    cpu_kernels_or_skip()
    s, t, _ = _inputs(n=16, v=50, dtype=torch.float32)
    T = 3.0
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T**2
    out = lossfuse.distillation_loss(s, t, temperature=T)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)
    out = lossfuse.distillation_loss(s, t, temperature=T, scale_by_t2=False)
    torch.testing.assert_close(out, ref / T**2, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
def test_dtypes_against_float64(dtype, beta):
    cpu_kernels_or_skip()
    s, t, y = _inputs(n=64, v=300, dtype=dtype)
    sr = s.clone().requires_grad_(True)
    tr = t.clone().requires_grad_(True)
    out = lossfuse.distillation_loss(sr, tr, temperature=2.0, beta=beta, target=y)
    out.backward()
    assert out.dtype == dtype
    sd, td = s.double().clone().requires_grad_(True), t.double().clone().requires_grad_(True)
    ref = lossfuse.distillation_loss(sd, td, temperature=2.0, beta=beta, target=y, backend="reference")
    ref.backward()
    assert_close(out, ref.detach(), dtype, "loss")
    assert_close(sr.grad, sd.grad, dtype, "student grad")
    assert_close(tr.grad, td.grad, dtype, "teacher grad")


@pytest.mark.parametrize("v", [7, 40000])  # 40000: past the scratch row (csrc/distillation_kernel.h, kScratchMax)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("beta", BETAS)
def test_row_lengths(v, dtype, beta):
    cpu_kernels_or_skip()
    s, t, y = _inputs(n=5, v=v, dtype=dtype)
    sr = s.clone().requires_grad_(True)
    tr = t.clone().requires_grad_(True)
    out = lossfuse.distillation_loss(sr, tr, beta=beta, target=y, temperature=2.0, reduction="sum")
    out.backward()
    sd, td = s.double().clone().requires_grad_(True), t.double().clone().requires_grad_(True)
    ref = lossfuse.distillation_loss(sd, td, beta=beta, target=y, temperature=2.0, reduction="sum", backend="reference")
    ref.backward()
    assert_close(out, ref.detach(), dtype, "loss")
    assert_close(sr.grad, sd.grad, dtype, "student grad")
    assert_close(tr.grad, td.grad, dtype, "teacher grad")


def test_teacher_gradient_only_when_it_requires_grad():
    cpu_kernels_or_skip()
    s, t, y = _inputs(dtype=torch.float32)
    s.requires_grad_(True)
    out = lossfuse.distillation_loss(s, t, target=y)
    out.backward()
    assert t.grad is None and s.grad is not None
    # The teacher alone (a student that is a constant): its gradient, the student's not formed.
    s2, t2 = s.detach(), t.clone().requires_grad_(True)
    lossfuse.distillation_loss(s2, t2, target=y, beta=0.5).backward()
    t3 = t.double().requires_grad_(True)
    lossfuse.distillation_loss(s2.double(), t3, target=y, beta=0.5, backend="reference").backward()
    assert_close(t2.grad, t3.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fused_gradient_for_other_grad_outputs_and_a_retained_graph(dtype):
    """The forward writes the gradient for grad_output 1; any other grad_output scales it (fp32/fp64) or
    recomputes (bf16), and a second backward through a retained graph recomputes."""
    cpu_kernels_or_skip()
    s, t, y = _inputs(n=32, v=100, dtype=dtype)
    for g in (1.0, 3.0, 2.0**16):
        sr = s.clone().requires_grad_(True)
        out = lossfuse.distillation_loss(sr, t, target=y, temperature=2.0)
        out.backward(torch.tensor(g, dtype=out.dtype), retain_graph=True)
        first = sr.grad.clone()
        sr.grad = None
        out.backward(torch.tensor(g, dtype=out.dtype))
        sd = s.detach().double().clone().requires_grad_(True)  # a copy also for float64: s stays a constant
        ref = lossfuse.distillation_loss(sd, t.double(), target=y, temperature=2.0, backend="reference")
        ref.backward(torch.tensor(g, dtype=torch.float64))
        assert_close(first, sd.grad, dtype, f"grad_output {g}")
        assert_close(sr.grad, sd.grad, dtype, f"grad_output {g}, second backward")


def test_spatial_logits_and_targets():
    cpu_kernels_or_skip()
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 9, 4, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(3, 9, 4, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, 9, (3, 4, 5), generator=gen)
    y[0, 1] = -100
    for reduction in REDUCTIONS:
        out = lossfuse.distillation_loss(s, t, target=y, beta=0.5, temperature=2.0, reduction=reduction)
        # The same rows as (N * d1 * d2, V).
        s2 = s.movedim(1, -1).reshape(-1, 9)
        t2 = t.movedim(1, -1).reshape(-1, 9)
        ref = lossfuse.distillation_loss(s2, t2, target=y.reshape(-1), beta=0.5, temperature=2.0, reduction=reduction,
                                         backend="reference")
        if reduction == "none":
            ref = ref.reshape(3, 4, 5)
        assert out.shape == ref.shape
        w = torch.randn_like(out)
        g = torch.autograd.grad((out * w).sum(), (s, t))
        r = torch.autograd.grad((ref * w).sum(), (s, t))
        assert_close(out, ref.detach(), torch.float64, reduction)
        assert_close(g[0], r[0], torch.float64, reduction + " student")
        assert_close(g[1], r[1], torch.float64, reduction + " teacher")
    assert torch.autograd.gradcheck(lambda s, t: lossfuse.distillation_loss(s, t, target=y, beta=1.0), (s, t))


def test_strided_rows_and_a_teacher_of_another_dtype():
    cpu_kernels_or_skip()
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(20, 30, generator=gen)
    s = base[:, :17].requires_grad_(False).clone()[::1]  # contiguous copy
    s_strided = base[::2, 3:20]  # row stride 60, class stride 1: read in place
    t = torch.randn(10, 17, generator=gen, dtype=torch.float64)
    sr = s_strided.clone().requires_grad_(True)
    out = lossfuse.distillation_loss(s_strided.t().contiguous().t().requires_grad_(True), t.float())
    ref = lossfuse.distillation_loss(sr.double(), t, backend="reference")
    assert_close(out, ref, torch.float32, "transposed layout")
    out2 = lossfuse.distillation_loss(s_strided, t)  # float64 teacher: converted to the student's dtype
    assert out2.dtype == torch.float32
    assert_close(out2, ref, torch.float32, "strided rows")
    assert s.shape == (20, 17)


def test_all_rows_ignored_and_empty():
    cpu_kernels_or_skip()
    s, t, _ = _inputs(n=4, v=5, dtype=torch.float32)
    y = torch.full((4,), -100)
    assert torch.isnan(lossfuse.distillation_loss(s, t, target=y))  # 0 / 0, as cross_entropy's mean
    assert lossfuse.distillation_loss(s, t, target=y, reduction="sum").item() == 0.0
    e = torch.empty(0, 5)
    assert lossfuse.distillation_loss(e, e, reduction="sum").item() == 0.0


def test_torch_compile_with_teacher_grad():
    cpu_kernels_or_skip()
    torch._dynamo.reset()
    s, t, y = _inputs(n=8, v=13, dtype=torch.float32)

    def step(s, t):
        return lossfuse.distillation_loss(s, t, target=y, beta=0.5, temperature=2.0) * 2

    compiled = torch.compile(step, fullgraph=True)
    se, te = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    sc, tc = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    step(se, te).backward()
    compiled(sc, tc).backward()
    torch.testing.assert_close(sc.grad, se.grad)
    torch.testing.assert_close(tc.grad, te.grad)


def test_module():
    cpu_kernels_or_skip()
    s, t, y = _inputs(dtype=torch.float32)
    crit = lossfuse.DistillationLoss(temperature=2.0, beta=0.5, reduction="sum")
    torch.testing.assert_close(crit(s, t, y), lossfuse.distillation_loss(s, t, temperature=2.0, beta=0.5, target=y,
                                                                         reduction="sum"))
    assert "beta=0.5" in repr(crit)


def test_bad_arguments():
    s, t, y = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        lossfuse.distillation_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="beta must be a number in"):
        lossfuse.distillation_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="beta must be a number in"):
        lossfuse.distillation_loss(s, t, beta=math.nan)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        lossfuse.distillation_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="the same shape"):
        lossfuse.distillation_loss(s, t[:, :3])
    with pytest.raises(ValueError, match="target must have the logits' shape"):
        lossfuse.distillation_loss(s, t, target=y[:2])
    with pytest.raises(RuntimeError, match="expected target dtype"):
        lossfuse.distillation_loss(s, t, target=y.float())
    with pytest.raises(ValueError, match="logits must be"):
        lossfuse.distillation_loss(s[0], t[0])
    with pytest.raises(NotImplementedError, match="student_logits must be a floating-point tensor"):
        lossfuse.distillation_loss(s.long(), t)
    with pytest.raises(ValueError, match="temperature"):
        lossfuse.DistillationLoss(temperature=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("classes", [1000, 33000], ids=["scratch", "long_rows"])
def test_loss_scaling_one_ulp_on_many_elements(classes, beta, temperature, dtype):
    """The GradScaler rule (docs/design.md, "Mixed precision") for every beta, on 256k+ elements where
    terms agreeing to 1e-5 happen many times: every element of both gradients within 1 ulp of the float64
    gradient x 2^16, the same zeros (the contract checks 1344 student elements). The student's q - p,
    the teacher's p (-d - L), reverse KL's q (d - L) and the JSD's brackets all cancel somewhere; rows
    longer than the per-thread scratch (33000 classes) take the other walk; T = 3 is not a power of two."""
    cpu_kernels_or_skip()
    from helpers import ulps_apart

    s, t, y = _inputs(n=256 if classes == 1000 else 8, v=classes, dtype=dtype)
    sr, tr = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = lossfuse.distillation_loss(sr, tr, temperature=temperature, beta=beta, target=y)
    loss.backward(torch.full_like(loss, 2.0**16))
    sd, td = s.double().requires_grad_(True), t.double().requires_grad_(True)
    lossfuse.distillation_loss(sd, td, temperature=temperature, beta=beta, target=y, backend="reference").backward()
    for name, got, ref in (("student", sr.grad, sd.grad), ("teacher", tr.grad, td.grad)):
        expected = ref * 2.0**16
        worst = ulps_apart(got, expected, dtype).max().item()
        assert worst <= 1.0, f"{name}: {worst:.2f} ulp"
        assert torch.equal(got == 0, expected.to(dtype) == 0), name
