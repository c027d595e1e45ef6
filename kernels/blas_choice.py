"""cuBLAS or cuBLASLt for each dense linear of the decode step, measured on the device at first use.

    y = choice.linear(x, weight, bias)   # F.linear, through the library measured faster for this shape

torch sends a bf16/fp16 `F.linear` to one of two libraries, cuBLAS or cuBLASLt
(`torch.backends.cuda.preferred_blas_library`), and their heuristics pick different kernels at
decode's skinny M: on the H200 (benchmarks/blas_backend_ab.py, run 57; us, cuBLAS / cuBLASLt)
Llama-2-7B's out-projection at M 32 16.6 / 15.0 and its down projection at M 64 31.3 / 27.7,
but Llama-3.1-8B's down projection at M 8-16 34.6 / 37.4 and at M 128 38.2 / 41.4. Neither wins
everywhere, and the process-wide setting is read when a GEMM is launched, so each call sets the
library measured faster for its key and puts the previous setting back; a CUDA-graph capture
records the chosen library's kernel.

The key is (device, dtype, in and out features, the weight's strides, bias, M bucket): M
rounded up to a power of two (>= 8), measured at the bucket's largest M, so a prefill chunk of
any length up to MAX_MEASURED_M rows costs at most the few measurements its bucket needs; more
rows take torch's default unmeasured.
Measured like kernels/mlp_dispatch.py's plans: outside any capture (DecodeGraphs runs each
bucket eagerly before capturing it), each library's call captured in a CUDA graph and its
replays timed with L2 flushed (kernels/graph_timer.py). cuBLASLt is chosen only when MARGIN
faster than cuBLAS, so timing noise does not move a shape away from the library torch uses by
default. A miss while capturing runs torch's default and measures nothing. Either library
computes the same product up to rounding order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.graph_timer import GraphTimer

log = logging.getLogger(__name__)

LIBRARIES = ("cublas", "cublaslt")
MAX_MEASURED_M = 256  # rows of the largest decode bucket measured; more rows: torch's default
MARGIN = 0.03  # cuBLASLt must be this much faster than cuBLAS to be chosen
REPS = 9  # timed replays per library (median)


@dataclass(frozen=True)
class LinearKey:
    device: str
    dtype: torch.dtype
    in_features: int
    out_features: int
    weight_strides: tuple[int, ...]  # a transposed view runs other kernels than a row-major weight
    bias: bool
    m: int  # the M bucket: rows rounded up to a power of two, >= 8


def m_bucket(rows: int) -> int:
    """Largest M of rows' bucket: the next power of two, at least 8."""
    return max(8, 1 << (rows - 1).bit_length())


def choose_library(times_ms: dict[str, float], margin: float = MARGIN) -> str:
    """cuBLASLt where it timed at least `margin` faster than cuBLAS, else cuBLAS."""
    return "cublaslt" if times_ms["cublaslt"] < (1.0 - margin) * times_ms["cublas"] else "cublas"


@contextlib.contextmanager
def preferred_library(name: str) -> Iterator[None]:
    """torch's BLAS library for the calls inside, the previous choice restored after."""
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


class BlasChoice:
    """Libraries by key, measured on first use (see the module docstring); one per KernelOps."""

    def __init__(self, reps: int = REPS) -> None:
        self.reps = reps
        self.choices: dict[LinearKey, str] = {}
        self.measured_ms: dict[LinearKey, dict[str, float]] = {}
        self._timer: GraphTimer | None = None

    @staticmethod
    def _measurable(x: torch.Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    def _capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias) [..., out_features], through the measured library."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0 or rows > MAX_MEASURED_M or not self._measurable(x):
            return F.linear(x, weight, bias)
        key = LinearKey(str(x.device), x.dtype, weight.shape[1], weight.shape[0], tuple(weight.stride()),
                        bias is not None, m_bucket(rows))
        library = self.choices.get(key)
        if library is None:
            if self._capturing():  # cannot time here: torch's default, nothing cached
                return F.linear(x, weight, bias)
            library = self.choices[key] = self._measure(key, weight, bias)
        with preferred_library(library):
            return F.linear(x, weight, bias)

    def _measure(self, key: LinearKey, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        """Both libraries timed at the bucket's largest M (random rows, never zeros)."""
        if self._timer is None:
            self._timer = GraphTimer(weight.device, self.reps)
        gen = torch.Generator(device="cpu").manual_seed(key.m)
        x = torch.randn(key.m, key.in_features, generator=gen).to(device=weight.device, dtype=weight.dtype)
        times = {}
        for library in LIBRARIES:
            with preferred_library(library):
                times[library] = self._timer(lambda: F.linear(x, weight, bias))
        self.measured_ms[key] = times
        library = choose_library(times)
        log.info("linear %d -> %d%s M %d %s: %s (cublas %.4f ms, cublaslt %.4f ms)", key.in_features,
                 key.out_features, " + bias" if key.bias else "", key.m, key.dtype, library, times["cublas"],
                 times["cublaslt"])
        return library
