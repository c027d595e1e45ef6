"""benchmarks/throughput.py on CPU with tiny random shapes: the harness runs every variant, writes
rows with the documented fields, and its floor model counts what sparsity removes; over tp=2 x dp=2
ranks (torchrun) every rank's step and all-reduce times reach global rank 0, tokens/s adds up over
the replicas, and the JSON records the layout."""

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
FIELDS = {"model", "tp", "batch", "context", "density", "mlp_sparse", "variant", "tokens_per_s", "ms_per_step",
          "floor_ms"}


def tiny_config(path: Path, model_type: str) -> Path:
    arch = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    if model_type == "opt":
        arch = {"model_type": "opt", "vocab_size": 256, "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 3,
                "num_attention_heads": 4, "max_position_embeddings": 512, "do_layer_norm_before": True,
                "word_embed_proj_dim": 64}
    path.write_text(yaml.safe_dump({"model": {"init": "random", "seed": 0, "dtype": "float32", "device": "cpu",
                                              "tokenizer": "bytes", "architecture": arch}}))
    return path


def run(config: Path, out: Path, *extra: str, ranks: int = 1, batch: tuple[str, ...] = ("2", "4")) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                                      str(free_port())]
    args = ["--config", str(config), "--batch", *batch, "--context", "40", "--steps", "2", "--out", str(out), *extra]
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / "benchmarks" / "throughput.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / f"throughput-{config.stem}.json").read_text())
    result["stdout"] = proc.stdout
    return result


def by(rows: list[dict], **match: object) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_llama_dense_sparse_and_mixed(tmp_path: Path) -> None:
    result = run(tiny_config(tmp_path / "tiny-llama.yaml", "llama"), tmp_path, "--density", "1.0", "0.5",
                 "--mixed", "20:60")
    rows = result["rows"]
    for r in rows:
        assert FIELDS <= r.keys(), r
    ours = [r for r in rows if r["variant"].startswith("ours")]
    # 2 densities x (2 batches x (1 fixed + 1 mixed context))
    assert len(ours) == 8 and len(by(rows, variant="floor")) == 8
    for r in ours:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3)
    dense = by(rows, variant="ours_dense", batch=4, context="40")[0]
    sparse = by(rows, variant="ours_sparse", batch=4, context="40")[0]
    # layer 0 reads all 4 groups, layers 1-2 read 2: 8 of 12 group-layers
    assert sparse["kv_bytes_read"] == pytest.approx(dense["kv_bytes_read"] * 8 / 12)
    assert sparse["weight_bytes_read"] > dense["weight_bytes_read"]  # the routers are read too
    # untied: the embedding gives its 4 rows, the LM head is read whole
    params = 256 * 64 * 2 + 3 * (64 * 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert dense["weight_bytes_read"] == (params - (256 - 4) * 64) * 4
    mixed = by(rows, variant="ours_dense", batch=4, context="mixed 20-60")[0]
    assert 20 <= mixed["mean_context"] <= 60
    # the README's table over this file: one line per sparse row, each against its own case's dense row
    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput_table import table_lines

    lines = table_lines(tmp_path / "throughput-tiny-llama.json")
    assert len(lines) == 4
    line = next(x for x in lines if "| 4 | 40 |" in x)
    assert f"{dense['ms_per_step']:.3f} ({dense['ms_per_step'] / dense['floor_ms']:.2f}x)" in line
    assert f"{sparse['ms_per_step']:.3f} ({sparse['ms_per_step'] / sparse['floor_ms']:.2f}x)" in line


def test_opt_mlp_sparsity_reads_fewer_weights(tmp_path: Path) -> None:
    result = run(tiny_config(tmp_path / "tiny-opt.yaml", "opt"), tmp_path, "--density", "1.0", "--mlp-sparse",
                 "--set", "sparsity.mlp_density=0.25")
    rows = result["rows"]
    dense = by(rows, variant="ours_dense", batch=2)[0]
    mlp = by(rows, variant="ours_sparse", batch=2, mlp_sparse=True)[0]
    # 3 layers of 256 neurons x (64 W1 + 64 W2) floats; k = 64 of 256 in each layer: 3 x 192 x 128 x 4 bytes fewer
    # (the neuron routers, hidden -> 1024 -> neurons without biases, are read on top)
    router_bytes = 3 * (64 * 1024 + 1024 * 256) * 4
    assert mlp["weight_bytes_read"] == dense["weight_bytes_read"] - 3 * 192 * 128 * 4 + router_bytes


def test_breakdown_names_real_kernels() -> None:
    """Every kernel the breakdown charges by name is a Triton kernel of kernels/ (a renamed kernel
    would otherwise fall silently into "other")."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.step_breakdown import _TRITON_KERNELS

    source = "\n".join(p.read_text() for p in (ROOT / "kernels").glob("*.py"))
    for name in _TRITON_KERNELS:
        assert f"def {name}(" in source, name
        assert source.count(name) >= 2, f"{name} is defined but never launched"


@pytest.mark.slow
def test_two_replicas_of_tp2_add_up(tmp_path: Path) -> None:
    result = run(tiny_config(tmp_path / "tiny-llama.yaml", "llama"), tmp_path, "--density", "1.0", "0.5", "--set",
                 "parallel.dp=2", "--set", "parallel.timeout_s=60", ranks=4, batch=("2",))
    assert (result["tp"], result["dp"], result["device"]) == (2, 2, "cpu")
    layout = result["layout"]
    assert (layout["tp"], layout["dp"], layout["world_size"], layout["launcher"]) == (2, 2, 4, "torchrun")
    assert [r["ranks"] for r in layout["replicas"]] == [[0, 1], [2, 3]] == [r["ranks"] for r in result["replicas"]]
    assert len(result["total"]) == 2  # two densities x one case
    for i, total in enumerate(result["total"]):
        rows = [rep["rows"][i] for rep in result["replicas"]]
        assert all((r["variant"], r["density"], r["batch"]) == (total["variant"], total["density"], total["batch"])
                   for r in rows)
        assert total["tokens_per_s_per_replica"] == [r["tokens_per_s"] for r in rows]
        assert total["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in rows))
        assert total["slowest_step_ms"] == max(r["ms_per_step"] for r in rows)
        for rep, row in zip(result["replicas"], rows):
            assert [r["rank"] for r in row["per_rank"]] == rep["ranks"]
            assert all(r["comm_ms"] > 0 and r["compute_ms"] >= 0 for r in row["per_rank"])
            assert row["collectives"] > 0 and row["comm_ms_max"] == max(r["comm_ms"] for r in row["per_rank"])
    ours = [r for r in result["rows"] if r["variant"].startswith("ours")]  # global rank 0's own rows, as at dp = 1
    assert len(ours) == 2 and all(r["tp"] == 2 and FIELDS <= r.keys() for r in ours)
    assert "dp=2" in result["stdout"] and "total tok/s" in result["stdout"]
