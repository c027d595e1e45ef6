"""Multi-rank tests on CPU: `run_ranks(fn, world_size, *args)` starts `world_size` spawned
processes that join a gloo group through the environment torchrun would set, on a free port,
and fails the test with each failing rank's traceback, prefixed `[rank r]`, if any rank raises,
exits non-zero or hangs past the timeout. `start_ranks` starts them and hands back the
processes, for tests that expect ranks to fail (and time how fast they do).

`fn` must be importable by the spawned processes: a module-level function of a test module or
of this package, called as `fn(rank, world_size, *args)`; the arguments are pickled.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable

import pytest
import torch


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0 and let the OS choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768-60999), for a server that a launcher
    starts seconds later: a port from free_port() is an ephemeral one, which any outgoing
    connection on the machine may take in the meantime (EADDRINUSE at the rendezvous)."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    return free_port()


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple, errors: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"})
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - relayed to the parent with the rank, then re-raised
        errors.put((rank, traceback.format_exc()))
        raise


def start_ranks(fn: Callable[..., None], world_size: int, *args: Any) -> tuple[list[Any], Any]:
    """Start `fn(rank, world_size, *args)` in `world_size` spawned processes on a free port;
    returns (processes, error queue). For tests that watch the processes themselves."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs, errors


def run_ranks(fn: Callable[..., None], world_size: int, *args: Any, timeout_s: float = 240.0) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; fail with every
    failing rank's traceback if one raises, exits non-zero, or is still running after `timeout_s`."""
    procs, errors = start_ranks(fn, world_size, *args)
    deadline = time.monotonic() + timeout_s  # one limit for the whole group, not per rank
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    reports = []
    while not errors.empty():
        rank, tb = errors.get()
        reports.append(f"[rank {rank}]\n{tb}")
    codes = [p.exitcode for p in procs]
    if reports or hung or any(codes):
        pytest.fail(f"ranks failed (exit codes {codes}, hung {hung}):\n" + "\n".join(reports), pytrace=False)
