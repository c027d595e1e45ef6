"""The control channel: the driver's step messages (int64 arrays, polar_dist/engine/step.py) to
the other ranks of its replica.

Two transports, chosen once at construction (a collective over the control group):
- every rank of the replica on its driver's machine (same host name and boot id) on x86-64: a shared-memory ring
  (polar_dist/engine/shm_ring.py), a few microseconds a message instead of a gloo round of
  TCP. If any rank is on another machine, every rank uses gloo (no mixed layout).
- otherwise the gloo control group: a message travels in a fixed-size buffer (one broadcast)
  when it fits, which a decode step at full batch always does; a longer one sends its
  remainder in a second broadcast, whose size the first one carried.

Failures end the ranks as over gloo: a worker that receives nothing (IDLE heartbeats included)
for parallel.timeout_s raises; a dead worker is found by rank 0 through the next collective.
Over shared memory rank 0 writes without waiting for anyone, so each IDLE heartbeat is paired
with a one-word gloo broadcast: an idle rank 0 still finds a dead worker (the broadcast fails);
a worker waiting on the ring watches rank 0's process, and raises as soon as it has ended.
"""

from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import torch

from polar_dist.engine import shm_ring
from polar_dist.engine.step import MsgKind
from polar_dist.log import get_logger
from polar_dist.parallel.context import ParallelContext

log = get_logger(__name__)


def buffer_capacity(max_batch_size: int) -> int:
    """Header + a decode step's tokens + room for new blocks and a few new sequences."""
    return max(1024, 16 + 4 * max_batch_size)


def host_id() -> str:
    """This machine's identity: host name and boot id (containers on one host share the boot id
    but not necessarily /dev/shm; the host name tells them apart)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ControlChannel:
    """Construct on every rank at the same point (collective). `shared_memory=False` keeps gloo."""

    RING_MESSAGES = 4  # the ring holds this many full buffers: rank 0 may run ahead of a slow reader
    GPU_SPIN_S, CPU_SPIN_S = 50e-3, 1e-3

    def __init__(self, ctx: ParallelContext, capacity: int, timeout_s: float = 120.0,
                 shared_memory: bool = True) -> None:
        self.ctx = ctx
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._buf = torch.zeros(capacity, dtype=torch.int64)
        self._view = self._buf.numpy()
        self._beat = torch.zeros(1, dtype=torch.int64)
        self.ring: shm_ring.ShmRing | None = None
        if ctx.tp_size > 1 and shared_memory:
            self.ring = self._open_ring()

    @property
    def transport(self) -> str:
        return "none" if self.ctx.tp_size == 1 else "shm" if self.ring is not None else "gloo"

    def _open_ring(self) -> shm_ring.ShmRing | None:
        readers, words = self.ctx.tp_size - 1, self.RING_MESSAGES * self.capacity
        # How long a waiting rank spins before it sleeps: a GPU worker waits a whole step (it does
        # not wait for its kernels), and must not oversleep the next message; a CPU rank waits
        # only for rank 0's sampling, and shares the cores with the others.
        spin_s = self.GPU_SPIN_S if self.ctx.device.type == "cuda" else self.CPU_SPIN_S
        ring, name = None, None
        if self.ctx.is_driver and shm_ring.supported():
            name = f"polar-control-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                ring = shm_ring.ShmRing.create(name, readers, words, spin_s)
            except OSError as e:
                log.info("no shared-memory control ring (%s); using gloo", e)
                name = None
        try:
            host, name, pid = self.ctx.broadcast_object((host_id(), name, os.getpid()))
            if not self.ctx.is_driver and name is not None and host == host_id():
                try:
                    ring = shm_ring.ShmRing.open(name, readers, words, self.ctx.tp_rank - 1, spin_s, writer_pid=pid)
                except OSError:
                    ring = None
            everyone = self.ctx.all_reduce_min(int(ring is not None))  # every rank mapped it
        finally:
            if self.ctx.is_driver and ring is not None:
                ring.unlink()  # the mappings stay; the name goes, whatever happens next
        if not everyone:
            if ring is not None:
                ring.close()
            log.info("control messages over gloo: not every rank is on this machine (or could map the ring)")
            return None
        if self.ctx.is_driver:
            log.info("control messages through shared memory: every rank is on this machine")
        return ring

    def send(self, msg: np.ndarray) -> None:
        """The driver: send `msg` (its element 1 is its length) to the other ranks of its replica."""
        if self.ctx.tp_size == 1:
            return
        if self.ring is not None:
            self.ring.write(msg, self.timeout_s)
            if msg[0] == MsgKind.IDLE:
                self.ctx.broadcast_tensor(self._beat)  # raises if a worker is gone
            return
        n = min(len(msg), self.capacity)
        self._view[:n] = msg[:n]
        self.ctx.broadcast_tensor(self._buf)
        if len(msg) > self.capacity:
            self.ctx.broadcast_tensor(torch.from_numpy(np.ascontiguousarray(msg[self.capacity:])))

    def recv(self) -> np.ndarray:
        """Other ranks: the next message (blocks until it comes; RuntimeError after the timeout)."""
        if self.ring is not None:
            msg = self.ring.read(self.timeout_s)
            if msg[0] == MsgKind.IDLE:
                self.ctx.broadcast_tensor(self._beat)
            return msg
        self.ctx.broadcast_tensor(self._buf)
        total = int(self._view[1])
        if total <= self.capacity:
            return self._view[:total].copy()
        rest = torch.empty(total - self.capacity, dtype=torch.int64)
        self.ctx.broadcast_tensor(rest)
        return np.concatenate([self._view, rest.numpy()])
