"""Tensor parallelism over NCCL on 2, 4 and 8 GPUs (run on a multi-GPU machine:
`pytest -m gpu tests/test_multi_gpu.py`): teacher-forced logits of random Llama-2-7B and
Llama-3.1-8B shapes at tp=N equal tp=1 within the dtype's tolerance, KV-head replication
included (a 4-KV-head variant at tp=8), and greedy tokens of launch/generate.py equal tp=1.
A near-tie in a random model can flip a greedy token legitimately; the logits test then says
whether the difference is within tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from support.ranks import free_port
from support.tolerance import CUDA_MODEL_ULPS, assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def tp_sizes() -> list[int]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [t for t in (2, 4, 8) if t <= n] or [2]


def nccl_env() -> dict[str, str]:
    # NVLink multicast stays off on shared machines.
    return dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
                PYTHONPATH=str(ROOT))


def logits_at(tp: int, config: Path, dtype: str, out: Path) -> list[torch.Tensor]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port",
         str(free_port()), str(ROOT / "tests/support/tp_script.py"), str(config), str(out), dtype, "--device", "cuda"],
        env=nccl_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


def kv4_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/llama-3.1-8b.yaml").read_text())
    cfg["model"]["architecture"]["num_key_value_heads"] = 4  # at tp=8 each KV head sits on two ranks
    path = tmp_path / "llama-kv4.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
@pytest.mark.parametrize("config", ["llama-2-7b", "llama-3.1-8b", "llama-kv4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logits_tp_equal_tp1(config: str, dtype: str, tmp_path: Path) -> None:
    path = kv4_config(tmp_path) if config == "llama-kv4" else ROOT / f"configs/{config}.yaml"
    sizes = [8] if config == "llama-kv4" else tp_sizes()
    if max(sizes) > torch.cuda.device_count():
        pytest.skip(f"needs {max(sizes)} GPUs")
    # The rule of the kernel tests, with tp=1 in `dtype` as the same-dtype reference: tp=N in
    # `dtype` may be off the float32 result by at most twice what tp=1 is, plus the logits' ulps.
    ref32 = logits_at(1, path, "float32", tmp_path / "tp1-fp32.pt")
    one = logits_at(1, path, dtype, tmp_path / "tp1.pt")
    for tp in sizes:
        assert_close_to_reference(logits_at(tp, path, dtype, tmp_path / f"tp{tp}.pt"), ref32, one,
                                  dtype=DTYPES[dtype], ulps=CUDA_MODEL_ULPS, what=f"{config} {dtype} tp={tp}")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_tokens_tp_equal_tp1(dtype: str) -> None:
    args = [str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/llama-3.1-8b.yaml"),
            "--set", f"model.dtype={dtype}", "--set", "engine.max_batch_size=4", "--set", "engine.max_seq_len=512",
            "--prompt", "hello", "--prompt", "a longer prompt for the second sequence", "--max-new-tokens", "32",
            "--ignore-eos"]
    outs = {}
    for tp in [1, *tp_sizes()]:
        launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(tp), "--master_port", str(free_port())]
        proc = subprocess.run([*launcher, *args], env=nccl_env(), capture_output=True, text=True, timeout=900,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[tp] = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outs[1]) == 2 and all(len(json.loads(x)["token_ids"]) == 32 for x in outs[1])
    for tp, lines in outs.items():
        assert lines == outs[1], f"tp={tp} tokens differ from tp=1 (check the logits test for near-ties)"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 4, reason="needs 4+ GPUs")
def test_replicas_over_nccl_give_the_tokens_of_one_replica() -> None:
    """tp=2 x dp=2 on 4 GPUs (NCCL tp groups, gloo control groups per replica): the prompts go
    round-robin over the replicas and rank 0 prints them in prompt order, as tp=2 alone does."""
    args = [str(ROOT / "launch/generate.py"), "--config", str(ROOT / "configs/llama-3.1-8b.yaml"),
            "--set", "model.dtype=bfloat16", "--set", "engine.max_batch_size=4", "--set", "engine.max_seq_len=512",
            *[x for p in ("hello", "a longer prompt", "third one", "and a fourth") for x in ("--prompt", p)],
            "--max-new-tokens", "16", "--ignore-eos"]
    outs = {}
    for world, dp in ((2, 1), (4, 2)):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                               "--master_port", str(free_port()), *args, "--set", f"parallel.dp={dp}"],
                              env=nccl_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[dp] = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outs[1]) == 4 and outs[2] == outs[1]
