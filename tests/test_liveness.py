"""parallel/liveness.py: a peer on this host is named as ended once its process is gone or a
zombie, never while it runs; peers on other hosts are listed as unchecked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from polar_dist.parallel.liveness import RankProcess, RankProcesses, process_ended


def test_a_running_process_is_not_ended_a_zombie_or_a_reaped_one_is() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert not process_ended(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_ended(proc.pid):  # a zombie until reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert process_ended(proc.pid)
    assert not process_ended(os.getpid())


def test_describe_lost_names_the_ended_peers_and_the_unchecked_hosts() -> None:
    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        peers = [RankProcess(0, host, os.getpid()), RankProcess(1, host, alive.pid), RankProcess(2, host, gone.pid),
                 RankProcess(3, "another-host", 1)]
        text = RankProcesses(peers, me=0).describe_lost()
        assert text == f"rank 2 (pid {gone.pid} on {host}) has ended; ranks [3] run on other hosts and were not checked"
        still = RankProcesses(peers[:2], me=0).describe_lost()
        assert still == f"every other rank of this replica on {host} is still running"
    finally:
        alive.kill()
        alive.wait()
