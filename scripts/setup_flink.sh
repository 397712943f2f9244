#!/usr/bin/env bash
# The PyFlink job's own environment (.venv-flink): apache-flink 2.3 pins apache-beam<=2.61, so it
# cannot share .venv (beam 2.77). Idempotent. The job imports only freshrec's runner-free core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv-flink/.freshrec-installed
want="apache-flink==2.3.0 torch==2.13.0 fastavro avro numpy pytest river numpy<2.2 tfx-bsl==1.21.0 --no-deps"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv-flink/bin/python ] || "$PY" -m venv .venv-flink
.venv-flink/bin/python -m pip install -q --upgrade pip
.venv-flink/bin/python -m pip install -q "torch==2.13.0"
.venv-flink/bin/python -m pip install -q "apache-flink==2.3.0" fastavro avro numpy pytest
# the job's window statistics and drift detectors (monitoring/): River within Beam 2.61's numpy pin, and
# tfx-bsl's sketches without the TensorFlow its metadata pulls (as scripts/setup.sh does)
.venv-flink/bin/python -m pip install -q river "numpy<2.2"
.venv-flink/bin/python -m pip install -q --no-deps "tfx-bsl==1.21.0"
echo "$want" > "$stamp"
