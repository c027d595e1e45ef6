"""benchmarks/kernel_bench.py --grid on the CPU: the case list and its subset rules, the floors,
and a smoke run (tiny cases, torch references) that writes the JSON rows the GPU run writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_grid as grid

REPO = Path(__file__).resolve().parents[1]


def test_case_list_covers_the_axes_and_fits_the_budget() -> None:
    attn, mlp = grid.attention_cases(), grid.mlp_cases()
    assert len(set(attn)) == len(attn) and len(set(mlp)) == len(mlp)
    kept = [c for c in attn if grid.skip_reason(c) is None]
    assert {c.batch for c in kept} == {1, 8, 32, 64, 128, 256}
    assert {c.dist for c in kept} == {"uniform", "spread", "one_long"}
    assert {c.longest for c in kept} == {1024, 4096, 16384}
    assert {(c.heads.hq, c.heads.hkv) for c in kept} >= {(32, 32), (64, 64), (72, 72), (32, 8)}
    assert {c.heads.d for c in kept} == {64, 80, 96, 128} and {c.dtype for c in kept} == {"bfloat16", "float16"}
    assert max(c.table_tokens for c in kept) == 32768
    assert {d for c in kept for d in c.densities} == {0.2, 0.3, 0.5, 0.75, 1.0}
    # the full cross of batch x distribution x density for the three recorded head configurations
    full = [c for c in kept if c.family == "attn-4k"]
    assert len(full) == 3 * (6 * 3 - 2)  # B = 1 only uniform
    assert {(c.name, c.m) for c in mlp if c.family.startswith("mlp-opt")} == {
        (name, m) for name in ("opt-6.7b", "opt-13b", "opt-30b", "opt-66b") for m in (1, 16, 32, 64, 128, 256)}
    assert all(c.n == 4 * c.d for c in mlp)
    # ~0.12 s per timing + compiles: the grid leaves room for the GPU tests in 6 minutes
    assert grid.estimate_seconds(attn, mlp) < 240


def test_skips_and_deduplicated_densities() -> None:
    big = grid.AttnCase("x", grid.MHA64, 256, "uniform", 16384, 32768, "bfloat16", (1.0,))
    assert "KV 137 GB" in grid.skip_reason(big)
    one = grid.AttnCase("x", grid.GQA, 1, "spread", 4096, 32768, "bfloat16", grid.DENSITIES)
    assert "B = 1" in grid.skip_reason(one)
    gqa = grid.AttnCase("x", grid.GQA, 8, "uniform", 4096, 32768, "bfloat16", grid.DENSITIES)
    assert grid.k_groups(gqa) == [2, 4, 6, 8]  # 0.2 and 0.3 of 8 groups are both 2
    assert grid.k_groups(grid.AttnCase("x", grid.LLAMA2, 8, "uniform", 4096, 32768, "bfloat16",
                                       grid.DENSITIES)) == [6, 10, 16, 24, 32]


def test_lengths_follow_the_distribution() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    case = grid.AttnCase("x", grid.LLAMA2, 64, "spread", 4096, 32768, "bfloat16", (1.0,))
    lens = grid.lengths(case, gen)
    assert len(lens) == 64 and max(lens) == lens[0] == 4096 and min(lens) >= 409
    one = grid.lengths(grid.AttnCase("x", grid.LLAMA2, 8, "one_long", 16384, 32768, "bfloat16", (1.0,)), gen)
    assert one == [16384] + [1024] * 7


def test_floors() -> None:
    # 64 sequences x 4096 tokens x 10 groups x D 128 x (K, V) x 2 B at 4 TB/s
    assert grid.attention_floor_ms(64 * 4096, 10, 128, 2, 4.0) == pytest.approx(64 * 4096 * 10 * 128 * 4 / 4e12 * 1e3)
    # OPT-66B 10%: bytes at M 64, FLOPs at M 256
    k, d = 3686, 9216
    assert grid.mlp_floor_ms(64, k, d, 2, 4.0) == pytest.approx(2 * k * d * 2 / 4e12 * 1e3)
    assert grid.mlp_floor_ms(256, k, d, 2, 4.0) == pytest.approx(4 * 256 * k * d / 650e12 * 1e3)


def test_smoke_run_writes_the_rows(tmp_path: Path) -> None:
    """The grid's own code path on the CPU: JSON rows as kernels.json's plus family and floor_ms."""
    data = grid.run_grid(tmp_path, smoke=True)
    saved = json.loads((tmp_path / "kernels_grid.json").read_text())
    assert saved["grid"] is True and saved["complete"] is True and saved["rows"] == data["rows"]
    rows = saved["rows"]
    for r in rows:
        assert {"op", "family", "shape", "dtype", "density", "variant", "ms", "floor_ms"} <= set(r)
        assert r["ms"] > 0 and r["floor_ms"] > 0
    attn = [r for r in rows if r["op"] == "attention"]
    assert {r["variant"] for r in attn} == {"ours", "sdpa_dense"}
    assert {r["shape"]["lengths"] for r in attn} == {"uniform", "spread"}
    assert all({"B", "Hq", "Hkv", "D", "longest", "mean_len", "table_tokens"} <= set(r["shape"]) for r in attn)
    mlp = [r for r in rows if r["op"] == "mlp"]
    assert {r["variant"] for r in mlp} == {"ours", "cublas_dense"}
    plans = {round(r["density"], 2): r["plan"]["path"] for r in mlp if r["variant"] == "ours"}
    assert plans == {0.1: "gather", 1.0: "dense"}  # the CPU runs the references; density 1 is dense
    png = tmp_path / "kernels_grid.png"
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_cli_smoke_and_plot_from(tmp_path: Path) -> None:
    script = str(REPO / "benchmarks" / "kernel_bench.py")
    bad = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--smoke goes with --grid" in bad.stderr
    ran = subprocess.run([sys.executable, script, "--grid", "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    replot = subprocess.run([sys.executable, script, "--plot-from", str(tmp_path / "kernels_grid.json")],
                            capture_output=True, text=True, timeout=300)
    assert replot.returncode == 0 and "% of floor" in replot.stdout, replot.stderr
