"""The run: for each case, build inputs once, check every provider against float64, time the ones that
are right side by side, measure their peak memory, and collect one row per (case, mode, provider)."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import measure
from ..catalog import LOSSES, TOLERANCES, lossfuse_function
from .presets import Case, Preset, dtype_name
from .providers import COMPILE, EAGER, PROVIDERS, Provider

# Relative error allowed against the float64 reference: |loss - ref| / |ref| for the loss,
# ||g - g_ref|| / ||g_ref|| for each gradient. float32 implementations land near 1e-7 on these sizes
# (100x margin); bf16/fp16 outputs carry their own rounding (up to 2^-9 / 2^-12 relative) plus
# low-precision intermediate math in torch's eager formulas (CE bf16 eager: 3e-3).

# Below this size of the differentiable inputs, page-granular RSS cannot resolve a percentage.
MIN_RSS_INPUT_BYTES = 8 << 20

COLUMNS = {
    "loss": "loss key (--loss)",
    "title": "loss name",
    "variant": "input variant (targets, ignore_index)",
    "shape": "shape of the main input",
    "size": "elements of the main input",
    "dtype": "dtype of the floating inputs",
    "mode": "fwd, bwd (backward alone, graph built untimed), fwd+bwd or eval (forward under torch.no_grad)",
    "threads": "CPU threads (torch.set_num_threads; lossfuse's OpenMP uses the same count)",
    "provider": "implementation timed",
    "status": "ok | WRONG (disagrees with float64; not timed) | error (raised; not timed) | skipped",
    "note": "why a provider was skipped, wrong or failed; other remarks",
    "median_ms": "median over interleaved rounds of the time per call (ms)",
    "q1_ms": "25th percentile of the per-round times (ms)",
    "q3_ms": "75th percentile of the per-round times (ms)",
    "min_ms": "fastest round (ms)",
    "max_ms": "slowest round (ms)",
    "rounds": "interleaved rounds (each provider timed once per round)",
    "calls_per_round": "calls per timed block (CPU: one torch.utils.benchmark block per round)",
    "input_sets": "input sets the calls rotate through (several when the inputs fit in the CPU's cache)",
    "speedup_vs_torch": "median over rounds of t(torch eager) / t(provider), same round",
    "speedup_vs_torch_q1": "25th percentile of those per-round ratios",
    "speedup_vs_torch_q3": "75th percentile of those per-round ratios",
    "speedup_vs_compile": "median over rounds of t(torch.compile) / t(provider), same round",
    "speedup_vs_compile_q1": "25th percentile of those per-round ratios",
    "speedup_vs_compile_q3": "75th percentile of those per-round ratios",
    "anchor": "the loss's anchor provider (ce: liger, lce: torch-chunked), where the loss has one",
    "speedup_vs_anchor": "median over rounds of t(anchor) / t(provider), same round",
    "speedup_vs_anchor_q1": "25th percentile of those per-round ratios",
    "speedup_vs_anchor_q3": "75th percentile of those per-round ratios",
    "counted_bytes": "bytes the call must move: inputs read once, gradients written once (bytes_formula)",
    "gbps": "counted_bytes / median time, GB/s (1e9 bytes/s)",
    "copy_bw_frac": "gbps / the device's copy bandwidth measured at the start of the run",
    "counted_flops": "arithmetic the call must do, where its loss counts it (lce: the matmuls; flops_formula)",
    "gflops": "counted_flops / median time, GFLOP/s (1e9 FLOP/s)",
    "peak_mem_mb": "peak memory above what existed before the call (inputs; for bwd the saved graph), MiB",
    "extra_mem_pct": "(peak_mem - gradients the call returns) / mem_ref_bytes, %",
    "mem_ref_bytes": "what extra_mem_pct is relative to: the differentiable inputs' size (lce: the full logits, N*V*b)",
    "loss_rel_err": "|loss - loss64| / |loss64| on the check inputs",
    "grad_rel_err": "||grad - grad64|| / ||grad64||, worst differentiable input",
    "tolerance": "largest relative error accepted for this dtype",
    "sweeps": "scaling sweeps this case belongs to (classes, rows, threads, size)",
    "target": "the project target this case is quoted for",
}


@dataclass
class RunConfig:
    device: torch.device
    preset: Preset
    cases: list
    modes: tuple
    providers: list                       # provider names, in table order
    threads: int
    rounds: int | None = None             # overrides of the preset's timing knobs
    min_rounds: int | None = None
    block_s: float | None = None
    budget_s: float | None = None
    extra_providers: dict = field(default_factory=dict)   # name -> Provider (tests, experiments)
    seed: int = 0
    copy_bytes: int | None = None         # size of the bandwidth copy (None: 256 MiB CPU, 1 GiB CUDA)
    progress: bool = True


@dataclass
class RunResult:
    rows: list
    notes: list
    phases: list     # per case: seconds per phase
    copy_bw: dict
    memory_method: str
    config: RunConfig
    targets: list = field(default_factory=list)   # targets.evaluate(...) of the rows


# ---------------------------------------------------------------------------------------------------
# Inputs and correctness
# ---------------------------------------------------------------------------------------------------


def llc_bytes() -> int:
    """The last-level cache size from sysfs (32 MiB if unreadable)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    txt = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
                best = max(best, int(txt.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or (32 << 20)


def buffer_sets(case: Case, device: torch.device) -> int:
    """How many input sets to rotate through: enough that they do not all fit in the CPU's last-level
    cache (4x its size), so repeated calls read memory, not cache. CUDA: do_bench flushes L2 itself."""
    if device.type == "cuda":
        return 1
    entry = case.entry
    one = entry.counted_bytes(case.shape, case.dtype, case.variant, "fwd+bwd")
    return max(1, min(32, math.ceil(4 * llc_bytes() / max(one, 1))))


def make_sets(case: Case, device: torch.device, count: int, seed: int) -> list:
    entry = case.entry
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + zlib.crc32(repr(case.key()).encode()))
    sets = []
    for _ in range(count):
        t = entry.make_inputs(case.shape, case.dtype, case.variant, device, gen)
        for name in entry.grad_inputs:
            t[name].requires_grad_(True)
        sets.append(t)
    return sets


def clone_sets(sets: list, entry) -> list:
    out = []
    for s in sets:
        c = {k: v.detach().clone() for k, v in s.items()}
        for name in entry.grad_inputs:
            c[name].requires_grad_(True)
        out.append(c)
    return out


def clear_grads(sets: list, entry) -> None:
    for s in sets:
        for name in entry.grad_inputs:
            s[name].grad = None


def run_once(fn: Callable, tensors: dict, entry) -> tuple:
    """Loss and gradients of one forward+backward, detached."""
    for name in entry.grad_inputs:
        tensors[name].grad = None
    loss = fn(*tensors.values())
    loss.backward()
    grads = {name: tensors[name].grad for name in entry.grad_inputs}
    for name in entry.grad_inputs:
        tensors[name].grad = None
    return loss.detach(), grads


def reference64(entry, tensors: dict, variant: str = "") -> tuple:
    """The entry's torch code on float64 copies of the inputs: the oracle every provider must match."""
    t64 = {}
    for k, v in tensors.items():
        v = v.detach()
        t64[k] = v.to(torch.float64) if v.is_floating_point() else v
    for name in entry.grad_inputs:
        t64[name].requires_grad_(True)
    return run_once(entry.torch_call(variant), t64, entry)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, accumulated in float64 through one reused chunk buffer: converting a
    131M-element gradient whole would fault in a gigabyte of fresh pages per comparison. A NaN or inf
    in ``a`` makes the result inf."""
    if a.shape != b.shape:
        return math.inf
    a = a.detach().reshape(-1)
    b = b.detach().reshape(-1)
    chunk = max(1, min(a.numel(), 1 << 20))
    buf = torch.empty(chunk, dtype=torch.float64, device=a.device)
    num = torch.zeros((), dtype=torch.float64, device=a.device)
    den = torch.zeros((), dtype=torch.float64, device=a.device)
    # One thread: hundreds of small parallel regions stall badly when other processes hold the CPUs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, a.numel(), chunk):
            n = min(chunk, a.numel() - i)
            d = buf[:n]
            d.copy_(a[i:i + n])
            d.sub_(b[i:i + n])
            num += torch.dot(d, d)
            d.copy_(b[i:i + n])
            den += torch.dot(d, d)
    finally:
        torch.set_num_threads(threads)
    num, den = math.sqrt(float(num)), math.sqrt(float(den))
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def rel_errors(loss, grads, ref_loss, ref_grads) -> tuple:
    """Relative errors of the loss and (the worst of) the gradients against the float64 reference."""
    le = _rel_error(loss.reshape(()), ref_loss.reshape(()))
    ge = 0.0
    for name, g in grads.items():
        ge = max(ge, math.inf if g is None else _rel_error(g, ref_grads[name]))
    return le, ge


# ---------------------------------------------------------------------------------------------------
# Steps: one training-loop iteration per call, rotating through the input sets
# ---------------------------------------------------------------------------------------------------


def make_step(fn: Callable, sets: list, entry, mode: str) -> tuple:
    """(step, memory_call, memory_prepare) for ``mode``. Each step call uses the next input set and
    drops the gradient of the set used before (``x.grad = None``, as a training loop does)."""
    names = entry.grad_inputs
    k = len(sets)
    state = {"i": 0, "prev": None}

    def drop_prev():
        if state["prev"] is not None:
            for n in names:
                sets[state["prev"]][n].grad = None

    if mode == "fwd":
        def step():
            s = sets[state["i"]]
            state["i"] = (state["i"] + 1) % k
            return fn(*s.values())

        def mem_call():
            return fn(*sets[0].values())   # kept: the graph and what it saved for backward count

    elif mode == "fwd+bwd":
        def step():
            i = state["i"]
            state["i"] = (i + 1) % k
            drop_prev()
            state["prev"] = i
            fn(*sets[i].values()).backward()

        def mem_call():
            fn(*sets[0].values()).backward()
            return [sets[0][n].grad for n in names]

    elif mode == "eval":
        # Validation and inference loops: no graph is built, nothing is saved for a backward.
        def step():
            s = sets[state["i"]]
            state["i"] = (state["i"] + 1) % k
            with torch.no_grad():
                return fn(*s.values())

        def mem_call():
            with torch.no_grad():
                return fn(*sets[0].values())

    elif mode == "bwd":
        # The graphs are built here, untimed; backward runs on them again and again.
        graphs = [fn(*s.values()) for s in sets]

        def step():
            i = state["i"]
            state["i"] = (i + 1) % k
            drop_prev()
            state["prev"] = i
            graphs[i].backward(retain_graph=True)

        def mem_call():
            graphs[0].backward(retain_graph=True)
            return [sets[0][n].grad for n in names]

    else:
        raise ValueError(f"unknown mode {mode!r}")

    def prepare():
        clear_grads(sets, entry)
        state["prev"] = None

    return step, mem_call, prepare


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def _base_row(case: Case, mode: str, threads: int) -> dict:
    entry = case.entry
    row = {
        "loss": case.loss, "title": entry.title, "variant": case.variant,
        "shape": "x".join(str(s) for s in case.shape), "size": case.size, "dtype": dtype_name(case.dtype),
        "mode": mode, "threads": threads, "sweeps": "+".join(case.sweeps), "target": case.target,
        "main": case.main,  # not a column: plots keep sweep-only points out of the size comparisons
        "counted_bytes": entry.counted_bytes(case.shape, case.dtype, case.variant, mode),
        "anchor": entry.anchor,
    }
    if entry.counted_flops is not None:
        row["counted_flops"] = entry.counted_flops(case.shape, case.dtype, case.variant, mode)
    return row


def mem_ref_bytes(entry, case: Case, tensors: dict) -> int:
    """What ``extra_mem_pct`` is a percentage of: the entry's reference size (linear + cross-entropy: the
    full logits, which a fused implementation never holds), else the size of the differentiable inputs."""
    if entry.mem_ref_bytes is not None:
        return int(entry.mem_ref_bytes(case.shape, case.dtype, case.variant))
    return sum(tensors[n].numel() * tensors[n].element_size() for n in entry.grad_inputs)


def _fill_timing(row: dict, secs: list, number: int, rounds: int, copy_gbps: float, sets: int) -> None:
    s = measure.summary(secs)
    row["input_sets"] = sets
    row.update(median_ms=s["median"] * 1e3, q1_ms=s["q1"] * 1e3, q3_ms=s["q3"] * 1e3,
               min_ms=s["min"] * 1e3, max_ms=s["max"] * 1e3, rounds=rounds, calls_per_round=number)
    row["gbps"] = row["counted_bytes"] / s["median"] / 1e9
    row["copy_bw_frac"] = row["gbps"] / copy_gbps if copy_gbps else None
    if row.get("counted_flops") is not None:
        row["gflops"] = row["counted_flops"] / s["median"] / 1e9


def _fill_speedups(rows: list, times: dict) -> None:
    for row in rows:
        mine = times.get(row["provider"])
        if mine is None:
            continue
        anchor = row.get("anchor")
        for base, col in ((EAGER, "speedup_vs_torch"), (COMPILE, "speedup_vs_compile"),
                          (anchor, "speedup_vs_anchor")):
            if base and base in times:
                r = measure.paired_ratios(times[base], mine)
                if r:
                    row[col] = measure.quantile(r, 0.5)
                    row[col + "_q1"] = measure.quantile(r, 0.25)
                    row[col + "_q3"] = measure.quantile(r, 0.75)


def run(cfg: RunConfig, on_case_done: Callable | None = None, on_start: Callable | None = None) -> RunResult:
    device = cfg.device
    preset = cfg.preset
    rounds = cfg.rounds or preset.rounds
    min_rounds = cfg.min_rounds or preset.min_rounds
    block_s = cfg.block_s if cfg.block_s is not None else preset.block_s
    budget_s = cfg.budget_s if cfg.budget_s is not None else preset.budget_s
    providers = {**PROVIDERS, **cfg.extra_providers}

    torch.set_num_threads(cfg.threads)
    notes: list = []
    rows: list = []
    phases: list = []

    def note(text: str) -> None:
        if text not in notes:
            notes.append(text)

    mem_problem = None if device.type == "cuda" else measure.cpu_memory_supported()
    if mem_problem:
        note(f"peak memory not measured: {mem_problem}")
    memory_method = measure.CUDA_MEMORY_METHOD if device.type == "cuda" else measure.CPU_MEMORY_METHOD

    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if load > 0.5 * cpus:
            note(f"the machine was busy when the run started (1-min load average {load:.1f} on {cpus} CPUs): "
                 f"threads of a parallel region wait for CPUs other processes hold, so absolute times "
                 f"suffer; ratios measured side by side suffer less")
    copy_bw = measure.copy_bandwidth(device, cfg.threads, cfg.copy_bytes)
    if on_start is not None:
        on_start(copy_bw, memory_method)

    units = sum(len(case_modes(c, cfg.modes)) for c in cfg.cases)
    bar = _progress(units, cfg.progress)
    # Everything alive now (modules, torch's registries) is long-lived: keep it out of the collections
    # that run before each memory measurement, which would otherwise take ~0.3 s each.
    gc.collect()
    gc.freeze()
    try:
        for case in cfg.cases:
            try:
                case_rows = _run_case(case, cfg, providers, device, copy_bw["gbps"], rounds, min_rounds, block_s,
                                      budget_s, mem_problem, note, bar, phases)
            except KeyboardInterrupt:
                note(f"interrupted during {case.label()}: the results hold the cases finished before it")
                break
            rows.extend(case_rows)
            if on_case_done is not None:
                on_case_done(case, case_rows)
    finally:
        gc.unfreeze()
        bar.close()
        torch.set_num_threads(cfg.threads)
    if rows:
        # Again at the end: how far the machine drifted while the run went on.
        end = measure.copy_bandwidth(device, cfg.threads, cfg.copy_bytes)
        copy_bw["gbps_at_end"] = end["gbps"]
        lo, hi = sorted((copy_bw["gbps"], end["gbps"]))
        if hi > 1.25 * lo:
            note(f"the copy bandwidth moved during the run ({copy_bw['gbps']:.1f} GB/s at the start, "
                 f"{end['gbps']:.1f} at the end): the machine's load changed; copy_bw_frac is relative to "
                 f"the start")
    return RunResult(rows=rows, notes=notes, phases=phases, copy_bw=copy_bw, memory_method=memory_method, config=cfg)


def case_modes(case: Case, modes: tuple) -> tuple:
    """The run's modes, narrowed to the case's own where it has some (the sweeps time fwd+bwd only)."""
    if not case.modes:
        return tuple(modes)
    return tuple(m for m in case.modes if m in modes) or tuple(case.modes)


def _run_case(case, cfg, providers, device, copy_gbps, rounds, min_rounds, block_s, budget_s, mem_problem,
              note, bar, phases) -> list:
    entry = LOSSES[case.loss]
    modes = case_modes(case, cfg.modes)
    threads = case.threads or cfg.threads
    out: list = []
    bar.set_description(case.label())

    if lossfuse_function(entry) is None:
        why = entry.unavailable_note or (f"lossfuse has no {entry.lossfuse_name} yet: the {entry.key} entry is "
                                         f"skipped (it runs once the function is merged)")
        note(why)
        for mode in modes:
            out.append({**_base_row(case, mode, threads), "provider": "all", "status": "skipped", "note": why})
            bar.update(1)
        return out

    skipped_modes = [m for m in modes if m not in entry.modes]
    if skipped_modes:
        why = f"{entry.key}: {', '.join(skipped_modes)} not measured: {entry.modes_note}"
        note(why)
        for mode in skipped_modes:
            out.append({**_base_row(case, mode, threads), "provider": "all", "status": "skipped", "note": why})
            bar.update(1)
        modes = tuple(m for m in modes if m in entry.modes)
        if not modes:
            return out

    if case.rounds and not cfg.rounds:
        # The case's own cap (its calls take seconds): --repeats still overrides it.
        rounds, min_rounds = min(rounds, case.rounds), min(min_rounds, case.rounds)
    min_rounds = min(min_rounds, rounds)

    clock = _Clock(case.label(), phases)
    torch.set_num_threads(threads)
    _reset_compile_caches()  # a fresh compile per case: shapes and thread counts are baked into its code
    sets = make_sets(case, device, buffer_sets(case, device), cfg.seed)
    if len(sets) > 1:
        note(f"inputs smaller than 4x the last-level cache ({llc_bytes() >> 20} MiB) rotate through several "
             f"input sets, so that calls read memory, not cache (input_sets column)")
    clock("inputs")
    ref_loss, ref_grads = reference64(entry, sets[0], case.variant)
    tol = TOLERANCES[case.dtype].norm
    clock("float64 reference")

    # Check every provider once (its first call: torch.compile compiles here, untimed).
    fns: dict = {}
    psets: dict = {}
    status: dict = {}
    for name in cfg.providers:
        p: Provider = providers[name]
        if p.losses is not None and entry.key not in p.losses:
            continue  # an anchor of other losses: no row
        if name in case.leave_out:
            continue  # a sweep point timed against fewer providers (the case says which)
        made = p.make(entry, case, device)
        if isinstance(made, str):
            status[name] = ("skipped", made, None, None)
            continue
        mine = clone_sets(sets, entry) if p.mutates_inputs else sets
        try:
            loss, grads = run_once(made, mine[0], entry)
            le, ge = rel_errors(loss, grads, ref_loss, ref_grads)
        except Exception as exc:  # a provider that raises is reported, not fatal
            status[name] = ("error", _why(exc), None, None)
            continue
        if not (le <= tol and ge <= tol):
            status[name] = ("WRONG", f"disagrees with float64: loss rel err {le:.2e}, grad rel err {ge:.2e} "
                                     f"(tolerance {tol:.0e}); not timed", le, ge)
            continue
        status[name] = ("ok", "", le, ge)
        fns[name] = made
        psets[name] = mine
        clock(f"check {name}")
    del ref_grads

    # bwd last: repeating a compiled backward needs a recompile without donated buffers, which the
    # other modes must not inherit.
    ctx = _ModeContext(case, entry, device, threads, copy_gbps, rounds, min_rounds, block_s, budget_s,
                       mem_problem, note, clock, tol)
    for mode in sorted(modes, key=lambda m: m == "bwd"):
        with contextlib.ExitStack() as stack:
            mode_fns = dict(fns)
            compile_note = ""
            if mode == "bwd" and COMPILE in fns:
                try:
                    compile_note = _recompile_for_repeated_backward(entry, case.variant, mode_fns, psets, stack)
                except Exception as exc:
                    del mode_fns[COMPILE]
                    out.append({**_base_row(case, mode, threads), "provider": COMPILE, "status": "error",
                                "note": f"{mode}: {_why(exc)}"})
            out.extend(_run_mode(ctx, mode, cfg.providers, mode_fns, psets, status,
                                 {COMPILE: compile_note} if compile_note else {}))
        for name in fns:
            clear_grads(psets[name], entry)
        bar.update(1)

    del fns, psets, sets
    gc.collect()
    measure.empty_lossfuse_cache()
    _reset_compile_caches()
    clock("cleanup")
    return out


@dataclass
class _ModeContext:
    case: Case
    entry: object
    device: torch.device
    threads: int
    copy_gbps: float
    rounds: int
    min_rounds: int
    block_s: float
    budget_s: float
    mem_problem: str | None
    note: Callable
    clock: Callable
    tol: float


def _why(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _run_mode(c: _ModeContext, mode: str, names: list, fns: dict, psets: dict, status: dict,
              extra_notes: dict) -> list:
    """Warm up, time interleaved, measure memory: the rows of one (case, mode)."""
    case, entry, device = c.case, c.entry, c.device
    rows: list = []
    steps, mems = {}, {}
    for name, fn in fns.items():
        try:
            step, mem_call, prepare = make_step(fn, psets[name], entry, mode)
            if mode != "fwd+bwd":
                step()  # the check ran fwd+bwd: one call in this mode before it is timed
            steps[name] = step
            mems[name] = (mem_call, prepare)
        except Exception as exc:
            rows.append({**_base_row(case, mode, c.threads), "provider": name, "status": "error",
                         "note": f"{mode}: {_why(exc)}"})
            clear_grads(psets[name], entry)
    c.clock(f"{mode} steps")
    times, number, r_count = ({}, {}, 0)
    if steps:
        times, number, r_count = measure.interleaved(
            steps, device, c.threads, rounds=c.rounds, min_rounds=c.min_rounds, block_s=c.block_s,
            budget_s=c.budget_s, setup={name: mems[name][1] for name in steps})
    c.clock(f"{mode} timing")
    for name in names:
        if name in steps:
            row = {**_base_row(case, mode, c.threads), "provider": name, "status": "ok", "note": "",
                   "loss_rel_err": status[name][2], "grad_rel_err": status[name][3], "tolerance": c.tol}
            _fill_timing(row, times[name], number[name], r_count, c.copy_gbps, len(psets[name]))
            if not c.mem_problem:
                _fill_memory(c, row, mode, mems[name], psets[name][0])
            if name == "liger" and entry.key == "ce":
                row["note"] = "computes the gradient in its forward, in place into the logits"
            elif name.startswith("lossfuse-") and mode in entry.lossfuse_notes:
                row["note"] = entry.lossfuse_notes[mode]
            if name in extra_notes:
                row["note"] = extra_notes[name]
            rows.append(row)
        elif name in status and status[name][0] != "ok":
            st, why, le, ge = status[name]
            rows.append({**_base_row(case, mode, c.threads), "provider": name, "status": st, "note": why,
                         "loss_rel_err": le, "grad_rel_err": ge, "tolerance": c.tol if st == "WRONG" else None})
    c.clock(f"{mode} memory")
    _fill_speedups(rows, times)
    return rows


def _fill_memory(c: _ModeContext, row: dict, mode: str, mem: tuple, tensors: dict) -> None:
    mem_call, prepare = mem
    prepare()
    try:
        peak = measure.peak_bytes(mem_call, c.device)
    finally:
        prepare()
    diff_bytes = sum(tensors[n].numel() * tensors[n].element_size() for n in c.entry.grad_inputs)
    grad_bytes = 0 if mode in ("fwd", "eval") else diff_bytes
    ref = mem_ref_bytes(c.entry, c.case, tensors)
    row["peak_mem_mb"] = peak / 2**20
    row["mem_ref_bytes"] = ref
    if c.device.type == "cuda" or ref >= MIN_RSS_INPUT_BYTES:
        row["extra_mem_pct"] = 100.0 * (peak - grad_bytes) / ref
    else:
        c.note(f"extra_mem_pct is left out where its reference size (the differentiable inputs; linear + "
               f"cross-entropy: the logits) is under {MIN_RSS_INPUT_BYTES >> 20} MiB on the CPU: resident "
               f"pages are too coarse a measure there")


def _recompile_for_repeated_backward(entry, variant: str, fns: dict, psets: dict, context: contextlib.ExitStack) -> str:
    """bwd mode runs backward again and again on one graph (retain_graph=True). torch.compile donates
    saved buffers to its backward by default, which forbids that (and would overwrite them): compile
    afresh without donation, bypassing the compiled-autograd cache, and keep the option on while the
    mode runs (the backward is compiled lazily, and checked, on its first retain_graph call)."""
    import torch._functorch.config as functorch_config

    _reset_compile_caches()
    context.enter_context(functorch_config.patch(donated_buffer=False, enable_autograd_cache=False))
    fn = torch.compile(entry.torch_call(variant), dynamic=False)
    run_once(fn, psets[COMPILE][0], entry)
    fns[COMPILE] = fn
    return "bwd: compiled with donated_buffer=False, so its backward can be repeated on one graph"


def _reset_compile_caches() -> None:
    """torch._dynamo.reset() where torch.compile has been used (importing dynamo costs seconds)."""
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


class _Clock:
    """Seconds spent in each phase of a case, kept in the results (where did the run's time go)."""

    def __init__(self, label: str, sink: list):
        self.t = time.perf_counter()
        self.entry = {"case": label, "phases": {}}
        sink.append(self.entry)

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.entry["phases"][phase] = round(now - self.t, 2)
        self.t = now


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, text):
        pass

    def close(self):
        pass

    def write(self, text):
        print(text)


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="case", dynamic_ncols=True, leave=False)


def echo(text: str) -> None:
    """Print above the progress bar when tqdm is present."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(text)
    except ImportError:
        print(text)
