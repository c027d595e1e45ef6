"""The attention plan's item order: sequences in index order (the runtime's before H200 run 69)
against the longest pieces first (plan_attention(longest_first=True)), the same cut either way,
timed in a graph (GraphTimer.in_graph, L2 flushed before each call) at plan_waves_ab.py's cases
and more batches of unequal lengths; outputs checked against the index order's. Also the plan's host time at
batch 256 both ways.

    PYTHONPATH=. python3 benchmarks/plan_order_ab.py benchmarks/results/<gpu>/ab/plan_order.json

Why: the GPU starts a launch's programs in the order of their ids, so with unequal pieces the
ones that start last decide when the launch ends; longest first leaves short pieces for that
tail (list scheduling, longest processing time first).
"""
import statistics
import sys
import time

import numpy as np

from benchmarks.plan_waves_ab import CASES, time_cases, write_rows
from kernels.attention_plan import StepPlanner

MORE = [  # name, B, Hq, Hkv, D, lengths, k: unequal lengths at more batches and densities
    ("l3-8b B64 mixed dense", 64, 32, 8, 128, "mixed", 8),
    ("l3-8b B128 mixed k4", 128, 32, 8, 128, "mixed", 4),
    ("l3-8b B256 mixed k4", 256, 32, 8, 128, "mixed", 4),
    ("l2-7b B32 mixed k16", 32, 32, 32, 128, "mixed", 16),
    ("l2-7b B64 mixed k16", 64, 32, 32, 128, "mixed", 16),
]
ORDERS = {"index": False, "longest_first": True}


def host_us(longest_first: bool, batch: int = 256, repeats: int = 500) -> float:
    """StepPlanner's median host time over consecutive decode steps, as the grid's plan_host_us."""
    lens = np.random.default_rng(0).integers(100, 8193, batch)
    planner = StepPlanner(8, 132, longest_first=longest_first)
    cap = planner.capacity(batch)
    planner.plan(lens, cap)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        planner.plan(lens + i + 1, cap)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(out: str) -> None:
    def describe(case: tuple, row: dict) -> str:
        g = row["us_in_graph"]
        return (f"{case[0]:24} floor {row['floor_us']:6.1f} index {g['index']:6.1f} longest first "
                f"{g['longest_first']:6.1f} ({g['longest_first'] / g['index']:.3f}x; {row['plans']['index']['items']} "
                f"items)")

    variants = {order: (None, {"longest_first": longest_first}) for order, longest_first in ORDERS.items()}
    # the same pieces, merged in the same order: the same bits
    bw, rows = time_cases(CASES + MORE, lambda case: variants, describe, tol=0.0, sdpa=False)
    ratios = [r["us_in_graph"]["longest_first"] / r["us_in_graph"]["index"] for r in rows]
    host = {order: host_us(longest_first) for order, longest_first in ORDERS.items()}
    print(f"longest first / index: median {statistics.median(ratios):.3f} min {min(ratios):.3f} max "
          f"{max(ratios):.3f}; host us at B 256: {host}", flush=True)
    write_rows(out, bw, rows, host_us_b256=host)


if __name__ == "__main__":
    main(sys.argv[1])
