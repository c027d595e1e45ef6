"""Decode attention at head dims between powers of two (80, 96: OPT-2.7B, some Llama-family
models) and at 256, next to 64 and 128, against torch SDPA over a contiguous cache of the same
bytes, as the grid times them (benchmarks/kernel_grid.py: the runtime's KernelOps call, CUDA-graph
replays with L2 flushed, `ms_in_graph`, floors of the real head dim's bytes).

    PYTHONPATH=. python3 benchmarks/head_dim_ab.py benchmarks/results/<gpu>/ab/head_dim_run<N>.json

Run 54's kernel ran a head dim D in tiles of the next power of two, reading and writing only D
columns: the question was what the pad costs against the bytes D really moves (since run 79 a
main and a tail tile: benchmarks/head_tiles_ab.py). Recorded: run 54
(the kernel then: results/nvidia-h200/ab/head_dim_run54.json) and run 56 (a two-tile form,
80 = 64 + 16, not adopted: head_dim_two_tiles_run56.json); benchmarks/KERNELS_NOTES.md. Each output is
checked against the torch reference before timing. Also prints and stores every compiled
attention kernel's registers, shared memory and programs per SM (plan_waves_ab.occupancy).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import triton

from benchmarks.kernel_bench import _copy_tbps, _try_bench
from benchmarks.kernel_grid import AttnCase, Heads, run_attention
from benchmarks.plan_waves_ab import occupancy
from kernels.dispatch import Backend, KernelOps, choose_pdl
from kernels.select_attention import select_attention, select_attention_ref

HEAD_DIMS = (64, 80, 96, 128, 256)
BATCHES = (8, 32, 64)
LONGEST = 4096


def check(ops: KernelOps, d: int, hq: int, hkv: int) -> float:
    """Max abs error of the runtime's call against the fp32 reference on a small mixed batch."""
    gen = torch.Generator().manual_seed(d)
    lens = [1, 37, 700, 2049]
    blocks = sum(-(-n // 16) for n in lens) + 1
    kc = torch.randn(blocks, hkv, 16, d, generator=gen).to("cuda", torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.full((len(lens), 129), blocks - 1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        bt[i, :-(-n // 16)] = torch.arange(at, at + -(-n // 16))
        at += -(-n // 16)
    q = torch.randn(len(lens), hq, d, generator=gen).to("cuda", torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ht = torch.stack([torch.randperm(hkv, generator=gen)[:max(1, hkv // 2)] for _ in lens]).int().cuda()
    out = select_attention(q, kc, vc, bt.cuda(), sl, ht, d**-0.5)
    ref = select_attention_ref(q.float(), kc.float(), vc.float(), bt.cuda(), sl, ht, d**-0.5)
    return (out.float() - ref).abs().max().item()


def main(out_path: str) -> None:
    dev = torch.device("cuda")
    bw = _copy_tbps()
    ops = KernelOps(Backend.TRITON, pdl=choose_pdl(True, Backend.TRITON, dev))
    timer = functools.partial(_try_bench, in_graph=True)
    rows: list[dict] = []
    errors = {}
    for d in HEAD_DIMS:
        for hq, hkv in ((32, 32), (32, 8)):
            name = f"{'mha-32' if hq == hkv else 'gqa-32/8'}-d{d}"
            errors[name] = check(ops, d, hq, hkv)
            print(f"{name}: max abs error vs fp32 reference {errors[name]:.2e}", flush=True)
            for i, b in enumerate(BATCHES):
                case = AttnCase("head-dim", Heads(name, hq, hkv, d), b, "uniform", LONGEST, 32768, "bfloat16",
                                (0.5, 1.0))
                run_attention(case, ops, timer, bw, rows, "cuda", seed=i)
                torch.cuda.empty_cache()
                for r in rows[-3:]:
                    print(f"  {name} B {b} d {r['density']:.2f} {r['variant']}: {r['ms_in_graph'] * 1e3:.1f} us "
                          f"in graph, floor {r['floor_ms'] * 1e3:.1f}", flush=True)
    occ = occupancy()
    print("occupancy", occ, flush=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_TBps": bw,
                                          "versions": {"torch": torch.__version__, "triton": triton.__version__}, "errors": errors,
                                          "occupancy": occ, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
