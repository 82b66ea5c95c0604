"""What a run leaves behind: the terminal table, results.csv / results.json (with the machine, versions,
date and git commit), table.txt; plots are in plots.py."""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..catalog import LOSSES
from .runner import COLUMNS, RunResult, llc_bytes


# ---------------------------------------------------------------------------------------------------
# The machine and the software
# ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args, cwd) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device, threads: int, argv=None) -> dict:
    import lossfuse
    from .. import _backend

    pkg_dir = Path(lossfuse.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], pkg_dir)
    dirty = None
    if commit:
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], pkg_dir))
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": threads,
        "llc_bytes": llc_bytes(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "lossfuse": lossfuse.__version__,
            "liger_kernel": _version("liger-kernel"),
        },
        "lossfuse_path": str(pkg_dir),
        "lossfuse_cpu_isa": _backend._C.cpu_isa() if _backend._C is not None else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join(argv if argv is not None else sys.argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return meta


# ---------------------------------------------------------------------------------------------------
# The terminal table
# ---------------------------------------------------------------------------------------------------


def _fmt(v, spec, dash="-"):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return dash
    return format(v, spec)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def legend(copy_bw: dict, memory_method: str) -> str:
    return "\n".join([
        f"copy bandwidth {copy_bw['gbps']:.1f} GB/s at the start"
        + (f", {copy_bw['gbps_at_end']:.1f} GB/s at the end" if copy_bw.get("gbps_at_end") else "")
        + f" ({copy_bw['method']}).",
        "median ms: median over interleaved rounds; IQR: inter-quartile range of the rounds;",
        "vs torch / vs compile / vs <anchor>: median of same-round time ratios (>1 = faster);",
        "GB/s: counted bytes / median time (inputs read once, gradients written once); %BW: of copy bandwidth;",
        "GFLOP/s (linear+CE): the projection's matmul FLOPs / median time;",
        f"peak MiB: memory above the inputs during the call ({memory_method});",
        "extra %: peak minus the gradients returned, as % of the differentiable inputs' size",
        "  (linear+CE: % of the full logits' size, N*V*b; stated per case).",
    ])


def case_block(rows: list, copy_bw: dict | None = None) -> str:
    """One (case, mode) group of rows as a small table."""
    r0 = rows[0]
    head = f"{r0['title']} ({r0['shape']}) {r0['dtype']}"
    if r0["variant"]:
        head += f" [{LOSSES[r0['loss']].label_variant(r0['variant'])}]"
    head += f"  {r0['mode']}  {r0['threads']} thread{'' if r0['threads'] == 1 else 's'}"
    if r0.get("target"):
        head += "  (target case)"
    lines = [head]
    entry = LOSSES[r0["loss"]]
    counted = r0["counted_bytes"]
    lines.append(f"  counted {counted / 1e6:,.1f} MB   [{entry.bytes_formula}]")
    if r0.get("counted_flops") is not None:
        lines.append(f"  counted {r0['counted_flops'] / 1e9:,.3g} GFLOP   [{entry.flops_formula}]")
    ref = next((r["mem_ref_bytes"] for r in rows if r.get("mem_ref_bytes")), None)
    if entry.mem_ref_bytes is not None and ref:
        lines.append(f"  extra % is of {entry.mem_ref_name} = {ref / 2**20:,.1f} MiB, not of the inputs")
    anchor = r0.get("anchor")
    with_anchor = bool(anchor) and any(r.get("speedup_vs_anchor") is not None for r in rows)
    with_flops = any(r.get("gflops") is not None for r in rows)
    vs_anchor = f"vs {anchor}" if with_anchor else ""
    aw = max(11, len(vs_anchor) + 2) if with_anchor else 0
    lines.append(f"  {'provider':<19}{'median ms':>10}{'IQR ms':>9}{'vs torch':>9}{'vs compile':>11}"
                 + (f"{vs_anchor:>{aw}}" if with_anchor else "")
                 + (f"{'GFLOP/s':>9}" if with_flops else "")
                 + f"{'GB/s':>8}{'%BW':>6}{'peak MiB':>10}{'extra %':>9}")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['provider']:<19}{r['status']}: {r['note']}")
            continue
        iqr = (r["q3_ms"] - r["q1_ms"]) if r.get("q3_ms") is not None else None
        lines.append(
            f"  {r['provider']:<19}{_ms(r['median_ms']):>10}{_ms(iqr):>9}"
            f"{_x(r.get('speedup_vs_torch')):>9}{_x(r.get('speedup_vs_compile')):>11}"
            + (f"{_x(r.get('speedup_vs_anchor')):>{aw}}" if with_anchor else "")
            + (f"{_fmt(r.get('gflops'), '.1f'):>9}" if with_flops else "")
            + f"{_fmt(r.get('gbps'), '.1f'):>8}{_fmt(100 * r['copy_bw_frac'] if r.get('copy_bw_frac') else None, '.0f'):>6}"
            f"{_fmt(r.get('peak_mem_mb'), ',.1f'):>10}{_fmt(r.get('extra_mem_pct'), '.1f'):>9}"
        )
    lines.extend(_comparisons(rows))
    return "\n".join(lines)


def _comparisons(rows: list) -> list:
    """For a loss with an anchor (linear + cross-entropy: torch's chunked version), one line per lossfuse
    provider: its speed-up and extra memory against torch eager and against the anchor, side by side."""
    anchor = rows[0].get("anchor")
    ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
    if not anchor or anchor not in ok:
        return []
    out = []
    for name, r in ok.items():
        if not name.startswith("lossfuse-"):
            continue
        parts = []
        for base, col in (("torch", "speedup_vs_torch"), (anchor, "speedup_vs_anchor")):
            if base not in ok or r.get(col) is None:
                continue
            part = f"against {base}: speed-up {_x(r[col])}"
            if r.get("extra_mem_pct") is not None and ok[base].get("extra_mem_pct") is not None:
                part += f", extra memory {r['extra_mem_pct']:.1f}% vs {ok[base]['extra_mem_pct']:.1f}%"
            parts.append(part)
        if parts:
            out.append(f"  {name} " + "; ".join(parts))
    return out


def group_rows(rows: list) -> list:
    """Rows grouped by (case, mode), in run order."""
    groups: dict = {}
    for r in rows:
        k = (r["loss"], r["variant"], r["shape"], r["dtype"], r["mode"], r["threads"])
        groups.setdefault(k, []).append(r)
    return list(groups.values())


def full_table(result: RunResult) -> str:
    parts = [legend(result.copy_bw, result.memory_method), ""]
    for g in group_rows(result.rows):
        parts.append(case_block(g))
        parts.append("")
    if result.targets:
        from .targets import table

        parts.append(table(result.targets))
        parts.append("")
    if result.notes:
        parts.append("notes:")
        parts.extend(f"  - {n}" for n in result.notes)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def write_files(result: RunResult, meta: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cfg = result.config
    meta["preset"] = cfg.preset.name
    meta["modes"] = list(cfg.modes)
    meta["providers"] = list(cfg.providers)
    paths = {}

    csv_path = out_dir / "results.csv"
    with open(csv_path, "w", newline="") as f:
        # The machine in comment lines first, so the CSV stands on its own.
        for key in ("date", "device_name", "cpu_count", "torch_threads", "git_commit", "preset"):
            f.write(f"# {key}: {meta.get(key)}\n")
        f.write(f"# versions: {json.dumps(meta['versions'])}\n")
        f.write(f"# copy_bandwidth_gbps: {result.copy_bw['gbps']:.3f}\n")
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in result.rows:
            w.writerow({k: _clean(r.get(k)) for k in COLUMNS})
    paths["csv"] = csv_path

    json_path = out_dir / "results.json"
    doc = {
        "meta": meta,
        "copy_bandwidth": result.copy_bw,
        "memory_method": result.memory_method,
        "byte_formulas": {k: e.bytes_formula for k, e in LOSSES.items()},
        "columns": COLUMNS,
        "notes": result.notes,
        "targets": result.targets,
        "phase_seconds": result.phases,
        "results": [{k: _clean(r.get(k)) for k in COLUMNS} for r in result.rows],
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    paths["json"] = json_path

    table_path = out_dir / "table.txt"
    with open(table_path, "w") as f:
        f.write(f"lossfuse-bench  {meta['date']}  {meta['device_name']}  ({meta['cpus_usable']} usable CPUs, "
                f"{meta['torch_threads']} threads)  git {meta['git_commit']}\n")
        f.write(f"versions: {json.dumps(meta['versions'])}\n\n")
        f.write(full_table(result))
        f.write("\n")
    paths["table"] = table_path
    return paths
