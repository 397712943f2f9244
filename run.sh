#!/usr/bin/env bash
# Set up (first time) and run the main job: the embedded synthetic stream on the DirectRunner.
# Any flag can follow (./run.sh --help lists them), e.g. ./run.sh --data ../shared/datasets/movielens-100k;
# ./run.sh show out, ./run.sh report out and ./run.sh export ... run those commands.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
case "${1:-}" in
  show|report|export|stack) exec .venv/bin/python -m pipelines.cli "$@" ;;
esac
exec .venv/bin/python -m pipelines.cli --output_dir "${FRESHREC_OUT:-out}" "$@"
