"""The decode attention kernel's pipeline depth and tile against the programs an SM holds: the
default before run 72 (64-token tiles, 3 stages, a plan cut for 3 resident programs per SM)
against 2 stages (the default since) and 32-token tiles, each with plans cut for the programs
per SM its smaller shared-memory footprint may allow, and torch SDPA over a contiguous cache where every head is read; timed in a
graph (GraphTimer.in_graph, L2 flushed before each call), outputs checked against the default's.
Prints each compiled build's registers, shared memory and programs per SM. Recorded: run 72
(`results/nvidia-h200/ab/attention_stages_run72.json`, the first five 128-wide variants), run 73
(`attention_stages_run73.json`, all).

    PYTHONPATH=. python3 benchmarks/attention_stages_ab.py benchmarks/results/<gpu>/ab/attention_stages.json

Why: at 2.6 waves (MHA-32 B 32 4096, GQA-32/8 B 128 4096, density 1.0) the kernel is 8% behind
SDPA and 2% behind it at 5+ waves (the committed grid): a launch whose last wave is part-empty
leaves bandwidth unused, and more programs per SM shrink that tail.
"""
import json
import statistics
import sys

import torch

from benchmarks.kernel_bench import _copy_tbps, runtime_plan
from benchmarks.kernel_grid import attention_floor_ms
from benchmarks.plan_waves_ab import occupancy, paged_case, sdpa_in_graph_us
from kernels.attention_plan import padded_head_dim
from kernels.graph_timer import GraphTimer
from kernels.select_attention import AttentionConfig, _launch

CASES = [  # name, B, Hq, Hkv, D, lengths ("mixed": 512-6144), k
    ("mha32 B1 4096 dense", 1, 32, 32, 128, [4096], 32),
    ("mha32 B8 4096 dense", 8, 32, 32, 128, [4096] * 8, 32),
    ("l2-7b B16 2048 dense", 16, 32, 32, 128, [2048] * 16, 32),
    ("l2-7b B16 2048 k16", 16, 32, 32, 128, [2048] * 16, 16),
    ("l2-7b B32 2048 dense", 32, 32, 32, 128, [2048] * 32, 32),
    ("l2-7b B32 2048 k16", 32, 32, 32, 128, [2048] * 32, 16),
    ("mha32 B32 4096 dense", 32, 32, 32, 128, [4096] * 32, 32),
    ("gqa B8 4096 dense", 8, 32, 8, 128, [4096] * 8, 8),
    ("gqa B64 4096 dense", 64, 32, 8, 128, [4096] * 64, 8),
    ("gqa B128 4096 dense", 128, 32, 8, 128, [4096] * 128, 8),
    ("l3-8b B64 6144 k4", 64, 32, 8, 128, [6144] * 64, 4),
    ("l3-8b B64 mixed k4", 64, 32, 8, 128, "mixed", 4),
    ("l3-8b B64 mixed dense", 64, 32, 8, 128, "mixed", 8),
    ("mqa-32 B16 4096", 16, 32, 1, 128, [4096] * 16, 1),  # 32 query heads a group: 3 per SM by ptxas
    ("mqa-32 B64 4096", 64, 32, 1, 128, [4096] * 64, 1),
    ("gqa-d64 B8 4096 k4", 8, 32, 8, 64, [4096] * 8, 4),
    ("gqa-d64 B64 4096 k2", 64, 32, 8, 64, [4096] * 64, 2),
    ("mha32-d64 B64 4096 dense", 64, 32, 32, 64, [4096] * 64, 32),
    ("mha32-d64 B16 2048 dense", 16, 32, 32, 64, [2048] * 16, 32),
]
VARIANTS = {  # padded head dim: {name: (kernel config, resident programs per SM the plan is cut for)}
    128: {
        "n64s3/r3": (AttentionConfig(num_stages=3), 3),  # the default before run 72
        "n64s2/r3": (AttentionConfig(num_stages=2), 3),
        "n64s2/r4": (AttentionConfig(num_stages=2), 4),
        "n64s2/r5": (AttentionConfig(num_stages=2), 5),
        "n32s3/r5": (AttentionConfig(block_n=32, num_stages=3), 5),
        "n64s2 reg96/r5": (AttentionConfig(num_stages=2, maxnreg=96), 5),
        "n64s2 reg80/r6": (AttentionConfig(num_stages=2, maxnreg=80), 6),
    },
    64: {
        "n64s3/r6": (AttentionConfig(num_stages=3), 6),  # the default
        "n64s2/r6": (AttentionConfig(num_stages=2), 6),
        "n64s2/r8": (AttentionConfig(num_stages=2), 8),
    },
}


def main(out: str) -> None:
    dev = torch.device("cuda")
    bw = _copy_tbps()
    timer = GraphTimer(dev, reps=20)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, b, hq, hkv, d, spec, k in CASES:
        lens, kc, vc, bt, q, sl, ht = paged_case(spec, b, hq, hkv, d, k, gen)
        out_t = torch.empty_like(q)
        row = {"case": name, "floor_us": attention_floor_ms(sum(lens), k, d, 2, bw) * 1e3, "us_in_graph": {},
               "plans": {}}
        ref = None
        variants = VARIANTS[padded_head_dim(d)]
        for key, (config, resident) in variants.items():
            plan, info = runtime_plan(lens, k, head_dim=d, resident=resident)
            fn = lambda: _launch(q, kc, vc, bt, sl, ht, d**-0.5, out_t, plan, config, pdl=True)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            if ref is None:
                ref = out_t.clone()
            elif (out_t.float() - ref.float()).abs().max().item() > 2e-2:  # other cuts sum in another order
                print("MISMATCH", name, key, flush=True)
            row["plans"][key] = info
            row["us_in_graph"][key] = timer.in_graph(fn) * 1e3
        if k == hkv and len(set(lens)) == 1:  # every head, equal lengths: SDPA over a contiguous cache
            row["us_in_graph"]["sdpa"] = sdpa_in_graph_us(timer, q, hkv, lens[0])
        g = row["us_in_graph"]
        print(f"{name:22} floor {row['floor_us']:6.1f} | " + " ".join(f"{key} {t:6.1f}" for key, t in g.items())
              + " | items " + " ".join(str(p["items"]) for p in row["plans"].values()), flush=True)
        rows.append(row)
        del kc, vc
        torch.cuda.empty_cache()
    for variants in VARIANTS.values():
        base = next(iter(variants))
        for key in list(variants)[1:]:
            ratios = [r["us_in_graph"][key] / r["us_in_graph"][base] for r in rows if key in r["us_in_graph"]]
            print(f"{key} / {base}: median {statistics.median(ratios):.3f} min {min(ratios):.3f} "
                  f"max {max(ratios):.3f}", flush=True)
    builds = occupancy()
    for build in builds:
        print(build, flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, "builds": builds, "rows": rows},
              open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
