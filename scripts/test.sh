#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the CPU test suite; GPU tests are marked `gpu` and run on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -m "not gpu" -q "$@"
