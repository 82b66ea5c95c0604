"""Huber / SmoothL1 benchmark: lossfuse against torch eager and torch.compile, side by side.

    python bench/bench_huber.py                       # the issue-4 cases (16M fp32, mean, fwd+bwd)
    python bench/bench_huber.py --reps 30 --cases all --providers lossfuse-cpu,torch-eager,torch-compile

Providers are timed interleaved in one run (the order shuffled every repetition), after a warm-up,
and reported as medians with their inter-quartile range; speed-ups are ratios of medians measured
side by side. Bandwidth is *counted*: every input read once and every output written once (for a
forward+backward with mean reduction: input and target read, input gradient written; the scalar loss
is free), divided by the time, and compared with the machine's copy bandwidth measured in the same
run (a large tensor copy, bytes read + written; the copy's stores also read their destination lines
first, which streaming stores avoid, so a kernel can pass 100% of it). For float32/float64 with a mean
or sum, lossfuse-cpu forms the gradient during the forward and moves just the counted bytes;
lossfuse-cpu-recompute is the same kernels with the gradient recomputed in the backward (input and
target read twice), the path fp16/bf16 and torch.compile take. `Case.traffic` lists both.

Case definitions (`Case`, `CASES`, `PROVIDERS`, `make_step`) are plain data and functions so that a
benchmark suite can import them. Results go to stdout and, as JSON with machine details, to
bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the checkout's lossfuse
import lossfuse  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    loss: str  # "huber" | "smooth_l1"
    numel: int
    dtype: torch.dtype = torch.float32
    reduction: str = "mean"
    threshold: float = 1.0  # delta (Huber) or beta (SmoothL1)
    mode: str = "fwd+bwd"  # "fwd" (training forward, inputs require grad) | "fwd+bwd"
    target_grad: bool = False

    def inputs(self, device: str):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(self.numel, generator=g).to(device=device, dtype=self.dtype)
        y = torch.randn(self.numel, generator=g).to(device=device, dtype=self.dtype)
        return x.requires_grad_(True), y.requires_grad_(self.target_grad)

    def counted_bytes(self) -> int:
        """Each input read once, each output written once."""
        e = torch.empty((), dtype=self.dtype).element_size()
        n = self.numel
        out = n * e if self.reduction == "none" else 0  # the loss; a scalar is free
        if self.mode == "fwd":
            return 2 * n * e + out
        grads = n * e * (2 if self.target_grad else 1)
        grad_out = n * e if self.reduction == "none" else 0
        return 2 * n * e + out + grad_out + grads

    def eager_gradient(self) -> bool:
        """Whether lossfuse's CPU backend forms the gradient during the forward (ops/huber.py): the
        inputs require grad here, so also in a forward that is never followed by a backward."""
        return self.reduction != "none" and self.dtype in (torch.float32, torch.float64)

    def traffic(self, recompute: bool = False) -> int:
        """Bytes the lossfuse CPU kernels move. Gradient formed during the forward: the counted bytes,
        plus the gradient write when no backward follows. Recomputed: the backward reads input and
        target a second time."""
        e = torch.empty((), dtype=self.dtype).element_size()
        n_grads = 2 if self.target_grad else 1
        if self.eager_gradient() and not recompute:
            return self.counted_bytes() + (n_grads * self.numel * e if self.mode == "fwd" else 0)
        return self.counted_bytes() + (2 * self.numel * e if self.mode == "fwd+bwd" else 0)


N16M = 16_777_216
CASES = {
    "huber-16M-f32-mean": Case("huber-16M-f32-mean", "huber", N16M),
    "smooth_l1-16M-f32-mean": Case("smooth_l1-16M-f32-mean", "smooth_l1", N16M),
}
EXTRA_CASES = {
    "huber-16M-f32-mean-fwd": Case("huber-16M-f32-mean-fwd", "huber", N16M, mode="fwd"),
    "huber-16M-f32-none": Case("huber-16M-f32-none", "huber", N16M, reduction="none"),
    "huber-16M-bf16-mean": Case("huber-16M-bf16-mean", "huber", N16M, dtype=torch.bfloat16),
    "l1-16M-f32-mean": Case("l1-16M-f32-mean", "smooth_l1", N16M, threshold=0.0),
    "huber-16M-f32-mean-both-grads": Case("huber-16M-f32-mean-both-grads", "huber", N16M, target_grad=True),
}

# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------


def _torch_fn(case: Case):
    if case.loss == "huber":
        return lambda x, y: F.huber_loss(x, y, reduction=case.reduction, delta=case.threshold)
    return lambda x, y: F.smooth_l1_loss(x, y, reduction=case.reduction, beta=case.threshold)


def _lossfuse_fn(case: Case, backend: str):
    if case.loss == "huber":
        return lambda x, y: lossfuse.huber_loss(x, y, reduction=case.reduction, delta=case.threshold, backend=backend)
    return lambda x, y: lossfuse.smooth_l1_loss(x, y, reduction=case.reduction, beta=case.threshold, backend=backend)


def _recompute_fn(case: Case):
    """lossfuse-cpu with the gradient recomputed in the backward (huber_fwd + huber_bwd), for comparison."""
    from lossfuse.ops import huber as huber_ops

    fn = _lossfuse_fn(case, "cpu")

    def run(x, y):
        huber_ops.EAGER_GRADIENT = False
        try:
            return fn(x, y)
        finally:
            huber_ops.EAGER_GRADIENT = True

    return run


PROVIDERS = {
    "lossfuse-cpu": lambda case: _lossfuse_fn(case, "cpu"),
    "lossfuse-cpu-recompute": _recompute_fn,
    "lossfuse-triton": lambda case: _lossfuse_fn(case, "triton"),
    "lossfuse-reference": lambda case: _lossfuse_fn(case, "reference"),
    "torch-eager": _torch_fn,
    "torch-compile": lambda case: torch.compile(_torch_fn(case)),
}


def default_providers(device: str) -> list[str]:
    if device == "cpu":
        return ["lossfuse-cpu", "lossfuse-cpu-recompute", "torch-eager", "torch-compile"]
    return ["lossfuse-triton", "torch-eager", "torch-compile"]


def make_step(case: Case, fn, x, y, grad_out=None):
    """One timed unit of work. Gradients of the previous step are dropped before the timer starts
    (a training loop frees them in zero_grad), so the step pays for allocating its own."""

    def step():
        out = fn(x, y)
        if case.mode == "fwd+bwd":
            out.backward(grad_out)
        return out

    def reset():
        x.grad = None
        y.grad = None

    return step, reset


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def copy_bandwidth(device: str, nbytes: int = 256 << 20, reps: int = 15) -> float:
    """GB/s of a large tensor copy, counting bytes read + written (destination pre-faulted)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def measure(case: Case, providers: list[str], device: str, reps: int, warmup: int):
    x, y = case.inputs(device)
    grad_out = None
    steps = {}
    for name in providers:
        fn = PROVIDERS[name](case)
        if case.mode == "fwd+bwd" and case.reduction == "none":
            grad_out = torch.ones(case.numel, dtype=case.dtype, device=device)
        steps[name] = make_step(case, fn, x, y, grad_out)
    for name, (step, reset) in steps.items():  # warm-up (and compile)
        for _ in range(warmup):
            reset()
            step()
    times = {name: [] for name in providers}
    order = list(providers)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            step, reset = steps[name]
            reset()
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def quartiles(ts):
    q = statistics.quantiles(ts, n=4)
    return q[0], statistics.median(ts), q[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default="default", help="'default', 'all' or comma-separated case names")
    p.add_argument("--providers", default=None, help="comma-separated; default: lossfuse, eager, compile")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)

    all_cases = {**CASES, **EXTRA_CASES}
    if args.cases == "default":
        cases = list(CASES.values())
    elif args.cases == "all":
        cases = list(all_cases.values())
    else:
        cases = [all_cases[c] for c in args.cases.split(",")]
    providers = args.providers.split(",") if args.providers else default_providers(args.device)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    bw = copy_bandwidth(args.device)
    print(f"device {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"lossfuse {lossfuse.__version__}")
    print(f"copy bandwidth: {bw:.2f} GB/s (read + write, 256 MiB fp32 copy)")
    results = []
    for case in cases:
        times = measure(case, providers, args.device, args.reps, args.warmup)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        counted = case.counted_bytes()
        print(f"\n{case.name}: {case.numel:,} x {str(case.dtype).replace('torch.', '')}, {case.reduction}, "
              f"{case.mode}; counted {counted / 1e6:.1f} MB (lossfuse-cpu moves {case.traffic() / 1e6:.1f} MB, "
              f"-recompute {case.traffic(recompute=True) / 1e6:.1f} MB)")
        print(f"  {'provider':<24} {'median ms':>10} {'IQR ms':>15} {'GB/s':>7} {'of copy':>8} {'vs eager':>9} {'vs compile':>11}")
        for name, ts in times.items():
            q1, m, q3 = quartiles(ts)
            gbs = counted / m / 1e9
            row = {
                "case": case.name, "provider": name, "median_ms": m * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                "counted_bytes": counted, "gb_per_s": gbs,
                "fraction_of_copy_bw": gbs / bw,
            }
            vs = []
            for ref in ("torch-eager", "torch-compile"):
                r = med[ref] / m if ref in med else float("nan")
                row[f"speedup_vs_{ref}"] = r
                vs.append(r)
            results.append(row)
            print(f"  {name:<24} {m * 1e3:>10.2f} {q1 * 1e3:>7.2f}-{q3 * 1e3:<7.2f} {gbs:>7.2f} {gbs / bw:>7.0%} "
                  f"{vs[0]:>8.2f}x {vs[1]:>10.2f}x")

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"bench_huber-{args.device}-{stamp}.json")
    meta = {
        "date": stamp, "device": args.device, "device_name": device_name, "torch": torch.__version__,
        "lossfuse": lossfuse.__version__, "threads": torch.get_num_threads(), "copy_gb_per_s": bw,
        "reps": args.reps, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nload average {meta['load_average']}; results in {path}")
    return results


if __name__ == "__main__":
    main()
