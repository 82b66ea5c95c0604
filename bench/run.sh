#!/usr/bin/env bash
# The main job: set up (first run: venv, torch, triton, build), then benchmark every loss -- each
# provider first checked against a float64 reference -- on the best device present (CUDA if available,
# else CPU), default preset (about 3 minutes on 2 CPU cores). Extra arguments go
# to the benchmark.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/.ci/setup"
cd "$repo"
lossfuse-bench "$@"
