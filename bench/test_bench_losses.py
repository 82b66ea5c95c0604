"""pytest-benchmark entry points: the cases of ``lossfuse-bench``, for people who track regressions with
pytest-benchmark (``--benchmark-autosave`` / ``--benchmark-compare``).

    pip install pytest-benchmark
    pytest bench/test_bench_losses.py --benchmark-only
    LOSSFUSE_BENCH_PRESET=quick LOSSFUSE_BENCH_MODE=fwd pytest bench/test_bench_losses.py -k ce

Not part of the test run: ``pyproject.toml`` sets ``testpaths = ["tests"]``, and this file is only
collected when named. The cases, providers, inputs, correctness check and training-loop step are the
suite's own (``lossfuse.bench``); pytest-benchmark does the timing and the bookkeeping. For ratios
measured side by side, GB/s against the copy bandwidth and peak memory, run ``lossfuse-bench``.

Environment: LOSSFUSE_BENCH_PRESET (default ``default``), LOSSFUSE_BENCH_MODE (``fwd``, ``bwd``,
``fwd+bwd``; default ``fwd+bwd``), LOSSFUSE_BENCH_PROVIDERS (comma-separated; default: those of the
device), LOSSFUSE_BENCH_DEVICE (default: cuda if available, else cpu).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from lossfuse.bench import presets, providers, runner  # noqa: E402
from lossfuse.catalog import lossfuse_function  # noqa: E402

DEVICE = torch.device(os.environ.get("LOSSFUSE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET = presets.get_preset(os.environ.get("LOSSFUSE_BENCH_PRESET", "default"))
MODES = [m for m in os.environ.get("LOSSFUSE_BENCH_MODE", "fwd+bwd").split(",") if m]
PROVIDERS = (providers.resolve_names([os.environ["LOSSFUSE_BENCH_PROVIDERS"]])
             if os.environ.get("LOSSFUSE_BENCH_PROVIDERS")
             else providers.default_names(DEVICE, PRESET.with_reference))
CASES = presets.select(PRESET, device_type=DEVICE.type)

_inputs: dict = {}


def _sets(case):
    """Input sets built once per case and shared by its providers (the same inputs for every one)."""
    if case.key() not in _inputs:
        _inputs.clear()  # one case's inputs alive at a time: the large ones are GBs
        sets = runner.make_sets(case, DEVICE, runner.buffer_sets(case, DEVICE), seed=0)
        _inputs[case.key()] = (sets, runner.reference64(case.entry, sets[0], case.variant))
    return _inputs[case.key()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_loss(benchmark, case, provider, mode):
    entry = case.entry
    if lossfuse_function(entry) is None:
        pytest.skip(f"lossfuse has no {entry.lossfuse_name} yet")
    p = providers.PROVIDERS[provider]
    torch.set_num_threads(case.threads or torch.get_num_threads())
    runner._reset_compile_caches()
    if p.losses is not None and entry.key not in p.losses:
        pytest.skip(f"{provider} implements {', '.join(p.losses)} only")
    if mode not in entry.modes:
        pytest.skip(f"{entry.key}: {mode} not measured: {entry.modes_note}")
    made = p.make(entry, case, DEVICE)
    if isinstance(made, str):
        pytest.skip(made)
    sets, (ref_loss, ref_grads) = _sets(case)
    if p.mutates_inputs:
        sets = runner.clone_sets(sets, entry)

    # Correct first: a provider that disagrees with float64 fails here and is never timed.
    loss, grads = runner.run_once(made, sets[0], entry)
    le, ge = runner.rel_errors(loss, grads, ref_loss, ref_grads)
    tol = runner.TOLERANCES[case.dtype].norm
    assert le <= tol and ge <= tol, f"{provider} disagrees with float64: loss {le:.2e}, grad {ge:.2e} > {tol:.0e}"

    step, _, _ = runner.make_step(made, sets, entry, mode)
    if DEVICE.type == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    counted = entry.counted_bytes(case.shape, case.dtype, case.variant, mode)
    benchmark.group = f"{case.label()} {mode}"
    benchmark.extra_info.update(loss=case.loss, shape=list(case.shape), dtype=presets.dtype_name(case.dtype),
                                variant=case.variant, mode=mode, provider=provider, counted_bytes=counted,
                                bytes_formula=entry.bytes_formula, device=str(DEVICE),
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=min(PRESET.rounds, case.rounds or PRESET.rounds), iterations=1, warmup_rounds=1)
    runner.clear_grads(sets, entry)
    benchmark.extra_info["gbps"] = counted / benchmark.stats.stats.median / 1e9
    if entry.counted_flops is not None:
        flops = entry.counted_flops(case.shape, case.dtype, case.variant, mode)
        benchmark.extra_info.update(counted_flops=flops, gflops=flops / benchmark.stats.stats.median / 1e9)
