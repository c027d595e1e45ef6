"""Where a CUDA-graph decode step's GPU time goes: its kernels as the GPU ran them, and the
gaps between them (benchmarks/throughput.py --timeline).

One step is replayed under torch.profiler (CUPTI records the kernels a graph launches, with
their device timestamps). From the sorted intervals: the step's span (first kernel start to last
kernel end), busy time (the union of kernel intervals), the gaps (span - busy), and per kernel
name its launches and time, and the gap time before it (what a kernel boundary costs there:
launch latency, and with programmatic dependent launch, what the previous kernel's early
release hides of it).
"""

from __future__ import annotations

from collections import defaultdict

import torch

TOP = 12  # kernel names kept per row, by time


def short_name(name: str) -> str:
    """A kernel's name without its template arguments or parameter list, at most 60 characters."""
    for cut in ("<", "("):
        name = name.split(cut, 1)[0]
    return name.strip()[:60]


def intervals_summary(spans: list[tuple[float, float, str]]) -> dict:
    """spans: (start us, end us, name) of the device work of one step, any order."""
    spans = sorted(spans)
    if not spans:
        return {"kernels": 0, "span_ms": 0.0, "busy_ms": 0.0, "gap_ms": 0.0, "by_kernel": []}
    busy, gap = 0.0, 0.0
    reach = spans[0][0]  # the furthest end so far (overlapping kernels, PDL)
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # launches, us, gap us before
    for start, end, name in spans:
        before = max(0.0, start - reach)
        gap += before
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
        entry = per_name[short_name(name)]
        entry[0] += 1
        entry[1] += end - start
        entry[2] += before
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {"kernels": len(spans), "span_ms": (reach - spans[0][0]) / 1e3, "busy_ms": busy / 1e3,
            "gap_ms": gap / 1e3,
            "by_kernel": [{"name": n, "launches": int(c), "ms": t / 1e3, "gap_before_ms": g / 1e3}
                          for n, (c, t, g) in top]}


def step_timeline(run_step, device: torch.device) -> dict:
    """Profile one call of run_step() (a graph-replayed decode forward) on `device`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run_step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
        torch.cuda.synchronize(device)
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
             if e.device_type == DeviceType.CUDA]
    return intervals_summary(spans)
