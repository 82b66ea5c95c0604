#!/usr/bin/env bash
# The main job: set up (first run: venv, torch, triton, build), then check every backend against
# torch and benchmark on the best device present (CUDA if available, else CPU). Extra arguments go
# to the benchmark.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/.ci/setup"
cd "$repo"
python -m lossfuse.verify "$@"
