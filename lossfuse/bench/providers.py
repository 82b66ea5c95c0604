"""Providers: the implementations a case is timed with.

  lossfuse-cpu        lossfuse's C++/OpenMP kernels (CPU)
  lossfuse-triton     lossfuse's Triton kernels (CUDA only: on the CPU Triton runs its interpreter,
                      which is a testing tool, never timed)
  lossfuse-reference  lossfuse's plain-PyTorch backend (slow; in the ``full`` preset or when asked)
  torch               the loss entry's torch code, eager
  torch.compile       the same torch code under torch.compile (its compile time is never timed)
  liger               liger-kernel's cross-entropy, and its fused linear + cross-entropy for ``lce``
                      (CUDA; an anchor, when it is installed)
  cce                 cut-cross-entropy's ``linear_cross_entropy`` (Apple's CCE; ``lce`` on CUDA, when
                      installed), with its defaults: impl "cce" and gradient filtering (filter_eps "auto")
  cce-compile         cut-cross-entropy's ``linear_cross_entropy(..., impl="torch_compile")``: the logits
                      under torch.compile, on any device (``lce``, when installed; the CPU anchor of issue 12)
  torch-chunked       torch's own chunked linear + cross-entropy, ``F.linear_cross_entropy(...,
                      options=torch.nn.LinearCrossEntropyOptions())`` (torch >= 2.13; the anchor of ``lce``)
  hf-logits-lossfuse  the ``hf`` entry's model under ``lossfuse.transformers.apply(model, fused_linear=False)``
                      (lossfuse's cross-entropy on the logits; the lossfuse-<backend> rows are fused_linear=True)

``Provider.make(entry, case, device)`` returns a callable ``fn(*tensors) -> loss``, or a string saying
why the provider does not apply (shown as a note; nothing is timed). An anchor that implements only some
losses names them in ``Provider.losses``; cases of other losses leave it out without a row.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .. import catalog as _losses
from .. import _backend

EAGER = "torch"
COMPILE = "torch.compile"


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable            # (entry, case, device) -> fn | str (why not)
    mutates_inputs: bool = False   # writes into its inputs (liger's in-place gradient): gets private copies
    losses: tuple | None = None    # the loss entries it implements (an anchor's); None: all. Other
                                   # losses leave it out without a row (a note would repeat on every case)


def _lossfuse(backend: str) -> Provider:
    def make(entry, case, device):
        fn = _losses.lossfuse_function(entry)
        if fn is None:
            return f"this lossfuse has no {entry.lossfuse_name}"
        if backend == "triton" and device.type != "cuda":
            return "Triton on the CPU is its interpreter (a testing tool): not timed"
        if backend == "cpu" and device.type != "cpu":
            return "the C++ kernels run on CPU tensors"
        if backend == "cpu" and not _backend.cpu_kernels_available():
            return f"lossfuse._C did not load ({_backend._C_ERROR})"
        if backend == "triton" and not _backend.triton_installed():
            return "triton is not installed"

        lossfuse_fn = entry.lossfuse_call(case.variant)

        def call(*tensors):
            return lossfuse_fn(fn, *tensors, backend=backend)

        return call

    return Provider(f"lossfuse-{backend}", make)


def _eager_make(entry, case, device):
    return entry.torch_call(case.variant)


def _compile_make(entry, case, device):
    if entry.compile_note:
        return entry.compile_note
    # dynamic=False: one specialised graph per shape, what a training loop with fixed shapes gets.
    return torch.compile(entry.torch_call(case.variant), dynamic=False)


def _liger_make(entry, case, device):
    if entry.key in ("distill", "ldistill"):
        return _liger_distill_make(entry, case, device)
    if entry.key not in ("ce", "lce"):
        return "liger-kernel anchors cross-entropy, linear + cross-entropy and the distillation losses only"
    if entry.key == "ce" and case.variant not in ("", "ignore_index"):
        return "liger-kernel is timed on class-index targets without weights or smoothing"
    if device.type != "cuda":
        return "liger-kernel runs on CUDA only"
    if entry.key == "ce" and len(case.shape) != 2:
        return "liger-kernel's cross-entropy takes (N, C) logits only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel; offline: bench/README.md)"
    try:
        if entry.key == "ce":
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss as Loss
        else:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss as Loss
    except Exception as exc:  # an install that does not import is a note, not a crash
        return f"liger-kernel does not import: {type(exc).__name__}: {exc}"
    module = Loss()

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if entry.key == "ce":
        return lambda x, y: first(module(x, y))
    # liger's order: (lin_weight, input, target)
    return lambda x, w, y: first(module(w, x, y))


def _liger_distill_make(entry, case, device):
    """liger-kernel's JSD (beta 0: the forward KL) on log_softmax tensors -- it takes log-probabilities,
    not logits -- and its fused linear JSD, for the catalog's forward-KL cases at T = 1."""
    opts = entry.options.get(case.variant) or {}
    if opts.get("temperature", 1.0) != 1.0 or opts.get("beta", 0.0) != 0.0 or "ignore" in case.variant:
        return "liger-kernel is timed on the forward KL at temperature 1 without labels"
    if device.type != "cuda":
        return "liger-kernel runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel; offline: bench/README.md)"
    try:
        if entry.key == "distill":
            from liger_kernel.transformers.jsd import LigerJSD

            module = LigerJSD(beta=0.0)
        else:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

            module = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    except Exception as exc:  # an install that does not import (or refuses beta 0) is a note, not a crash
        return f"liger-kernel does not import: {type(exc).__name__}: {exc}"
    if entry.key == "distill":
        return lambda s, t: module(torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    return lambda x, w, xt, wt: module(x, w, xt, wt)


def _cce_function(entry, device, impl: str):
    """cut-cross-entropy's ``linear_cross_entropy`` bound to ``impl``, or why it does not apply."""
    if entry.key != "lce":
        return "cut-cross-entropy implements linear + cross-entropy only"
    if impl == "cce" and device.type != "cuda":
        return "cut-cross-entropy's kernels run on CUDA only"
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy; offline: bench/README.md)"
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        return f"cut-cross-entropy does not import: {type(exc).__name__}: {exc}"

    def call(x, w, y):  # CCE's order: (embeddings (N, H), classifier (V, H), targets)
        return linear_cross_entropy(x, w, y, reduction="mean", impl=impl)

    return call


def _cce_make(entry, case, device):
    return _cce_function(entry, device, "cce")


def _cce_compile_make(entry, case, device):
    # Its compiled function is module-level: the runner's per-case dynamo reset makes the check call
    # compile it afresh for the case's shapes, untimed, as for the torch.compile provider.
    return _cce_function(entry, device, "torch_compile")


def _torch_chunked_make(entry, case, device):
    if entry.key != "lce":
        return "torch's chunked linear_cross_entropy anchors linear + cross-entropy only"
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options_cls is None:
        return (f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                f"(options=torch.nn.LinearCrossEntropyOptions(): torch >= 2.13)")
    # The zero-argument options: chunking method and accumulation picked by torch per (device, dtype).
    options = options_cls()

    def call(x, w, y):
        return fn(x, w, y, options=options)

    return call


def _hf_logits_make(entry, case, device):
    backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and not _backend.cpu_kernels_available():
        return f"lossfuse._C did not load ({_backend._C_ERROR})"
    if backend == "triton" and not _backend.triton_installed():
        return "triton is not installed"

    def call(*tensors):
        return _losses.hf_step("logits", backend, *tensors)

    return call


PROVIDERS = {
    p.name: p
    for p in [
        _lossfuse("cpu"), _lossfuse("triton"), _lossfuse("reference"),
        Provider(EAGER, _eager_make), Provider(COMPILE, _compile_make),
        # liger writes the gradient into the logits during the forward: it gets its own copies.
        Provider("liger", _liger_make, mutates_inputs=True, losses=("ce", "lce", "distill", "ldistill")),
        Provider("cce", _cce_make, losses=("lce",)),
        Provider("cce-compile", _cce_compile_make, losses=("lce",)),
        Provider("torch-chunked", _torch_chunked_make, losses=("lce",)),
        # lossfuse.transformers.apply(model, fused_linear=False): lossfuse's cross-entropy on the logits.
        Provider("hf-logits-lossfuse", _hf_logits_make, losses=("hf",)),
    ]
}

ALIASES = {
    "cpu": "lossfuse-cpu", "triton": "lossfuse-triton", "reference": "lossfuse-reference",
    "eager": EAGER, "compile": COMPILE, "liger-kernel": "liger", "chunked": "torch-chunked",
    "cut-cross-entropy": "cce", "cce-torch-compile": "cce-compile",
    "logits": "hf-logits-lossfuse",
}


def resolve_names(names) -> list:
    out = []
    for raw in names:
        for n in str(raw).split(","):
            n = n.strip()
            if not n:
                continue
            n = ALIASES.get(n, n)
            if n not in PROVIDERS:
                raise ValueError(f"unknown provider {n!r}; choose from "
                                 f"{', '.join(list(PROVIDERS) + list(ALIASES))}")
            if n not in out:
                out.append(n)
    return out


def default_names(device: torch.device, with_reference: bool) -> list:
    """Every lossfuse backend usable on ``device``, torch eager and compiled, and the anchors."""
    if device.type == "cuda":
        names = ["lossfuse-triton"]
    else:
        names = ["lossfuse-cpu"]
    if with_reference:
        names.append("lossfuse-reference")
    names += [EAGER, COMPILE]
    if device.type == "cuda":
        names += ["liger", "cce"]
    names.append("cce-compile")     # on lce cases only; a note where cut-cross-entropy is not installed
    names.append("torch-chunked")   # on lce cases only (Provider.losses); a note where torch lacks it
    names.append("hf-logits-lossfuse")  # on hf cases only
    return names
