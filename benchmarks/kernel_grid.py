"""The kernels under serving conditions: `benchmarks/kernel_bench.py --grid`.

    python3 benchmarks/kernel_bench.py --grid --out $OUT               # one H200: ~4 min
    python3 benchmarks/kernel_bench.py --grid --smoke --out /tmp/grid  # CPU: tiny cases, torch references
    python3 benchmarks/kernel_bench.py --plot-from $OUT/kernels_grid.json

Writes <out>/kernels_grid.json ({"grid": true, device, versions, copy_TBps, complete, rows,
skipped}; rewritten after every case, so a run stopped early keeps what it timed) and
kernels_grid.png (% of floor per case, one panel per family). Rows are kernels.json rows (op,
shape, dtype, density, variant, ms) plus family and floor_ms. `ours` is what the runtime runs:
KernelOps.select_attention, and KernelOps.sparse_mlp with its dispatch (gather pair or dense
cuBLAS, measured at first use; the row's `plan` says which, with the dispatch's own timings).
Baselines of the same run: `sdpa_dense` (torch SDPA over a contiguous cache of the same bytes:
B sequences of the mean length, density 1.0), `cublas_dense` (relu(x W1^T + b1) W2^T, the
runtime's dense MLP) and, where the dispatch chose dense, `gather` (the pair with its measured
configs) so every MLP case has the kernel's time. Floors: attention = selected KV bytes (the
real lengths x selected groups x D x K and V) / copy bandwidth; MLP = max(selected weight bytes
/ copy bandwidth, FLOPs / 650 TFLOP/s). Timing: kernel_bench._bench (CUDA-graph replays,
median of 50, L2 flushed by a read before each; rows before run 36 flushed by a write, up to 8
us slower per replay: benchmarks/timer_flush_ab.py). Each timed row also carries `ms_in_graph`
(from run 39): the call inside a graph of 10 flushed calls, less the flushes alone
(GraphTimer.in_graph), i.e. without the graph launch that a one-kernel replay pays and a decode
step pays once for ~400 kernels; the summary counts the attention target under both.

The subset. The full cross product (6 batches x 3 length distributions x 3 longest contexts x
6 head configurations x 5 densities x 2 dtypes, and 4 x 6 x 7 MLP cases) is ~3,300 timings,
over 6 minutes at ~0.1 s each. What each axis changes in these kernels decides where it is
crossed with the others:
* batch x density x length distribution interact (the split plan depends on B x k_max and the
  per-sequence lengths; density sets the grid): crossed in full, family `attn-4k`, for the three
  head configurations of the recorded runs (MHA 32 and 72, GQA 32/8), D 128, longest 4k, bf16;
* the longest context changes tokens per program (and the split rule's band): family
  `attn-context`, 1k / 4k / 16k x B 1, 8, 64, 256 x uniform and one-long x density 0.3, 1.0, on a
  64-head MHA (the third MHA size);
* head dim 64 changes the tile's bytes, not the plan: family `attn-d64`, MHA 32 and GQA 32/8 x B
  8, 64, 256 x uniform and spread x density 0.2, 0.5, 1.0;
* head dims between powers of two run a main and a tail tile (80, 96: 64 + 32): family `attn-headdim`,
  MHA 32 at D 80 (OPT-2.7B) and GQA 32/8 at D 96 x B 8, 64, 256 x uniform and spread x density
  0.3, 1.0;
* dtype: fp16 and bf16 run the same code at the same bytes: family `attn-fp16`, B 8, 64, 256,
  uniform, density 0.3 and 1.0;
* table width: a block table padded to 32k tokens (what the CUDA-graph path passes, with
  max_seq_len 32k) is the default everywhere; family `attn-width` adds tables exactly as wide as
  the longest sequence (1k and 4k) and the 32k one at 1k, to show what the padding costs;
* MLP: every M x density for OPT-6.7B/13B/30B/66B (d, N = 4d; one rank), bf16, families
  `mlp-<model>`; fp16 at OPT-66B M 16 and 128, density 0.1 and 0.5 (`mlp-fp16`); batches that
  are not a power of two (M 48, 96, 200 at OPT-13B and 66B, densities 0.1-1.0: `mlp-odd-m`).
Skipped, and listed in `skipped`: cases whose KV would pass MAX_KV_BYTES (the cache and the
SDPA baseline's copy must fit beside each other), B = 1 with a non-uniform distribution (the
same single sequence), and densities that round to the same number of KV groups as another.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench import BLOCK_SIZE, _block_table, _head_table, _paged_kv, runtime_plan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MMA_FLOP_PER_S = 650e12  # the MLP floor's FLOP term (cuBLAS dense reached 630-730 TFLOP/s on H100)
MAX_KV_BYTES = 40e9  # paged cache per case; the SDPA baseline copies as much again
TABLE_TOKENS = 32768  # the block table's width unless a case says otherwise
SECONDS_PER_TIMING = 0.03  # _bench on a warm kernel: the capture and 51 replays after a 0.2 GB read
COMPILE_SECONDS = 60  # Triton builds of the attention and gather-GEMM variants the grid meets, once each


@dataclass(frozen=True)
class Heads:
    name: str
    hq: int
    hkv: int
    d: int


@dataclass(frozen=True)
class AttnCase:
    """One KV cache (heads, batch, lengths, table); each density of it is one timed row."""
    family: str
    heads: Heads
    batch: int
    dist: str  # uniform | spread (10% to 100% of the longest) | one_long (one longest, the rest longest / 16)
    longest: int
    table_tokens: int
    dtype: str
    densities: tuple[float, ...]


@dataclass(frozen=True)
class MlpCase:
    family: str
    name: str
    d: int
    n: int
    m: int
    dtype: str
    fracs: tuple[float, ...]


LLAMA2 = Heads("mha-32", 32, 32, 128)
OPT66 = Heads("mha-72", 72, 72, 128)
GQA = Heads("gqa-32/8", 32, 8, 128)
MHA64 = Heads("mha-64", 64, 64, 128)
OPT27 = Heads("mha-32-d80", 32, 32, 80)  # OPT-2.7B: a head dim between powers of two
GQA96 = Heads("gqa-32/8-d96", 32, 8, 96)
BATCHES = (1, 8, 32, 64, 128, 256)
DISTS = ("uniform", "spread", "one_long")
DENSITIES = (0.2, 0.3, 0.5, 0.75, 1.0)
OPT_SHAPES = (("opt-6.7b", 4096), ("opt-13b", 5120), ("opt-30b", 7168), ("opt-66b", 9216))  # (name, d); N = 4d
MLP_MS = (1, 16, 32, 64, 128, 256)
MLP_FRACS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def attention_cases() -> list[AttnCase]:
    cases = []
    for heads in (LLAMA2, OPT66, GQA):
        cases += [AttnCase("attn-4k", heads, b, dist, 4096, TABLE_TOKENS, "bfloat16", DENSITIES)
                  for b in BATCHES for dist in DISTS]
    cases += [AttnCase("attn-context", MHA64, b, dist, longest, TABLE_TOKENS, "bfloat16", (0.3, 1.0))
              for longest in (1024, 4096, 16384) for b in (1, 8, 64, 256) for dist in ("uniform", "one_long")]
    cases += [AttnCase("attn-d64", Heads(h.name + "-d64", h.hq, h.hkv, 64), b, dist, 4096, TABLE_TOKENS, "bfloat16",
                       (0.2, 0.5, 1.0))
              for h in (LLAMA2, GQA) for b in (8, 64, 256) for dist in ("uniform", "spread")]
    cases += [AttnCase("attn-fp16", LLAMA2, b, "uniform", 4096, TABLE_TOKENS, "float16", (0.3, 1.0))
              for b in (8, 64, 256)]
    cases += [AttnCase("attn-width", LLAMA2, b, "spread", longest, width, "bfloat16", (0.3, 1.0))
              for longest, width in ((1024, 1024), (1024, TABLE_TOKENS), (4096, 4096)) for b in (8, 64)]
    # last: a case's lengths are drawn from a seed of its index, which benchmarks/plan_model_fit.py
    # replays against the grids recorded before this family
    cases += [AttnCase("attn-headdim", heads, b, dist, 4096, TABLE_TOKENS, "bfloat16", (0.3, 1.0))
              for heads in (OPT27, GQA96) for b in (8, 64, 256) for dist in ("uniform", "spread")]
    return cases


def mlp_cases() -> list[MlpCase]:
    cases = [MlpCase(f"mlp-{name}", name, d, 4 * d, m, "bfloat16", MLP_FRACS) for name, d in OPT_SHAPES for m in MLP_MS]
    cases += [MlpCase("mlp-fp16", "opt-66b", 9216, 4 * 9216, m, "float16", (0.1, 0.5)) for m in (16, 128)]
    # last (a case's selection is drawn from a seed of its index): batches that are not a power of
    # two, whose last M tile is part empty
    cases += [MlpCase("mlp-odd-m", name, d, 4 * d, m, "bfloat16", (0.1, 0.3, 0.5, 1.0))
              for name, d in (("opt-13b", 5120), ("opt-66b", 9216)) for m in (48, 96, 200)]
    return cases


def smoke_cases() -> tuple[list[AttnCase], list[MlpCase]]:
    """A few tiny cases for the CPU: every code path of the grid, in seconds."""
    heads = Heads("mha-4", 4, 4, 32)
    attn = [AttnCase("attn-smoke", heads, 3, dist, 64, 128, "bfloat16", (0.5, 1.0)) for dist in ("uniform", "spread")]
    attn.append(AttnCase("attn-smoke", Heads("gqa-4/2", 4, 2, 32), 1, "uniform", 64, 128, "bfloat16", (0.3, 0.5)))
    mlp = [MlpCase("mlp-smoke", "tiny", 64, 256, m, "bfloat16", (0.1, 1.0)) for m in (1, 5)]
    return attn, mlp


def expected_tokens(case: AttnCase) -> float:
    """Cached tokens of the case's batch (the mean of spread's lengths for spread)."""
    b, n = case.batch, case.longest
    return {"uniform": b * n, "spread": n + (b - 1) * 0.55 * n, "one_long": n + (b - 1) * max(1, n // 16)}[case.dist]


def kv_bytes(case: AttnCase) -> float:
    return expected_tokens(case) * case.heads.hkv * case.heads.d * 2 * 2  # K and V, 2-byte elements


def k_groups(case: AttnCase) -> list[int]:
    """Distinct numbers of selected KV groups for the case's densities (a density that rounds
    to a count already timed is dropped)."""
    out: list[int] = []
    for dens in case.densities:
        k = max(1, round(dens * case.heads.hkv))
        if k not in out:
            out.append(k)
    return out


def skip_reason(case: AttnCase) -> str | None:
    if case.batch == 1 and case.dist != "uniform":
        return "B = 1: every distribution is the one sequence"
    if kv_bytes(case) > MAX_KV_BYTES:
        return f"KV {kv_bytes(case) / 1e9:.0f} GB > {MAX_KV_BYTES / 1e9:.0f} GB"
    return None


def lengths(case: AttnCase, gen: torch.Generator) -> list[int]:
    """The batch's lengths; the first sequence is always the longest."""
    b, n = case.batch, case.longest
    if case.dist == "uniform":
        return [n] * b
    if case.dist == "one_long":
        return [n] + [max(1, n // 16)] * (b - 1)
    return [n] + torch.randint(max(1, n // 10), n + 1, (b - 1,), generator=gen).tolist()


def attention_floor_ms(tokens: int, k: int, head_dim: int, elt: int, bw_tbps: float) -> float:
    """Selected K and V bytes over the copy bandwidth: every cached token of each selected group."""
    return tokens * k * head_dim * 2 * elt / (bw_tbps * 1e12) * 1e3


def mlp_floor_ms(m: int, k: int, d: int, elt: int, bw_tbps: float) -> float:
    """max(the k selected rows of W1 and W2 over the copy bandwidth, 4 M k d FLOPs at 650 TFLOP/s)."""
    return max(2 * k * d * elt / (bw_tbps * 1e12), 4 * m * k * d / MMA_FLOP_PER_S) * 1e3


def timings(attn: list[AttnCase], mlp: list[MlpCase]) -> int:
    """Timed variants of a run (ours per density, one baseline per case; the MLP's `gather` row
    at most once per case beside ours)."""
    n = 0
    for c in attn:
        if skip_reason(c) is None:
            n += sum(len(plan_variants(c, k)) for k in k_groups(c)) + 1
    for c in mlp:
        n += 2 * len(c.fracs) + 1
    return n


def estimate_seconds(attn: list[AttnCase], mlp: list[MlpCase]) -> float:
    return timings(attn, mlp) * SECONDS_PER_TIMING + COMPILE_SECONDS


def _row(rows: list, op: str, family: str, shape: dict, dtype: str, density: float, variant: str, ms: float,
         floor_ms: float, **more) -> None:
    rows.append({"op": op, "family": family, "shape": shape, "dtype": dtype, "density": density, "variant": variant,
                 "ms": ms, "floor_ms": floor_ms, **more})


# Planner rules timed beside the default (attn-4k cases at densities 0.3 and 0.5): the fixed
# program counts per SM of the rule before the wave-filling cut (16 was its default) and the
# shortest chunk (benchmarks/KERNELS_NOTES.md, "Work plan", "Attention programs in whole waves").
PLAN_SWEEP = {"plan_pps16": {"programs_per_sm": 16}, "plan_pps8": {"programs_per_sm": 8},
              "plan_pps32": {"programs_per_sm": 32},
              "plan_min128": {"min_chunk": 128}, "plan_min512": {"min_chunk": 512}}


def plan_variants(case: AttnCase, k: int) -> list[tuple[str, dict]]:
    out = [("ours", {})]
    if case.family == "attn-4k" and round(0.3 * case.heads.hkv) <= k <= round(0.5 * case.heads.hkv):
        out += list(PLAN_SWEEP.items())
    if case.family in ("attn-4k", "attn-d64"):  # the A/B of the grid: persistent, 2 programs per SM
        from kernels.attention_builds import AttentionConfig

        out.append(("persistent_grid", {"config": AttentionConfig(resident_per_sm=2)}))
    return out


def plan_host_us(batch: int = 256, repeats: int = 200) -> dict:
    """Host time of one step's plan at `batch` (spread lengths up to 8k, 8 groups, 132 SMs): the
    runtime's StepPlanner over consecutive decode steps (every length + 1 a step), and
    plan_attention choosing the cut afresh each time."""
    from kernels.attention_plan import StepPlanner, plan_attention

    lens = torch.randint(100, 8193, (batch,), generator=torch.Generator().manual_seed(0)).numpy()
    planner = StepPlanner(8, 132)
    cap = planner.capacity(batch)
    planner.plan(lens, cap)
    steps, fresh = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        planner.plan(lens + i + 1, cap)
        steps.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        plan_attention(lens, groups=8, num_sms=132, capacity=cap)
        fresh.append((time.perf_counter() - t0) * 1e6)
    return {"op": "plan", "batch": batch, "median_us": statistics.median(steps), "p99_us": sorted(steps)[-2],
            "fresh_median_us": statistics.median(fresh), "fresh_p99_us": sorted(fresh)[-2]}


def run_attention(case: AttnCase, ops, timer: Callable, bw: float, rows: list, device: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, dtype = case.heads, DTYPES[case.dtype]
    lens = lengths(case, gen)
    kc, vc, perm = _paged_kv(lens, h.hkv, h.d, dtype, gen, device)
    bt = _block_table(lens, perm, -(-case.table_tokens // BLOCK_SIZE), device)
    q = torch.randn(len(lens), h.hq, h.d, device=device, dtype=dtype)
    seq_lens = torch.tensor(lens, device=device, dtype=torch.int32)
    out = torch.empty_like(q)
    scale = h.d**-0.5
    tokens = sum(lens)
    shape = {"name": h.name, "B": case.batch, "Hq": h.hq, "Hkv": h.hkv, "D": h.d, "block_size": BLOCK_SIZE,
             "lengths": case.dist, "longest": case.longest, "min_len": min(lens), "max_len": max(lens),
             "mean_len": tokens / len(lens), "table_tokens": case.table_tokens}
    elt = torch.finfo(dtype).bits // 8
    for k in k_groups(case):
        ht = _head_table(case.batch, h.hkv, k, gen, device)
        floor = attention_floor_ms(tokens, k, h.d, elt, bw)
        for variant, rule in plan_variants(case, k):
            plan, info = runtime_plan(lens, k, device, h.d, **{key: v for key, v in rule.items() if key != "config"})
            if "config" in rule:  # a kernel config other than the default: the launch itself
                from kernels.select_attention import _launch

                ms, extra = timer(lambda: _launch(q, kc, vc, bt, seq_lens, ht, scale, out, plan, rule["config"]))
            else:
                ms, extra = timer(lambda: ops.select_attention(q, kc, vc, bt, seq_lens, ht, scale, out, plan))
            _row(rows, "attention", case.family, shape, case.dtype, k / h.hkv, variant, ms, floor, k_max=k,
                 plan=info, **extra)
    del kc, vc
    # SDPA over a contiguous cache of the same bytes: B sequences of the mean length.
    mean_len = max(1, round(tokens / len(lens)))
    kd = torch.randn(case.batch, h.hkv, mean_len, h.d, device=device, dtype=dtype)
    vd = torch.randn_like(kd)
    q4 = q.view(case.batch, h.hq, 1, h.d)
    ms, extra = timer(lambda: F.scaled_dot_product_attention(q4, kd, vd, scale=scale, enable_gqa=h.hq != h.hkv))
    _row(rows, "attention", case.family, shape, case.dtype, 1.0, "sdpa_dense", ms,
         attention_floor_ms(case.batch * mean_len, h.hkv, h.d, elt, bw), **extra)


def run_mlp(case: MlpCase, ops, timer: Callable, bw: float, rows: list, device: str, seed: int) -> None:
    from kernels.mlp_dispatch import MlpPath, run_plan, work_split

    gen = torch.Generator().manual_seed(seed)
    dtype, d, n, m = DTYPES[case.dtype], case.d, case.n, case.m
    w1 = (torch.randn(n, d, device=device, dtype=dtype) / d**0.5)
    w2t = (torch.randn(n, d, device=device, dtype=dtype) / n**0.5)  # fc2.weight.T, as the runtime holds it
    b1 = torch.randn(n, device=device, dtype=dtype)
    x = torch.randn(m, d, device=device, dtype=dtype)
    shape = {"name": case.name, "M": m, "d": d, "N": n}
    elt = torch.finfo(dtype).bits // 8
    ms, extra = timer(lambda: F.linear(F.linear(x, w1, b1).relu_(), w2t.t()))
    _row(rows, "mlp", case.family, shape, case.dtype, 1.0, "cublas_dense", ms, mlp_floor_ms(m, n, d, elt, bw), **extra)
    for frac in case.fracs:
        k = max(1, round(frac * n))
        idx = torch.randperm(n, generator=gen)[:k].sort().values.int().to(device)
        floor = mlp_floor_ms(m, k, d, elt, bw)
        ms, extra = timer(lambda: ops.sparse_mlp(x, w1, b1, w2t, idx))  # the first call measures the plan
        if "error" in extra:  # the failure is in the row; asking for the plan again would raise it again
            _row(rows, "mlp", case.family, shape, case.dtype, k / n, "ours", ms, floor, k=k, **extra)
            continue
        plan = ops.mlp_plan(x, w1, b1, w2t, k)
        plan_row = {"path": plan.path.value, "fc1": work_split(plan.fc1) if plan.fc1 else None,
                    "fc2": work_split(plan.fc2) if plan.fc2 else None, "measured_ms": plan.measured_ms}
        _row(rows, "mlp", case.family, shape, case.dtype, k / n, "ours", ms, floor, k=k, plan=plan_row, **extra)
        if plan.path is MlpPath.DENSE and k < n:
            gather_plan = type(plan)(MlpPath.GATHER, plan.fc1, plan.fc2)
            ms, extra = timer(lambda: run_plan(gather_plan, x, w1, b1, w2t, idx))
            _row(rows, "mlp", case.family, shape, case.dtype, k / n, "gather", ms, floor, k=k, **extra)


def _wall_timer(fn: Callable) -> tuple[float, dict]:
    """The smoke mode's timer: median wall-clock ms of 3 calls after one warm-up (CPU)."""
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), {}


def _cpu_copy_tbps() -> float:
    src = torch.randn(1 << 24)
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    return 4 * 2 * src.numel() * 4 / (time.perf_counter() - t0) / 1e12


def run_grid(out_dir: Path, smoke: bool, only: str | None = None) -> dict:
    """Time every case (smoke: the tiny cases on the CPU with the torch references; only: "attention"
    or "mlp" to time one op); write the JSON and the PNG; return the JSON's dict."""
    from kernels.dispatch import Backend, KernelOps, choose_pdl

    attn, mlp = smoke_cases() if smoke else (attention_cases(), mlp_cases())
    attn, mlp = ([] if only == "mlp" else attn), ([] if only == "attention" else mlp)
    if smoke:
        device, ops, timer, bw = "cpu", KernelOps(Backend.TORCH), _wall_timer, _cpu_copy_tbps()
        versions = {"torch": torch.__version__}
        name = "cpu (smoke: torch references, wall clock)"
    else:
        import triton

        from benchmarks.kernel_bench import _copy_tbps, _try_bench

        device, bw = "cuda", _copy_tbps()
        ops = KernelOps(Backend.TRITON, pdl=choose_pdl(True, Backend.TRITON, torch.device(device)))  # as the runtime
        timer = functools.partial(_try_bench, in_graph=True)
        versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
        name = torch.cuda.get_device_name()
    print(f"grid: {len(attn)} attention cases, {len(mlp)} MLP cases, {timings(attn, mlp)} timings, "
          f"~{estimate_seconds(attn, mlp):.0f} s estimated; copy {bw:.2f} TB/s", flush=True)
    t0 = time.time()
    data = {"grid": True, "device": name, "versions": versions, "copy_TBps": bw, "complete": False,
            "elapsed_s": 0.0, "plan_host": plan_host_us(), "rows": [], "skipped": []}
    rows, path = data["rows"], out_dir / "kernels_grid.json"
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a run cut short by a time limit keeps what it timed
        data["elapsed_s"] = time.time() - t0
        path.write_text(json.dumps(data, indent=1))

    for i, case in enumerate(mlp):  # first: the MLP is what the dispatch changes, attention is unchanged
        run_mlp(case, ops, timer, bw, rows, device, seed=i)
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"MLP done in {time.time() - t0:.0f} s", flush=True)
    for i, case in enumerate(attn):
        reason = skip_reason(case)
        if reason:
            data["skipped"].append({"case": asdict(case), "reason": reason})
            continue
        run_attention(case, ops, timer, bw, rows, device, seed=i)
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    data["complete"] = True
    save()
    print(f"wrote {path} ({len(rows)} rows, {len(data['skipped'])} cases skipped) in {data['elapsed_s']:.0f} s",
          flush=True)
    print_summary(data)
    plot_grid(data, out_dir / "kernels_grid.png")
    return data


def _panels(data: dict) -> dict:
    """{(family, shape name): {(row label, density): % of floor}} over the `ours` rows."""
    panels: dict = {}
    for r in data["rows"]:
        if r["variant"] != "ours" or not r["ms"] > 0:
            continue
        s = r["shape"]
        if r["op"] == "mlp":
            label = f"M {s['M']:>3}"
        else:
            label = f"B {s['B']:>3} {s['lengths']}"
            if r["family"] in ("attn-context", "attn-width"):
                label = f"L {s['longest']:>5} {label}"
            if r["family"] == "attn-width":
                label += f" T {s['table_tokens']}"
        panels.setdefault((r["family"], s["name"]), {})[(label, round(r["density"], 3))] = 100 * r["floor_ms"] / r["ms"]
    return panels


def attention_target(row: dict, key: str = "ms") -> bool:
    """The attention target: within 90% of a floor >= 50 us, within floor + 10 us below that;
    judged on the row's `key` (ms: one graph replay per call; ms_in_graph: the call inside a graph)."""
    floor, ms = row["floor_ms"], row[key]
    return ms <= floor / 0.9 if floor >= 0.05 else ms <= floor + 0.010


def print_summary(data: dict) -> None:
    if "plan_host" in data:
        p = data["plan_host"]
        print(f"plan: B {p['batch']} {p['median_us']:.1f} us median, {p['p99_us']:.1f} us p99 (host)")
    variants: dict = {}
    for r in data["rows"]:
        if r["op"] == "attention" and r["variant"] != "sdpa_dense" and r["ms"] > 0:
            v = variants.setdefault((r["family"], r["variant"]), [0, 0, [], 0])
            v[0] += attention_target(r)
            v[1] += 1
            v[3] += "ms_in_graph" in r and attention_target(r, "ms_in_graph")
            v[2].append(min(1.0, r["floor_ms"] / r["ms"]) if r["floor_ms"] >= 0.05 else
                        (r["floor_ms"] + 0.010) / max(r["ms"], 1e-9))
    for (family, variant), (met, n, ratios, met_in_graph) in sorted(variants.items()):
        print(f"{family:14} {variant:12} target met {met}/{n} ({met_in_graph} in graph); "
              f"median score {statistics.median(ratios):.2f}")
    for (family, name), cells in _panels(data).items():
        dens = sorted({d for _, d in cells})
        print(f"\n{family} {name}: % of floor" + "".join(f" {d:>6.3f}" for d in dens))
        for label in sorted({lab for lab, _ in cells}):
            print(f"  {label:34}" + "".join(f" {cells[(label, d)]:6.0f}" if (label, d) in cells else "      -"
                                           for d in dens))


def plot_grid(data: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed here: plot later with --plot-from {path.with_suffix('.json')}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(data)
    cols = 4
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 5 * nrows), squeeze=False)
    for ax, ((family, name), cells) in zip(axes.flat, panels.items()):
        labels = sorted({lab for lab, _ in cells})
        dens = sorted({d for _, d in cells})
        grid = [[cells.get((lab, d), float("nan")) for d in dens] for lab in labels]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_xticks(range(len(dens)), [f"{d:.2f}" for d in dens], fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{family}: {name}", fontsize=9)
        ax.set_xlabel("density", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="% of floor (floor / ours)")
    fig.suptitle(f"{data['device']}: ours as % of its floor; copy {data['copy_TBps']:.2f} TB/s, "
                 f"MLP FLOPs at {MMA_FLOP_PER_S / 1e12:.0f} TFLOP/s")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def plot_from(path: Path) -> None:
    data = json.loads(path.read_text())
    print_summary(data)
    plot_grid(data, path.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit("run it through benchmarks/kernel_bench.py --grid")
