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
import statistics
import sys


from benchmarks.plan_waves_ab import occupancy, time_cases, write_rows
from kernels.attention_builds import AttentionConfig, padded_head_dim

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
    def variants_of(case: tuple) -> dict:
        return {key: (config, {"resident": r}) for key, (config, r) in VARIANTS[padded_head_dim(case[4])].items()}

    def describe(case: tuple, row: dict) -> str:
        g = row["us_in_graph"]
        return (f"{case[0]:22} floor {row['floor_us']:6.1f} | " + " ".join(f"{key} {t:6.1f}" for key, t in g.items())
                + " | items " + " ".join(str(p["items"]) for p in row["plans"].values()))

    bw, rows = time_cases(CASES, variants_of, describe)
    for variants in VARIANTS.values():
        base = next(iter(variants))
        for key in list(variants)[1:]:
            ratios = [r["us_in_graph"][key] / r["us_in_graph"][base] for r in rows if key in r["us_in_graph"]]
            print(f"{key} / {base}: median {statistics.median(ratios):.3f} min {min(ratios):.3f} "
                  f"max {max(ratios):.3f}", flush=True)
    builds = occupancy()
    for build in builds:
        print(build, flush=True)
    write_rows(out, bw, rows, builds=builds)


if __name__ == "__main__":
    main(sys.argv[1])
