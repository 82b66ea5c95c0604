"""The project's stated targets (issues 3, 4, 5, 6, 11, 12, 13), checked against a run's rows and printed at its end.

A target is met or missed only where its case ran on its kind of device; otherwise it is left out.
These are the numbers the issues ask to quote from one run: ratios measured side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .presets import SMALL

F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Target:
    text: str
    device: str            # "cpu" or "cuda"
    loss: str
    shape: tuple
    dtype: torch.dtype
    variant: str
    metric: str            # a row column, "speedup_vs_liger", "time_vs_torch" (1 / speedup_vs_torch), or
                           # "mem_vs_liger" (peak_mem_mb / liger's on the same case)
                           # "mem_vs_torch" (extra_mem_pct over torch eager's)
                           # "speedup_vs_float32" (the float32 row's median over this row's: same case,
                           # mode and provider, another dtype)
                           # "time_vs_base" (median over the median of provider ``base``, same case)
    op: str                # ">=" or "<="
    value: float
    mode: str = "fwd+bwd"
    base: str = ""         # the provider of "time_vs_base"


def _case(title: str, device: str, loss: str, shape: tuple, dtype: torch.dtype, variant: str, *goals,
          mode: str = "fwd+bwd") -> list:
    """The targets of one case, each goal a tuple (text, metric, op, value[, base])."""
    return [Target(f"{title}: {text}", device, loss, shape, dtype, variant, metric, op, value, mode, *base)
            for text, metric, op, value, *base in goals]


def _x(value: float, of: str = "torch eager") -> tuple:
    metric = {"torch eager": "speedup_vs_torch", "torch.compile": "speedup_vs_compile",
              "liger-kernel": "speedup_vs_liger"}[of]
    return (f">= {value:g}x {of}", metric, ">=", value)


def _time(value: float) -> tuple:
    return (f"time <= {value:g}x torch eager", "time_vs_torch", "<=", value)


def _extra_mem(pct: float, above: str, of: str = "the logits") -> tuple:
    return (f"peak above {above} <= {pct:g}% of {of}", "extra_mem_pct", "<=", pct)


TARGETS = [
    *_case("cross-entropy (4096, 32000) fp32 fwd+bwd", "cpu", "ce", (4096, 32000), F32, "",
           _x(10), _x(6, "torch.compile"), _extra_mem(5, "logits + gradient")),
    *_case("sigmoid focal (200000, 80) fp32 float targets", "cpu", "sigmoid_focal", (200000, 80), F32, "float",
           _x(4, "torch.compile")),
    *_case("sigmoid focal (200000, 80) fp32 class-index targets", "cpu", "sigmoid_focal", (200000, 80), F32,
           "index", _x(5, "torch.compile")),
    *_case("softmax focal (65536, 1000) fp32", "cpu", "softmax_focal", (65536, 1000), F32, "",
           _x(8), _x(4, "torch.compile")),
    *[t for loss, name in (("huber", "Huber"), ("smooth_l1", "SmoothL1"))
      for t in _case(f"{name} 16,777,216 fp32", "cpu", loss, (16777216,), F32, "", _x(3, "torch.compile"), _x(6))],
    # Issues 6 and 12: the fused projection + cross-entropy against torch's unfused eager code and against
    # cut-cross-entropy's torch.compile path (the ``cce-compile`` provider, where cut_cross_entropy is
    # installed). Its memory is a percentage of the full (N, V) logits (the entry's mem_ref_bytes), not of
    # the inputs.
    *_case("linear+CE (4096, 512, 32000) fp32 fwd+bwd", "cpu", "lce", (4096, 512, 32000), F32, "",
           _extra_mem(8, "inputs + gradients"), _time(1.2),
           ("time <= cut-cross-entropy's torch_compile path", "time_vs_base", "<=", 1.0, "cce-compile"),
           _extra_mem(6, "inputs + gradients")),
    # Issue 15: distillation on logits, the usual kl_div of two log_softmax tensors against the fused kernel.
    *_case("distillation (4096, 32000) fp32 fwd+bwd", "cpu", "distill", (4096, 32000), F32, "",
           _x(8), _x(4, "torch.compile"), _extra_mem(5, "inputs + gradient", "one logits tensor")),
    *_case("linear+distillation (4096, 512, 32000) fp32 fwd+bwd", "cpu", "ldistill", (4096, 512, 32000), F32, "",
           _extra_mem(10, "inputs + gradients", "one logits tensor")),
    # Issue 13: a transformers training step patched with lossfuse.transformers.apply (fused_linear=True)
    # against transformers' own loss ("torch" rows of the hf entry).
    *[t for device in ("cpu", "cuda")
      for t in _case("HF Llama step (8x256 tokens, hidden 256, vocab 32000) fp32", device, "hf",
                     (8, 256, 256, 32000), F32, "",
                     ("peak above parameters + gradients <= 40% of transformers' own", "mem_vs_torch", "<=", 0.4),
                     ("time <= transformers' own", "time_vs_torch", "<=", 1.0))],
    # Issue 12: bf16 moves half of fp32's bytes, so it must be clearly faster; segmentation with
    # ignore_index.
    *_case("cross-entropy (4096, 32000) bf16 fwd+bwd", "cpu", "ce", (4096, 32000), BF16, "",
           (">= 1.6x faster than fp32 (same run)", "speedup_vs_float32", ">=", 1.6)),
    *_case("cross-entropy (8, 21, 256, 256) fp32 ignore_index fwd+bwd", "cpu", "ce", (8, 21, 256, 256), F32,
           "ignore_index", _x(6), _x(4, "torch.compile"), _extra_mem(5, "logits + gradient")),
    # Issue 11, on an H100/H200 (the ``gpu`` preset): cross-entropy bf16 fwd+bwd at V >= 32000 near the
    # copy bandwidth and ahead of liger-kernel and torch.compile; fused linear + cross-entropy no bigger
    # than liger's and close to torch eager's time.
    *_case("cross-entropy (4096, 32000) bf16 fwd+bwd", "cuda", "ce", (4096, 32000), BF16, "",
           (">= 80% of copy bandwidth", "copy_bw_frac", ">=", 0.8),
           ("at least as fast as liger-kernel", "speedup_vs_liger", ">=", 1.0)),
    *[t for shape in ((8192, 32000), (8192, 128256), (4096, 256000))
      for t in _case(f"cross-entropy ({shape[0]}, {shape[1]}) bf16 fwd+bwd", "cuda", "ce", shape, BF16, "",
                     (">= 85% of copy bandwidth", "copy_bw_frac", ">=", 0.85),
                     _x(1.2, "liger-kernel"), _x(2, "torch.compile"))],
    *_case("linear+CE (8192, 4096, 128256) bf16 fwd+bwd", "cuda", "lce", (8192, 4096, 128256), BF16, "",
           ("peak memory <= liger-kernel's", "mem_vs_liger", "<=", 1.0), _time(1.1)),
]


# Issue 12, the ``small`` preset: never slower than torch eager in a training step, at most twice its
# time in a validation loop (the forward under no_grad), at every small case.
_MODE_LIMITS = (("fwd+bwd", 1.0, "time <= torch eager's"), ("eval", 2.0, "forward under no_grad <= 2x torch eager's"))
for _c in SMALL:
    _what = f"{_c.entry.title} ({', '.join(str(d) for d in _c.shape)}) fp32" + (f" {_c.variant}" if _c.variant else "")
    TARGETS += [Target(f"small: {_what} {mode}: {text}", "cpu", _c.loss, _c.shape, _c.dtype, _c.variant,
                       "time_vs_torch", "<=", limit, mode=mode)
                for mode, limit, text in _MODE_LIMITS]


def _shape(t: Target) -> str:
    return "x".join(str(s) for s in t.shape)


_FORMATS = {
    "extra_mem_pct": "{:.1f}%",
    "copy_bw_frac": "{:.0%}",
    "mem_vs_liger": "{:.2f}x liger-kernel's peak memory",
    "mem_vs_torch": "{:.1%} of torch eager's",
    "time_vs_base": "{:.2f}x its time",
    "speedup_vs_float32": "{:.2f}x fp32's speed (fp32 time / this time)",
}


def _fmt(metric: str, v: float) -> str:
    if metric == "time_vs_torch":
        return f"{v:.2f}x torch eager's time (speed-up {1 / v:.2f}x)"
    return _FORMATS.get(metric, "{:.2f}x").format(v)


def evaluate(rows: list, device_type: str) -> list:
    """One dict per target whose case ran: text, measured value, met (bool), or a note why not."""
    dtype_names = {F32: "float32", BF16: "bfloat16"}
    provider = "lossfuse-triton" if device_type == "cuda" else "lossfuse-cpu"
    out = []
    for t in TARGETS:
        if t.device != device_type:
            continue
        mine = [r for r in rows if r["loss"] == t.loss and r["shape"] == _shape(t) and r["mode"] == t.mode
                and r["dtype"] == dtype_names[t.dtype] and r["variant"] == t.variant and r.get("main", True)
                and "threads" not in (r.get("sweeps") or "")]
        if not mine:
            continue
        row = next((r for r in mine if r["provider"] == provider), None)
        if row is None or row["status"] != "ok":
            why = "not run" if row is None else f"{row['status']}: {row['note']}"
            out.append({"target": t.text, "measured": None, "met": None, "note": why})
            continue
        if t.metric == "speedup_vs_liger":
            liger = next((r for r in mine if r["provider"] == "liger" and r["status"] == "ok"), None)
            value = None if liger is None else liger["median_ms"] / row["median_ms"]
        elif t.metric == "mem_vs_liger":
            liger = next((r for r in mine if r["provider"] == "liger" and r["status"] == "ok"), None)
            ok = liger is not None and liger.get("peak_mem_mb") and row.get("peak_mem_mb") is not None
            value = row["peak_mem_mb"] / liger["peak_mem_mb"] if ok else None
        elif t.metric == "mem_vs_torch":
            eager = next((r for r in mine if r["provider"] == "torch" and r["status"] == "ok"), None)
            mem = None if eager is None else eager.get("extra_mem_pct")
            value = None if mem is None or row.get("extra_mem_pct") is None or mem <= 0 else (
                row["extra_mem_pct"] / mem)
        elif t.metric == "speedup_vs_float32":
            fp32 = next((r for r in rows if r["loss"] == t.loss and r["shape"] == _shape(t) and r["mode"] == t.mode
                         and r["dtype"] == "float32" and r["variant"] == t.variant and r["provider"] == provider
                         and r["status"] == "ok" and r.get("main", True)
                         and "threads" not in (r.get("sweeps") or "")), None)
            if fp32 is None:
                out.append({"target": t.text, "measured": None, "met": None, "note": "no float32 row in this run"})
                continue
            value = fp32["median_ms"] / row["median_ms"]
        elif t.metric == "time_vs_base":
            base = next((r for r in mine if r["provider"] == t.base), None)
            if base is None or base["status"] != "ok":
                why = f"{t.base} not run" if base is None else f"{t.base} {base['status']}: {base['note']}"
                out.append({"target": t.text, "measured": None, "met": None, "note": why})
                continue
            value = row["median_ms"] / base["median_ms"]
        elif t.metric == "time_vs_torch":
            s = row.get("speedup_vs_torch")
            value = 1.0 / s if s else None
        else:
            value = row.get(t.metric)
        if value is None:
            out.append({"target": t.text, "measured": None, "met": None, "note": f"{t.metric} not measured"})
            continue
        met = value >= t.value if t.op == ">=" else value <= t.value
        out.append({"target": t.text, "measured": _fmt(t.metric, value), "value": value, "met": met, "note": ""})
    return out


def table(results: list) -> str:
    if not results:
        return ""
    lines = ["targets (this run):"]
    for r in results:
        state = "n/a " if r["met"] is None else ("met " if r["met"] else "MISS")
        lines.append(f"  [{state}] {r['target']}: {r['measured'] or r['note']}")
    return "\n".join(lines)
