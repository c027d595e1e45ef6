"""Arrival counters: zeroed int32 words that a kernel's programs count themselves in on.

When several programs of one launch each write a partial result of the same output tile, the
last one to arrive can finish the tile itself (read the others' partials back, write the
output) instead of a second kernel doing it, which saves a launch and a graph node. Each
program stores its partial, counts itself in with an atomic add (acquire-release, so the
partials written before are visible to whoever counts last), and the program that sees the
count reach the number of contributors merges and writes the counter back to 0. The counters
are therefore zero before and after every launch: one buffer, zeroed once, serves every
launch and every CUDA-graph replay with no memset.

The buffer is per device and grows on demand, never while a CUDA graph is being captured (the
zero fill would only be recorded, not run, so an eager launch before the first replay would
read garbage): a launch that captures runs once eagerly first, as DecodeGraphs and the graph
timers do. A buffer that a larger one replaces is kept alive, since a captured graph may still
read it. Kernels that use the counters must not run
concurrently on two streams of one device (the runtime uses one stream per device).
"""

from __future__ import annotations

import torch

_MIN_WORDS = 1 << 14  # 64 KiB: every launch at decode sizes fits the first buffer
_buffers: dict[torch.device, torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # replaced buffers that captured graphs may still read


def counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 counters on `device` (a view of the device's buffer); every launch that
    uses them must leave them at 0."""
    buf = _buffers.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"arrival counters: {n} needed while capturing a CUDA graph and "
                               f"{0 if buf is None else buf.numel()} allocated; run the launch once eagerly "
                               "before capturing it")
        if buf is not None:
            _retired.append(buf)
        buf = _buffers[device] = torch.zeros(max(n, _MIN_WORDS), dtype=torch.int32, device=device)
    return buf[:n]
