#!/usr/bin/env bash
# Set up (first time) and run the main job: the embedded synthetic stream on the DirectRunner.
# Any pipeline flag can follow, e.g. ./run.sh --data ../shared/datasets/movielens-100k
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pipelines.cli --output_dir "${FRESHREC_OUT:-out}" "$@"
