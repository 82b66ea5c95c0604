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


TARGETS = [
    Target("cross-entropy (4096, 32000) fp32 fwd+bwd: >= 10x torch eager", "cpu", "ce", (4096, 32000), F32, "",
           "speedup_vs_torch", ">=", 10),
    Target("cross-entropy (4096, 32000) fp32 fwd+bwd: >= 6x torch.compile", "cpu", "ce", (4096, 32000), F32, "",
           "speedup_vs_compile", ">=", 6),
    Target("cross-entropy (4096, 32000) fp32 fwd+bwd: peak above logits + gradient <= 5% of the logits", "cpu",
           "ce", (4096, 32000), F32, "", "extra_mem_pct", "<=", 5),
    Target("sigmoid focal (200000, 80) fp32 float targets: >= 4x torch.compile", "cpu", "sigmoid_focal",
           (200000, 80), F32, "float", "speedup_vs_compile", ">=", 4),
    Target("sigmoid focal (200000, 80) fp32 class-index targets: >= 5x torch.compile", "cpu", "sigmoid_focal",
           (200000, 80), F32, "index", "speedup_vs_compile", ">=", 5),
    Target("softmax focal (65536, 1000) fp32: >= 8x torch eager", "cpu", "softmax_focal", (65536, 1000), F32, "",
           "speedup_vs_torch", ">=", 8),
    Target("softmax focal (65536, 1000) fp32: >= 4x torch.compile", "cpu", "softmax_focal", (65536, 1000), F32, "",
           "speedup_vs_compile", ">=", 4),
    Target("Huber 16,777,216 fp32: >= 3x torch.compile", "cpu", "huber", (16777216,), F32, "",
           "speedup_vs_compile", ">=", 3),
    Target("Huber 16,777,216 fp32: >= 6x torch eager", "cpu", "huber", (16777216,), F32, "",
           "speedup_vs_torch", ">=", 6),
    Target("SmoothL1 16,777,216 fp32: >= 3x torch.compile", "cpu", "smooth_l1", (16777216,), F32, "",
           "speedup_vs_compile", ">=", 3),
    Target("SmoothL1 16,777,216 fp32: >= 6x torch eager", "cpu", "smooth_l1", (16777216,), F32, "",
           "speedup_vs_torch", ">=", 6),
    # Issue 6: the fused projection + cross-entropy against torch's unfused eager code. Its memory is a
    # percentage of the full (N, V) logits (the entry's mem_ref_bytes), not of the inputs.
    Target("linear+CE (4096, 512, 32000) fp32 fwd+bwd: peak above inputs + gradients <= 8% of the logits", "cpu",
           "lce", (4096, 512, 32000), F32, "", "extra_mem_pct", "<=", 8),
    Target("linear+CE (4096, 512, 32000) fp32 fwd+bwd: time <= 1.2x torch eager", "cpu", "lce",
           (4096, 512, 32000), F32, "", "time_vs_torch", "<=", 1.2),
    # Issue 15: distillation on logits, the usual kl_div of two log_softmax tensors against the fused kernel.
    Target("distillation (4096, 32000) fp32 fwd+bwd: >= 8x torch eager", "cpu", "distill", (4096, 32000), F32, "",
           "speedup_vs_torch", ">=", 8),
    Target("distillation (4096, 32000) fp32 fwd+bwd: >= 4x torch.compile", "cpu", "distill", (4096, 32000), F32, "",
           "speedup_vs_compile", ">=", 4),
    Target("distillation (4096, 32000) fp32 fwd+bwd: peak above inputs + gradient <= 5% of one logits tensor", "cpu",
           "distill", (4096, 32000), F32, "", "extra_mem_pct", "<=", 5),
    Target("linear+distillation (4096, 512, 32000) fp32 fwd+bwd: peak above inputs + gradients <= 10% of one "
           "logits tensor", "cpu", "ldistill", (4096, 512, 32000), F32, "", "extra_mem_pct", "<=", 10),
    # Issue 13: a transformers training step patched with lossfuse.transformers.apply (fused_linear=True)
    # against transformers' own loss ("torch" rows of the hf entry).
    *[Target(f"HF Llama step (8x256 tokens, hidden 256, vocab 32000) fp32: {what}", device, "hf",
             (8, 256, 256, 32000), F32, "", metric, "<=", value)
      for device in ("cpu", "cuda")
      for what, metric, value in (
          ("peak above parameters + gradients <= 40% of transformers' own", "mem_vs_torch", 0.4),
          ("time <= transformers' own", "time_vs_torch", 1.0))],
    # Issue 12: bf16 moves half of fp32's bytes, so it must be clearly faster; segmentation with
    # ignore_index; linear + cross-entropy against cut-cross-entropy's torch.compile path (the
    # ``cce-compile`` provider, where cut_cross_entropy is installed).
    Target("cross-entropy (4096, 32000) bf16 fwd+bwd: >= 1.6x faster than fp32 (same run)", "cpu", "ce",
           (4096, 32000), BF16, "", "speedup_vs_float32", ">=", 1.6),
    Target("cross-entropy (8, 21, 256, 256) fp32 ignore_index fwd+bwd: >= 6x torch eager", "cpu", "ce",
           (8, 21, 256, 256), F32, "ignore_index", "speedup_vs_torch", ">=", 6),
    Target("cross-entropy (8, 21, 256, 256) fp32 ignore_index fwd+bwd: >= 4x torch.compile", "cpu", "ce",
           (8, 21, 256, 256), F32, "ignore_index", "speedup_vs_compile", ">=", 4),
    Target("cross-entropy (8, 21, 256, 256) fp32 ignore_index fwd+bwd: peak above logits + gradient <= 5% of "
           "the logits", "cpu", "ce", (8, 21, 256, 256), F32, "ignore_index", "extra_mem_pct", "<=", 5),
    Target("linear+CE (4096, 512, 32000) fp32 fwd+bwd: time <= cut-cross-entropy's torch_compile path", "cpu",
           "lce", (4096, 512, 32000), F32, "", "time_vs_base", "<=", 1.0, base="cce-compile"),
    Target("linear+CE (4096, 512, 32000) fp32 fwd+bwd: peak above inputs + gradients <= 6% of the logits", "cpu",
           "lce", (4096, 512, 32000), F32, "", "extra_mem_pct", "<=", 6),
    Target("cross-entropy (4096, 32000) bf16 fwd+bwd: >= 80% of copy bandwidth", "cuda", "ce", (4096, 32000),
           BF16, "", "copy_bw_frac", ">=", 0.8),
    Target("cross-entropy (4096, 32000) bf16 fwd+bwd: at least as fast as liger-kernel", "cuda", "ce",
           (4096, 32000), BF16, "", "speedup_vs_liger", ">=", 1.0),
]

# Issue 11, on an H100/H200 (the ``gpu`` preset): cross-entropy bf16 fwd+bwd at V >= 32000 near the copy
# bandwidth and ahead of liger-kernel and torch.compile; fused linear + cross-entropy no bigger than
# liger's and close to torch eager's time.
for _shape in ((8192, 32000), (8192, 128256), (4096, 256000)):
    _s = f"({_shape[0]}, {_shape[1]})"
    TARGETS += [
        Target(f"cross-entropy {_s} bf16 fwd+bwd: >= 85% of copy bandwidth", "cuda", "ce", _shape, BF16, "",
               "copy_bw_frac", ">=", 0.85),
        Target(f"cross-entropy {_s} bf16 fwd+bwd: >= 1.2x liger-kernel", "cuda", "ce", _shape, BF16, "",
               "speedup_vs_liger", ">=", 1.2),
        Target(f"cross-entropy {_s} bf16 fwd+bwd: >= 2x torch.compile", "cuda", "ce", _shape, BF16, "",
               "speedup_vs_compile", ">=", 2.0),
    ]
TARGETS += [
    Target("linear+CE (8192, 4096, 128256) bf16 fwd+bwd: peak memory <= liger-kernel's", "cuda", "lce",
           (8192, 4096, 128256), BF16, "", "mem_vs_liger", "<=", 1.0),
    Target("linear+CE (8192, 4096, 128256) bf16 fwd+bwd: time <= 1.1x torch eager", "cuda", "lce",
           (8192, 4096, 128256), BF16, "", "time_vs_torch", "<=", 1.1),
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
