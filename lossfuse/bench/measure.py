"""Measuring: interleaved timing, the copy bandwidth, and peak memory.

Timing. Every provider has run once before (the correctness check, where torch.compile compiles);
a first round of single calls warms up and sizes the blocks (see ``interleaved``). The providers are
timed in rounds, round-robin, the starting provider rotating from round to round, so a change in machine load during the run hits all of them
alike; before each block the gradients left on the shared inputs are dropped, untimed;
a provider's time is the median over rounds, its spread the inter-quartile range and min/max,
and a speed-up is the median of the per-round ratios, each taken from providers timed moments apart.

  CPU   one round = one ``torch.utils.benchmark.Timer(...).timeit(number)`` block per provider
        (``number`` calls sized to ``block_s`` from the warm-up), with the run's thread count;
  CUDA  one round = one ``triton.testing.do_bench`` per provider (CUDA events, the L2 flushed before
        every call, the median of its samples); without triton, CUDA events around synchronised calls.

Copy bandwidth: a large tensor copy ``dst.copy_(src)``, counted as bytes read + bytes written.

Peak memory above what exists before the call:
  CPU   peak resident set size. The kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``),
        VmHWM is read before and after the call (/proc/self/status). Freed heap pages are returned first
        (``malloc_trim(0)``) and lossfuse's cache of freed gradient buffers is emptied, so every page the
        call touches is counted. This counts pages touched, not bytes requested: it is what the machine
        pays, and it includes memory allocators keep.
  CUDA  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the allocated
        bytes before the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summary(xs) -> dict:
    return {"median": statistics.median(xs), "q1": quantile(xs, 0.25), "q3": quantile(xs, 0.75),
            "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratios(base, other) -> list:
    """Per-round ratios base[r] / other[r]: the speed-up of ``other`` over ``base`` in each round."""
    return [b / o for b, o in zip(base, other) if o > 0]


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _timer_once(step: Callable, number: int, threads: int) -> float:
    """Seconds per call of ``step``, from one torch.utils.benchmark block of ``number`` calls.

    ``Timer.timeit(number)`` first makes max(number // 100, 2) untimed calls of its own, which would
    triple the cost of a round of 2-second calls; the suite warms up itself, so it runs the Timer's
    timed block alone (``Timer._timeit``: the same timer, statement and globals), and falls back to
    ``timeit`` where a torch version lacks it. The thread count is the case's (set by the runner and
    passed to the Timer)."""
    from torch.utils.benchmark import Timer

    t = Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    block = getattr(t, "_timeit", None)
    if block is None:
        return t.timeit(number).mean
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return block(number) / number


def _cuda_once(step: Callable, rep_ms: float) -> float:
    """Median seconds per call of ``step`` on CUDA, with CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(step, warmup=max(1, int(rep_ms // 4)), rep=max(1, int(rep_ms)), return_mode="all")
        return statistics.median(times) / 1e3
    # Without triton: events around synchronised calls, still device time.
    torch.cuda.synchronize()
    n = 5
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def _calibrate(step: Callable, est: float, block_s: float, threads: int, setup: Callable | None) -> float:
    """Seconds per call from blocks of growing size (x4) until one lasts a quarter of ``block_s``.

    One call is a poor estimate of a ~10 us call on a loaded machine: a single preemption makes it look
    milliseconds long, and the blocks sized from it would hold one or two calls each, as noisy as the
    call itself -- and that first estimate is not trusted to decide either: only a call of a whole
    block or more keeps it (no cost added; such blocks hold one call anyway)."""
    if est >= block_s:
        return est
    best, number = est, 1
    while number < 10000:
        number = min(10000, number * 4)
        if setup is not None:
            setup()
        t = _timer_once(step, number, threads)
        best = min(best, t)   # preemption only ever adds time: the fastest block is the call's cost
        if t * number >= block_s / 4:
            break
    return best


def interleaved(steps: dict, device: torch.device, threads: int, *, rounds: int, min_rounds: int,
                block_s: float, budget_s: float, setup: dict | None = None) -> tuple:
    """Time every step of ``steps`` (name -> callable) in interleaved rounds.

    Every step has already run once (the correctness check, where torch.compile compiled). The first
    round times one call of each; that, refined by ``_calibrate`` for calls shorter than a quarter
    block, sizes the blocks of the later rounds (``block_s`` each) and how
    many rounds fit the budget. It counts as a round when every step is slow enough for one call per
    block -- where calls take seconds, a separate warm-up round would cost as much as a measured one --
    and is dropped as a warm-up otherwise.

    ``setup`` (name -> callable, optional) runs untimed before each of that step's blocks. Providers
    share their input tensors, so the runner uses it to drop the gradients the previous provider left
    on them: freeing those (torch's 500 MB gradient returned to the OS, say) is not the next
    provider's cost.

    Returns (per-provider list of per-round seconds per call, calls per block, rounds kept).
    """
    names = list(steps)

    def one_round(r: int, number: dict, out: dict) -> None:
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if setup and n in setup:
                setup[n]()
            if device.type == "cuda":
                out[n].append(_cuda_once(steps[n], rep_ms=max(10.0, block_s * 1e3)))
            else:
                out[n].append(_timer_once(steps[n], number[n], threads))

    first = {n: [] for n in names}
    one_round(0, {n: 1 for n in names}, first)
    est = {n: first[n][0] for n in names}
    if device.type != "cuda":
        for n in names:
            est[n] = _calibrate(steps[n], est[n], block_s, threads, setup.get(n) if setup else None)
    if device.type == "cuda":
        number = {n: 1 for n in names}   # do_bench sizes its own repetitions
    else:
        number = {n: max(1, min(10000, round(block_s / max(est[n], 1e-9)))) for n in names}
    keep_first = device.type != "cuda" and all(v == 1 for v in number.values())
    round_s = sum(max(block_s, est[n] * number[n]) for n in names) or 1e-9
    r_count = max(min_rounds, min(rounds, int(budget_s / round_s) + (1 if keep_first else 0)))
    times = {n: list(first[n]) if keep_first else [] for n in names}
    for r in range(1 if keep_first else 0, r_count):
        one_round(r, number, times)
    return times, number, r_count


# ---------------------------------------------------------------------------------------------------
# Copy bandwidth
# ---------------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, threads: int, nbytes: int | None = None) -> dict:
    """The device's copy bandwidth in GB/s (1e9 bytes/s), counting bytes read + bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.full((n,), 1.5, device=device)  # the values do not matter to a copy
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing

    def step():
        dst.copy_(src)

    if device.type == "cuda":
        secs = [_cuda_once(step, rep_ms=50) for _ in range(5)]
    else:
        est = _timer_once(step, 1, threads)
        number = max(1, round(0.1 / est))
        secs = [_timer_once(step, number, threads) for _ in range(7)]
    s = summary(secs)
    moved = 2 * n * 4
    del src, dst
    return {"gbps": moved / s["median"] / 1e9, "gbps_min": moved / s["max"] / 1e9,
            "gbps_max": moved / s["min"] / 1e9, "bytes": moved,
            "method": f"dst.copy_(src), {n * 4 / 2**20:.0f} MiB fp32, bytes read + written, "
                      f"median of {len(secs)} blocks"}


# ---------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------

CPU_MEMORY_METHOD = ("peak RSS: VmHWM reset with /proc/self/clear_refs before the call, minus the RSS "
                     "before it; malloc_trim(0) and lossfuse's buffer cache emptied first")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus allocated before"

_libc = None


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_memory_supported() -> str | None:
    """None when the RSS high-water mark can be reset here, else why not."""
    try:
        _reset_hwm()
        _status_bytes("VmHWM")
        return None
    except OSError as exc:
        return f"peak RSS cannot be reset here ({exc})"
    except RuntimeError as exc:
        return str(exc)


def empty_lossfuse_cache() -> None:
    from .. import _backend

    if _backend._C is not None and hasattr(_backend._C, "empty_cache"):
        _backend._C.empty_cache()


def peak_bytes(call: Callable, device: torch.device) -> int:
    """Peak memory (bytes) above what exists before ``call()``; what ``call`` returns is kept alive
    until the peak is read, so outputs (the loss, its graph, gradients held by the inputs) count."""
    gc.collect()
    empty_lossfuse_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        keep = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _malloc_trim()
        _reset_hwm()
        base = _status_bytes("VmHWM")  # == VmRSS right after the reset
        keep = call()
        peak = _status_bytes("VmHWM") - base
    del keep
    return max(0, int(peak))
