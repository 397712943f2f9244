#!/usr/bin/env bash
# Set up (first time), lint, type-check and run the default test suite.
# Slow benchmarks are opt-in: FRESHREC_SLOW=1 ./test.sh
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
