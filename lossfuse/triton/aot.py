"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

    python -m lossfuse.triton.aot [--arch 80,90] [--kernel SUBSTR] [--set quick|cover|all] [-j N] [--list]

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) checks a kernel's semantics but never
compiles it. This compiles each kernel with Triton's real pipeline down to a cubin (``triton.compile``
of an ``ASTSource`` for a ``GPUTarget``; ptxas ships inside the triton wheel, no GPU or driver is
needed) and prints one row per variant: kernel, specialisation, arch, registers, spilled bytes, shared
memory. It exits 1 on a compile error, any register spill, or shared memory above the arch's limit.

What a variant is. A kernel's launcher picks, per call: pointer dtypes (fp32/bf16/fp16; fp64 only
where the launcher accepts it on CUDA, i.e. Huber), each constexpr flag, and a launch configuration
(block sizes, num_warps) from the shape. The configurations come from each kernel module's
``launch_configs()``, which enumerates the very functions the launchers call (``_launch_config`` in
cross_entropy.py and so on) over all supported shapes: the heuristics and this list cannot drift
apart. The dtypes and flags are the axes in ``KERNELS`` below. Every other argument gets the value of
a typical call (strides of a contiguous (N, C) or (N, C, H, W) tensor, 16-byte aligned pointers),
specialised the way Triton's launcher does (an int equal to 1 becomes a constant, multiples of 16 are
marked divisible), so the compiled code is the one a typical launch gets.

Which variants (``--set``): ``all`` is the full product of every axis and every configuration
(thousands: hours on a few cores). ``cover`` (the default) compiles every configuration with the
kernel's heaviest flag settings (the most live values: the register-pressure worst case), the other
axes rotating, plus the full product of dtypes and flags at the configurations with the most elements
per thread of each walk. ``quick`` (CI: tests/test_triton_aot.py) keeps every kernel, every value of
every axis (each flag on and off, each dtype) and the heaviest settings at the largest and smallest
configuration of each walk.

Registers and spills: without a GPU, Triton's ``n_regs`` / ``n_spills`` (read from the loaded module
by the driver) do not exist, so they are read from ptxas' own resource report (``-v``, which Triton
passes; TRITON_DUMP_PTXAS_LOG makes Triton print it), and shared memory from the compiled kernel's
metadata (``metadata.shared``, the bytes Triton's launcher asks for) plus ptxas' static smem.

Checked with the same code on Triton 3.6.0 (torch 2.11's, the GPU image's) and 3.9.0 (CI's): both
take ``ASTSource(fn, signature={name: type or "constexpr"}, constexprs={name: value},
attrs={(index,): [["tt.divisibility", 16]]})`` and ``GPUTarget("cuda", arch, 32)`` (read from each
version's triton/compiler/compiler.py, then compiled with both). ptxas differs between them: 3.6 uses
ptxas 12.8 for both archs; 3.9 uses 12.9 for sm_80 and 13.x for sm_90, always with
``--regAllocOptLevel=2``. Left to themselves, both now and then park one to four 4-byte values in local
memory instead of taking a few more registers -- loop invariants stored before a loop and loaded
after it, seen in the kernels with loss options (weight, smoothing, soft-capping, a probability
target) at some tile shapes, on either arch. The cross-entropy launchers therefore state the block's
register ceiling (``maxnreg``) for those kernels and for the fused kernels below sm_90
(``launch_maxnreg`` in cross_entropy.py; a ``Kernel``'s ``maxnreg`` hook resolves it per variant
here), and leave the option-free kernels -- the common call -- to ptxas' choice. The soft-capped
kernels form x / cap as x times 1 / cap: a division per element (div.full) made the 16-warp forward
tiles spill. The command reports any spill as a failure. Checked on 2026-12-07: the cover set's 1978
cross-entropy variants compile for sm_80 and sm_90 with no spill on Triton 3.9 (3956 compiles, 1274 s
on 2 cores) and on 3.6 (886 s), and so do the focal, distillation and KL cover sets on 3.9 (534
compiles).

ADDING A KERNEL: give its module a ``launch_configs()`` entry (kernel name -> configurations from the
launcher's own heuristic) and add one ``Kernel(...)`` to ``KERNELS`` below (its dtype/flag axes and its
typical arguments). A configuration is the kernel's block constexprs plus the launch options the
launcher passes (``LAUNCH_OPTIONS``: num_warps, maxnreg). An option that depends on the GPU (the fused
CE kernels' maxnreg, set below sm_90 only) is given per arch as ``((arch, value), ...)``, with None for
"not passed": the module's ``launch_configs(archs)`` then takes the archs being compiled for and asks
the launcher's heuristic for each (``fused_launch_config(..., arch)`` in cross_entropy.py), and each
compile uses its arch's value; an option that also depends on the call's flags comes from the
``Kernel``'s ``maxnreg`` hook, which asks the launcher's own rule. A heuristic whose tiles themselves
differ by arch is refused there (one variant is compiled for every arch). A launched kernel (``name[grid](...)`` in a lossfuse/triton module) with no entry
makes this command fail, and so does an entry that leaves a constexpr of the kernel unset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import itertools
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

# Real compilation: kernels defined under the interpreter are not JITFunctions. This must hold before
# any lossfuse.triton module is imported, so the command refuses to run in an interpreting process.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("lossfuse.triton.aot compiles for real GPUs: unset TRITON_INTERPRET")
# ptxas' resource report on stdout (captured per variant), and a fresh compile even on a cache hit
# (a hit has no report); the cache goes to a temporary folder, not the user's.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

MODULES = ("cross_entropy", "focal", "huber", "distillation", "kl_div")  # every lossfuse/triton module that launches kernels

# Shared memory one block may use, opt-in maximum (what a kernel can be launched with), in bytes. From
# NVIDIA's per-compute-capability limits in the CUDA programming guide: A100-class sm_80 offers 164 KiB
# of shared memory per SM of which a block can take 163 KiB; Hopper sm_90 228 KiB, a block 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


# ----------------------------------------------------------------------------------------------
# Arguments of a typical launch.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a tensor of this Triton dtype (fp32, bf16, fp16, fp64, i64)."""

    dtype: str


def _specialize(value):
    """(type, attribute descriptor) of a runtime argument, as Triton's launcher computes it: ints equal
    to 1 become constants, multiples of 16 (and 16-byte aligned pointers) are marked divisible."""
    if isinstance(value, Ptr):  # torch's allocations are aligned far beyond 16 bytes
        return f"*{value.dtype}", "D"
    try:  # Triton 3.6 to 3.9: the launcher's own (C++) rule
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(BaseBackend, value, False, True, True)
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton type for {value!r}")


@dataclass
class Kernel:
    """One Triton kernel's variants.

    axes: choice axes (dtypes, flags), name -> values; ``args(choice, config)`` returns every argument
    of the kernel by name (``Ptr`` for pointers, Python values for the rest, constexprs included
    except the configuration's own); ``valid(choice)`` drops combinations the launcher never makes;
    ``heavy``: partial choices with the most live values (compiled at every configuration);
    ``group(config)``: the walk a configuration belongs to (extremes are taken per group).
    """

    module: str
    name: str
    axes: dict
    args: Callable
    heavy: list = field(default_factory=list)
    valid: Callable = lambda choice: True
    group: Callable = lambda config: ""
    package: str = "lossfuse.triton"  # "" for a top-level module (the tests' toy kernels)
    # maxnreg(choice, config, arch) -> the launch's maxnreg, for a launcher that picks it from the call's
    # flags too (the configuration's own, per arch, otherwise)
    maxnreg: Callable | None = None

    def _module(self):
        return importlib.import_module(f"{self.package}.{self.module}" if self.package else self.module)

    @property
    def fn(self):
        return getattr(self._module(), self.name)

    def configs(self, archs=(80, 90)):
        fn = self._module().launch_configs
        if "archs" in inspect.signature(fn).parameters:  # arch-dependent launch options (maxnreg)
            return fn(archs=tuple(archs))[self.name]
        return fn()[self.name]


# Launch options a configuration may carry besides its constexprs. An arch-dependent one is given as
# ((arch, value), ...) by launch_configs(archs) and resolved per compile; None means the launcher
# leaves it unset.
LAUNCH_OPTIONS = ("num_warps", "maxnreg")


def _constexprs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}


def _options(config: dict, arch: int) -> dict:
    out = {}
    for k in LAUNCH_OPTIONS:
        v = config.get(k)
        if isinstance(v, tuple):
            per_arch = dict(v)
            if arch not in per_arch:
                raise ValueError(f"{k} has no value for sm_{arch} (launch_configs got archs {sorted(per_arch)})")
            v = per_arch[arch]
        if v is not None:
            out[k] = v
    return out


FLOAT = ("fp32", "bf16", "fp16")  # what the CE and focal launchers accept on CUDA (fp64: reference)
B = (False, True)


def _acc(x):
    return "fp64" if x == "fp64" else "fp32"


def _ce_strides(config):
    # (N, C) = (8192, 32000) read as (N, C, 1), or (N, C, H*W) = (8, 21, 4096) for the spatial walk.
    if config["SPATIAL_WALK"]:
        n, c, s = 8, 21, 4096
        return n * c, c, s, (c * s, s, 1), (s, 1)
    n, c = 8192, 32000
    return n, c, 1, (c, 1, 1), (1, 1)


def _ce_target(choice, x):
    return {"index": "i64", "prob:x": x, "prob:fp32": "fp32"}[choice["target"]]


def _ce_fwd_args(ch, cfg):
    r, c, s, xs, ts = _ce_strides(cfg)
    prob = ch["target"] != "index"
    t_strides = xs if prob else (ts[0], 0, ts[1])
    return dict(
        x_ptr=Ptr(ch["x"]), t_ptr=Ptr(_ce_target(ch, ch["x"])), w_ptr=Ptr("fp32"), loss_ptr=Ptr("fp32"),
        lse_ptr=Ptr("fp64"), R=r, C=c, S=s, x_sN=xs[0], x_sC=xs[1], x_sS=xs[2],
        t_sN=t_strides[0], t_sC=t_strides[1], t_sS=t_strides[2],
        ignore_index=-100, keep=0.9, eps_c=0.1 / c, z_loss=1e-4, softcap=30.0,
        HAS_WEIGHT=ch["HAS_WEIGHT"], HAS_SMOOTHING=ch["HAS_SMOOTHING"], PROB_TARGET=prob,
        HAS_SOFTCAP=ch["HAS_SOFTCAP"],
    )


def _ce_bwd_args(ch, cfg):
    a = _ce_fwd_args(ch, cfg)
    r, c, s, xs, ts = _ce_strides(cfg)
    prob = a["PROB_TARGET"]
    del a["loss_ptr"]
    return dict(
        go_ptr=Ptr("fp32"), g_ptr=Ptr("fp32"), x_ptr=a["x_ptr"], t_ptr=a["t_ptr"], w_ptr=a["w_ptr"], wsum_ptr=Ptr("fp32"),
        lse_ptr=a["lse_ptr"], gx_ptr=Ptr(ch["x"]), gt_ptr=Ptr(_ce_target(ch, ch["x"]) if prob else ch["x"]),
        R=r, C=c, S=s, num_classes=float(c),
        g_sN=0, g_sS=0,  # the expanded scalar of a mean/sum
        x_sN=xs[0], x_sC=xs[1], x_sS=xs[2], t_sN=a["t_sN"], t_sC=a["t_sC"], t_sS=a["t_sS"],
        gx_sN=xs[0], gx_sC=xs[1], gx_sS=xs[2], gt_sN=xs[0], gt_sC=xs[1], gt_sS=xs[2],
        ignore_index=-100, keep=0.9, eps_c=0.1 / c, z_loss=1e-4, softcap=30.0,
        HAS_WEIGHT=ch["HAS_WEIGHT"], HAS_SMOOTHING=ch["HAS_SMOOTHING"], PROB_TARGET=prob,
        HAS_SOFTCAP=ch["HAS_SOFTCAP"], INPUT_GRAD=ch["grads"] in ("input", "both"),
        TARGET_GRAD=ch["grads"] in ("target", "both"), ACC=triton.language.float32,
    )


def _ce_fused_args(ch, cfg):
    # class-index targets only; absent weight / weight sum / scale pointers are the fp32 loss buffer
    r, c, s, xs, ts = _ce_strides(cfg)
    return dict(
        x_ptr=Ptr(ch["x"]), t_ptr=Ptr("i64"), w_ptr=Ptr("fp32"), wsum_ptr=Ptr("fp32"), s_ptr=Ptr("fp32"),
        loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp64"), gx_ptr=Ptr(ch["x"]),
        R=r, C=c, S=s, num_classes=float(c), x_sN=xs[0], x_sC=xs[1], x_sS=xs[2], t_sN=ts[0], t_sS=ts[1],
        gx_sN=xs[0], gx_sC=xs[1], gx_sS=xs[2],
        ignore_index=-100, keep=0.9, eps_c=0.1 / c, z_loss=1e-4, softcap=30.0,
        HAS_WEIGHT=ch["HAS_WEIGHT"], HAS_SMOOTHING=ch["HAS_SMOOTHING"], HAS_SOFTCAP=ch["HAS_SOFTCAP"],
        HAS_SCALE=ch["HAS_SCALE"],
    )


def _ce_scale_args(ch, cfg):
    r, c, s, xs, ts = _ce_strides(cfg)
    return dict(go_ptr=Ptr(ch["gx"]), gx_ptr=Ptr(ch["gx"]), R=r, C=c, S=s, gx_sN=xs[0], gx_sC=xs[1], gx_sS=xs[2])


def _sigmoid_fwd_args(ch, cfg):
    return dict(
        x_ptr=Ptr(ch["x"]), t_ptr=Ptr("i64" if ch["INDEX"] else ch["x"]), out_ptr=Ptr("fp32"), gs_ptr=Ptr("fp32"),
        gx_ptr=Ptr(ch["x"]), numel=8192 * 80, C=80, alpha=0.25, gamma=2.0,
        SUM_BLOCK=4096 if cfg["PARTIAL"] else cfg["BLOCK"],
        HAS_ALPHA=ch["HAS_ALPHA"], INDEX=ch["INDEX"], STORE_GRAD=ch["STORE_GRAD"],
    )


def _sigmoid_bwd_args(ch, cfg):
    return dict(
        go_ptr=Ptr("fp32"), g_ptr=Ptr("fp32"), x_ptr=Ptr(ch["x"]), t_ptr=Ptr("i64" if ch["INDEX"] else ch["x"]),
        gx_ptr=Ptr(ch["x"]), numel=8192 * 80, C=80, alpha=0.25, gamma=2.0,
        HAS_ALPHA=ch["HAS_ALPHA"], INDEX=ch["INDEX"], GRAD_SCALAR=ch["GRAD_SCALAR"], CHECK_ONE=ch["CHECK_ONE"],
    )


def _softmax_strides(ch):
    # (N, C) = (8192, 1000) as (N, C, 1), or (N, C, H*W) = (8, 21, 4096): the layouts the ops pass
    return ((1000, 1, 1), 1000, 1) if ch["layout"] == "rows" else ((21 * 4096, 4096, 1), 21, 4096)


def _softmax_fwd_args(ch, cfg):
    xs, c, s = _softmax_strides(ch)
    return dict(
        x_ptr=Ptr(ch["x"]), y_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"), loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"),
        d_ptr=Ptr("fp32"), gs_ptr=Ptr("fp32"), gx_ptr=Ptr(ch["x"]), C=c, S=s, x_sN=xs[0], x_sC=xs[1], x_sS=xs[2],
        y_sN=s, y_sS=1, gx_sN=xs[0], gx_sC=xs[1], gx_sS=xs[2],
        alpha=0.25, gamma=2.0, ignore_index=-100, HAS_SCALE=ch["HAS_SCALE"], STORE_GRAD=ch["STORE_GRAD"],
    )


def _softmax_bwd_args(ch, cfg):
    xs, c, s = _softmax_strides(ch)
    return dict(
        go_ptr=Ptr("fp32"), g_ptr=Ptr("fp32"), x_ptr=Ptr(ch["x"]), y_ptr=Ptr("i64"), lse_ptr=Ptr("fp32"),
        d_ptr=Ptr("fp32"), gx_ptr=Ptr(ch["x"]), C=c, S=s, g_sN=0, g_sS=0, x_sN=xs[0], x_sC=xs[1], x_sS=xs[2],
        y_sN=s, y_sS=1, gx_sN=xs[0], gx_sC=xs[1], gx_sS=xs[2], ignore_index=-100, CHECK_ONE=ch["CHECK_ONE"],
    )


def _huber_operands(ch):
    x = ch["x"]
    pick = {"x": x, "acc": _acc(x), None: x}
    return x, pick[ch["target"]], (None if ch["weight"] is None else pick[ch["weight"]])


# Strides of a contiguous tensor of shape (2, 3, 5, 7)[-NDIM:] (sizes after merging), a broadcast target
# along the last dim at NDIM >= 2 (stride 0): the forms the ops pass.
def _huber_space(ndim):
    sizes = [2, 48, 80, 1024][-ndim:]
    st, acc = [], 1
    for n in reversed(sizes):
        st.insert(0, acc)
        acc *= n
    pad = 4 - ndim
    full = [1] * pad + sizes
    return full[1:], [0] * pad + st


def _huber_fwd_args(ch, cfg):
    x, t, w = _huber_operands(ch)
    (s1, s2, s3), st = _huber_space(ch["NDIM"])
    ws = st if w is not None else [0, 0, 0, 0]
    return dict(
        X=Ptr(x), Y=Ptr(t), Wt=Ptr(w or x), OUT=Ptr("fp64" if cfg["REDUCE"] else _acc(x)), GS=Ptr(_acc(x)),
        GX=Ptr(x), GY=Ptr(t), numel=2 * 48 * 80 * 1024, S1=s1, S2=s2, S3=s3,
        x_s0=st[0], x_s1=st[1], x_s2=st[2], x_s3=st[3], y_s0=st[0], y_s1=st[1], y_s2=st[2], y_s3=st[3],
        w_s0=ws[0], w_s1=ws[1], w_s2=ws[2], w_s3=ws[3], delta_hi=1.0, delta_lo=1e-9,
        MODE=ch["MODE"], HAS_W=w is not None, WANT_GX="x" in ch["grads"], WANT_GY="y" in ch["grads"],
        NDIM=ch["NDIM"], F64=x == "fp64",
    )


def _huber_bwd_args(ch, cfg):
    x, t, w = _huber_operands(ch)
    (s1, s2, s3), st = _huber_space(ch["NDIM"])
    ws = st if w is not None else [0, 0, 0, 0]
    gs = [0, 0, 0, 0] if ch["G_SCALAR"] else st
    grads = ch["grads"]
    return dict(
        GO=Ptr(_acc(x)), G=Ptr(_acc(x)), X=Ptr(x), Y=Ptr(t), Wt=Ptr(w or x), GX=Ptr(x), GY=Ptr(t), GW=Ptr(w or x),
        numel=2 * 48 * 80 * 1024, S1=s1, S2=s2, S3=s3,
        x_s0=st[0], x_s1=st[1], x_s2=st[2], x_s3=st[3], y_s0=st[0], y_s1=st[1], y_s2=st[2], y_s3=st[3],
        w_s0=ws[0], w_s1=ws[1], w_s2=ws[2], w_s3=ws[3], g_s0=gs[0], g_s1=gs[1], g_s2=gs[2], g_s3=gs[3],
        delta_hi=1.0, delta_lo=1e-9,
        MODE=ch["MODE"], HAS_W=w is not None, G_SCALAR=ch["G_SCALAR"], WANT_GX="x" in grads, WANT_GY="y" in grads,
        WANT_GW="w" in grads, CHECK_ONE=ch["CHECK_ONE"], NDIM=ch["NDIM"], F64=x == "fp64",
    )


def _distill_args(ch, cfg):
    # (R, V) = (8192, 32000) rows, a scalar upstream gradient expanded over the rows (stride 0)
    x, grads = ch["x"], ch["grads"]
    return dict(
        s_ptr=Ptr(x), t_ptr=Ptr(x), y_ptr=Ptr("i64"), g_ptr=Ptr("fp32"), loss_ptr=Ptr("fp32"), gs_ptr=Ptr(x),
        gt_ptr=Ptr(x), V=32000, s_sR=32000, t_sR=32000, g_sR=0, gs_sR=32000, gt_sR=32000, ignore_index=-100,
        inv=0.5, beta=0.5, lr=0.0, nla=0.69, nlb=0.69,
        MODE=ch["MODE"], HAS_Y=ch["HAS_Y"], WANT_GS="s" in grads, WANT_GT="t" in grads,
    )


def _kl_fwd_args(ch, cfg):
    return dict(X=Ptr(ch["x"]), T=Ptr(ch["x"]), OUT=Ptr("fp64" if cfg["REDUCE"] else "fp32"), numel=8192 * 32000,
                LOG_TARGET=ch["LOG_TARGET"])


def _kl_bwd_args(ch, cfg):
    x, grads = ch["x"], ch["grads"]
    return dict(G=Ptr("fp32"), X=Ptr(x), T=Ptr(x), GX=Ptr(x), GT=Ptr(x), numel=8192 * 32000,
                LOG_TARGET=ch["LOG_TARGET"], G_SCALAR=ch["G_SCALAR"], WANT_GX="x" in grads, WANT_GT="t" in grads)


_CE_AXES = dict(x=FLOAT, target=("index", "prob:x", "prob:fp32"), HAS_WEIGHT=B, HAS_SMOOTHING=B, HAS_SOFTCAP=B)
_CE_HEAVY_FLAGS = dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True)
_HUBER_AXES = dict(x=("fp32", "bf16", "fp16", "fp64"), target=("x", "acc"), weight=(None, "x", "acc"),
                   MODE=(0, 1, 2), NDIM=(1, 2, 3, 4))


def _walk(config):
    return "spatial" if config.get("SPATIAL_WALK") else "rows"


def _ce_maxnreg(fused):
    """The cross-entropy launchers' maxnreg (launch_maxnreg): fused(config) says whether the launch is
    a fused kernel's; the loss options come from the variant's flags."""

    def pick(ch, cfg, arch):
        from . import cross_entropy as ce

        options = (ch.get("HAS_WEIGHT") or ch.get("HAS_SMOOTHING") or ch.get("HAS_SOFTCAP")
                   or ch.get("target", "index") != "index")
        return ce.launch_maxnreg(cfg["num_warps"], arch, fused(cfg), bool(options))

    return pick


# THE LIST: every launched Triton kernel. Adding a kernel = one entry here (+ its module's launch_configs()).
KERNELS = [
    Kernel("cross_entropy", "_ce_fwd_kernel", _CE_AXES, _ce_fwd_args, group=_walk, maxnreg=_ce_maxnreg(lambda cfg: False),
           heavy=[dict(target="index", **_CE_HEAVY_FLAGS), dict(target="prob:x", **_CE_HEAVY_FLAGS)]),
    # CHECK_ONE comes with the configuration: the fused forward's tiles (cross_entropy_fused_bwd)
    Kernel("cross_entropy", "_ce_bwd_kernel", dict(_CE_AXES, grads=("input", "target", "both")), _ce_bwd_args,
           group=lambda cfg: f"{_walk(cfg)} check_one={cfg['CHECK_ONE']}",
           maxnreg=_ce_maxnreg(lambda cfg: cfg["CHECK_ONE"]),
           # a class-index target has no target gradient (the launcher passes need_target only for probabilities)
           valid=lambda ch: ch["target"] != "index" or ch["grads"] == "input",
           heavy=[dict(target="index", grads="input", **_CE_HEAVY_FLAGS),
                  dict(target="prob:x", grads="both", **_CE_HEAVY_FLAGS)]),
    Kernel("cross_entropy", "_ce_fused_kernel",
           dict(x=FLOAT, HAS_WEIGHT=B, HAS_SMOOTHING=B, HAS_SOFTCAP=B, HAS_SCALE=B), _ce_fused_args,
           # the row held in registers (ONE_CHUNK) and the chunk loop are separate code: extremes of each
           group=lambda cfg: f"{_walk(cfg)} one_chunk={cfg['ONE_CHUNK']}",
           maxnreg=_ce_maxnreg(lambda cfg: True),
           heavy=[dict(HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True, HAS_SCALE=True)]),
    # the launcher takes a float32 or float64 gradient (a narrower one would be rounded twice)
    Kernel("cross_entropy", "_ce_scale_kernel", dict(gx=("fp32", "fp64")), _ce_scale_args, group=_walk,
           heavy=[dict(gx="fp32")]),
    # STORE_GRAD: the forward that also writes the gradient (the Triton fused path)
    Kernel("focal", "_sigmoid_focal_fwd_kernel", dict(x=FLOAT, HAS_ALPHA=B, INDEX=B, STORE_GRAD=B),
           _sigmoid_fwd_args,
           heavy=[dict(HAS_ALPHA=True, INDEX=True, STORE_GRAD=True), dict(HAS_ALPHA=True, INDEX=False, STORE_GRAD=True)],
           group=lambda cfg: "partial" if cfg["PARTIAL"] else "elementwise"),
    # CHECK_ONE: the backward of the gradient-writing forward (the fused_bwd ops), scalar g only
    Kernel("focal", "_sigmoid_focal_bwd_kernel", dict(x=FLOAT, HAS_ALPHA=B, INDEX=B, GRAD_SCALAR=B, CHECK_ONE=B),
           _sigmoid_bwd_args, valid=lambda ch: ch["GRAD_SCALAR"] or not ch["CHECK_ONE"],
           heavy=[dict(HAS_ALPHA=True, INDEX=True, GRAD_SCALAR=False, CHECK_ONE=False)]),
    Kernel("focal", "_softmax_focal_fwd_kernel",
           dict(x=FLOAT, HAS_SCALE=B, STORE_GRAD=B, layout=("rows", "spatial")),
           _softmax_fwd_args, heavy=[dict(HAS_SCALE=True, STORE_GRAD=True)]),
    Kernel("focal", "_softmax_focal_bwd_kernel", dict(x=FLOAT, CHECK_ONE=B, layout=("rows", "spatial")),
           _softmax_bwd_args, heavy=[dict(layout="rows", CHECK_ONE=True)]),
    # grads: the gradients a reducing forward also writes (huber_fwd_grad)
    Kernel("huber", "huber_fwd_kernel", dict(_HUBER_AXES, grads=("", "x", "y", "xy")), _huber_fwd_args,
           heavy=[dict(weight="x", NDIM=4, grads="xy")],
           group=lambda cfg: "reduce" if cfg["REDUCE"] else "elementwise"),
    Kernel("huber", "huber_bwd_kernel",
           dict(_HUBER_AXES, G_SCALAR=B, CHECK_ONE=B, grads=("x", "y", "w", "xy", "xw", "yw", "xyw")),
           _huber_bwd_args,
           # the launcher returns early when no gradient is wanted; a weight gradient needs a weight.
           # (CHECK_ONE, huber_fused_bwd, only ever has a scalar G and no weight gradient; the other
           # combinations are compiled all the same, so that the quick set still covers every value.)
           valid=lambda ch: "w" not in ch["grads"] or ch["weight"] is not None,
           heavy=[dict(weight="x", NDIM=4, G_SCALAR=False, CHECK_ONE=False, grads="xyw")]),
    # one kernel serves distillation_fwd and distillation_bwd; grads "" is the loss alone
    Kernel("distillation", "_distill_kernel", dict(x=FLOAT, MODE=(0, 1, 2), HAS_Y=B, grads=("", "s", "t", "st")),
           _distill_args, heavy=[dict(MODE=2, HAS_Y=True, grads="st")]),
    Kernel("kl_div", "kl_div_fwd_kernel", dict(x=FLOAT, LOG_TARGET=B), _kl_fwd_args,
           heavy=[dict(LOG_TARGET=True)], group=lambda cfg: "reduce" if cfg["REDUCE"] else "elementwise"),
    Kernel("kl_div", "kl_div_bwd_kernel", dict(x=FLOAT, LOG_TARGET=B, G_SCALAR=B, grads=("x", "t", "xt")),
           _kl_bwd_args, heavy=[dict(LOG_TARGET=True, G_SCALAR=False, grads="xt")]),
]


# ----------------------------------------------------------------------------------------------
# Variants.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    kernel: Kernel
    choice: tuple  # ((axis, value), ...)
    config: tuple  # ((name, value), ...), num_warps included

    @property
    def name(self):
        return self.kernel.name.strip("_")

    def spec(self, arch: int | None = None) -> str:
        short = {False: "0", True: "1", None: "-"}
        parts = [f"{k}={short.get(v, v) if isinstance(v, (bool, type(None))) else v}" for k, v in self.choice]
        cfg = dict(self.config)
        if self.kernel.maxnreg is not None:
            cfg.pop("maxnreg", None)
            if arch is not None:
                cfg["maxnreg"] = self.kernel.maxnreg(dict(self.choice), dict(self.config), arch)
        for k, v in cfg.items():
            if k in LAUNCH_OPTIONS and isinstance(v, tuple):  # per arch
                v = dict(v).get(arch) if arch is not None else "/".join(f"{a}:{x}" for a, x in v)
            if k == "maxnreg" and v is None:
                continue
            parts.append(f"{'warps' if k == 'num_warps' else k}={short.get(v, v) if isinstance(v, bool) else v}")
        return " ".join(parts)

    def source(self, arch: int):
        """(ASTSource, compile options for ``arch``)."""
        k = self.kernel
        fn = k.fn
        options = _options(dict(self.config), arch)
        cfg = _constexprs(dict(self.config))
        if k.maxnreg is not None:
            options.pop("maxnreg", None)
            m = k.maxnreg(dict(self.choice), dict(self.config), arch)
            if m is not None:
                options["maxnreg"] = m
        args = k.args(dict(self.choice), cfg)
        args.update(cfg)
        names = list(fn.arg_names)
        given, wanted = set(args), set(names)
        if given != wanted:
            raise ValueError(f"{k.name}: the AOT arguments do not match the kernel's: missing "
                             f"{sorted(wanted - given)}, unknown {sorted(given - wanted)}")
        constexpr_params = {p.name for p in fn.params if p.is_constexpr}
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(names):
            value = args[name]
            if name in constexpr_params:
                signature[name], constexprs[name] = "constexpr", value
                continue
            ty, desc = _specialize(value)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = desc
            elif isinstance(desc, str) and "D" in desc:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def _dedupe(variants):
    """One variant per compiled identity: choices that give the same arguments (for fp32 input the
    'prob:x' target is 'prob:fp32') compile to the same kernel."""
    seen, out = set(), []
    for v in variants:
        cfg = _constexprs(dict(v.config))
        args = v.kernel.args(dict(v.choice), cfg)
        key = (v.kernel.name, v.config, tuple(sorted((k, repr(a)) for k, a in args.items())))
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _choices(k: Kernel):
    names = list(k.axes)
    for values in itertools.product(*(k.axes[n] for n in names)):
        ch = dict(zip(names, values))
        if k.valid(ch):
            yield ch


def _per_thread(cfg):
    elems = 1
    for name, v in cfg.items():
        if name.startswith("BLOCK") and isinstance(v, int):
            elems *= v
    return elems / (32 * cfg["num_warps"]), elems


def _extremes(k: Kernel, configs, smallest=False):
    """Per walk: the configuration with the most elements per thread (then the largest tile); with
    ``smallest`` also the one with the fewest."""
    groups = {}
    for cfg in configs:
        groups.setdefault(k.group(cfg), []).append(cfg)
    out = []
    for cfgs in groups.values():
        cfgs = sorted(cfgs, key=_per_thread)
        out.append(cfgs[-1])
        if smallest and cfgs[0] is not cfgs[-1]:
            out.append(cfgs[0])
    return out


def _complete(k: Kernel, partial: dict, i: int):
    """``partial`` with the other axes filled by rotation (offset i): the first valid completion."""
    names = [n for n in k.axes if n not in partial]
    for j in range(len(list(_choices(k))) + 1):
        ch = dict(partial)
        for a, n in enumerate(names):
            vals = k.axes[n]
            ch[n] = vals[(i + j + a) % len(vals)]
        if k.valid(ch):
            return ch
    raise ValueError(f"{k.name}: no valid choice extends {partial}")


def variants(kernels=KERNELS, which: str = "cover", archs=(80, 90)):
    out = []
    for k in kernels:
        configs = k.configs(archs)
        names = list(k.axes)
        mk = lambda ch, cfg: Variant(k, tuple((n, ch[n]) for n in names), tuple(cfg.items()))  # noqa: E731
        if which == "all":
            out += [mk(ch, cfg) for cfg in configs for ch in _choices(k)]
            continue
        if which == "cover":
            for i, cfg in enumerate(configs):
                out += [mk(_complete(k, h, i), cfg) for h in k.heavy]
            out += [mk(ch, cfg) for cfg in _extremes(k, configs) for ch in _choices(k)]
        elif which == "quick":
            ext = _extremes(k, configs, smallest=True)
            for cfg in ext:
                out += [mk(_complete(k, h, 0), cfg) for h in k.heavy]
            # every value of every axis at least once, at the largest configuration of each walk
            big = _extremes(k, configs)
            width = max(len(v) for v in k.axes.values())
            for i in range(width):
                ch = {}
                for a, n in enumerate(names):
                    vals = k.axes[n]
                    ch[n] = vals[i % len(vals)]
                if not k.valid(ch):
                    ch = _complete(k, {n: ch[n] for n in names[:1]}, i)
                out.append(mk(ch, big[i % len(big)]))
        else:
            raise ValueError(f"unknown variant set {which!r}")
    return _dedupe(out)


def coverage_gaps(vs) -> list[str]:
    """What a variant list leaves out: a kernel, an axis value, a constexpr flag value."""
    gaps = []
    by_kernel = {}
    for v in vs:
        by_kernel.setdefault(v.kernel.name, []).append(v)
    for k in KERNELS:
        got = by_kernel.get(k.name, [])
        if not got:
            gaps.append(f"{k.name}: no variant")
            continue
        for axis, values in k.axes.items():
            seen = {dict(v.choice)[axis] for v in got}
            gaps += [f"{k.name}: {axis}={val!r} never compiled" for val in values if val not in seen]
        # every bool constexpr of the kernel both ways (what the launcher can pass)
        flags = {}
        for v in got:
            cfg = _constexprs(dict(v.config))
            a = k.args(dict(v.choice), cfg)
            a.update(cfg)
            for p in k.fn.params:
                if p.is_constexpr and isinstance(a.get(p.name), bool):
                    flags.setdefault(p.name, set()).add(a[p.name])
        gaps += [f"{k.name}: constexpr {f} only {sorted(s)}" for f, s in flags.items() if len(s) < 2]
    return gaps


def unlisted_kernels() -> list[str]:
    """Kernels launched (``name[grid](``) in a lossfuse/triton module without a KERNELS entry."""
    listed = {(k.module, k.name) for k in KERNELS}
    missing = []
    for mod in MODULES:
        m = importlib.import_module(f"lossfuse.triton.{mod}")
        src = open(m.__file__).read()
        for name, obj in vars(m).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and re.search(rf"\b{name}\[", src):
                if (mod, name) not in listed:
                    missing.append(f"{mod}.{name}")
    return missing


# ----------------------------------------------------------------------------------------------
# Compilation.
# ----------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Row:
    kernel: str
    spec: str
    arch: int
    regs: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        limit = SMEM_LIMIT.get(self.arch)
        if limit is not None and self.smem > limit:
            out.append(f"shared memory {self.smem} B > {limit} B")
        return out


def compile_variant(v: Variant, arch: int) -> Row:
    row = Row(v.name, v.spec(arch), arch)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src, options = v.source(arch)
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        text = log.getvalue()
        regs = _REGS.findall(text)
        spill = _SPILL.findall(text)
        if not regs or not spill:
            raise RuntimeError("ptxas printed no resource report (TRITON_DUMP_PTXAS_LOG unsupported?)")
        row.regs = int(regs[-1])
        row.stack, row.spill_stores, row.spill_loads = map(int, spill[-1])
        static = _SMEM.findall(text)
        row.smem = int(ck.metadata.shared) + (int(static[-1]) if static else 0)
    except Exception as e:  # noqa: BLE001 -- any failure is the variant's result
        msg = str(e).strip().splitlines()
        row.error = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    row.seconds = time.perf_counter() - t0
    return row


_POOL_VARIANTS: list = []


def _work(item):
    i, arch = item
    return i, compile_variant(_POOL_VARIANTS[i], arch)


def run(vs, archs, jobs=1, out=sys.stdout):
    global _POOL_VARIANTS
    _POOL_VARIANTS = vs
    items = [(i, a) for a in archs for i in range(len(vs))]
    rows = [None] * len(items)
    index = {it: n for n, it in enumerate(items)}
    header = f"{'kernel':<26} {'arch':>5} {'regs':>4} {'spill':>9} {'smem':>7}  specialisation"
    print(header, file=out, flush=True)

    def emit(row):
        spill = f"{row.spill_stores}/{row.spill_loads}"
        bad = row.problems()
        regs = "-" if row.regs < 0 else row.regs
        line = f"{row.kernel:<26} sm_{row.arch:<2} {regs:>4} {spill:>9} {row.smem:>7}  {row.spec}"
        print(line + (f"   <-- {'; '.join(bad)}" if bad else ""), file=out, flush=True)

    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for i, row in pool.imap_unordered(_work, items):
                pass_item = (i, row.arch)
                rows[index[pass_item]] = row
                emit(row)
    else:
        for n, (i, arch) in enumerate(items):
            rows[n] = compile_variant(vs[i], arch)
            emit(rows[n])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lossfuse.triton.aot", description=__doc__.split("\n\n")[1])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--kernel", action="append", default=[], help="only kernels whose name contains this (repeatable)")
    ap.add_argument("--set", dest="which", default="cover", choices=("quick", "cover", "all"),
                    help="which variants (see the module docstring; default cover)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap.add_argument("-j", "--jobs", type=int, default=cpus, help="compile in this many processes (default: every CPU)")
    ap.add_argument("--list", action="store_true", help="print the variants, compile nothing")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    kernels = [k for k in KERNELS if not args.kernel or any(s in k.name for s in args.kernel)]
    if not kernels:
        print(f"no kernel matches {args.kernel}", file=sys.stderr)
        return 2
    problems = [f"launched kernel without an AOT entry: {name}" for name in unlisted_kernels()]
    vs = variants(kernels, args.which, archs)
    if not args.kernel:
        problems += [f"coverage: {g}" for g in coverage_gaps(vs)]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    if args.list:
        for v in vs:
            print(f"{v.name:<26} {v.spec()}")
        counts = {}
        for v in vs:
            counts[v.name] = counts.get(v.name, 0) + 1
        print(f"{len(vs)} variants x {len(archs)} arch(s): " + ", ".join(f"{k} {n}" for k, n in counts.items()))
        return 0
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(vs)} variants x arch {archs} "
          f"({args.which}), {args.jobs} job(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="lossfuse-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        rows = run(vs, archs, jobs=max(1, args.jobs))
        wall = time.perf_counter() - t0
    bad = [r for r in rows if r.problems()]
    print(f"\n{'kernel':<26} {'arch':>5} {'variants':>8} {'max regs':>8} {'spilling':>8} {'errors':>6} {'max smem':>8}")
    for name in dict.fromkeys(r.kernel for r in rows):
        for arch in archs:
            rs = [r for r in rows if r.kernel == name and r.arch == arch]
            ok = [r for r in rs if not r.error]
            print(f"{name:<26} sm_{arch:<2} {len(rs):>8} {max((r.regs for r in ok), default=-1):>8} "
                  f"{sum(1 for r in ok if r.spill_stores or r.spill_loads):>8} {sum(1 for r in rs if r.error):>6} "
                  f"{max((r.smem for r in ok), default=0):>8}")
    print(f"{len(rows)} compiles in {wall:.0f} s; {len(bad)} with problems")
    for r in bad:
        print(f"FAIL {r.kernel} sm_{r.arch} {r.spec}: {'; '.join(r.problems())}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
