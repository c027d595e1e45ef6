"""Timing of candidate kernels as decode runs them: captured in a CUDA graph (host launch time
drops out), replays timed with L2 flushed before each (every layer's weights are cold when its
turn comes), the median of a few. kernels/mlp_dispatch.py times its candidates with it, and
NeuronSparseMLP its sparse and dense paths, outside any capture; the kernel benchmarks too.

The flush reads twice the L2's bytes (a sum): every line the timed kernel could hit is evicted
and the lines left are clean, as after a decode step's weight GEMMs. A flush by writing (a
zero_, as triton.testing.do_bench does) leaves L2 full of dirty lines that the timed kernel's
first reads must write back: measured on the H200, 3-8 us more per replay on kernels that read
>= 30 MB, nothing measurable under ~15 MB (benchmarks/timer_flush_ab.py), a cost no decode step pays.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

REPS = 5  # timed graph replays per candidate (median); each ~5 us to 1 ms at decode shapes


def l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))


FLUSHES = ("read", "write", "none")  # how L2 is flushed before a timed replay; "read" is the timer's own


class GraphTimer:
    """Median ms of a callable's CUDA-graph replays, L2 flushed before each (`flush`: by a read;
    "write" and "none" only for benchmarks/timer_flush_ab.py's comparison)."""

    def __init__(self, device: torch.device, reps: int = REPS, flush: str = "read") -> None:
        if flush not in FLUSHES:
            raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
        self.buffer = torch.ones(2 * l2_bytes(device) // 4, dtype=torch.int32, device=device)
        self.flush = flush
        self.reps = reps
        self.stream = torch.cuda.Stream(device)  # captures must not use the legacy default stream

    def __call__(self, fn: Callable[[], torch.Tensor]) -> float:
        fn()  # compile (Triton) / pick kernels (cuBLAS) outside the capture
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end on a side stream, not torch.cuda.graph(): that one also runs
        # gc.collect() and empty_cache() per capture, tens of ms in a loaded server process.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            graph.capture_begin()
            try:
                fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph.replay()  # warm: the first replay uploads the graph
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            if self.flush == "read":
                self.buffer.sum(dtype=torch.int64)  # evicts every line, leaves the rest clean
            elif self.flush == "write":
                self.buffer.zero_()  # evicts every line, leaves them dirty
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def time_graphs_ms(fns: list[Callable[[], torch.Tensor]], device: torch.device, reps: int = REPS) -> list[float]:
    """Median ms of each callable's CUDA-graph replays, L2 flushed before each; call outside any capture."""
    timer = GraphTimer(device, reps)
    return [timer(fn) for fn in fns]
