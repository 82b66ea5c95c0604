"""``python -m lossfuse.verify``: every available backend against torch, on fresh random data.

For each loss and case, the loss and the input gradient of every lossfuse backend usable on the
device are compared with torch's own code (lossfuse/catalog.py) evaluated in float64 on the same inputs,
within the catalog's tolerance table. Prints a table of errors as multiples of the tolerance (1 = at
the limit); exits 1 if anything disagrees. A quick health check of an installation; the benchmark suite
(``lossfuse-bench``) runs the same check before it times anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

import lossfuse
from lossfuse import catalog

# (loss key in lossfuse/catalog.py, shape, variant): sizes a CPU checks in seconds, every target kind
# and option path of each loss, in float32, bfloat16 and float16.
CASES = {
    "cross_entropy": [
        ("ce", (512, 32000), ""),
        ("ce", (512, 32000), "weight+smoothing"),
        ("ce", (64, 1000), "probability"),
        ("ce", (2, 21, 64, 64), "ignore_index"),
    ],
    "focal": [
        ("sigmoid_focal", (20000, 80), "float"),
        ("sigmoid_focal", (20000, 80), "index"),
        ("softmax_focal", (4096, 1000), "alpha+ignore"),
        ("softmax_focal", (2, 21, 64, 64), "alpha+ignore"),
    ],
    "huber": [
        ("huber", (1048576,), ""),
        ("smooth_l1", (65536, 4), "beta=1/9"),
    ],
    "distillation": [
        ("distill", (512, 32000), ""),
        ("distill", (512, 32000), "T=2, ignore"),
        ("distill", (256, 1000), "reverse"),
        ("distill", (256, 1000), "jsd, ignore"),
        ("ldistill", (256, 64, 2000), ""),
        ("kl_div", (4096, 100), "batchmean, zeros"),
        ("kl_div", (4096, 100), "log_target, sum"),
    ],
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Case:
    entry: catalog.LossEntry
    shape: tuple
    variant: str
    dtype: torch.dtype

    @property
    def name(self) -> str:
        label = self.entry.label_variant(self.variant)
        return f"{tuple(self.shape)} {label}".strip()


def cases(group: str) -> list[Case]:
    return [Case(catalog.LOSSES[key], shape, variant, dtype)
            for dtype in DTYPES for key, shape, variant in CASES[group]]


def run_case(case: Case, backend: str, device: torch.device, gen: torch.Generator) -> tuple[float, float]:
    """Errors of the loss and the input gradient as multiples of the dtype's tolerance (<= 1 passes)."""
    entry = case.entry
    tensors = entry.make_inputs(case.shape, case.dtype, case.variant, device, gen)
    names = list(tensors)
    x = tensors[names[0]].clone().requires_grad_(True)
    rest = [tensors[k] for k in names[1:]]
    fn = catalog.lossfuse_function(entry)
    out = entry.lossfuse_call(case.variant)(fn, x, *rest, backend=backend)
    # float16 gradients of a mean over a million elements sit below fp16's normal range: scaled as a
    # GradScaler would (2^10 here, so that a float16 loss itself cannot overflow), the reference alike.
    scale = 1024.0 if case.dtype == torch.float16 else 1.0
    out.backward(torch.tensor(scale, dtype=out.dtype, device=out.device))
    xd = tensors[names[0]].double().requires_grad_(True)
    rest64 = [t.double() if t.is_floating_point() else t for t in rest]
    ref = entry.torch_call(case.variant)(xd, *rest64)
    ref.backward(torch.tensor(scale, dtype=ref.dtype, device=ref.device))
    return (catalog.error_ratio(out.detach(), ref.detach(), case.dtype),
            catalog.error_ratio(x.grad, xd.grad, case.dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lossfuse.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss", action="append", choices=sorted(CASES), help="repeatable; default all")
    p.add_argument("--seed", type=int, default=None, help="default: fresh random inputs each run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device)
    if args.seed is not None:
        gen.manual_seed(args.seed)
    else:
        gen.seed()  # fresh random inputs each run
    backends = [b for b in lossfuse.available_backends(device) if not (b == "triton" and device.type == "cpu")]
    print(f"lossfuse {lossfuse.__version__} | torch {torch.__version__} | device {device} | backends {backends}")
    if device.type == "cpu" and not lossfuse.cpu_kernels_available():
        print("note: lossfuse._C is not built; only the reference backend runs")
    header = f"{'loss':<14} {'case':<52} {'dtype':<9} {'backend':<10} {'loss err':>9} {'grad err':>9}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    start = time.perf_counter()
    for group in args.loss or sorted(CASES):
        for case in cases(group):
            for backend in backends:
                try:
                    le, ge = run_case(case, backend, device, gen)
                    ok = le <= 1.0 and ge <= 1.0
                    status = "ok" if ok else f"MISMATCH ({catalog.TOLERANCES[case.dtype]})"
                except Exception as exc:  # noqa: BLE001  (report, do not stop the table)
                    le = ge = float("nan")
                    ok, status = False, f"ERROR {type(exc).__name__}: {exc}"[:80]
                failures += not ok
                dt = str(case.dtype).replace("torch.", "")
                print(f"{case.entry.key:<14} {case.name:<52} {dt:<9} {backend:<10} {le:>9.2f} {ge:>9.2f}  {status}",
                      flush=True)
    print(f"\n{'all agree with torch' if not failures else f'{failures} FAILED'} "
          f"({time.perf_counter() - start:.1f} s; errors as multiples of the tolerance, <= 1 passes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
