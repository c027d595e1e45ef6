#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: greedy generation on the embedded SmolLM2-135M.
# stdout carries only the JSON lines of launch/generate.py; setup and logs go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
. .venv/bin/activate
export HF_HUB_OFFLINE=1
if [ "$#" -eq 0 ]; then
  set -- --prompt "Once upon a time" --prompt "The capital of France is" --max-new-tokens 32
fi
python launch/generate.py --config configs/smollm2-135m.yaml "$@"
