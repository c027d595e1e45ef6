"""Logits of tiny random Llama (GQA, KV replication at tp=4), Qwen2 and OPT models match
transformers at tp=1, 2 and 4, for prefill and every decode step (gloo on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from support.ranks import run_ranks
from support.tiny_models import ARCHS, check_against_hf, rank_main


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(arch: str, tp: int, tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    if tp == 1:
        rank_main(0, 1, str(tiny_model(arch)), str(out), "float32")
    else:
        run_ranks(rank_main, tp, str(tiny_model(arch)), str(out), "float32")
    check_against_hf(tiny_model(arch), torch.load(out), "float32")


@pytest.mark.parametrize("arch", ["llama-gqa", "opt"])
def test_logits_match_transformers_bf16(arch: str, tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "logits.pt"
    run_ranks(rank_main, 2, str(tiny_model(arch)), str(out), "bfloat16")
    check_against_hf(tiny_model(arch), torch.load(out), "bfloat16")
