"""Gather-GEMM pair or dense cuBLAS for a neuron-sparse ReLU MLP, chosen per (layer shape, M bucket, k).

    y = KernelOps.sparse_mlp(x, w1, b1, w2t, idx)   # [M, d] = relu(x @ w1[idx].T + b1[idx]) @ w2t[idx]

(no fc2 bias: under tensor parallelism the caller adds it once, after the all-reduce). Two plans
compute that same function:
* GATHER: gather_fc1 + gather_fc2 (kernels/gather_gemm.py), reading only the k selected rows of
  each weight, with the work split (K slices or stream-K) the measurement picked;
* DENSE: cuBLAS on the full weights with the unselected neurons zeroed. h = relu(x @ w1.T + b),
  where b is b1 on the selected neurons and the dtype's lowest finite value elsewhere, so an
  unselected neuron's pre-activation is <= 0 (or -inf) and its ReLU exactly 0; then y = h @ w2t.
  The mask rides in cuBLAS's bias epilogue, so it costs one N-element kernel
  (kernels/masked_bias.py), not an [M, N] pass. (cuBLASLt's ReLU epilogue, torch._addmm_activation,
  timed 2-3 us faster at M 64 and up to 26 us slower at OPT-66B M 256, where DENSE is chosen.)
  With k = N (density 1.0) there is nothing to mask: plain dense MLP. idx must hold
  distinct ids (union_topk_neurons does), else GATHER counts a repeated neuron twice.
Either plan gives the same result up to rounding: the choice changes speed, never which
neurons count, so ranks of one tensor-parallel group may choose differently.

Why measured on the device at first use, and not a committed JSON table. A table measured by
benchmarks/kernel_bench.py holds only the GPU, software versions and shapes it was measured on
(an H100 run says nothing about an H200, a Triton upgrade moves the crossover, tensor
parallelism cuts N by tp), so it needs a fallback for every other case and goes stale without
notice; timing both plans on the device where they will run is right by construction and costs
a few ms per key. What decides correctness is CUDA-graph capture: the runtime captures decode
once per batch bucket and replays that graph, so the plan of each bucket must be fixed before
its capture and must never need a host sync inside it. Measuring is a sync, so it happens only
outside any capture: DecodeGraphs runs every bucket eagerly twice (on a side stream) before
capturing it, and the first of those calls measures and caches the plan; the capture and every
replay then run the cached plan. A miss while capturing (a caller that captures without that
warm-up) cannot measure: it runs the static plan (GATHER with the cost-model splits; DENSE at
k = N), logs a warning and caches nothing, so a later eager call still measures.

The key: (device, dtype, d, N, M bucket, full last tile, k bin). M buckets are the tile table's
ranges (<= 16, 32, 64, 128, 256, then multiples of 256). A batch whose last M tile is full (M
the bucket's largest, or a multiple of 256) runs the kernels as built for it and is measured at
the bucket's largest M; any other masks the rows past M off (kernels/gather_gemm_kernels.py), a
build of its own whose best work split can differ (H200 run 63: fc2 as stream-K with 2
programs per SM 1.4x slower masked, the other splits not), so it is keyed apart and measured
one row short of the bucket's largest M. k bins are N/32 wide, measured at the bin's largest
k, so a bin's plan is measured at its most expensive GATHER. Each candidate is captured in a CUDA graph (as decode
runs it; host launch time drops out) and its replays are timed with L2 flushed before each, as
every layer's weights are cold when its turn comes. GATHER's fc1 and fc2 are timed separately
at split counts around the cost model's (1, s / 2, s, 2 s) and as stream-K (1 and 2 programs
per SM: every program reads the same bytes, so no SM idles while others finish a second tile),
on each of gather_gemm's tile candidates for M (two at M 129-256), and the fastest of each is
kept.
With PDL (KernelOps(pdl=True)), a GATHER plan whose fc1 + fc2 measured under PDL_MAX_PAIR_MS
launches the pair with programmatic dependent launch (fc2 asks L2 for its first weight rows while
fc1 drains): 2-12% faster below ~50 us, while longer pairs gained nothing and lost up to 17% at
OPT-30B M 128 (run 44, benchmarks/mlp_pdl_ab.py; fc2 waiting at a split-K grid smaller than the
GPU's slots: probably its early-dispatched programs pile onto the SMs that free up first).
On the CPU nothing is measured: the torch references (Backend.TORCH), or the kernels in the
interpreter when Backend.TRITON is forced there.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kernels import gather_gemm
from kernels.graph_timer import REPS, GraphTimer
from kernels.gather_gemm import GemmConfig
from kernels.masked_bias import masked_bias, masked_bias_ref

log = logging.getLogger(__name__)

K_BINS = 32  # k is keyed in bins of N / K_BINS neurons
PDL_MAX_PAIR_MS = 0.050  # a GATHER pair measured (fc1 + fc2, one replay each) shorter than this uses PDL
STREAM_CANDIDATES = (1, 2)  # stream-K programs per SM timed next to the tile grid's splits


class MlpPath(enum.Enum):
    GATHER = "gather"
    DENSE = "dense"


@dataclass(frozen=True)
class MlpKey:
    device: str
    dtype: torch.dtype
    d: int
    n: int  # neurons this rank holds (N_local under tensor parallelism)
    m_bucket: int  # largest M of the bucket
    full_tile: bool  # M fills its last M tile (no rows masked off)
    k_bin: int  # largest k of the bin


@dataclass(frozen=True)
class MlpPlan:
    path: MlpPath
    fc1: GemmConfig | None = None  # GATHER: the configs measured fastest; None = gather_gemm's own
    fc2: GemmConfig | None = None
    pdl: bool = False  # GATHER: launch the pair with PDL when the ops do (a pair measured short)
    measured_ms: dict[str, float] = field(default_factory=dict, compare=False)  # candidate -> median ms

    def describe(self) -> str:
        if self.path is MlpPath.DENSE:
            return "dense"
        splits = "" if self.fc1 is None or self.fc2 is None else f" ({work_split(self.fc1)}/{work_split(self.fc2)})"
        return f"gather{splits}{', pdl' if self.pdl else ''}"


def work_split(config: GemmConfig) -> str:
    """How a config spreads the work: "split<s>" (a grid of tiles, K in s slices) or "stream<n>"
    (stream-K, n programs per SM), and on which tile where M's range has more than one
    (gather_gemm.tile_candidates): "split2 n128k64"."""
    split = f"stream{config.stream}" if config.stream else f"split{config.split_k}"
    tiles = gather_gemm.tile_candidates(config.block_m, fc1=True) + gather_gemm.tile_candidates(config.block_m, fc1=False)
    if len({(t.block_n, t.block_k) for t in tiles}) == 1:
        return split
    return f"{split} n{config.block_n}k{config.block_k}"


def m_bucket(m: int) -> int:
    """Largest M of m's bucket: the gather-GEMM tile table's M ranges, then multiples of 256."""
    for max_m, *_ in gather_gemm._M_TILES:
        if m <= max_m:
            return max_m
    return -(-m // gather_gemm.MAX_BLOCK_M) * gather_gemm.MAX_BLOCK_M


def full_tile(m: int) -> bool:
    """Whether M rows fill their last M tile (the gather pair then masks no row off)."""
    return m % gather_gemm.tile_config(m, fc1=True).block_m == 0


def k_bin(k: int, n: int) -> int:
    """Largest k of k's bin: bins of n / K_BINS neurons, below n (k = n, density 1.0, is DENSE unmeasured)."""
    if k >= n:
        return n
    index = -(-k * K_BINS // n)  # 1..K_BINS
    return min(n - 1, -(-index * n // K_BINS))


def dense_masked_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor,
                     idx: torch.Tensor) -> torch.Tensor:
    """The DENSE plan: relu(x @ w1.T + b masked to idx) @ w2t; any device (the torch path at k = N)."""
    n = w1.shape[0]
    if idx.shape[0] == n:  # every neuron selected: nothing to mask
        return F.linear(x, w1, b1).relu_() @ w2t
    build = masked_bias if x.is_cuda else masked_bias_ref  # one kernel on the GPU, three torch ops elsewhere
    h = F.linear(x, w1, build(b1, idx, n, x.dtype, x.device)).relu_()  # (M, N); unselected columns exactly 0
    return h @ w2t  # (M, d)


def gather_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor, idx: torch.Tensor,
               plan: MlpPlan | None = None, pdl: bool = False) -> torch.Tensor:
    """The GATHER plan: gather_fc2(gather_fc1(...)) with the plan's configs. pdl: both launched
    with programmatic dependent launch, fc2's first weight rows requested while fc1 runs."""
    fc1, fc2 = (None, None) if plan is None else (plan.fc1, plan.fc2)
    h = gather_gemm.gather_fc1(x, w1, idx, b1, config=fc1, pdl=pdl)  # (M, k)
    return gather_gemm.gather_fc2(h, w2t, idx, None, config=fc2, pdl=pdl)  # (M, d)


def run_plan(plan: MlpPlan, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor,
             idx: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """The plan's path; pdl: the caller's kernels may use PDL, which the pair does where the plan says."""
    if plan.path is MlpPath.DENSE:
        return dense_masked_mlp(x, w1, b1, w2t, idx)
    return gather_mlp(x, w1, b1, w2t, idx, plan, pdl and plan.pdl)


class MlpDispatch:
    """Plans by key, measured on first use (see the module docstring); one per KernelOps."""

    def __init__(self, reps: int = REPS) -> None:
        self.reps = reps
        self.plans: dict[MlpKey, MlpPlan] = {}

    @staticmethod
    def _measurable(x: torch.Tensor) -> bool:
        return x.device.type == "cuda"

    @staticmethod
    def _capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()

    def plan(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor,
             k: int) -> MlpPlan:
        """The plan for M = x.shape[0] rows and k selected neurons of w1 [N, d]."""
        n = w1.shape[0]
        if k >= n:
            return MlpPlan(MlpPath.DENSE)  # density 1.0: cuBLAS, nothing to measure
        if not self._measurable(x):
            return MlpPlan(MlpPath.GATHER)  # the interpreter: nothing to time
        m = x.shape[0]
        key = MlpKey(str(x.device), x.dtype, x.shape[1], n, m_bucket(m), full_tile(m), k_bin(k, n))
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        if self._capturing():
            log.warning("sparse MLP %s: no measured plan while capturing a CUDA graph; running the static gather "
                        "plan (run the shape once eagerly before capture to measure it)", key)
            return MlpPlan(MlpPath.GATHER)
        plan = self.plans[key] = self._measure(key, w1, b1, w2t)
        log.info("sparse MLP d=%d N=%d M<=%d k<=%d %s: %s; %s", key.d, key.n, key.m_bucket, key.k_bin, key.dtype,
                 plan.describe(), ", ".join(f"{c} {ms:.4f} ms" for c, ms in plan.measured_ms.items()))
        return plan

    def _measure(self, key: MlpKey, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor) -> MlpPlan:
        """Time DENSE and GATHER's kernels (each tile candidate at its work splits) at the key's M
        (the bucket's largest, one less for a part-empty last tile) and largest k (random x and idx)."""
        m, k, d, n = key.m_bucket - (not key.full_tile), key.k_bin, key.d, key.n
        dev = w1.device
        gen = torch.Generator(device="cpu").manual_seed(k * 131 + m)
        x = torch.randn(m, d, generator=gen).to(device=dev, dtype=w1.dtype)  # random, never zeros
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(device=dev, dtype=torch.int32)
        h = gather_gemm.gather_fc1(x, w1, idx, b1)  # fc2's input
        sms = gather_gemm._num_sms(dev)
        timer = GraphTimer(dev, self.reps)
        dense_ms = timer(lambda: dense_masked_mlp(x, w1, b1, w2t, idx))
        fc1: dict[GemmConfig, float] = {}
        fc2: dict[GemmConfig, float] = {}
        for times, n_out, k_loop, is_fc1 in ((fc1, k, d, True), (fc2, d, k, False)):
            candidates = []
            for tile in gather_gemm.tile_candidates(m, is_fc1):
                split = gather_gemm.choose_split(m, n_out, k_loop, tile, sms)
                candidates += [replace(tile, split_k=s) for s in split_candidates(split, k_loop, tile.block_k)]
                candidates += [replace(tile, split_k=1, stream=n) for n in STREAM_CANDIDATES]
            for c in candidates:
                times[c] = timer((lambda c=c: gather_gemm.gather_fc1(x, w1, idx, b1, config=c)) if is_fc1
                                 else (lambda c=c: gather_gemm.gather_fc2(h, w2t, idx, None, config=c)))
        return choose_plan(dense_ms, fc1, fc2)


def choose_plan(dense_ms: float, fc1: dict[GemmConfig, float], fc2: dict[GemmConfig, float]) -> MlpPlan:
    """GATHER with the fastest fc1 and fc2 configs if their sum beats DENSE, else DENSE (ties: DENSE,
    which reads every weight once and needs no split); PDL for a pair under PDL_MAX_PAIR_MS."""
    best1 = min(fc1, key=lambda c: (fc1[c], c.stream, c.split_k))
    best2 = min(fc2, key=lambda c: (fc2[c], c.stream, c.split_k))
    gather_ms = fc1[best1] + fc2[best2]
    times = {"dense": dense_ms, "gather": gather_ms}
    times.update({f"fc1_{work_split(c)}": t for c, t in fc1.items()})
    times.update({f"fc2_{work_split(c)}": t for c, t in fc2.items()})
    path = MlpPath.GATHER if gather_ms < dense_ms else MlpPath.DENSE
    return MlpPlan(path, best1, best2, path is MlpPath.GATHER and gather_ms < PDL_MAX_PAIR_MS, times)


def split_candidates(s: int, k_loop: int, block_k: int) -> list[int]:
    """1, s / 2, s and 2 s, within gather_gemm's limits (at most 8, no split under 2 K tiles)."""
    out = []
    for c in (1, max(1, s // 2), s, 2 * s):
        if c not in out and c <= gather_gemm._MAX_SPLITS and (c == 1 or k_loop // c >= 2 * block_k):
            out.append(c)
    return out
