"""PNG plots of a run (matplotlib, Agg backend): what people look at first.

  speedup_<mode>.png      speed-up over torch eager vs input size, one panel per loss
  bandwidth_<mode>.png    effective GB/s per case and provider, against the measured copy bandwidth
  memory_<mode>.png       peak memory beyond the inputs and gradients, % of the differentiable inputs'
                          size (linear + cross-entropy: of the full logits')
  scaling_classes.png     (full) time and GB/s vs number of classes, cross-entropy
  scaling_rows.png        (full) time and GB/s vs number of rows, cross-entropy
  threads.png             (full, CPU) time vs CPU threads
  time_vs_size.png        (small) time per fwd+bwd vs input size from one row up, log-log, lossfuse
                          against torch eager, and where lossfuse overtakes it
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import LOSSES

COLORS = {
    "lossfuse-cpu": "#1f63b4", "lossfuse-triton": "#1f63b4", "lossfuse-reference": "#8fb8e0",
    "torch": "#6e6e6e", "torch.compile": "#e8790c", "liger": "#2a9d3c", "torch-chunked": "#8e44ad",
    "cce-compile": "#b5651d",
}
MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^", "float64": "D"}


def _color(provider: str) -> str:
    return COLORS.get(provider, "#c23b3b")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9, "axes.titlesize": 10,
                         "legend.fontsize": 8, "legend.frameon": False})
    return plt


def _subtitle(meta: dict, threads: bool = True) -> str:
    n = meta.get('torch_threads')
    thr = f", {n} thread{'' if n == 1 else 's'}" if meta.get("device") == "cpu" and threads else ""
    return f"{meta.get('device_name')}{thr} · lossfuse {meta['versions'].get('lossfuse')} · {meta.get('date', '')[:10]}"


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]


def _case_label(r) -> str:
    lab = f"{r['title']} {r['shape'].replace('x', '×')} {r['dtype'].replace('float', 'fp').replace('bfp', 'bf')}"
    if r["variant"]:
        lab += f"\n{LOSSES[r['loss']].label_variant(r['variant'])}"
    return lab


def _size_rows(rows):
    """Rows of the size-comparison plots: the presets' cases, not the points of the scaling sweeps
    (those have their own plots)."""
    return [r for r in _ok(rows) if r.get("main", True)]


def _tick(v: float) -> str:
    """Axis label of a class or row count: binary k for multiples of 1024 (vocabulary sizes), else k/M."""
    v = int(round(v))
    if v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}k"
    return _human(v)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


LINESTYLES = {"float32": "-", "bfloat16": "--", "float16": ":", "float64": "-."}


def speedup_plot(rows, meta, mode, path: Path) -> Path | None:
    rows = [r for r in _size_rows(rows) if r["mode"] == mode and r["provider"] != "torch"
            and r.get("speedup_vs_torch") is not None]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = list(dict.fromkeys((r["loss"], r["variant"]) for r in rows))
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.8 * ncol, 3.5 * nrow + 0.9), squeeze=False)
    handles: dict = {}
    for ax, (loss, variant) in zip(axes.flat, panels):
        mine = [r for r in rows if r["loss"] == loss and r["variant"] == variant]
        for provider, dtype in dict.fromkeys((r["provider"], r["dtype"]) for r in mine):
            pts = sorted((r["size"], r["speedup_vs_torch"]) for r in mine
                         if r["provider"] == provider and r["dtype"] == dtype)
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, marker=MARKERS.get(dtype, "o"), ls=LINESTYLES.get(dtype, "-"),
                              color=_color(provider), lw=1.6, ms=6)
            handles.setdefault(f"{provider} ({dtype})", line)
            # One label per series, at its largest size: every point labelled would overlap.
            ax.annotate(f"{ys[-1]:.1f}x", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 0),
                        va="center", fontsize=7.5, color=_color(provider))
        base = ax.axhline(1.0, color=_color("torch"), ls="--", lw=1)
        handles.setdefault("torch eager (= 1)", base)
        ax.set_xscale("log")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        e = LOSSES[loss]
        ax.set_title(e.title + (f" — {e.label_variant(variant)}" if variant else ""))
        ax.set_xlabel(f"size: {e.size_name}")
        ax.set_ylabel("speed-up over torch eager")
        xs = [r["size"] for r in mine]
        ax.set_xlim(min(xs) / 2.5, max(xs) * 3.5)  # room for the labels on the right
        lo = min([r["speedup_vs_torch"] for r in mine] + [1.0])
        hi = max([r["speedup_vs_torch"] for r in mine] + [1.0])
        ax.set_ylim(lo / 1.6, hi * 1.8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    ncols = min(4, len(handles))
    legend_rows = (len(handles) + ncols - 1) // ncols
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncols, frameon=False)
    fig.suptitle(f"Speed-up over torch eager, {mode} (higher is better)\n{_subtitle(meta)}", fontsize=11)
    fig.tight_layout(rect=(0, 0.045 * legend_rows * 3.5 / fig.get_figheight() * 2, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _hbars(ax, cases, providers, value, annot):
    import numpy as np

    h = 0.8 / max(1, len(providers))
    y = np.arange(len(cases))
    for i, p in enumerate(providers):
        vals = [value(c, p) for c in cases]
        pos = y - 0.4 + h * (i + 0.5)
        ax.barh(pos, [v if v is not None else 0 for v in vals], height=h * 0.92, color=_color(p), label=p)
        for yy, c, v in zip(pos, cases, vals):
            if v is not None:
                ax.annotate(annot(c, p, v), (v, yy), textcoords="offset points", xytext=(3, 0), va="center",
                            fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([_case_label(c[0]) for c in cases], fontsize=8)
    ax.invert_yaxis()


def _cases_by_provider(rows):
    keys = list(dict.fromkeys((r["loss"], r["variant"], r["shape"], r["dtype"], r["threads"]) for r in rows))
    cases = [[r for r in rows if (r["loss"], r["variant"], r["shape"], r["dtype"], r["threads"]) == k]
             for k in keys]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    return cases, providers


def _get(case_rows, provider, key):
    for r in case_rows:
        if r["provider"] == provider:
            return r.get(key)
    return None


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _hbar_figure(rows, key: str, annot):
    """A figure of horizontal bars, one group per case and one bar per provider, of each row's ``key``
    (``annot(case, provider, value)`` written beside each bar), sized to the bars; (plt, fig, ax)."""
    plt = _plt()
    cases, providers = _cases_by_provider(rows)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(cases) * max(1, len(providers)) / 2 + 1.8))
    _hbars(ax, cases, providers, lambda c, p: _get(c, p, key), annot)
    return plt, fig, ax


def _finish_hbars(plt, fig, ax, path: Path) -> Path:
    """The legend beside the bars, no horizontal grid lines, then saved."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", visible=False)
    return _save(plt, fig, path)


def bandwidth_plot(rows, meta, copy_gbps, mode, path: Path) -> Path | None:
    rows = [r for r in _size_rows(rows) if r["mode"] == mode and r.get("gbps")]
    if not rows:
        return None
    plt, fig, ax = _hbar_figure(rows, "gbps", lambda c, p, v: f"{v:.1f} ({100 * v / copy_gbps:.0f}%)")
    ax.axvline(copy_gbps, color="black", ls="--", lw=1.2, label=f"copy bandwidth {copy_gbps:.1f} GB/s")
    top = max([copy_gbps] + [r["gbps"] for r in rows])
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("effective bandwidth, GB/s (counted bytes / median time)")
    ax.set_title(f"Effective bandwidth, {mode}, against the measured copy bandwidth (higher is better)\n"
                 f"{_subtitle(meta)}")
    return _finish_hbars(plt, fig, ax, path)


def memory_plot(rows, meta, mode, path: Path) -> Path | None:
    rows = [r for r in _size_rows(rows) if r["mode"] == mode and r.get("extra_mem_pct") is not None]
    if not rows:
        return None
    plt, fig, ax = _hbar_figure(rows, "extra_mem_pct",
                                lambda c, p, v: f"{v:.1f}%  ({_get(c, p, 'peak_mem_mb'):,.0f} MiB peak)")
    top = max(r["extra_mem_pct"] for r in rows)
    ax.set_xlim(min(0, min(r["extra_mem_pct"] for r in rows)), max(10, top) * 1.45)
    what = "gradients" if mode != "fwd" else "nothing returned but the loss"
    ax.set_xlabel(f"peak memory beyond the inputs and {what}, % of the differentiable inputs' size\n"
                  f"(linear + cross-entropy: % of the full logits' size, N*V*b)")
    ax.set_title(f"Extra memory, {mode} (lower is better; {meta.get('memory_short', '')})\n{_subtitle(meta)}")
    return _finish_hbars(plt, fig, ax, path)


def sweep_plot(rows, meta, copy_gbps, sweep: str, path: Path) -> Path | None:
    rows = [r for r in _ok(rows) if sweep in (r.get("sweeps") or "").split("+") and r["mode"] == "fwd+bwd"]
    if len(rows) < 2:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    dim = 1 if sweep == "classes" else 0
    fixed = 0 if sweep == "classes" else 1

    def xval(r):
        return int(r["shape"].split("x")[dim])

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for p in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((xval(r), r["median_ms"], r["gbps"]) for r in rows if r["provider"] == p)
        xs = [a for a, _, _ in pts]
        ax1.plot(xs, [b for _, b, _ in pts], marker="o", color=_color(p), label=p)
        ax2.plot(xs, [c for _, _, c in pts], marker="o", color=_color(p), label=p)
    ax2.axhline(copy_gbps, color="black", ls="--", lw=1.2, label=f"copy bandwidth {copy_gbps:.1f} GB/s")
    other = rows[0]["shape"].split("x")[fixed]
    xlabel = f"classes C (rows N = {other})" if sweep == "classes" else f"rows N (classes C = {other})"
    ticks = sorted({xval(r) for r in rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.legend(loc="best")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.set_ylabel("time per fwd+bwd, ms (lower is better)")
    ax2.set_ylabel("effective bandwidth, GB/s (higher is better)")
    ax2.set_ylim(0, max([copy_gbps] + [r["gbps"] for r in rows]) * 1.3)
    fig.suptitle(f"Cross-entropy fp32 fwd+bwd vs {sweep}\n{_subtitle(meta)}", fontsize=11)
    return _save(plt, fig, path)


def threads_plot(rows, meta, path: Path) -> Path | None:
    rows = [r for r in _ok(rows) if "threads" in (r.get("sweeps") or "").split("+")]
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = list(dict.fromkeys((r["loss"], r["variant"], r["shape"], r["dtype"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        mine = [r for r in rows if (r["loss"], r["variant"], r["shape"], r["dtype"]) == key]
        for p in dict.fromkeys(r["provider"] for r in mine):
            pts = sorted((r["threads"], r["median_ms"]) for r in mine if r["provider"] == p)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", color=_color(p), label=p)
        threads = sorted({r["threads"] for r in mine})
        ax.set_xticks(threads)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU threads (torch.set_num_threads)")
        ax.set_ylabel("time per fwd+bwd, ms")
        ax.set_title(_case_label(mine[0]).replace("\n", ", "))
        ax.legend()
    fig.suptitle(f"Time vs CPU threads (lower is better)\n{_subtitle(meta, threads=False)}", fontsize=11)
    return _save(plt, fig, path)


def crossover(points: list) -> tuple:
    """(size, always): ``points`` are (size, lossfuse time / torch time) sorted by size. ``size`` is the
    smallest size from which lossfuse is at least as fast as torch at every larger size measured (None:
    slower at the largest); ``always`` is True when that holds at every size."""
    start = None
    for size, ratio in reversed(points):
        if ratio > 1.0:
            break
        start = size
    return start, start is not None and start == points[0][0]


def size_sweep_plot(rows, meta, path: Path) -> Path | None:
    """Time per fwd+bwd vs size (the ``size`` sweep), log-log, one column per loss; below, lossfuse's time
    over torch eager's (the median of the same-round ratios), so the crossing of 1 is easy to read."""
    rows = [r for r in _ok(rows) if "size" in (r.get("sweeps") or "").split("+") and r["mode"] == "fwd+bwd"]
    panels = list(dict.fromkeys((r["loss"], r["variant"], r["dtype"]) for r in rows))
    panels = [k for k in panels if len({r["size"] for r in rows if (r["loss"], r["variant"], r["dtype"]) == k}) >= 2]
    if not panels:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": (2.2, 1)}, sharex="col")
    for col, key in enumerate(panels):
        mine = [r for r in rows if (r["loss"], r["variant"], r["dtype"]) == key]
        ax, rax = axes[0, col], axes[1, col]
        # Cross-entropy against its rows (the batch size people choose); the others against elements.
        by_rows = len({r["shape"].split("x", 1)[-1] for r in mine}) == 1 and "x" in mine[0]["shape"]

        def xval(r):
            return int(r["shape"].split("x")[0]) if by_rows else r["size"]

        for i, p in enumerate(dict.fromkeys(r["provider"] for r in mine)):
            pts = sorted((xval(r), r["median_ms"], r.get("speedup_vs_torch")) for r in mine if r["provider"] == p)
            xs = [a for a, _, _ in pts]
            ax.plot(xs, [b * 1e3 for _, b, _ in pts], marker="o", ms=4, color=_color(p), label=p)
            if p == "torch":
                continue
            ratio = [(a, 1.0 / s) for a, _, s in pts if s]
            if not ratio:
                continue
            rax.plot([a for a, _ in ratio], [b for _, b in ratio], marker="o", ms=4, color=_color(p), label=p)
            start, always = crossover(ratio)
            if always:
                text = f"{p}: as fast or faster at every size"
            elif start is None:
                text = f"{p}: slower than torch at the largest size"
            else:
                text = f"{p}: as fast or faster from {_human(start)} on"
                for a in (ax, rax):
                    a.axvline(start, color=_color(p), ls=":", lw=1.2)
            rax.annotate(text, (0.02, 0.95 - 0.1 * i), xycoords="axes fraction", va="top", fontsize=7.5, color=_color(p))
        rax.axhline(1.0, color=_color("torch"), ls="--", lw=1)
        ratios = [1.0 / r["speedup_vs_torch"] for r in mine if r["provider"] != "torch" and r.get("speedup_vs_torch")]
        if ratios:  # at least 0.5x-2x, so that ticks on both sides of 1 show how far from it a point is
            rax.set_ylim(min(ratios + [0.5]) / 1.15, max(ratios + [2.0]) * 1.6)
        e = LOSSES[key[0]]
        title = e.title + (f" — {e.label_variant(key[1])}" if key[1] else "")
        if by_rows:
            title += f" ({mine[0]['shape'].split('x', 1)[1].replace('x', ' x ')} per row)"
        ax.set_title(f"{title}, {key[2].replace('float', 'fp')}")
        for a in (ax, rax):
            a.set_xscale("log")
            a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
            a.xaxis.set_minor_formatter(NullFormatter())
        for a, unit, subs in ((ax, "", (1.0, 2.0, 5.0)), (rax, "x", (1.0, 1.5, 2.0, 3.0, 5.0, 7.0))):
            a.set_yscale("log")
            a.yaxis.set_major_locator(LogLocator(subs=subs))
            a.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: f"{v:g}{u}"))
            a.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("time per fwd+bwd, us (lower is better)")
        ax.legend(loc="upper left")
        rax.set_ylabel("time / torch eager's\n(below 1 = faster)")
        rax.set_xlabel("rows N" if by_rows else f"size: {e.size_name}")
    fig.suptitle(f"Time vs size, fwd+bwd: where lossfuse overtakes torch eager\n{_subtitle(meta)}", fontsize=11)
    return _save(plt, fig, path)


def make_plots(rows, meta, copy_gbps, out_dir: Path) -> list:
    """Every plot the rows allow; returns the paths written."""
    out = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for mode in modes:
        slug = mode.replace("+", "_")
        out.append(speedup_plot(rows, meta, mode, out_dir / f"speedup_{slug}.png"))
        out.append(bandwidth_plot(rows, meta, copy_gbps, mode, out_dir / f"bandwidth_{slug}.png"))
        out.append(memory_plot(rows, meta, mode, out_dir / f"memory_{slug}.png"))
    out.append(sweep_plot(rows, meta, copy_gbps, "classes", out_dir / "scaling_classes.png"))
    out.append(sweep_plot(rows, meta, copy_gbps, "rows", out_dir / "scaling_rows.png"))
    out.append(threads_plot(rows, meta, out_dir / "threads.png"))
    out.append(size_sweep_plot(rows, meta, out_dir / "time_vs_size.png"))
    return [p for p in out if p is not None]
