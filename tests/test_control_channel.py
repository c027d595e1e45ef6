"""The shared-memory control ring and the control channel over it: every kind and length of
message (longer than the ring too) arrives whole and in order from a fast producer, to
several readers; a reader whose producer is gone raises within the timeout, or at once when it
knows the producer's process and that has ended; a writer whose reader stopped does too; the segment's name is gone once the ranks mapped it."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from support.ranks import run_ranks
from polar_dist.config import ParallelConfig
from polar_dist.engine import shm_ring
from polar_dist.engine.control import ControlChannel
from polar_dist.engine.shm_ring import RingTimeout, ShmRing
from polar_dist.engine.step import HEADER, MsgKind, NewSeq, StepDelta, control_message, encode

pytestmark = pytest.mark.skipif(not shm_ring.supported(), reason="shared-memory ring needs x86-64 and /dev/shm")


def _messages(count: int, seed: int = 0) -> list[np.ndarray]:
    """STEP messages of lengths 8 .. 700 (a 64-word ring streams the long ones), IDLE and STOP."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 7 == 3:
            out.append(control_message(MsgKind.IDLE))
            continue
        n = int(rng.choice([0, 1, 20, 56, 57, 100, 700]))
        delta = StepDelta(new=[NewSeq(i, n + 1, [i, i + 1])] if i % 5 == 0 else [],
                          prefill=[(i, n)] if n else [], token_ids=rng.integers(0, 1 << 40, n + 1).tolist())
        out.append(encode(delta))
    return out + [control_message(MsgKind.STOP)]


def _ring(words: int = 64, readers: int = 1) -> tuple[str, ShmRing]:
    name = f"polar-test-{uuid.uuid4().hex}"
    return name, ShmRing.create(name, readers, words)


def test_every_kind_and_length_arrives_in_order_from_a_fast_producer() -> None:
    name, writer = _ring()
    reader = ShmRing.open(name, 1, 64, reader=0)
    writer.unlink()
    msgs = _messages(400)
    t = threading.Thread(target=lambda: [writer.write(m, 10.0) for m in msgs])
    t.start()
    got = [reader.read(10.0) for _ in msgs]
    t.join()
    assert all(np.array_equal(a, b) for a, b in zip(got, msgs))
    assert [int(m[0]) for m in got[-2:]] == [MsgKind.STEP, MsgKind.STOP] and got[3][1] == HEADER


def _read_all(name: str, reader: int, count: int, out: str) -> None:
    ring = ShmRing.open(name, 2, 64, reader=reader)
    ok = all(np.array_equal(ring.read(10.0), m) for m in _messages(count))
    Path(out).write_text(json.dumps(ok))


def test_two_reader_processes_see_every_message() -> None:
    import multiprocessing as mp

    name, writer = _ring(readers=2)
    ctx = mp.get_context("spawn")
    outs = [f"/tmp/{name}-{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_read_all, args=(name, r, 300, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for m in _messages(300):  # the first ones wait in the ring until the readers come
        writer.write(m, 30.0)
    for p in procs:
        p.join(60)
    writer.unlink()
    results = [json.loads(Path(o).read_text()) for o in outs]
    for o in outs:
        os.unlink(o)
    assert results == [True, True] and [p.exitcode for p in procs] == [0, 0]


def test_reader_times_out_without_a_producer_and_writer_without_a_reader() -> None:
    name, writer = _ring()
    reader = ShmRing.open(name, 1, 64, reader=0)
    writer.unlink()
    start = time.monotonic()
    with pytest.raises(RingTimeout, match="no message came within 0.3 s"):
        reader.read(0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    writer.write(np.arange(60, dtype=np.int64), 1.0)  # fits; the reader reads nothing
    with pytest.raises(RingTimeout, match="read nothing"):
        writer.write(np.arange(60, dtype=np.int64), 0.3)


def test_reader_raises_at_once_when_the_writers_process_has_ended() -> None:
    import subprocess
    import sys

    name, writer = _ring()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for the writer
    try:
        reader = ShmRing.open(name, 1, 64, reader=0, writer_pid=victim.pid)
        alive = ShmRing.open(name, 1, 64, reader=0, writer_pid=os.getpid())
        writer.unlink()
        victim.kill()  # not reaped yet: a zombie ends the wait too
        start = time.monotonic()
        with pytest.raises(RingTimeout, match=rf"the writer's process \(pid {victim.pid}\) has ended"):
            reader.read(30.0)
        assert time.monotonic() - start < 1.0  # not the 30 s timeout
    finally:
        victim.kill()
        victim.wait()
    with pytest.raises(RingTimeout, match="no message came within 0.3 s"):  # a live writer: the timeout
        alive.read(0.3)


def test_segment_name_is_gone_after_unlink_and_mappings_still_work() -> None:
    name, writer = _ring()
    reader = ShmRing.open(name, 1, 64, reader=0)
    writer.unlink()
    assert not os.path.exists(shm_ring.segment_path(name))
    writer.write(control_message(MsgKind.STOP), 1.0)
    assert reader.read(1.0)[0] == MsgKind.STOP
    writer.close()
    reader.close()


def _channel_ranks(rank: int, world_size: int, out_dir: str) -> None:
    from polar_dist.parallel.context import init_parallel

    ctx = init_parallel(ParallelConfig(timeout_s=5.0), "cpu")
    channel = ControlChannel(ctx, capacity=32, timeout_s=2.0)
    assert channel.transport == "shm"
    before = set(os.listdir(shm_ring.SHM_DIR))
    msgs = _messages(60)
    if rank == 0:
        for m in msgs:
            channel.send(m)  # IDLE ones pair with a gloo broadcast
        Path(out_dir, "segments").write_text(json.dumps(sorted(s for s in before if s.startswith(f"polar-control-{os.getpid()}-"))))
        ctx.all_reduce_min(0)  # the workers checked
        # gone, as a process that ends does (os._exit: no interpreter teardown, where the gloo
        # group's destructor can abort while the workers still read): their next read fails
        os._exit(0)
    got = [channel.recv() for _ in msgs]
    assert all(np.array_equal(a, b) for a, b in zip(got, msgs))
    ctx.all_reduce_min(0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no message came"):
        channel.recv()
    Path(out_dir, f"waited-{rank}").write_text(str(time.monotonic() - start))


def test_channel_over_shared_memory_between_ranks(tmp_path: Path) -> None:
    run_ranks(_channel_ranks, 3, str(tmp_path))
    assert json.loads((tmp_path / "segments").read_text()) == []  # unlinked once every rank mapped it
    for r in (1, 2):
        assert float((tmp_path / f"waited-{r}").read_text()) < 4.0
