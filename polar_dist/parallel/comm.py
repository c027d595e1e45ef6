"""Tensor-parallel communication behind one small interface, with the group passed in.

`SingleRank` is the tp=1 implementation and never touches torch.distributed, so the models
run on one device without it. `GroupComm` wraps a torch.distributed process group.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TPComm(Protocol):
    """What a tensor-parallel layer needs from its group."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns `x`."""
        ...

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        ...

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Overwrite `x` with the group's first rank's (the replica's driver), in place; returns `x`."""
        ...


class SingleRank:
    rank = 0
    size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        return x


class GroupComm:
    """TPComm over a torch.distributed process group (NCCL on CUDA, gloo on CPU)."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        self._dist.broadcast(x, group=self.group, group_src=0)
        return x


class TimedComm:
    """A TPComm that, while `timing` is on, adds the wall time of each collective to `seconds`,
    synchronizing the device before and after, so the time is the collective's own and not the
    compute queued ahead of it (benchmarks: all-reduce time reported apart from compute). The
    synchronizations slow the step down: time the step itself with `timing` off."""

    def __init__(self, inner: TPComm, device: torch.device) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.device = device
        self.timing = False
        self.seconds = 0.0
        self.calls = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        if not self.timing:
            return fn(x)
        import time

        self._sync()
        t0 = time.perf_counter()
        out = fn(x)
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed(self.inner.all_reduce, x)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed(self.inner.all_gather_last_dim, x)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        return self._timed(self.inner.broadcast_from_first, x)
