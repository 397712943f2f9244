#!/usr/bin/env bash
# Create .venv with everything freshrec needs (idempotent). torch goes first, pinned to the CPU wheel:
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.freshrec-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# tfx-bsl's metadata pulls TensorFlow (~2 GB), which its sketches (monitoring/stream_stats.py) never
# import: install it alone, over the pyarrow that Beam brings (tests/test_stream_stats.py checks both).
.venv/bin/python -m pip install -q --no-deps "tfx-bsl==1.21.0"
echo "$want" > "$stamp"
