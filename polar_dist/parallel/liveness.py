"""Which ranks of a replica have ended: for the message a surviving rank fails with.

    peers = RankProcesses.gather(control_group, tp_rank)   # at start, collective over the replica
    peers.describe_lost()   # after a failed collective: "rank 2 (pid 4121 on node-a) has ended"

A collective that fails (a closed connection, a timeout) says nothing about which peer caused
it. At start every rank of a replica shares its host name and pid; after a failure a rank checks
the peers on its own host (the process gone, or a zombie that its launcher has not reaped yet)
and names those that ended. Peers on other hosts cannot be checked from here: they are listed
as unchecked, so a reader knows where to look next.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankProcess:
    rank: int  # global rank
    host: str
    pid: int


def process_ended(pid: int) -> bool:
    """Whether process `pid` of this host has ended (gone, or a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(comm)"
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class RankProcesses:
    def __init__(self, peers: list[RankProcess], me: int) -> None:
        self.peers = peers  # every rank of the replica, this one included
        self.me = me  # this rank's global rank
        self.host = socket.gethostname()

    @classmethod
    def gather(cls, group: Any, rank: int) -> RankProcesses:
        """Collective over `group` (the replica's gloo control group): every rank's host and pid."""
        import torch.distributed as dist

        mine = RankProcess(rank, socket.gethostname(), os.getpid())
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        return cls(sorted(every, key=lambda p: p.rank), rank)

    def ended(self) -> list[RankProcess]:
        """The peers on this host whose process has ended."""
        return [p for p in self.peers if p.rank != self.me and p.host == self.host and process_ended(p.pid)]

    def describe_lost(self) -> str:
        """One sentence on which peers ended, e.g. "rank 2 (pid 4121 on node-a) has ended"."""
        ended = self.ended()
        elsewhere = sorted(p.rank for p in self.peers if p.host != self.host)
        if ended:
            names = ", ".join(f"rank {p.rank} (pid {p.pid} on {p.host})" for p in ended)
            text = f"{names} {'has' if len(ended) == 1 else 'have'} ended"
        else:
            text = f"every other rank of this replica on {self.host} is still running"
        if elsewhere:
            text += f"; ranks {elsewhere} run on other hosts and were not checked"
        return text
