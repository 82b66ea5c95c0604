"""``python -m lossfuse.verify``: every available backend against torch, on fresh random data.

For each loss and case, the loss and the input gradient of every lossfuse backend usable on the
device are compared with torch's own function evaluated in float64 on the same inputs. Prints a table;
exits 1 if anything disagrees. A quick health check of an installation; the benchmark suite
(``lossfuse-bench``) runs the same check before it times anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import lossfuse

# Error allowed, relative to the largest magnitude of the float64 result: one rounding of the output
# dtype, with room for accumulation order.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    loss: str
    name: str
    dtype: torch.dtype
    make: Callable[[torch.device], tuple]  # -> (input, other args..., kwargs)
    ours: Callable  # (backend, *args, **kw) -> loss
    torch_fn: Callable  # float64 torch reference (*args, **kw) -> loss


def _ce_inputs(shape, dtype, weight=False, ignore=False, prob=False, smoothing=0.0):
    def make(device):
        C = shape[1] if len(shape) > 1 else shape[0]
        x = (torch.randn(shape, device=device, dtype=torch.float64) * 3).to(dtype)
        if prob:
            t = torch.softmax(torch.randn(shape, device=device, dtype=torch.float64), 1).to(dtype)
        else:
            t = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), device=device)
            if ignore:
                t[torch.rand(t.shape, device=device) < 0.2] = -100
        kw = {"label_smoothing": smoothing}
        if weight:
            kw["weight"] = torch.rand(C, device=device, dtype=torch.float64).to(dtype) + 0.1
        return x, t, kw

    return make


def _ce_torch(x, t, **kw):
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return F.cross_entropy(x, t.double() if t.is_floating_point() else t, **kw)


def cross_entropy_cases() -> list[Case]:
    ours = lambda backend, x, t, **kw: lossfuse.cross_entropy(x, t, backend=backend, **kw)  # noqa: E731
    specs = [
        ("(512, 32000)", (512, 32000), {}),
        ("(512, 32000) weight+ignore+smoothing", (512, 32000), {"weight": True, "ignore": True, "smoothing": 0.1}),
        ("(64, 1000) probability targets", (64, 1000), {"prob": True, "smoothing": 0.05}),
        ("(2, 21, 64, 64) segmentation", (2, 21, 64, 64), {"ignore": True}),
    ]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, shape, opts in specs:
            cases.append(Case("cross_entropy", name, dtype, _ce_inputs(shape, dtype, **opts), ours, _ce_torch))
    return cases


def _focal_inputs(shape, dtype, index=False, softmax=False):
    def make(device):
        n, c = shape[0], shape[1]
        x = (torch.randn(shape, device=device, dtype=torch.float64) * 3).to(dtype)
        if softmax:
            t = torch.randint(0, c, (n,) + tuple(shape[2:]), device=device)
            t[torch.rand(t.shape, device=device) < 0.1] = -100
            return x, t, {"gamma": 2.0, "alpha": 0.25}
        labels = torch.randint(0, c, (n,), device=device)
        labels[torch.rand(n, device=device) < 0.7] = c  # background: no positive class
        if index:
            return x, labels, {"reduction": "mean"}
        t = torch.nn.functional.one_hot(labels, c + 1)[:, :c].to(dtype)
        return x, t, {"reduction": "mean"}

    return make


def _sigmoid_focal_torch(x, t, **kw):
    from . import reference

    if not t.is_floating_point():  # class indices: torchvision needs the one-hot
        t = torch.nn.functional.one_hot(t, x.shape[1] + 1)[:, : x.shape[1]]
    return reference.sigmoid_focal_loss(x, t.double(), **kw)


def _softmax_focal_torch(x, t, **kw):
    from . import reference

    return reference.softmax_focal_loss(x, t, **kw)


def focal_cases() -> list[Case]:
    sig = lambda backend, x, t, **kw: lossfuse.sigmoid_focal_loss(x, t, backend=backend, **kw)  # noqa: E731
    soft = lambda backend, x, t, **kw: lossfuse.softmax_focal_loss(x, t, backend=backend, **kw)  # noqa: E731
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(Case("sigmoid_focal", "(20000, 80) float targets", dtype,
                          _focal_inputs((20000, 80), dtype), sig, _sigmoid_focal_torch))
        cases.append(Case("sigmoid_focal", "(20000, 80) class-index targets", dtype,
                          _focal_inputs((20000, 80), dtype, index=True), sig, _sigmoid_focal_torch))
        cases.append(Case("softmax_focal", "(4096, 1000) alpha+ignore", dtype,
                          _focal_inputs((4096, 1000), dtype, softmax=True), soft, _softmax_focal_torch))
        cases.append(Case("softmax_focal", "(2, 21, 64, 64) segmentation", dtype,
                          _focal_inputs((2, 21, 64, 64), dtype, softmax=True), soft, _softmax_focal_torch))
    return cases


def _regression_inputs(shape, dtype, **kw):
    def make(device):
        x = (torch.randn(shape, device=device, dtype=torch.float64) * 2).to(dtype)
        t = (torch.randn(shape, device=device, dtype=torch.float64) * 2).to(dtype)
        return x, t, dict(kw)

    return make


def huber_cases() -> list[Case]:
    hub = lambda backend, x, t, **kw: lossfuse.huber_loss(x, t, backend=backend, **kw)  # noqa: E731
    sl1 = lambda backend, x, t, **kw: lossfuse.smooth_l1_loss(x, t, backend=backend, **kw)  # noqa: E731
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(Case("huber", "(1048576,) delta=1", dtype, _regression_inputs((1048576,), dtype, delta=1.0),
                          hub, lambda x, t, **kw: F.huber_loss(x, t.double(), **kw)))
        cases.append(Case("smooth_l1", "(65536, 4) beta=1/9", dtype, _regression_inputs((65536, 4), dtype, beta=1 / 9),
                          sl1, lambda x, t, **kw: F.smooth_l1_loss(x, t.double(), **kw)))
    return cases


REGISTRY: dict[str, Callable[[], list[Case]]] = {
    "cross_entropy": cross_entropy_cases,
    "focal": focal_cases,
    "huber": huber_cases,
}


def _rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.double(), e.double()
    both_nan = torch.isnan(a) & torch.isnan(e)
    scale = e[torch.isfinite(e)].abs().max().item() if torch.isfinite(e).any() else 1.0
    diff = torch.where(both_nan, 0.0, (a - e).abs())
    return float(diff.max().item() / max(scale, 1e-30)) if diff.numel() else 0.0


def run_case(case: Case, backend: str, device: torch.device) -> tuple[float, float]:
    x, t, kw = case.make(device)
    xr = x.clone().requires_grad_(True)
    out = case.ours(backend, xr, t, **kw)
    # float16 gradients of a mean over a million elements sit below fp16's normal range: scaled as a
    # GradScaler would (2^10 here, so that a float16 loss itself cannot overflow), the reference alike.
    scale = 1024.0 if case.dtype == torch.float16 else 1.0
    out.backward(torch.tensor(scale, dtype=out.dtype, device=out.device))
    xd = x.double().requires_grad_(True)
    ref = case.torch_fn(xd, t, **kw)
    ref.backward(torch.tensor(scale, dtype=ref.dtype, device=ref.device))
    return _rel_err(out.detach(), ref.detach()), _rel_err(xr.grad, xd.grad)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossfuse.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss", action="append", choices=sorted(REGISTRY), help="repeatable; default all")
    p.add_argument("--seed", type=int, default=None, help="default: fresh random inputs each run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    backends = [b for b in lossfuse.available_backends(device) if not (b == "triton" and device.type == "cpu")]
    print(f"lossfuse {lossfuse.__version__} | torch {torch.__version__} | device {device} | backends {backends}")
    if device.type == "cpu" and not lossfuse.cpu_kernels_available():
        print("note: lossfuse._C is not built; only the reference backend runs")
    header = f"{'loss':<14} {'case':<40} {'dtype':<9} {'backend':<10} {'loss err':>9} {'grad err':>9}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    start = time.perf_counter()
    for loss in args.loss or sorted(REGISTRY):
        for case in REGISTRY[loss]():
            for backend in backends:
                tol = TOLERANCE[case.dtype]
                try:
                    le, ge = run_case(case, backend, device)
                    ok = le <= tol and ge <= tol
                    status = "ok" if ok else f"MISMATCH (tol {tol:g})"
                except Exception as exc:  # noqa: BLE001  (report, do not stop the table)
                    le = ge = float("nan")
                    ok, status = False, f"ERROR {type(exc).__name__}: {exc}"[:80]
                failures += not ok
                dt = str(case.dtype).replace("torch.", "")
                print(f"{case.loss:<14} {case.name:<40} {dt:<9} {backend:<10} {le:>9.1e} {ge:>9.1e}  {status}", flush=True)
    print(f"\n{'all agree with torch' if not failures else f'{failures} FAILED'} "
          f"({time.perf_counter() - start:.1f} s; errors relative to the largest float64 value)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
