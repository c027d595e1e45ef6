"""The attention work plan's two constants (programs per SM the cut aims at, the shortest chunk)
swept at the end-to-end decode shapes and at the grid's mid-size GQA rows, each plan timed in a
graph (GraphTimer.in_graph, L2 flushed before each call); outputs checked against the default
plan's.

    PYTHONPATH=. python3 benchmarks/plan_waves_ab.py benchmarks/results/<gpu>/ab/plan_waves.json

The question: whether the ~12-19 us a mid-size attention call spends over its KV floor is paid
per wave of programs (3 resident per SM, so the default 16 per SM is ~5 waves, each program
starting with a chain of dependent loads), in which case fewer, longer programs would cut it.
"""
import json
import sys

import torch

from benchmarks.kernel_bench import BLOCK_SIZE, _block_table, _copy_tbps, _head_table, _paged_kv, runtime_plan
from kernels.graph_timer import GraphTimer
from kernels.select_attention import AttentionConfig, _launch

CASES = [  # name, B, Hq, Hkv, lengths ("mixed": 512-6144, "spread": 10-100% of 4096), k
    ("l2-7b B8 2048 k16", 8, 32, 32, [2048] * 8, 16),
    ("l2-7b B16 2048 k16", 16, 32, 32, [2048] * 16, 16),
    ("l2-7b B16 2048 dense", 16, 32, 32, [2048] * 16, 32),
    ("l2-7b B32 2048 k16", 32, 32, 32, [2048] * 32, 16),
    ("l2-7b B32 2048 dense", 32, 32, 32, [2048] * 32, 32),
    ("l3-8b B64 mixed k4", 64, 32, 8, "mixed", 4),
    ("l3-8b B64 6144 k4", 64, 32, 8, [6144] * 64, 4),
    ("gqa B32 4096 k4", 32, 32, 8, [4096] * 32, 4),
    ("gqa B64 4096 k2", 64, 32, 8, [4096] * 64, 2),
    ("gqa B64 spread k4", 64, 32, 8, "spread", 4),
    ("mha32 B32 spread k6", 32, 32, 32, "spread", 6),
]
PER_SM = (3, 4, 6, 8, 12, 16, 24, 32)
MIN_CHUNK = (128, 256, 512)


def main(out):
    dev = torch.device("cuda")
    bw = _copy_tbps()
    timer = GraphTimer(dev, reps=20)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, b, hq, hkv, lens, k in CASES:
        if lens == "mixed":
            lens = torch.randint(512, 6145, (b,), generator=gen).tolist()
        elif lens == "spread":
            lens = torch.linspace(410, 4096, b).round().int().tolist()
        kc, vc, perm = _paged_kv(lens, hkv, 128, torch.bfloat16, gen)
        bt = _block_table(lens, perm, 8192 // BLOCK_SIZE)
        q = torch.randn(b, hq, 128, device=dev, dtype=torch.bfloat16)
        sl = torch.tensor(lens, device=dev, dtype=torch.int32)
        ht = _head_table(b, hkv, k, gen)
        out_t = torch.empty_like(q)
        floor_us = sum(lens) * k * 128 * 2 * 2 / (bw * 1e12) * 1e6
        plan, _ = runtime_plan(lens, k)
        _launch(q, kc, vc, bt, sl, ht, 128**-0.5, out_t, plan, AttentionConfig(), pdl=True)
        ref = out_t.clone()
        row = {"case": name, "floor_us": floor_us, "us_in_graph": {}, "plans": {}}
        for per_sm in PER_SM:
            for min_chunk in MIN_CHUNK:
                key = f"{per_sm}/{min_chunk}"
                plan, info = runtime_plan(lens, k, programs_per_sm=per_sm, min_chunk=min_chunk)
                fn = lambda: _launch(q, kc, vc, bt, sl, ht, 128**-0.5, out_t, plan, AttentionConfig(), pdl=True)
                fn(); torch.cuda.synchronize()
                row["plans"][key] = info
                row["us_in_graph"][key] = timer.in_graph(fn) * 1e3
                if (out_t.float() - ref.float()).abs().max().item() > 2e-2:
                    print("MISMATCH", name, key, flush=True)
        g = row["us_in_graph"]
        base = g["16/256"]
        best = min(g, key=g.get)
        print(f"{name:22} floor {floor_us:6.1f} default {base:6.1f} best {best} {g[best]:6.1f} | "
              + " ".join(f"{p}:{g[f'{p}/256']:6.1f}" for p in PER_SM), flush=True)
        rows.append(row)
        del kc, vc
        torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
