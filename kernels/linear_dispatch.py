"""cuBLAS or the stream-K skinny GEMM for a dense linear at decode's few rows, per (shape, M bucket).

    y = KernelOps.linear(x, w, bias)   # [M, N] = x [M, K] @ w [N, K].T + bias

At decode, M (the batch) is 1-256 rows against thousands of weight rows, so a linear is a read of
its weight, and its time is how close the kernel comes to the copy bandwidth. cuBLAS tiles the
output and, where the tiles are fewer than the SMs, splits K and adds a reduce kernel; with
tiles a little more than the SMs, some SMs read two tiles while others idle (wave quantisation).
gather_gemm.skinny_linear with a stream-K config gives every program the same number of K steps
whatever the tile count, and the last program holding a piece of a cut tile finishes it in the
same launch. Which is faster depends on the shape and the GPU, so it is timed on the device at
first use of a key (device, dtype, N, K, bias, M bucket), as kernels/mlp_dispatch.py times its
plans, and only outside a CUDA-graph capture (DecodeGraphs runs each bucket eagerly before
capturing it); a miss while capturing runs cuBLAS and caches nothing. Off CUDA, for M past the
tile table or for shapes the kernel does not take, it is always F.linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kernels import gather_gemm
from kernels.gather_gemm import GemmConfig
from kernels.graph_timer import REPS, GraphTimer
from kernels.mlp_dispatch import m_bucket

log = logging.getLogger(__name__)

STREAM_CANDIDATES = (1, 2)  # stream-K programs per SM timed against cuBLAS
MARGIN = 0.02  # the kernel must beat cuBLAS by this fraction (timing noise is ~1%)


@dataclass(frozen=True)
class LinearKey:
    device: str
    dtype: torch.dtype
    n: int
    k: int
    bias: bool
    m_bucket: int


@dataclass(frozen=True)
class LinearPlan:
    config: GemmConfig | None  # None: cuBLAS
    measured_ms: dict[str, float] = field(default_factory=dict, compare=False)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the skinny kernel can run this call at all (else it is F.linear, unmeasured)."""
    return (x.device.type == "cuda" and x.dim() == 2 and 0 < x.shape[0] <= gather_gemm.MAX_BLOCK_M
            and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype and x.shape[1] % 16 == 0
            and x.stride(1) == 1 and w.is_contiguous())


class LinearDispatch:
    """Plans by key, measured on first use (see the module docstring); one per KernelOps."""

    def __init__(self, reps: int = REPS) -> None:
        self.reps = reps
        self.plans: dict[LinearKey, LinearPlan] = {}

    @staticmethod
    def _capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()

    def plan(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> LinearPlan:
        if not takes(x, w):
            return LinearPlan(None)
        key = LinearKey(str(x.device), x.dtype, w.shape[0], w.shape[1], bias is not None, m_bucket(x.shape[0]))
        plan = self.plans.get(key)
        if plan is None:
            if self._capturing():
                return LinearPlan(None)
            plan = self.plans[key] = self._measure(key, w, bias)
            log.info("linear N=%d K=%d M<=%d %s: %s; %s", key.n, key.k, key.m_bucket, key.dtype,
                     "cublas" if plan.config is None else f"stream{plan.config.stream}",
                     ", ".join(f"{c} {ms:.4f} ms" for c, ms in plan.measured_ms.items()))
        return plan

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        config = self.plan(x, w, bias).config
        return F.linear(x, w, bias) if config is None else gather_gemm.skinny_linear(x, w, bias, config)

    def _measure(self, key: LinearKey, w: torch.Tensor, bias: torch.Tensor | None) -> LinearPlan:
        """Time cuBLAS and stream-K at the bucket's largest M (random x)."""
        gen = torch.Generator(device="cpu").manual_seed(key.n * 7 + key.m_bucket)
        x = torch.randn(key.m_bucket, key.k, generator=gen).to(device=w.device, dtype=w.dtype)
        timer = GraphTimer(w.device, self.reps)
        times = {"cublas": timer(lambda: F.linear(x, w, bias))}
        base = gather_gemm.tile_config(key.m_bucket, fc1=True)
        configs = {f"stream{n}": replace(base, stream=n) for n in STREAM_CANDIDATES}
        for name, c in configs.items():
            times[name] = timer(lambda c=c: gather_gemm.skinny_linear(x, w, bias, c))
        return choose(times, configs)


def choose(times: dict[str, float], configs: dict[str, GemmConfig]) -> LinearPlan:
    """The fastest stream-K config if it beats cuBLAS by MARGIN, else cuBLAS."""
    best = min(configs, key=lambda name: times[name])
    faster = times[best] < (1.0 - MARGIN) * times["cublas"]
    return LinearPlan(configs[best] if faster else None, dict(times))
