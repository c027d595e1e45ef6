"""The control channel: the driver's step messages (int64 arrays, polar_dist/engine/step.py) to
the other ranks of its replica, over the replica's control (gloo) group.

A message travels in a fixed-size buffer (one broadcast) when it fits, which a decode step at
full batch always does; a longer one (a big prefill chunk's tokens) sends its remainder in a
second broadcast, whose size the first one carried.
"""

from __future__ import annotations

import numpy as np
import torch

from polar_dist.parallel.context import ParallelContext


def buffer_capacity(max_batch_size: int) -> int:
    """Header + a decode step's tokens + room for new blocks and a few new sequences."""
    return max(1024, 16 + 4 * max_batch_size)


class ControlChannel:
    def __init__(self, ctx: ParallelContext, capacity: int) -> None:
        self.ctx = ctx
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.int64)
        self._view = self._buf.numpy()

    def send(self, msg: np.ndarray) -> None:
        """The driver: broadcast `msg` (its element 1 is its length)."""
        if self.ctx.tp_size == 1:
            return
        n = min(len(msg), self.capacity)
        self._view[:n] = msg[:n]
        self.ctx.broadcast_tensor(self._buf)
        if len(msg) > self.capacity:
            self.ctx.broadcast_tensor(torch.from_numpy(np.ascontiguousarray(msg[self.capacity:])))

    def recv(self) -> np.ndarray:
        """Other ranks: the next message (blocks until it comes, or the group's timeout)."""
        self.ctx.broadcast_tensor(self._buf)
        total = int(self._view[1])
        if total <= self.capacity:
            return self._view[:total].copy()
        rest = torch.empty(total - self.capacity, dtype=torch.int64)
        self.ctx.broadcast_tensor(rest)
        return np.concatenate([self._view, rest.numpy()])
