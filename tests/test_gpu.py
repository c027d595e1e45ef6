"""CUDA checks, run on a GPU machine with `pytest -m gpu`: the tiny-model logits match
transformers in fp16 and bf16 (decode through the Triton kernels, eager and CUDA graphs), also
through the NCCL code path at world size 1, and launch/generate.py runs a random
Llama-3.1-8B-shape model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from support.ranks import free_port
from support.tiny_models import ARCHS, check_against_hf, release_device_memory, runtime_logits
from support.tolerance import CUDA_MODEL_ULPS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_logits_match_transformers_cuda(arch: str, dtype: str, cuda_graphs: bool,
                                        tiny_model: Callable[[str], Path]) -> None:
    # 3 sequences decode in the batch-4 graph: one padding row writes the scratch block
    ours = runtime_logits(tiny_model(arch), dtype, device="cuda", cuda_graphs=cuda_graphs)
    check_against_hf(tiny_model(arch), ours, dtype, device="cuda", ulps=CUDA_MODEL_ULPS)


def test_nccl_path_at_world_size_one(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    release_device_memory()  # the runtime in the child sizes its KV cache from this GPU's free memory
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
         str(ROOT / "tests/support/tp_script.py"), str(tiny_model("llama-gqa")), str(out), "bfloat16",
         "--device", "cuda", "--backend", "nccl"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_against_hf(tiny_model("llama-gqa"), torch.load(out), "bfloat16", device="cuda", ulps=CUDA_MODEL_ULPS)


def test_generate_llama31_8b_shape_on_gpu() -> None:
    release_device_memory()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/llama-3.1-8b.yaml"),
         "--set", "engine.max_batch_size=16", "--set", "engine.max_seq_len=1024", "--prompt", "hello world",
         "--prompt", "a second, longer prompt", "--max-new-tokens", "64", "--ignore-eos", "--stats"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [len(x["token_ids"]) for x in lines] == [64, 64]
    print(proc.stderr.strip().splitlines()[-1])  # tokens/s
