"""The data-parallel x tensor-parallel layout of a job: which ranks form which replica.

    layout = resolve_layout(cfg.parallel, world_size=8)    # parallel.tp = 4, parallel.dp = 2
    layout.ranks_of(1) == [4, 5, 6, 7]; layout.drivers() == [0, 4]

Contiguous ranks form a replica: every launcher numbers a node's ranks contiguously, so with
tp dividing the ranks of a node each replica's all-reduces stay inside that node.
"""

from __future__ import annotations

from dataclasses import dataclass

from polar_dist.config import ParallelConfig
from polar_dist.errors import UserError


@dataclass(frozen=True)
class ReplicaLayout:
    """world = num_replicas x tp_size; replica r holds the contiguous global ranks
    [r * tp_size, (r + 1) * tp_size), and its driver is the first of them."""

    tp_size: int
    num_replicas: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.num_replicas

    def replica_of(self, rank: int) -> int:
        return rank // self.tp_size

    def ranks_of(self, replica: int) -> list[int]:
        return list(range(replica * self.tp_size, (replica + 1) * self.tp_size))

    def drivers(self) -> list[int]:
        return [r * self.tp_size for r in range(self.num_replicas)]


def resolve_layout(cfg: ParallelConfig, world_size: int) -> ReplicaLayout:
    """parallel.tp and parallel.dp against the launcher's world size (tp = 0: world size / dp)."""
    dp = cfg.dp
    if cfg.tp == 0:
        if world_size % dp:
            raise UserError(f"parallel.dp = {dp} does not divide the launcher's {world_size} process(es); start a "
                            f"multiple of {dp} processes, or set parallel.dp to a divisor of {world_size}")
        return ReplicaLayout(world_size // dp, dp)
    if cfg.tp * dp != world_size:
        what = f"parallel.tp = {cfg.tp}" + (f" x parallel.dp = {dp}" if dp > 1 else "")
        raise UserError(
            f"{what} needs {cfg.tp * dp} process(es) but the launcher started {world_size}; start "
            f"--nproc_per_node {cfg.tp * dp} (or mpirun -np {cfg.tp * dp}) in all, or set parallel.tp to 0 to follow "
            f"the launcher" + (" (tp = world size / dp)" if dp > 1 else ""))
    return ReplicaLayout(cfg.tp, dp)
