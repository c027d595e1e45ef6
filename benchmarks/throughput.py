"""Decode throughput, dense and sparse, against the bandwidth floor and transformers, per tensor-parallel size.

    torchrun --nproc_per_node 1 benchmarks/throughput.py --config configs/llama-2-7b.yaml \
        --batch 32 --context 2048 --density 1.0 0.5 --hf
    torchrun --nproc_per_node 1 benchmarks/throughput.py --config configs/llama-3.1-8b.yaml \
        --batch 64 --mixed 512:6144 --density 1.0 0.5 --set engine.max_seq_len=8192

For each attention density (and, with --mlp-sparse on a ReLU model, MLP sparsity on too) the
runtime is built with random routers at that density (the selection count is what costs), the
paged KV cache is filled with random values, and decode steps run as the engine runs them: a
Step per decode, CUDA-graph replay, the routers inside the graph, and sampling at temperature 1
on the device with its one device-to-host copy. Contexts are fixed (`--context`) or drawn
uniformly from a range per sequence (`--mixed LO:HI`, seeded). Every rank builds the same steps,
so no step crosses ranks (the control protocol's cost is benchmarks/control_traffic.py's).

Per row: ms per step (median of --steps after warm-up), tokens/s, and the floor: (this rank's
weight bytes read + the KV bytes the step reads) / the copy bandwidth measured in the same run;
layer 0 reads every KV group, a sparse layer k of them per sequence; a sparse MLP reads k of its
neurons' rows of W1 and W2. breakdown_ms splits the step by module (benchmarks/step_breakdown.py:
qkv, attention, out_proj, mlp, routers, all_reduce, sampling, other): the GPU time of the kernels
each module launched in one profiled eager step (host gaps not counted; a routed layer's router
scores are columns of its QKV GEMM, so they count in qkv and routers holds the selection),
sampling its share of the step (from the forward's end on the GPU to the tokens on the host),
other = the rest of the graph step (norms, embedding, LM head, gaps between kernels, the host's
part of the step). With --hf, transformers' generate (static cache, which compiles the forward in
transformers 5.x) on the same shape: (t(1 + n) - t(1)) / n, n = --hf-tokens, the minimum of 3
runs each after a warm-up of both.
With --timeline, `timeline` holds one graph-replayed forward's kernels as the GPU ran them: busy
time, the gaps between kernels, and the costliest kernels (benchmarks/step_timeline.py).

Over ranks and replicas (world = dp x tp, benchmarks/replica_results.py): comm_ms is the step's
all-reduce time, timed apart from compute in a second, eager pass over the same steps (under
CUDA graphs the timed step's collectives cannot be told apart); every rank's timings reach its
replica's driver and every replica's reach global rank 0; with parallel.dp = R the replicas run
the cases at once, and `total` sums tokens/s over them. The JSON records the layout (tp, dp,
each replica's ranks and hosts). Rank 0 prints a table and writes
benchmarks/results/<gpu>x<tp>[-dp<R>]/throughput-<model>.json and a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hf_baseline import hf_decode_step_ms  # noqa: E402
from benchmarks.replica_results import comm_pass, gather_results, results_dir_name, summarize, sync  # noqa: E402
from benchmarks.replica_results import timed_comm  # noqa: E402
from benchmarks.step_breakdown import breakdown  # noqa: E402
from benchmarks.step_timeline import step_timeline  # noqa: E402
from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402
from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed  # noqa: E402
from polar_dist.engine.sampling import SampleRow, SamplingParams  # noqa: E402
from polar_dist.engine.step import Step  # noqa: E402
from polar_dist.runtime import Runtime  # noqa: E402

WARMUP_STEPS = 3  # graph capture and first launches are not timed
BLOCK_SIZE = 16
TEMPERATURE_1 = SamplingParams(max_new_tokens=1 << 20, temperature=1.0, ignore_eos=True)
CASE_KEYS = ("variant", "density", "mlp_sparse", "batch", "context")  # a measured row, the same on every rank
TIMING_KEYS = ("ms_per_step", "comm_ms", "compute_ms")  # gathered from every rank


@dataclass(frozen=True)
class Variant:
    density: float
    mlp_sparse: bool

    @property
    def name(self) -> str:
        return "ours_dense" if self.density == 1.0 and not self.mlp_sparse else "ours_sparse"

    def overrides(self) -> list[str]:
        out = [f"sparsity.head_density={self.density}", f"sparsity.mlp={str(self.mlp_sparse).lower()}"]
        if self.density < 1.0 or self.mlp_sparse:
            out.append("sparsity.routers=random")
        return out


def copy_bandwidth_tbps(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy, in TB/s: the median of
    20 copies of 1 GiB, timed on the device by CUDA events (timed on the host, each copy also
    counted a sync's latency: 2-4% less bandwidth, floors as much too generous), on the host on
    the CPU."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20 if device.type == "cuda" else 10):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times) / 1e12


def contexts_for(batch: int, context: int | None, mixed: tuple[int, int] | None, seed: int = 0) -> list[int]:
    """(B,) cached tokens per sequence: all `context`, or uniform in [lo, hi] (seeded)."""
    if mixed is None:
        assert context is not None
        return [context] * batch
    rng = np.random.default_rng(seed)
    return rng.integers(mixed[0], mixed[1] + 1, size=batch).tolist()


def decode_steps(rt: Runtime, contexts: list[int], steps: int) -> list[Step]:
    """`steps` consecutive decode steps of len(contexts) sequences, each starting past its context."""
    bs = rt.cfg.engine.block_size
    allocator = BlockAllocator(rt.runner.num_blocks)
    tables = [allocator.allocate(blocks_needed(n + steps, bs)) for n in contexts]
    return [Step.decode([(7 * i + s) % 256 for i in range(len(contexts))], [n + s + 1 for n in contexts], tables, bs)
            for s in range(steps)]


# ---- bytes a step must move (this rank) ---------------------------------------------------------

def weight_bytes_read(rt: Runtime, batch: int, rows: int) -> int:
    """Parameters this rank reads in a decode step of `batch` sequences run as `rows` rows (its
    CUDA-graph bucket: what the per-row-count choices are made on): all of them, except that an
    embedding table (tokens, OPT's positions) gives only its `batch` rows unless it is also the
    LM head (tied), and a sparse MLP reads only its k selected rows of W1 and W2 (plus the
    routers that run at this row count, counted in full)."""
    from polar_dist.models.head_selection import RoutedGroups
    from polar_dist.models.relu_mlp import NeuronSparseMLP
    from polar_dist.parallel.layers import VocabParallelEmbedding

    model = rt.runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    head = model.lm_head.weight
    for m in model.modules():
        if isinstance(m, (VocabParallelEmbedding, torch.nn.Embedding)) and m.weight is not head:
            n_rows, dim = m.weight.shape
            total -= (n_rows - min(n_rows, batch)) * dim * m.weight.element_size()
    for layer in model.layers:
        heads, mlp = layer.attn.heads, layer.mlp
        if isinstance(heads, RoutedGroups) and rows < heads.min_batch:  # reads every group: no router run
            total -= sum(p.numel() * p.element_size() for p in heads.router.parameters())
        if isinstance(mlp, NeuronSparseMLP):
            k = mlp.k_for(rows)
            if k is not None and mlp.sparse_pays.get(rows, True):
                n_local = mlp.fc1.weight.shape[0]
                per_neuron = (mlp.fc1.weight[0].numel() + mlp.fc2_t[0].numel()) * mlp.fc1.weight.element_size()
                total -= (n_local - k) * per_neuron
            else:  # dense at this row count: the router is not run
                total -= sum(p.numel() * p.element_size() for p in mlp.router.parameters())
    return total


def kv_bytes_read(rt: Runtime, contexts: list[int], rows: int) -> float:
    """K and V bytes this rank's attention reads for one decode step (contexts: cached tokens
    before the step; rows: the rows it runs). A routed layer reads k groups per sequence (every
    group below its min_batch rows); under `global` scope on tp ranks each rank holds its share
    of the chosen groups on average."""
    from polar_dist.models.head_selection import RoutedGroups

    k_cache = rt.runner.kv_caches[0][0]  # (blocks, Hkv_local, block, D)
    g_local, head_dim, elt = k_cache.shape[1], k_cache.shape[3], k_cache.element_size()
    tokens = sum(n + 1 for n in contexts)
    total = 0.0
    for layer in rt.runner.model.layers:
        heads = layer.attn.heads
        groups = g_local
        if isinstance(heads, RoutedGroups) and rows >= heads.min_batch:
            if heads.scope.value == "local":
                groups = heads.k
            else:
                groups = heads.k * g_local / rt.spec.num_kv_heads
        total += 2 * groups * tokens * head_dim * elt
    return total


# ---- timing ------------------------------------------------------------------------------------

def time_steps(rt: Runtime, steps: list[Step]) -> tuple[float, float]:
    """Median ms of a step and of the sampling's share of it, over the steps after WARMUP_STEPS,
    run as the engine runs them: the driver samples (the others only run the forward), forward
    and sampling launched back to back, the tokens copied to the host once. With
    engine.overlap_steps (the default) every step after the first is chained: launched before
    the previous step's tokens are on the host, with those tokens as its inputs on the device,
    and a step's time is the interval between two steps' tokens reaching the host. Without it a
    step waits for the previous one's tokens and is timed from its launch to its own tokens.
    Sampling's share (CUDA): from the forward's end on the GPU to the tokens copied (events).
    The other ranks time the interval between their steps' ends (CUDA events; wall time on the
    CPU), never waiting for their device: a rank that waited would hold the replica back."""
    if not rt.ctx.is_driver:
        return _time_worker_steps(rt, steps), 0.0
    dev = rt.ctx.device
    cuda = dev.type == "cuda"
    overlap = rt.cfg.engine.overlap_steps
    totals, samples = [], []

    def collect(launched, since: float) -> float:  # noqa: ANN001 - (pending, events, index, host ms)
        pending, events, i, host_ms = launched
        pending.result()
        now = time.perf_counter()
        if i >= WARMUP_STEPS:
            totals.append(now - since)
            samples.append(events[0].elapsed_time(events[1]) if events else host_ms)  # CPU: sampling runs in launch
        return now

    sync(dev)
    last = time.perf_counter()
    prev = None  # the step launched last and not collected (overlap)
    for i, step in enumerate(steps):
        rows = [SampleRow(TEMPERATURE_1, seed=r, counter=i) for r in range(step.batch_size)]
        if not overlap:
            sync(dev)
            last = time.perf_counter()
        chained = overlap and prev is not None
        logits = rt.runner.logits(dataclasses.replace(step, chained=True) if chained else step,
                                  prev[0].tokens if chained else None)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
        t1 = time.perf_counter()
        if events:
            events[0].record()
        pending = rt.runner.sampler.launch(logits, rows)
        if events:
            events[1].record()
        launched = (pending, events, i, (time.perf_counter() - t1) * 1e3)
        if not overlap:
            collect(launched, last)
            continue
        if prev is not None:
            last = collect(prev, last)
        prev = launched
    if prev is not None:
        collect(prev, last)
    sync(dev)
    return statistics.median(totals) * 1e3, statistics.median(samples)


def _time_worker_steps(rt: Runtime, steps: list[Step]) -> float:
    """A non-driver rank's median ms between the ends of consecutive steps after the warm-up."""
    dev, overlap = rt.ctx.device, rt.cfg.engine.overlap_steps
    ends: list[torch.cuda.Event | float] = []
    for i, step in enumerate(steps):
        rt.runner.logits(dataclasses.replace(step, chained=True) if overlap and i > 0 else step)
        if dev.type == "cuda":
            ends.append(torch.cuda.Event(enable_timing=True))
            ends[-1].record()
        else:
            ends.append(time.perf_counter())
    sync(dev)
    gaps = [a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3  # type: ignore[operator]
            for a, b in zip(ends[WARMUP_STEPS - 1:], ends[WARMUP_STEPS:])]
    return statistics.median(gaps)


def time_collectives(rt: Runtime, steps: list[Step]) -> tuple[float, int]:
    """Median all-reduce ms per step over `steps`, and collectives per step, from an eager pass
    (graph replays would hide the collectives from the timer); (0, 0) at tp = 1."""
    comm = rt.ctx.tp_comm
    if rt.ctx.tp_size == 1:
        return 0.0, 0
    graphs, rt.runner.graphs = rt.runner.graphs, None
    try:
        return comm_pass(comm, steps, rt.runner.logits, rt.ctx.device)
    finally:
        rt.runner.graphs = graphs


# ---- the run -----------------------------------------------------------------------------------

def build(args: argparse.Namespace, variant: Variant, max_batch: int, max_context: int) -> Runtime:
    from polar_dist.runtime import build_runtime

    steps = args.steps + WARMUP_STEPS
    per_seq = blocks_needed(max_context + steps, BLOCK_SIZE)
    args_v = argparse.Namespace(**vars(args))
    args_v.overrides = list(args.overrides) + variant.overrides() + [
        f"engine.max_batch_size={max_batch}", f"engine.block_size={BLOCK_SIZE}",
        f"engine.kv_cache_blocks={max_batch * per_seq}"]
    if not any(o.startswith("engine.max_seq_len=") for o in args.overrides):
        args_v.overrides.append(f"engine.max_seq_len={max_context + steps + BLOCK_SIZE}")
    cfg = config_from_args(args_v)
    return build_runtime(cfg, args.ctx)


def measure_variant(args: argparse.Namespace, variant: Variant, cases: list[tuple[int, list[int], str]],
                    bw: float) -> list[dict]:
    max_batch = max(b for b, _, _ in cases)
    max_context = max(max(c) for _, c, _ in cases)
    rt = build(args, variant, max_batch, max_context)
    for k_cache, v_cache in rt.runner.kv_caches:  # random K/V: attention reads real-looking data
        k_cache.normal_()
        v_cache.normal_()
    rows = []
    for batch, contexts, label in cases:
        steps = decode_steps(rt, contexts, args.steps + WARMUP_STEPS)
        step_ms, sample_ms = time_steps(rt, steps)
        comm_ms, calls = time_collectives(rt, steps[WARMUP_STEPS:])
        ran = rt.runner.forward_rows(steps[-1])  # rows the steps ran: their CUDA-graph bucket
        weights, kv = weight_bytes_read(rt, batch, ran), kv_bytes_read(rt, contexts, ran)
        floor_ms = (weights + kv) / (bw * 1e12) * 1e3
        row = {"model": args.model_name, "tp": rt.ctx.tp_size, "batch": batch, "context": label,
               "mean_context": statistics.mean(contexts), "density": variant.density, "mlp_sparse": variant.mlp_sparse,
               "variant": variant.name, "tokens_per_s": batch / step_ms * 1e3, "ms_per_step": step_ms,
               "floor_ms": floor_ms, "step_over_floor": step_ms / floor_ms, "weight_bytes_read": weights,
               "kv_bytes_read": kv, "sample_ms": sample_ms, "comm_ms": comm_ms,
               "compute_ms": max(step_ms - comm_ms, 0.0), "collectives": calls}
        if args.breakdown:
            row["breakdown_ms"] = breakdown(rt, steps[-1], sample_ms, step_ms)
        if args.timeline and rt.ctx.device.type == "cuda":
            row["timeline"] = step_timeline(lambda: rt.runner.logits(steps[-1]), rt.ctx.device)
            t = row["timeline"]
            print(f"    timeline: {t['kernels']} kernels over {t['span_ms']:.3f} ms, busy {t['busy_ms']:.3f}, "
                  f"gaps {t['gap_ms']:.3f}", flush=True)
        rows.append(row)
        if rt.ctx.is_driver:  # every replica's driver: say which
            where = f"replica {rt.ctx.replica}: " if rt.ctx.num_replicas > 1 else ""
            print(f"  {where}{variant.name} d={variant.density} mlp={variant.mlp_sparse} B={batch} ctx={label}: "
                  f"{step_ms:.3f} ms, floor {floor_ms:.3f} ms ({step_ms / floor_ms:.2f}x)", flush=True)
    del rt
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def floor_rows(rows: list[dict]) -> list[dict]:
    """One "floor" row per (batch, context, density, mlp): the floor as a step time."""
    out = []
    for r in rows:
        out.append({**{k: r[k] for k in ("model", "tp", "batch", "context", "mean_context", "density", "mlp_sparse")},
                    "variant": "floor", "ms_per_step": r["floor_ms"], "floor_ms": r["floor_ms"],
                    "tokens_per_s": r["batch"] / r["floor_ms"] * 1e3})
    return out


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = sorted({(r["batch"], str(r["context"])) for r in rows}, key=lambda c: (c[0], c[1]))
    series = sorted({(r["variant"], r["density"], r["mlp_sparse"]) for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / max(1, len(series))
    for j, (variant, density, mlp) in enumerate(series):
        ys = []
        for b, c in cases:
            match = [r["tokens_per_s"] for r in rows if (r["batch"], str(r["context"])) == (b, c)
                     and (r["variant"], r["density"], r["mlp_sparse"]) == (variant, density, mlp)]
            ys.append(match[0] if match else 0.0)
        label = f"{variant} d={density}" + (" +mlp" if mlp else "")
        ax.bar([i + j * width for i in range(len(cases))], ys, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"B{b}\n{c}" for b, c in cases])
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--context", type=int, nargs="+", default=[2048])
    parser.add_argument("--mixed", default=None, help="LO:HI: also a case per batch with contexts uniform in [LO, HI]")
    parser.add_argument("--density", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mlp-sparse", action="store_true", help="ReLU models: also rows with MLP sparsity on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--breakdown", action="store_true", help="time each module in one eager step")
    parser.add_argument("--timeline", action="store_true",
                        help="the kernels of one graph-replayed step and the gaps between them (CUDA)")
    parser.add_argument("--hf", action="store_true", help="also time transformers generate (tp 1, CUDA)")
    parser.add_argument("--hf-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="directory (default benchmarks/results/<gpu>x<tp>)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    from polar_dist.log import configure_logging
    from polar_dist.models.loader import DTYPES
    from polar_dist.parallel.context import init_parallel

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    ctx.require_one_job("benchmarks/throughput.py")
    timed_comm(ctx)  # the layers keep this comm: collectives can be timed apart from compute
    args.ctx = ctx
    args.model_name = Path(args.config).stem
    cases = [(b, contexts_for(b, n, None), str(n)) for b in args.batch for n in args.context]
    if args.mixed:
        lo, hi = (int(x) for x in args.mixed.split(":"))
        cases += [(b, contexts_for(b, None, (lo, hi)), f"mixed {lo}-{hi}") for b in args.batch]
    variants = [Variant(d, False) for d in args.density]
    if args.mlp_sparse:
        variants += [Variant(d, True) for d in args.density]
    bw = copy_bandwidth_tbps(ctx.device)
    measured: list[dict] = []
    for v in variants:
        measured += measure_variant(args, v, cases, bw)
    rows = measured + floor_rows(measured)
    if args.hf and ctx.world_size == 1 and ctx.device.type == "cuda":
        for batch, contexts, label in cases:
            if len(set(contexts)) != 1:
                continue  # transformers' static cache needs one length per batch
            try:
                ms = hf_decode_step_ms(dict(cfg.model.architecture), DTYPES[cfg.model.dtype], batch, contexts[0],
                                args.hf_tokens)
                rows.append({"model": args.model_name, "tp": 1, "batch": batch, "context": label,
                             "mean_context": contexts[0], "density": 1.0, "mlp_sparse": False,
                             "variant": "hf_compiled", "tokens_per_s": batch / ms * 1e3, "ms_per_step": ms,
                             "floor_ms": None, "note": "transformers generate, static cache (compiles the forward)"})
            except torch.OutOfMemoryError:
                rows.append({"model": args.model_name, "tp": 1, "batch": batch, "context": label, "density": 1.0,
                             "mlp_sparse": False, "variant": "hf_compiled", "tokens_per_s": None, "ms_per_step": None,
                             "floor_ms": None, "note": "out of memory"})
    gathered = gather_results(ctx, measured, CASE_KEYS, TIMING_KEYS)
    if gathered is not None:  # global rank 0
        write_result(ctx, cfg, args, bw, rows, gathered)
    ctx.shutdown()


def write_result(ctx, cfg, args: argparse.Namespace, bw: float, rows: list[dict],  # noqa: ANN001
                 gathered: list[dict]) -> None:
    """Global rank 0: its rows (with the floor and transformers rows), every replica's, the
    totals over replicas, the layout, the table, the JSON and the PNG."""
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / results_dir_name(device, ctx)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(ctx, gathered, CASE_KEYS, "ms_per_step", TIMING_KEYS)
    result = {"device": device, "tp": ctx.tp_size, "dp": ctx.num_replicas, "layout": summary["layout"],
              "config": args.config, "dtype": cfg.model.dtype,
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "triton": _version("triton"), "transformers": _version("transformers")},
              "copy_TBps": bw, "steps": args.steps, "rows": rows, "replicas": summary["replicas"],
              "total": summary["total"]}
    name = f"throughput-{args.model_name}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    hosts = summary["layout"]["hosts"]
    print(f"{device} tp={ctx.tp_size} dp={ctx.num_replicas} on {len(hosts)} host(s) {args.model_name} "
          f"{cfg.model.dtype}; copy {bw:.2f} TB/s")
    print(f"{'variant':>12} {'dens':>5} {'mlp':>4} {'B':>4} {'context':>15} {'ms/step':>9} {'comm ms':>8} "
          f"{'tok/s':>9} {'total tok/s':>12} {'floor ms':>9} {'x floor':>8}")
    total = {tuple(t[k] for k in CASE_KEYS): t["tokens_per_s"] for t in summary["total"]}
    slowest_comm = {tuple(r[k] for k in CASE_KEYS): r["comm_ms_max"] for r in summary["replicas"][0]["rows"]}
    for r in rows:
        if r["variant"] == "floor" or r["ms_per_step"] is None:
            continue
        key = tuple(r[k] for k in CASE_KEYS)
        fl = (f"{r['floor_ms']:>9.3f} {r['ms_per_step'] / r['floor_ms']:>7.2f}x" if r["floor_ms"]
              else f"{'-':>9} {'-':>8}")
        comm = f"{slowest_comm[key]:>8.3f}" if key in slowest_comm else f"{'-':>8}"
        tot = f"{total[key]:>12.0f}" if key in total else f"{'-':>12}"
        print(f"{r['variant']:>12} {r['density']:>5} {str(r['mlp_sparse'])[0]:>4} {r['batch']:>4} "
              f"{r['context']:>15} {r['ms_per_step']:>9.3f} {comm} {r['tokens_per_s']:>9.0f} {tot} {fl}")
    title = f"{args.model_name} on {device}, tp {ctx.tp_size}" + (f" x dp {ctx.num_replicas}"
                                                                  if ctx.num_replicas > 1 else "")
    if plot(rows, out / f"{name}.png", title):
        print(f"wrote {out / name}.json and .png")
    else:
        print(f"wrote {out / name}.json (matplotlib missing: no PNG)")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_main(main)
