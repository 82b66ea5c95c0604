#!/usr/bin/env bash
# One command for the GPU (issue 11): on a CUDA machine, with the machine's own torch and Triton, build
# lossfuse, run the whole test suite on CUDA (the Triton kernels compiled and launched for real), then the
# GPU benchmark (lossfuse-bench --shapes gpu): copy bandwidth first, then every case against torch eager,
# torch.compile, liger-kernel and cut-cross-entropy where importable. Everything lands in
# bench/results/<date>-<gpu>/ (and, packed, under $OUT when that is set). Exit status: 2 without CUDA;
# else 0 when the tests passed and no benchmark provider was WRONG, 1 otherwise.
#
# Time: at most LOSSFUSE_GPU_BUDGET_S seconds (default 480) from start to the last file, each phase cut
# by `timeout` (an interrupted benchmark still writes the cases it finished). Knobs (environment):
#   PYTHON                  the interpreter (default: .venv/bin/python if present, else python3)
#   LOSSFUSE_GPU_BUDGET_S   the whole run's time box (default 480)
#   LOSSFUSE_GPU_TEST_S     the test suite's share (default 210)
#   LOSSFUSE_GPU_SKIP_TESTS=1   benchmark only
# Offline anchors: wheels in bench/wheels/ (git-ignored) are installed first with
# `pip install --no-index --no-deps --find-links bench/wheels` (bench/README.md, "GPU").
set -uo pipefail
start=$(date +%s)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
budget=${LOSSFUSE_GPU_BUDGET_S:-480}
test_s=${LOSSFUSE_GPU_TEST_S:-210}
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
  py="$repo/.venv/bin/python"
else
  py=python3
fi

left() { echo $((budget - ($(date +%s) - start))); }
say() { echo "[gpu.sh $(($(date +%s) - start))s] $*"; }

# 1. CUDA or nothing.
why=$("$py" - <<'PY' 2>&1
import sys
try:
    import torch
except Exception as e:
    print(f"torch does not import ({type(e).__name__}: {e})")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
    sys.exit(1)
print(torch.cuda.get_device_name(0))
PY
) || { echo "bench/gpu.sh: no CUDA here: $why. This script needs a CUDA GPU (an H100/H200); nothing was run." >&2; exit 2; }
say "device: $why; python: $py"
unset TRITON_INTERPRET  # the point is the real compiler

gpu=$(echo "$why" | tr 'A-Z' 'a-z' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
out="bench/results/$(date -u +%Y-%m-%d)-$gpu"
mkdir -p "$out"
log="$out/gpu.log"
exec > >(tee -a "$log") 2>&1
say "results: $out"

# 2. Anchors carried as wheels (nothing can be fetched on an offline GPU machine).
if ls bench/wheels/*.whl >/dev/null 2>&1; then
  for pkg in liger-kernel cut-cross-entropy; do
    "$py" -m pip install -q --no-index --no-deps --find-links bench/wheels "$pkg" >/dev/null 2>&1 &&
      say "installed $pkg from bench/wheels" || say "no $pkg wheel in bench/wheels (or it failed to install)"
  done
fi

# 3. The C++ extension against this machine's torch (the CPU tests need it; ~1 min on 16 cores).
if ! "$py" -c "import sys; sys.path.insert(0, '.'); import lossfuse; sys.exit(0 if lossfuse.cpu_kernels_available() else 1)" 2>/dev/null; then
  say "building lossfuse._C"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout $(( $(left) / 3 )) "$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 ||
    say "build failed or timed out (see $out/build.log); the CPU-kernel tests will fail"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# 4. Versions.
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  "$py" - <<'PY'
import importlib.metadata as md, platform, torch
import lossfuse
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for name in ("triton", "liger-kernel", "cut-cross-entropy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("lossfuse", lossfuse.__version__, "at", lossfuse.__file__, "| cpu kernels:", lossfuse.cpu_kernels_available())
PY
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# 5. The whole test suite on CUDA, in parallel processes where pytest-xdist is there.
tests_rc=0
if [ "${LOSSFUSE_GPU_SKIP_TESTS:-0}" = "1" ]; then
  say "tests skipped (LOSSFUSE_GPU_SKIP_TESTS=1)"
else
  t=$(( test_s < $(left) - 150 ? test_s : $(left) - 150 ))
  xdist=()
  "$py" -c "import xdist" 2>/dev/null && xdist=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
  say "test suite (${t}s at most${xdist:+, ${xdist[*]}})"
  timeout -s INT "$t" "$py" -m pytest tests -q -p no:cacheprovider "${xdist[@]}" >"$out/tests.txt" 2>&1
  tests_rc=$?
  tail -n 15 "$out/tests.txt"
  [ "$tests_rc" = 124 ] && say "the test suite ran out of its ${t}s: incomplete"
  say "tests exit status $tests_rc"
fi

# 6. The benchmark, in what is left (minus a margin for the files).
b=$(( $(left) - 20 ))
say "benchmark (${b}s at most)"
timeout -s INT "$b" "$py" -m lossfuse.bench --device cuda --shapes gpu --out "$out" --no-progress
bench_rc=$?
say "benchmark exit status $bench_rc (130: cut by the time box; the finished cases are written)"

# 7. $OUT (the device tool's return folder): one archive and the summary, within its file limits.
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  tar -czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
  cp "$out/env.txt" "$OUT/env.txt"
  [ -f "$out/table.txt" ] && cp "$out/table.txt" "$OUT/table.txt"
  [ -f "$out/tests.txt" ] && tail -n 40 "$out/tests.txt" >"$OUT/tests-tail.txt"
fi
say "done: $out"
[ "$tests_rc" = 0 ] && { [ "$bench_rc" = 0 ] || [ "$bench_rc" = 130 ]; } && exit 0
exit 1
