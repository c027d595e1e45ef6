"""Logits of tiny random Llama (GQA, KV replication at tp=4), Qwen2 and OPT models match
transformers at tp=1, 2 and 4, for prefill and every decode step (gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_ranks

import tp_cases

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tp_cases.save_tiny_model(arch, root / arch) for arch in tp_cases.ARCHS}


def check_against_hf(model_dir: Path, ours: list[torch.Tensor], dtype: str) -> None:
    ref64 = tp_cases.reference_logits(model_dir, torch.float64)
    hf_same = tp_cases.reference_logits(model_dir, DTYPES[dtype])
    tol = tp_cases.tolerance(ref64, hf_same, DTYPES[dtype])
    err = max((a - b).abs().max().item() for a, b in zip(ours, ref64))
    assert err <= tol, f"max |ours - float64 reference| = {err:.3e} > tolerance {tol:.3e}"
    for a, b in zip(ours, ref64):  # every position was produced (prefill + each decode step)
        assert a.shape == b.shape


@pytest.mark.parametrize("arch", list(tp_cases.ARCHS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(arch: str, tp: int, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    if tp == 1:
        tp_cases.rank_main(0, 1, str(model_dirs[arch]), str(out), "float32")
    else:
        run_ranks(tp_cases.rank_main, tp, str(model_dirs[arch]), str(out), "float32")
    check_against_hf(model_dirs[arch], torch.load(out), "float32")


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_logits_match_transformers_bf16(arch: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    run_ranks(tp_cases.rank_main, 2, str(model_dirs[arch]), str(out), "bfloat16")
    check_against_hf(model_dirs[arch], torch.load(out), "bfloat16")
