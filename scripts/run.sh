#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: the OpenAI-compatible server on the embedded
# SmolLM2-135M (CPU), at http://127.0.0.1:8000 until Ctrl-C (which drains, then exits 0).
# Arguments go to launch/serve.py, e.g. `bash scripts/run.sh --set server.port=8001`.
# Setup output and logs go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec python launch/serve.py --config configs/smollm2-135m.yaml "$@"
