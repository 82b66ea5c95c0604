"""Shape presets: which cases a run measures, and how hard it repeats them.

A case is one (loss, shape, dtype, variant[, thread count]). Presets list cases; ``--loss`` and
``--dtype`` filter and override them. ``default`` holds the cases the project's targets are quoted on
and finishes in about three minutes on a 2-core CPU (torch.compile's warm-up included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ..catalog import LOSSES, numel

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

DTYPE_NAMES = {
    "float32": F32, "fp32": F32, "float": F32,
    "bfloat16": BF16, "bf16": BF16,
    "float16": F16, "fp16": F16, "half": F16,
    "float64": F64, "fp64": F64, "double": F64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    loss: str
    shape: tuple
    dtype: torch.dtype = F32
    variant: str = ""
    threads: int | None = None          # None: the run's thread count
    sweeps: tuple = ()                  # scaling sweeps this case is a point of: "classes", "rows", "threads"
    modes: tuple | None = None          # None: the run's modes
    target: str = ""                    # the project target this case is quoted for, if any
    main: bool = True                   # False: a point of a scaling sweep only (kept out of the size plots)
    rounds: int | None = None           # at most this many interleaved rounds (calls of seconds); --repeats overrides
    leave_out: tuple = ()               # providers not run on this case (a sweep point timed against fewer)

    @property
    def entry(self):
        return LOSSES[self.loss]

    @property
    def size(self) -> int:
        return numel(self.shape)

    def key(self):
        return (self.loss, tuple(self.shape), self.dtype, self.variant, self.threads)

    def label(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        parts = [self.loss, f"({shape})", dtype_name(self.dtype)]
        if self.variant:
            parts.append(self.variant)
        if self.threads:
            parts.append(f"{self.threads} thr")
        return " ".join(parts)


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple
    modes: tuple = ("fwd+bwd",)
    rounds: int = 7           # interleaved rounds (each provider once per round), at most
    min_rounds: int = 5       # ... and at least, whatever the budget says
    block_s: float = 0.1      # each timed block calls the step this long (>= 1 call)
    budget_s: float = 12.0    # timed rounds of one (case, mode), all providers: soft cap
    with_reference: bool = False   # time lossfuse's plain-PyTorch backend too (slow)
    description: str = ""


def _c(loss, shape, dtypes=(F32,), variant="", **kw):
    return [Case(loss, tuple(shape), d, variant, **kw) for d in dtypes]


_SIGMOID_VARIANTS = ("float", "index")

QUICK = (
    _c("ce", (512, 1000)) + _c("ce", (2, 5, 32, 32), variant="ignore_index")
    + _c("sigmoid_focal", (4096, 80), variant="float") + _c("sigmoid_focal", (4096, 80), variant="index")
    + _c("softmax_focal", (2048, 100)) + _c("huber", (262144,)) + _c("smooth_l1", (262144,))
    + _c("lce", (256, 64, 2000))
    + _c("distill", (256, 1000)) + _c("kl_div", (4096, 64)) + _c("ldistill", (128, 32, 1000))
)

DEFAULT = (
    _c("ce", (4096, 32000), (F32, BF16), target="ce")
    + _c("ce", (8, 21, 256, 256), variant="ignore_index", target="ce")
    + _c("sigmoid_focal", (200000, 80), variant="float", target="sigmoid_focal")
    + _c("sigmoid_focal", (200000, 80), variant="index", target="sigmoid_focal")
    + _c("softmax_focal", (65536, 1000), target="softmax_focal")
    + _c("huber", (16777216,), target="huber")
    + _c("smooth_l1", (16777216,), target="smooth_l1")
    + _c("distill", (4096, 32000), (F32, BF16), target="distill")
    # Three rounds: each provider's fwd+bwd call is seconds of matmuls (536.9 GFLOP).
    + _c("ldistill", (4096, 512, 32000), target="ldistill", rounds=3)
)

LLM = (
    _c("ce", (4096, 32000), (BF16, F32))
    + _c("ce", (2048, 50257), (BF16,))
    + _c("ce", (1024, 128256), (BF16,))
    + _c("ce", (512, 256000), (BF16,))
    # Fused linear + cross-entropy at its target shape. Not in ``default``, which stays near three
    # minutes: 5.5-16 s per fwd+bwd call for every provider on 2 cores (402.7 GFLOP of matmuls), and
    # each provider also runs once for the check and once for the memory, so even three rounds (the
    # least that give a median) take about three minutes. --repeats overrides the cap.
    + _c("lce", (4096, 512, 32000), target="lce", rounds=3)
)

# A Hugging Face transformers training step (the hf entry; needs transformers): a small but wide Llama,
# batch 8 x 256 tokens, hidden 256, vocabulary 32000. About 1-2 s per step on 2 cores for each provider.
HF = _c("hf", (8, 256, 256, 32000), target="hf", rounds=3)

# Too big for the llm preset on a CPU: the float64 oracle alone holds several (4096, 128256) float64
# logits-sized tensors (4.2 GB each) and takes minutes; in ``full`` only.
LLM_LARGE = _c("lce", (4096, 1024, 128256), (BF16,), rounds=3)

# The GPU benchmark (bench/gpu.sh; issue 11): language-model cross-entropy in both dtypes, forward alone
# and with the backward, the other losses at their default-preset shapes, and fused linear +
# cross-entropy at a Llama-3-sized head. Sized to finish, torch.compile's warm-ups included, in the few
# minutes bench/gpu.sh leaves it on an H100/H200.
# (A case's modes narrow the run's: the preset runs fwd+bwd and fwd, the non-CE cases fwd+bwd only.)
_LM_FWD = ("fwd+bwd", "fwd")
_STEP = ("fwd+bwd",)
GPU = (
    [c for shape in [(8192, 32000), (8192, 128256), (4096, 256000)] for c in _c("ce", shape, (BF16, F32), modes=_LM_FWD)]
    + _c("sigmoid_focal", (200000, 80), variant="float", modes=_STEP)
    + _c("sigmoid_focal", (200000, 80), variant="index", modes=_STEP)
    + _c("softmax_focal", (65536, 1000), modes=_STEP)
    + _c("huber", (16777216,), (F32, BF16), modes=_STEP)
    + _c("lce", (8192, 4096, 128256), (BF16,), rounds=3, modes=_STEP)
    + _c("distill", (8192, 32000), (BF16, F32), modes=_STEP) + _c("distill", (8192, 128256), (BF16,), modes=_STEP)
    + _c("ldistill", (8192, 4096, 128256), (BF16,), rounds=3, modes=_STEP)
)

VISION = (
    _c("ce", (256, 1000)) + _c("ce", (4096, 1000))
    + _c("ce", (8, 21, 256, 256), variant="ignore_index")
    + _c("ce", (4, 150, 128, 128), variant="ignore_index")
    + _c("ce", (2, 19, 512, 1024), variant="ignore_index")
    + _c("softmax_focal", (4096, 1000)) + _c("softmax_focal", (65536, 1000))
)

DETECTION = (
    [c for shape in [(50000, 80), (200000, 80)] for v in _SIGMOID_VARIANTS
     for c in _c("sigmoid_focal", shape, variant=v)]
    + _c("smooth_l1", (200000, 4)) + _c("smooth_l1", (1000000, 4)) + _c("smooth_l1", (16777216,))
    + _c("huber", (1000000, 4)) + _c("huber", (16777216,))
)

# Small calls (issue 12): what classification, tabular and CI training loops on a CPU pass a loss, where
# per-call overhead, not the kernel, sets the time. Each in a training step (fwd+bwd) and in a validation
# loop (eval: the forward under no_grad); both are checked against torch eager in targets.py.
_SMALL_MODES = ("fwd+bwd", "eval")
SMALL = (
    [c for shape in [(1, 10), (8, 10), (64, 10), (256, 100), (32, 1000)]
     for c in _c("ce", shape, target="small", modes=_SMALL_MODES)]
    + _c("softmax_focal", (64, 10), target="small", modes=_SMALL_MODES)
    + [c for v in _SIGMOID_VARIANTS for c in _c("sigmoid_focal", (64, 80), variant=v, target="small",
                                                modes=_SMALL_MODES)]
    + [c for loss in ("huber", "smooth_l1") for n in (100, 10000)
       for c in _c(loss, (n,), target="small", modes=_SMALL_MODES)]
)

# Time vs size, from one row up (the time_vs_size plot: where lossfuse overtakes torch eager). Against
# torch eager alone: the targets are stated against it, and a fresh torch.compile per point would
# double the preset's time without adding to the picture.
SWEEP_SIZE_CE_ROWS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)     # CE (N, 10)
SWEEP_SIZE_HUBER = (100, 1000, 10000, 100000, 1000000)                 # Huber, elements


def _size_sweep() -> list:
    kw = dict(sweeps=("size",), modes=("fwd+bwd",), main=False, leave_out=("torch.compile",))
    return ([Case("ce", (n, 10), F32, **kw) for n in SWEEP_SIZE_CE_ROWS]
            + [Case("huber", (n,), F32, **kw) for n in SWEEP_SIZE_HUBER])


SWEEP_ROWS_FIXED = 1024          # rows of the classes sweep
SWEEP_CLASSES_FIXED = 32000      # classes of the rows sweep
SWEEP_CLASSES = (1024, 4096, 16384, 32768, 65536, 131072, 262144)
SWEEP_ROWS = (256, 1024, 4096, 8192)


def _thread_counts() -> tuple:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = [1]
    while counts[-1] * 2 <= n:
        counts.append(counts[-1] * 2)
    if counts[-1] != n:
        counts.append(n)
    return tuple(counts)


def _sweeps() -> list:
    fwdbwd = ("fwd+bwd",)
    out = [Case("ce", (SWEEP_ROWS_FIXED, c), F32, sweeps=("classes",), modes=fwdbwd, main=False)
           for c in SWEEP_CLASSES]
    out += [Case("ce", (n, SWEEP_CLASSES_FIXED), F32, sweeps=("rows",), modes=fwdbwd, main=False)
            for n in SWEEP_ROWS]
    # Every loss at its default-preset shape, and linear + cross-entropy at its target shape. That one
    # costs the most: 10-30 s per call on one thread for each provider, three rounds (as in llm) plus the
    # check and the memory call, several minutes per thread count -- a small part of full's hour.
    for t in _thread_counts():
        for loss, shape, variant in [("ce", (4096, 32000), ""), ("ce", (8, 21, 256, 256), "ignore_index"),
                                     ("sigmoid_focal", (200000, 80), "float"),
                                     ("sigmoid_focal", (200000, 80), "index"),
                                     ("softmax_focal", (65536, 1000), ""),
                                     ("huber", (16777216,), ""), ("smooth_l1", (16777216,), ""),
                                     ("distill", (4096, 32000), ""), ("kl_div", (4096, 32000), "")]:
            out.append(Case(loss, shape, F32, variant, threads=t, sweeps=("threads",), modes=fwdbwd, main=False))
        for loss in ("lce", "ldistill"):
            out.append(Case(loss, (4096, 512, 32000), F32, threads=t, sweeps=("threads",), modes=fwdbwd, main=False,
                            rounds=3))
    return out


def _merge(cases) -> tuple:
    """Drop repeated cases (same loss, shape, dtype, variant, threads), keeping the union of their tags."""
    seen: dict = {}
    for c in cases:
        k = c.key()
        if k in seen:
            old = seen[k]
            modes = None if old.modes is None or c.modes is None else tuple(dict.fromkeys(old.modes + c.modes))
            seen[k] = replace(old, sweeps=tuple(dict.fromkeys(old.sweeps + c.sweeps)), modes=modes,
                              target=old.target or c.target, main=old.main or c.main,
                              leave_out=tuple(p for p in old.leave_out if p in c.leave_out))
        else:
            seen[k] = c
    return tuple(seen.values())


PRESETS = {
    "quick": Preset("quick", _merge(QUICK), rounds=3, min_rounds=3, block_s=0.02, budget_s=1.5,
                    description="tiny shapes: a smoke test of the machinery, in seconds"),
    # ~10 us calls: short blocks (hundreds of calls each), many interleaved rounds, so that a preemption
    # on a loaded machine spoils a few blocks and the medians of the same-round ratios stay put.
    "small": Preset("small", _merge(SMALL + _size_sweep()), modes=_SMALL_MODES, rounds=61, min_rounds=21,
                    block_s=0.01, budget_s=2.0,
                    description="small calls (CE from 1 row, focal, Huber/SmoothL1 at 100 and 10k elements), "
                                "fwd+bwd and eval (forward under no_grad); time vs size from 1 row up"),
    # Four rounds at least: the eager formulas of the target cases take 1-4 s a call on 2 cores.
    "default": Preset("default", _merge(DEFAULT), rounds=7, min_rounds=4, budget_s=10.0,
                      description="the cases the project's targets are quoted on (~3 min on 2 CPU cores)"),
    "llm": Preset("llm", _merge(LLM), description="language-model cross-entropy: (tokens, vocab) up to 256k"),
    "vision": Preset("vision", _merge(VISION), description="classification and segmentation cross-entropy"),
    "detection": Preset("detection", _merge(DETECTION),
                        description="dense detection: sigmoid focal, SmoothL1/Huber box regression"),
    # do_bench samples ~budget/rounds per provider and round: a few 10 ms samples are plenty on a GPU.
    "gpu": Preset("gpu", _merge(GPU), modes=_LM_FWD, rounds=5, min_rounds=3, budget_s=2.0,
                  description="the GPU benchmark of bench/gpu.sh: LM cross-entropy fwd and fwd+bwd, focal, Huber, "
                              "linear + cross-entropy (8192, 4096, 128256) bf16"),
    "hf": Preset("hf", _merge(HF), min_rounds=3,
                 description="a Hugging Face transformers Llama training step: transformers' own loss against "
                             "lossfuse.transformers.apply (fused_linear=True and False); needs transformers"),
}


def full_preset() -> Preset:
    cases = _merge(DEFAULT + LLM + LLM_LARGE + VISION + DETECTION + _sweeps())
    return Preset("full", cases, modes=("fwd", "bwd", "fwd+bwd"), rounds=9, min_rounds=5, budget_s=15.0,
                  with_reference=True,
                  description="every preset, three modes, the reference backend, and the scaling sweeps "
                              "(classes 1k->256k, rows, CPU threads)")


PRESET_NAMES = ("quick", "small", "default", "llm", "vision", "detection", "hf", "gpu", "full")


def get_preset(name: str) -> Preset:
    if name == "full":
        return full_preset()
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}") from None


def select(preset: Preset, losses=None, dtypes=None, device_type: str = "cpu") -> list:
    """The preset's cases for the chosen losses, with ``dtypes`` replacing each case's dtype."""
    out = []
    for c in preset.cases:
        if losses and c.loss not in losses:
            continue
        if "threads" in c.sweeps and device_type != "cpu":
            continue  # the thread sweep is a CPU measurement
        if dtypes:
            out.extend(replace(c, dtype=d) for d in dtypes)
        else:
            out.append(c)
    return list(_merge(out))
