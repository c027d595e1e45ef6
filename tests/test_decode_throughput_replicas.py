"""benchmarks/decode_throughput.py over tp=2 x dp=2 CPU ranks (torchrun, a tiny random Llama):
every rank's step and collective times reach global rank 0, tokens/s adds up over replicas, and
the JSON records the layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
pytestmark = pytest.mark.slow


def test_throughput_over_two_replicas(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"init": "random", "architecture": ARCH, "tokenizer": "bytes",
                                                "device": "cpu"}, "parallel": {"dp": 2, "timeout_s": 60}}))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
         str(ROOT / "benchmarks/decode_throughput.py"), "--config", str(config), "--batch", "1", "4", "--context",
         "32", "--steps", "3", "--out", str(tmp_path)],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "decode_throughput_tiny.json").read_text())
    assert (result["tp"], result["dp"], result["device"]) == (2, 2, "cpu")
    assert result["layout"]["replicas"][1]["ranks"] == [2, 3] and result["layout"]["world_size"] == 4
    assert [r["ranks"] for r in result["replicas"]] == [[0, 1], [2, 3]]
    for i, total in enumerate(result["total"]):
        per_replica = [rep["rows"][i]["tokens_per_s"] for rep in result["replicas"]]
        assert total["tokens_per_s"] == pytest.approx(sum(per_replica)) and len(per_replica) == 2
        for rep in result["replicas"]:
            row = rep["rows"][i]
            assert [r["rank"] for r in row["per_rank"]] == rep["ranks"]
            assert all(r["comm_ms"] > 0 and r["compute_ms"] >= 0 for r in row["per_rank"])
            assert row["collectives"] > 0 and row["comm_ms_max"] == max(r["comm_ms"] for r in row["per_rank"])
    assert "dp=2" in proc.stdout and "total tok/s" in proc.stdout
