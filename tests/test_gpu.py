"""CUDA checks, run on a GPU machine with `pytest -m gpu`: the tiny-model logits match
transformers in fp16 and bf16 (decode through the Triton kernels, eager and CUDA graphs), also
through the NCCL code path at world size 1, and launch/generate.py runs a random
Llama-3.1-8B-shape model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_cases
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gpu")
    return {arch: tp_cases.save_tiny_model(arch, root / arch) for arch in tp_cases.ARCHS}


@pytest.mark.parametrize("arch", list(tp_cases.ARCHS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_logits_match_transformers_cuda(arch: str, dtype: str, cuda_graphs: bool, model_dirs: dict[str, Path]) -> None:
    # 3 sequences decode in the batch-4 graph: one padding row writes the scratch block
    ours = tp_cases.runtime_logits(model_dirs[arch], dtype, device="cuda", cuda_graphs=cuda_graphs)
    ref64 = tp_cases.reference_logits(model_dirs[arch], torch.float64, device="cuda")
    same = tp_cases.reference_logits(model_dirs[arch], DTYPES[dtype], device="cuda")
    tol = tp_cases.tolerance(ref64, same, DTYPES[dtype])
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref64))
    assert err <= tol, f"{arch} {dtype}: max |ours - float64| = {err:.3e} > {tol:.3e}"


def test_nccl_path_at_world_size_one(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
         str(ROOT / "tests/tp_cases.py"), str(model_dirs["llama-gqa"]), str(out), "bfloat16", "--device", "cuda",
         "--backend", "nccl"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = torch.load(out)
    ref64 = tp_cases.reference_logits(model_dirs["llama-gqa"], torch.float64, device="cuda")
    same = tp_cases.reference_logits(model_dirs["llama-gqa"], torch.bfloat16, device="cuda")
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref64))
    assert err <= tp_cases.tolerance(ref64, same, torch.bfloat16)


def test_generate_llama31_8b_shape_on_gpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/llama-3.1-8b.yaml"),
         "--set", "engine.max_batch_size=16", "--set", "engine.max_seq_len=1024", "--prompt", "hello world",
         "--prompt", "a second, longer prompt", "--max-new-tokens", "64", "--ignore-eos", "--stats"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [len(x["token_ids"]) for x in lines] == [64, 64]
    print(proc.stderr.strip().splitlines()[-1])  # tokens/s
