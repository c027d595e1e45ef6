"""Dense decode throughput of the runtime per tensor-parallel size, and over data-parallel replicas.

    torchrun --nproc_per_node N benchmarks/decode_throughput.py --config configs/llama-3.1-8b.yaml \
        --batch 1 16 64 --context 1024 4096
    python launch/cluster.py --cluster configs/cluster/two-nodes-tp8-dp2.yaml --config configs/llama-3.1-8b.yaml \
        -- throughput --batch 1 16 64      # the per-node commands; every replica runs every case at once

For each (batch, context) the KV cache of every sequence is filled with random values up to
`context` tokens (prefill is not what is measured), then decode steps run exactly as the
engine runs them (rank 0 broadcasts each step; every rank executes it). Reported per
case: median step time, tokens/s (batch / step), the bandwidth floor (this rank's weights +
the KV it reads, over the copy bandwidth measured in the same run) and, for tp > 1, the share
of GPU time spent in NCCL kernels (from a profiled step).

All-reduce time apart from compute, per-rank timings gathered to each replica's driver and the
replicas' to global rank 0, tokens/s summed over replicas and the layout: benchmarks/
replica_results.py. Under CUDA graphs the collectives run inside the graph, so there comm_ms is
the NCCL share of the step instead. Rank 0 prints a table and writes JSON under
benchmarks/results/<device>x<tp>[-dp<R>]/ (CPU runs too: gloo, for layouts and plumbing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.replica_results import comm_pass, gather_results, results_dir_name, summarize, sync  # noqa: E402
from benchmarks.replica_results import timed_comm  # noqa: E402
from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402
from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed  # noqa: E402
from polar_dist.engine.step import Step  # noqa: E402
from polar_dist.parallel.comm import TimedComm  # noqa: E402
from polar_dist.runtime import Runtime  # noqa: E402

WARMUP_STEPS = 3  # first steps of each case (graph capture, first launches) are not timed
CASE_KEYS = ("batch", "context")
TIMING_KEYS = ("step_ms", "comm_ms", "compute_ms")  # gathered from every rank

def copy_bandwidth_tbps(device: torch.device) -> float:
    """Device-to-device copy (CPU: memory to memory), bytes read + written per second, in TB/s."""
    src = torch.empty(1 << (30 if device.type == "cuda" else 26), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(times) / 1e12


def decode_steps(rt: Runtime, batch: int, context: int, steps: int) -> list[Step]:
    bs = rt.cfg.engine.block_size
    allocator = BlockAllocator(rt.runner.num_blocks)
    tables = [allocator.allocate(blocks_needed(context + steps, bs)) for _ in range(batch)]
    return [Step.decode([(7 * i + s) % 256 for i in range(batch)], [context + s + 1] * batch, tables, bs)
            for s in range(steps)]


def nccl_share(rt: Runtime, step: Step) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rt.runner.execute(rt.ctx.broadcast_object(step))
        torch.cuda.synchronize()
    total = nccl = 0.0
    for evt in prof.key_averages():  # self time: each kernel counted once, not again under its CPU op
        t = evt.self_device_time_total
        total += t
        if "nccl" in evt.key.lower():
            nccl += t
    return nccl / total if total else 0.0


def print_profile(rt: Runtime, step: Step) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rt.runner.execute(rt.ctx.broadcast_object(step))
        torch.cuda.synchronize()
    if not rt.ctx.is_driver:
        return
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))


def measure(rt: Runtime, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Time decode steps for every (batch, context) on this rank; returns the rows and run-wide figures."""
    ctx = rt.ctx
    comm = ctx.tp_comm if isinstance(ctx.tp_comm, TimedComm) else None
    for k_cache, v_cache in rt.runner.kv_caches:  # random K/V: attention reads real-looking data
        k_cache.normal_()
        v_cache.normal_()
    bw = copy_bandwidth_tbps(ctx.device)
    spec = rt.spec
    weight_bytes = sum(p.numel() * p.element_size() for p in rt.runner.model.parameters())
    kv_bytes_per_token = 2 * spec.num_layers * rt.runner.kv_caches[0][0].shape[1] * spec.head_dim * \
        rt.runner.kv_caches[0][0].element_size()
    rows = []
    for n in args.context:
        for b in args.batch:
            steps = decode_steps(rt, b, n, args.steps + WARMUP_STEPS)
            times = []
            for i, step in enumerate(steps):
                sync(ctx.device)
                t0 = time.perf_counter()
                rt.runner.execute(ctx.broadcast_object(step))
                sync(ctx.device)
                if i >= WARMUP_STEPS:
                    times.append(time.perf_counter() - t0)
            step_ms = statistics.median(times) * 1e3
            floor_ms = (weight_bytes + b * (n + 1) * kv_bytes_per_token) / (bw * 1e12) * 1e3
            on_gpu = ctx.device.type == "cuda"
            share = nccl_share(rt, steps[-1]) if ctx.tp_size > 1 and on_gpu else 0.0
            comm_ms, calls = comm_pass(comm, steps[WARMUP_STEPS:], lambda s: rt.runner.execute(ctx.broadcast_object(s)),
                                       ctx.device) if comm is not None else (0.0, 0)
            if calls == 0 and share:  # collectives inside CUDA graphs: the profiled NCCL share instead
                comm_ms = share * step_ms
            if args.profile and on_gpu:  # every rank runs the step (its collectives need all ranks); rank 0 prints
                print_profile(rt, steps[-1])
            rows.append({"batch": b, "context": n, "step_ms": step_ms, "tokens_per_s": b / step_ms * 1e3,
                         "floor_ms": floor_ms, "floor_over_step": floor_ms / step_ms, "nccl_share": share,
                         "comm_ms": comm_ms, "compute_ms": max(step_ms - comm_ms, 0.0), "collectives": calls})
    meta = {"copy_TBps": bw, "weight_bytes_per_rank": weight_bytes, "model": spec.model_type,
            "architecture": dict(rt.cfg.model.architecture)}
    return rows, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hf", action="store_true", help="also time transformers generate on the same shape (tp 1)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per case")
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results/<gpu>x<tp>)")
    args = parser.parse_args()
    max_b, max_n = max(args.batch), max(args.context)
    bs = 16
    steps = args.steps + WARMUP_STEPS
    args.overrides += [f"engine.max_batch_size={max_b}", f"engine.max_seq_len={max_n + steps + bs}",
                       f"engine.kv_cache_blocks={max_b * blocks_needed(max_n + steps, bs)}",
                       f"engine.block_size={bs}"]
    cfg = config_from_args(args)

    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    ctx.require_one_job("benchmarks/decode_throughput.py")
    timed_comm(ctx)  # the layers keep this comm: collectives can be timed apart from compute
    rows, meta = measure(build_runtime(cfg, ctx), args)
    gc.collect()  # our weights, cache and graph pools go before transformers allocates its own
    on_gpu = ctx.device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
    if args.hf and ctx.world_size == 1 and on_gpu:
        from benchmarks.hf_baseline import hf_decode_step_ms
        from polar_dist.models.loader import DTYPES

        print(f"GPU memory still allocated before transformers loads: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
        for r in rows:
            try:
                r["hf_step_ms"] = hf_decode_step_ms(meta["architecture"], DTYPES[cfg.model.dtype], r["batch"],
                                                    r["context"])
                r["speedup_vs_hf"] = r["hf_step_ms"] / r["step_ms"]
            except torch.OutOfMemoryError:
                r["hf_step_ms"] = None  # transformers' static cache and activations do not fit
    gathered = gather_results(ctx, rows, CASE_KEYS, TIMING_KEYS)
    if gathered is not None:  # global rank 0
        write_result(ctx, cfg, args, meta, gathered)
    ctx.shutdown()


def write_result(ctx, cfg, args: argparse.Namespace, meta: dict, gathered: list[dict]) -> None:  # noqa: ANN001
    """Global rank 0: totals over replicas, the layout, the table and the JSON."""
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    summary = summarize(ctx, gathered, CASE_KEYS, "step_ms", TIMING_KEYS)
    replicas, totals, layout = summary["replicas"], summary["total"], summary["layout"]
    bw = meta["copy_TBps"]
    result = {"device": device, "tp": ctx.tp_size, "dp": ctx.num_replicas, "layout": layout, "model": meta["model"],
              "config": args.config, "dtype": cfg.model.dtype,
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
              "copy_TBps": bw, "weight_bytes_per_rank": meta["weight_bytes_per_rank"],
              "hf_method": "transformers generate, static cache (compiled forward): "
                           "(t(129 tokens) - t(1 token)) / 128, min of 3"
              if args.hf else None, "rows": replicas[0]["rows"], "replicas": replicas, "total": totals}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / results_dir_name(device, ctx)
    out.mkdir(parents=True, exist_ok=True)
    name = f"decode_throughput_{Path(args.config).stem}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(f"{device} tp={ctx.tp_size} dp={ctx.num_replicas} on {len(layout['hosts'])} host(s) "
          f"{Path(args.config).stem} {cfg.model.dtype}; copy {bw:.2f} TB/s")
    print(f"{'batch':>6} {'context':>8} {'step ms':>9} {'comm ms':>8} {'tokens/s':>10} {'total tok/s':>12} "
          f"{'floor ms':>9} {'floor/step':>10} {'nccl':>6} {'HF ms':>8} {'vs HF':>6}")
    for r, t in zip(replicas[0]["rows"], totals):
        hf = r.get("hf_step_ms")
        hf_cols = f"{hf:>8.2f} {r['speedup_vs_hf']:>5.2f}x" if hf else f"{'-':>8} {'-':>6}"
        print(f"{r['batch']:>6} {r['context']:>8} {r['step_ms']:>9.2f} {r['comm_ms_max']:>8.2f} "
              f"{r['tokens_per_s']:>10.0f} {t['tokens_per_s']:>12.0f} {r['floor_ms']:>9.2f} "
              f"{r['floor_over_step']:>10.2f} {r['nccl_share']:>6.1%} {hf_cols}")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_main(main)
