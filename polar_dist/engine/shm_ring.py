"""A one-writer, many-reader ring of int64 messages in shared memory, for ranks on one machine.

A message is an int64 array whose element 1 is its length (the step protocol's messages,
polar_dist/engine/step.py). The writer copies it into the ring and then publishes the new
write count; each reader copies it out and then publishes its own read count, so the writer
never overwrites what a reader has not read. A message longer than the ring streams through
it in pieces. The counters only grow (int64 words since the start), and each sits on its own
cache line.

Publishing by a plain store after the copy relies on x86-64's store order (a reader that sees
the count sees the words before it); `supported()` says False elsewhere and the caller uses
another transport.

Waiting: spin for `spin_s` (yielding the core to other runnable threads), then sleep in
growing steps up to 1 ms (5 ms after a second of silence), so a waiting rank costs little CPU.
A wait longer than `timeout_s` raises RingTimeout: the other side is gone or stuck. A reader
told the writer's pid raises at once when that process has ended (checked every PEER_CHECK_S
while it sleeps): a worker whose driver was killed ends without waiting out the timeout.

The segment is a file under /dev/shm, named by the caller (a fresh uuid per engine); the writer
unlinks it once every reader has mapped it, so nothing is left behind however the processes end.
"""

from __future__ import annotations

import mmap
import os
import platform
import time

import numpy as np

LINE = 8  # int64 words per cache line: each counter has its own
SHM_DIR = "/dev/shm"
PEER_CHECK_S = 0.05  # how often a sleeping reader looks whether the writer's process still runs


class RingTimeout(RuntimeError):
    """No progress within the timeout: the other side stopped."""


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` in /proc (R, S, Z for an ended one not yet reaped, ...),
    None when there is no such process here."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


class ShmRing:
    """`ShmRing.create(name, ...)` on the writer, `ShmRing.open(name, reader=i)` on reader i."""

    def __init__(self, path: str, readers: int, words: int, reader: int | None, create: bool,
                 spin_s: float = 2e-3) -> None:
        total = LINE * (1 + readers) + words
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, total * 8)
            self._mm = mmap.mmap(fd, total * 8)
        finally:
            os.close(fd)
        mem = np.frombuffer(self._mm, dtype=np.int64)
        self._head = mem[0:1]  # words written
        self._tails = mem[LINE:LINE * (1 + readers):LINE]  # words read, one per reader
        self._data = mem[LINE * (1 + readers):]
        self.path, self.words, self.reader, self.spin_s = path, words, reader, spin_s
        self._pos = int(self._tails[reader]) if reader is not None else int(self._head[0])
        self._min_tail = self._pos  # writer: the slowest reader's count when last looked
        self._writer_pid: int | None = None  # reader: the writer's process, watched while waiting

    @classmethod
    def create(cls, name: str, readers: int, words: int, spin_s: float = 2e-3) -> ShmRing:
        return cls(segment_path(name), readers, words, None, True, spin_s)

    @classmethod
    def open(cls, name: str, readers: int, words: int, reader: int, spin_s: float = 2e-3,
             writer_pid: int | None = None) -> ShmRing:
        """Reader `reader`'s side. With `writer_pid`, a wait ends as soon as that process has
        ended (ignored when this process cannot see it: another pid namespace)."""
        ring = cls(segment_path(name), readers, words, reader, False, spin_s)
        if writer_pid is not None and process_state(writer_pid) is not None:
            ring._writer_pid = writer_pid
        return ring

    def unlink(self) -> None:
        """Remove the name; mapped rings keep working until their processes close them."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._head = self._tails = self._data = None  # type: ignore[assignment]
        self._mm.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:  # noqa: ANN001
        """Until ready() is true: spin, then sleep; RingTimeout after timeout_s."""
        if ready():
            return
        start = time.monotonic()
        spin_end = start + self.spin_s
        while time.monotonic() < spin_end:
            if ready():
                return
            os.sched_yield()
        nap, next_check = 50e-6, start + PEER_CHECK_S
        while not ready():
            now = time.monotonic()
            if now - start > timeout_s:
                raise RingTimeout(f"{what} within {timeout_s:g} s")
            if self._writer_pid is not None and now >= next_check:
                next_check = now + PEER_CHECK_S
                if process_state(self._writer_pid) in (None, "Z", "X"):
                    raise RingTimeout(f"{what}: the writer's process (pid {self._writer_pid}) has ended")
            time.sleep(nap)
            nap = min(2 * nap, 1e-3 if now - start < 1.0 else 5e-3)

    # writer

    def write(self, msg: np.ndarray, timeout_s: float) -> None:
        """Append `msg`; waits (up to timeout_s) while the slowest reader is a whole ring behind."""
        n, done, W = len(msg), 0, self.words
        while done < n:
            free = W - (self._pos - self._min_tail)
            if free <= 0:
                def room() -> bool:
                    self._min_tail = int(self._tails.min())
                    return self._pos - self._min_tail < W

                self._wait(room, timeout_s, "a reader of the control ring read nothing")
                continue
            at = self._pos % W
            k = min(n - done, free, W - at)
            self._data[at:at + k] = msg[done:done + k]
            self._pos += k
            done += k
            self._head[0] = self._pos  # publish after the copy

    # reader

    def read(self, timeout_s: float) -> np.ndarray:
        """The next message (a copy); RingTimeout if the writer adds nothing for timeout_s."""
        W, tail = self.words, self._tails[self.reader:self.reader + 1]
        head = self._head
        self._wait(lambda: int(head[0]) - self._pos >= 2, timeout_s, "no message came")
        at = self._pos % W
        n = int(self._data[(at + 1) % W])  # the message's length
        if at + n <= W and int(head[0]) - self._pos >= n:  # whole and contiguous: one copy
            out = self._data[at:at + n].copy()
            self._pos += n
            tail[0] = self._pos
            return out
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            self._wait(lambda: int(head[0]) > self._pos, timeout_s, "the rest of a message did not come")
            at = self._pos % W
            k = min(n - done, int(head[0]) - self._pos, W - at)
            out[done:done + k] = self._data[at:at + k]
            self._pos += k
            done += k
            tail[0] = self._pos  # free the words for the writer
        return out
