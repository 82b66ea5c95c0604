#!/usr/bin/env bash
# Set up (first run: venv, torch, triton, build) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/.ci/setup"
cd "$repo"
python -m pytest tests -q "$@"
