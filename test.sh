#!/usr/bin/env bash
# Set up (first time), lint, type-check and run the default test suite.
# The benchmarks (bench/) are separate scripts, not part of this suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
