"""Timing of candidate kernels as decode runs them: captured in a CUDA graph (host launch time
drops out), replays timed with L2 flushed before each (every layer's weights are cold when its
turn comes), the median of a few. kernels/mlp_dispatch.py times its candidates with it, and
NeuronSparseMLP its sparse and dense paths, outside any capture; the kernel benchmarks too.

The flush reads twice the L2's bytes (a sum): every line the timed kernel could hit is evicted
and the lines left are clean, as after a decode step's weight GEMMs. A flush by writing (a
zero_, as triton.testing.do_bench does) leaves L2 full of dirty lines that the timed kernel's
first reads must write back: measured on the H200, 3-8 us more per replay on kernels that read
>= 30 MB, nothing measurable under ~15 MB (benchmarks/timer_flush_ab.py), a cost no decode step pays.

A replay of a one-kernel graph also pays the graph's launch: an empty kernel's replay times
3.8 us on the H200, while inside a decode step's graph the kernels of a layer follow each
other with < 0.1 ms of gaps over ~400 kernels a step (benchmarks/step_timeline.py).
`GraphTimer.in_graph` measures the kernel as a step runs it: one graph holding `copies` x
(flush, callable), less a graph of the flushes alone, divided by `copies`.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

REPS = 5  # timed graph replays per candidate (median); each ~5 us to 1 ms at decode shapes
IN_GRAPH_COPIES = 10  # (flush, callable) pairs in one in_graph graph: the launch is paid once for all


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

    def _flush(self) -> None:
        if self.flush == "read":
            self.buffer.sum(dtype=torch.int64)  # evicts every line, leaves the rest clean
        elif self.flush == "write":
            self.buffer.zero_()  # evicts every line, leaves them dirty

    def _capture(self, body: Callable[[], object]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end on a side stream, not torch.cuda.graph(): that one also runs
        # gc.collect() and empty_cache() per capture, tens of ms in a loaded server process.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            graph.capture_begin()
            try:
                body()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph.replay()  # warm: the first replay uploads the graph
        return graph

    def _events(self) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
        return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(self.reps)]

    def __call__(self, fn: Callable[[], torch.Tensor]) -> float:
        fn()  # compile (Triton) / pick kernels (cuBLAS) outside the capture
        graph = self._capture(fn)
        events = self._events()
        for start, end in events:
            self._flush()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)

    def in_graph(self, fn: Callable[[], torch.Tensor], copies: int = IN_GRAPH_COPIES) -> float:
        """Median ms of one call of fn inside a graph, L2 flushed before it: replays of a graph of
        `copies` x (flush, fn) against replays of its `copies` flushes alone, alternated, each
        median's difference / copies. The graph's launch cancels out; what is left is what fn adds
        to a step's graph (its kernels' launch within a graph, ramp and drain, and the work)."""
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        fn()
        both = self._capture(lambda: [(self._flush(), fn()) for _ in range(copies)])
        flushes = self._capture(lambda: [self._flush() for _ in range(copies)])
        timed = [(both, self._events()), (flushes, self._events())]
        for i in range(self.reps):
            for graph, events in timed:
                events[i][0].record()
                graph.replay()
                events[i][1].record()
        torch.cuda.synchronize()
        with_fn, alone = (statistics.median(s.elapsed_time(e) for s, e in events) for _, events in timed)
        return (with_fn - alone) / copies


def time_graphs_ms(fns: list[Callable[[], torch.Tensor]], device: torch.device, reps: int = REPS) -> list[float]:
    """Median ms of each callable's CUDA-graph replays, L2 flushed before each; call outside any capture."""
    timer = GraphTimer(device, reps)
    return [timer(fn) for fn in fns]
