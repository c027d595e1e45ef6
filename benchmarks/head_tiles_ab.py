"""Decode attention at head dims between powers of two (80: OPT-2.7B, 96): one masked tile as
wide as the next power of two (the build before the split) against a 64-wide main and a 32-wide
tail tile (attention_builds.tile_split), the split's plans cut for 4 and 5 programs per SM (ptxas:
96-116 registers, 29 KiB, 4-5 per SM; the masked 128-wide build 124-128 registers, 4) and in 3
stages; torch SDPA over a contiguous cache where every head is read. Timed in a graph
(GraphTimer.in_graph, L2 flushed before each call); outputs checked against the first variant's.

    PYTHONPATH=. python3 benchmarks/head_tiles_ab.py benchmarks/results/<gpu>/ab/head_tiles.json

Why: the grid's head-dim rows (run 78) ran at 61-86% of the floor at head dim 80 and 47-91% at 96,
where 128-wide heads run at 95-108%: the 128-wide tile moves 1.6x (80) and 1.33x (96) the head's
columns through shared memory, registers and the MMAs for every byte read from HBM.
"""
import statistics
import sys


from benchmarks.plan_waves_ab import time_cases, write_rows
from kernels.attention_builds import AttentionConfig, padded_head_dim, tile_split

CASES = [  # name, B, Hq, Hkv, D, lengths ("mixed": 512-6144), k
    ("opt-2.7b B16 1920 dense", 16, 32, 32, 80, [1920] * 16, 32),
    ("opt-2.7b B64 1920 dense", 64, 32, 32, 80, [1920] * 64, 32),
    ("opt-2.7b B64 1920 k16", 64, 32, 32, 80, [1920] * 64, 16),
    ("mha32-d80 B8 4096 dense", 8, 32, 32, 80, [4096] * 8, 32),
    ("mha32-d80 B64 4096 dense", 64, 32, 32, 80, [4096] * 64, 32),
    ("mha32-d80 B256 4096 k10", 256, 32, 32, 80, [4096] * 256, 10),
    ("mha32-d80 B64 mixed k16", 64, 32, 32, 80, "mixed", 16),
    ("gqa-d96 B8 4096 dense", 8, 32, 8, 96, [4096] * 8, 8),
    ("gqa-d96 B64 4096 dense", 64, 32, 8, 96, [4096] * 64, 8),
    ("gqa-d96 B64 4096 k2", 64, 32, 8, 96, [4096] * 64, 2),
    ("gqa-d96 B256 4096 dense", 256, 32, 8, 96, [4096] * 256, 8),
    ("gqa-d96 B64 mixed k4", 64, 32, 8, 96, "mixed", 4),
    ("mha16-d160 B64 4096 dense", 64, 16, 16, 160, [4096] * 64, 16),
]


def variants(d: int) -> dict:
    """{name: (kernel config, programs per SM the plan is cut for)}: the padded tile first (the
    build before the split), the reference the others' outputs and times are taken against."""
    padded, split = padded_head_dim(d), tile_split(d)
    if padded == 128:
        return {"pad": (AttentionConfig(tiles=(padded, 0)), 4),
                "split/r4": (AttentionConfig(tiles=split), 4),
                "split/r5": (AttentionConfig(tiles=split), 5),
                "split s3/r4": (AttentionConfig(tiles=split, num_stages=3), 4)}
    return {"pad": (AttentionConfig(block_n=32, num_stages=3, tiles=(padded, 0)), 3),
            "split/r3": (AttentionConfig(block_n=32, num_stages=3, tiles=split), 3),
            "split/r4": (AttentionConfig(block_n=32, num_stages=3, tiles=split), 4)}


def main(out: str) -> None:
    def describe(case: tuple, row: dict) -> str:
        g = row["us_in_graph"]
        return (f"{case[0]:26} floor {row['floor_us']:7.1f} | " + " ".join(f"{key} {t:7.1f}" for key, t in g.items())
                + " | % of floor " + " ".join(f"{100 * row['floor_us'] / t:.0f}" for t in g.values()))

    bw, rows = time_cases(CASES, lambda case: {key: (config, {"resident": r})
                                               for key, (config, r) in variants(case[4]).items()}, describe)
    for key in ("split/r4", "split/r5", "split s3/r4", "split/r3", "sdpa"):
        ratios = [r["us_in_graph"][key] / r["us_in_graph"]["pad"] for r in rows if key in r["us_in_graph"]]
        if ratios:
            print(f"{key} / pad: median {statistics.median(ratios):.3f} min {min(ratios):.3f} "
                  f"max {max(ratios):.3f} over {len(ratios)}", flush=True)
    write_rows(out, bw, rows)


if __name__ == "__main__":
    main(sys.argv[1])
