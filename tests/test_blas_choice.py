"""The dense linears' BLAS library per shape (kernels/blas_choice.py) and its injection into the
tensor-parallel layers: the choice logic on the CPU with the GPU timing replaced, the real
measurement and a CUDA-graph capture on a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kernels import blas_choice
from kernels.blas_choice import MAX_MEASURED_M, BlasChoice, choose_library, m_bucket
from kernels.dispatch import Backend, KernelOps
from polar_dist.parallel.comm import SingleRank
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear


def test_choose_library_needs_the_margin() -> None:
    assert choose_library({"cublas": 10.0, "cublaslt": 9.0}) == "cublaslt"
    assert choose_library({"cublas": 10.0, "cublaslt": 9.8}) == "cublas"  # 2%: within the margin
    assert choose_library({"cublas": 10.0, "cublaslt": 11.0}) == "cublas"


def test_choices_are_measured_once_per_key_and_never_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list = []
    used: list[str] = []
    capturing = [False]
    monkeypatch.setattr(BlasChoice, "_measurable", staticmethod(lambda x: True))
    monkeypatch.setattr(BlasChoice, "_capturing", staticmethod(lambda: capturing[0]))
    monkeypatch.setattr(BlasChoice, "_measure", lambda self, key, *a: measured.append(key) or "cublaslt")
    monkeypatch.setattr(blas_choice, "preferred_library",
                        lambda name: used.append(name) or contextlib.nullcontext())
    choice = BlasChoice()
    w = torch.randn(24, 16)
    b = torch.randn(24)
    for _ in range(3):
        for m in (1, 5, 8, 9, 16):  # buckets of 8 and 16 rows
            x = torch.randn(m, 16)
            torch.testing.assert_close(choice.linear(x, w, b), F.linear(x, w, b))
    assert [(k.m, k.in_features, k.out_features, k.bias) for k in measured] == [(8, 16, 24, True), (16, 16, 24, True)]
    assert used == ["cublaslt"] * 15
    choice.linear(torch.randn(8, 16), w)  # no bias: a key of its own
    assert len(measured) == 3
    choice.linear(torch.randn(8, 16), w.t().contiguous().t())  # the same shape transposed in memory: another
    assert len(measured) == 4
    choice.linear(torch.randn(MAX_MEASURED_M + 1, 16), w)  # prefill-sized: torch's default, unmeasured
    capturing[0] = True
    choice.linear(torch.randn(17, 16), w)  # a miss while capturing: the default, nothing cached
    assert len(measured) == 4 and len(choice.choices) == 4 and len(used) == 17
    choice.linear(torch.randn(3, 16), w, b)  # a cached choice applies inside a capture
    assert used[-1] == "cublaslt" and len(measured) == 4


def test_m_buckets() -> None:
    assert [m_bucket(m) for m in (1, 8, 9, 16, 17, 100, 256)] == [8, 8, 16, 16, 32, 128, 256]


def test_kernel_ops_linear_is_f_linear_off_the_gpu() -> None:
    assert KernelOps(Backend.TORCH, blas_choice=True).blas_choice is None  # the torch backend: F.linear
    ops = KernelOps(Backend.TORCH)
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_layers_compute_through_the_linear_they_are_given() -> None:
    calls: list[tuple] = []

    def linear(x, w, b):
        calls.append((tuple(x.shape), tuple(w.shape), b is not None))
        return F.linear(x, w, b)

    comm = SingleRank()
    col = ColumnParallelLinear(8, 6, bias=True, dtype=torch.float32, device="cpu", linear=linear)
    row = RowParallelLinear(6, 4, bias=False, comm=comm, dtype=torch.float32, device="cpu", linear=linear)
    head = ParallelLMHead(torch.nn.Parameter(torch.randn(10, 4), requires_grad=False), 9, comm=comm, linear=linear)
    for layer in (col, row):
        torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(col.bias)
    x = torch.randn(2, 8)
    logits = head(row(col(x)))
    expected = F.linear(F.linear(F.linear(x, col.weight, col.bias), row.weight), head.weight)[:, :9]
    torch.testing.assert_close(logits, expected)
    assert calls == [((2, 8), (6, 8), True), ((2, 6), (4, 6), False), ((2, 4), (10, 4), False)]


@pytest.mark.gpu
def test_gpu_choice_is_measured_then_captured() -> None:
    """Llama-2-7B's down projection at M 64 (where the libraries differed by ~10% in run 57): the
    first call measures both libraries and caches one; the product matches F.linear up to
    rounding order; a CUDA graph captured after that replays the chosen library's result
    exactly; torch's library setting is left as it was."""
    ops = KernelOps(Backend.TRITON, blas_choice=True)
    before = torch.backends.cuda.preferred_blas_library()
    x = torch.randn(64, 11008, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) / 11008**0.5
    y = ops.linear(x, w)
    assert len(ops.blas_choice.choices) == 1
    (key, library), = ops.blas_choice.choices.items()
    assert set(ops.blas_choice.measured_ms[key]) == {"cublas", "cublaslt"}
    assert torch.backends.cuda.preferred_blas_library() == before
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    with blas_choice.preferred_library(library):
        eager = F.linear(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.linear(x, w)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert len(ops.blas_choice.choices) == 1 and torch.backends.cuda.preferred_blas_library() == before
