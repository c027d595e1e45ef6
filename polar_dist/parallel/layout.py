"""The data-parallel x tensor-parallel layout of a job: which ranks form which replica.

    layout = resolve_layout(cfg.parallel, world_size=8)    # parallel.tp = 4, parallel.dp = 2
    layout.ranks_of(1) == [4, 5, 6, 7]; layout.drivers() == [0, 4]

Contiguous ranks form a replica: every launcher numbers a node's ranks contiguously, so with
tp dividing the ranks of a node each replica's all-reduces stay inside that node.

A job is either every replica (one world of dp x tp ranks) or one replica alone (parallel.replica
set: a world of tp ranks, replica index `first_replica` of `dp`), when each replica runs as its
own launcher job so that a dead replica cannot take the others down with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from polar_dist.config import ParallelConfig
from polar_dist.errors import UserError


@dataclass(frozen=True)
class ReplicaLayout:
    """This job's world = num_replicas x tp_size; its replica `first_replica + i` holds the
    contiguous ranks [i * tp_size, (i + 1) * tp_size), and its driver is the first of them.
    `dp`: replicas over every job (0: this job's num_replicas, i.e. one job runs them all)."""

    tp_size: int
    num_replicas: int
    first_replica: int = 0
    dp: int = 0

    @property
    def world_size(self) -> int:
        return self.tp_size * self.num_replicas

    @property
    def total_replicas(self) -> int:
        return self.dp or self.num_replicas

    @property
    def one_job(self) -> bool:
        """Whether this job runs every replica (so its drivers can gather results at the end)."""
        return self.num_replicas == self.total_replicas

    def replica_of(self, rank: int) -> int:
        return self.first_replica + rank // self.tp_size

    def ranks_of(self, replica: int) -> list[int]:
        first = (replica - self.first_replica) * self.tp_size
        return list(range(first, first + self.tp_size))

    def drivers(self) -> list[int]:
        return [r * self.tp_size for r in range(self.num_replicas)]


def resolve_layout(cfg: ParallelConfig, world_size: int) -> ReplicaLayout:
    """parallel.tp, parallel.dp and parallel.replica against the launcher's world size (tp = 0:
    world size / dp, or the whole world for a job of one replica)."""
    dp = cfg.dp
    if cfg.replica is not None:  # this job is one replica alone
        if cfg.tp not in (0, world_size):
            raise UserError(
                f"parallel.replica = {cfg.replica} runs one replica of parallel.tp = {cfg.tp} ranks as its own job, "
                f"but the launcher started {world_size}; start --nproc_per_node {cfg.tp} (or mpirun -np {cfg.tp}) "
                "for this replica, or set parallel.replica to null to run every replica in one job")
        return ReplicaLayout(world_size, 1, first_replica=cfg.replica, dp=dp)
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
