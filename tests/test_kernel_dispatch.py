"""The kernel backend is chosen once per model and bound into KernelOps: each op then calls
its Triton kernel or its torch reference, and nothing else decides per call."""

from __future__ import annotations

import pytest
import torch

import kernels.gather_gemm as gather_gemm
import kernels.rms_norm as rms_norm
import kernels.select_attention as select_attention
from kernels.dispatch import Backend, KernelOps, choose_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_picks_triton_only_for_16_bit_cuda() -> None:
    assert choose_backend("auto", CUDA, torch.bfloat16) is Backend.TRITON
    assert choose_backend("auto", CUDA, torch.float16) is Backend.TRITON
    assert choose_backend("auto", CUDA, torch.float32) is Backend.TORCH
    assert choose_backend("auto", CPU, torch.bfloat16) is Backend.TORCH
    assert choose_backend("torch", CUDA, torch.bfloat16) is Backend.TORCH


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("triton", CPU, torch.float32) is Backend.TRITON
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend("triton", CPU, torch.float32)


@pytest.mark.parametrize("backend", list(Backend))
def test_ops_call_the_bound_backend(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for mod, op in ((select_attention, "select_attention"), (gather_gemm, "gather_fc1"), (gather_gemm, "gather_fc2"),
                    (rms_norm, "rms_norm"), (rms_norm, "add_rms_norm")):
        for name in (op, f"{op}_ref"):
            monkeypatch.setattr(mod, name, lambda *a, _n=name: calls.append(_n))
    ops = KernelOps(backend)
    ops.select_attention(*([None] * 7))
    ops.gather_fc1(None, None, None, None)
    ops.gather_fc2(None, None, None, None)
    ops.rms_norm(None, None, 1e-6)
    ops.add_rms_norm(None, None, None, 1e-6)
    suffix = "" if backend is Backend.TRITON else "_ref"
    assert calls == [f"{op}{suffix}" for op in ("select_attention", "gather_fc1", "gather_fc2", "rms_norm",
                                                  "add_rms_norm")]


def test_torch_backend_matches_the_reference_exactly() -> None:
    x, w = torch.randn(3, 64), torch.ones(64)
    out = KernelOps(Backend.TORCH).rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, rms_norm.rms_norm_ref(x, w, 1e-6), rtol=0, atol=0)
