"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each end named
`pd0`, with its own address; commands run in them also get their own hostname (a UTS namespace,
`unshare --uts`): Open MPI takes processes with one hostname for one node and would use shared
memory between them. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), iproute2's `ip` and `unshare`.

    with two_hosts() as hosts:            # skips the test, saying why, where they cannot be made
        subprocess.run(hosts.exec(0, ["python", "-c", "..."]))   # runs inside host 0's namespace

Names and the subnet carry the process id, so concurrent test runs do not collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest

INTERFACE = "pd0"


@dataclass(frozen=True)
class TwoHosts:
    namespaces: tuple[str, str]
    addresses: tuple[str, str]
    interface: str = INTERFACE

    def exec(self, host: int, argv: list[str]) -> list[str]:
        """`argv` run inside host `host`'s namespace, with the namespace's name as hostname."""
        ns = self.namespaces[host]
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "/bin/sh", "-c", 'hostname "$0" && exec "$@"', ns, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed; scripts/setup.sh installs it with apt where it can"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"pdprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`ip netns add` fails here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"two network namespaces cannot be made: {reason}")
    pid = os.getpid()
    names = (f"pd{pid}a", f"pd{pid}b")
    subnet = f"10.{100 + pid % 100}.{pid // 100 % 250}"
    addresses = (f"{subnet}.1", f"{subnet}.2")
    try:
        for ns in names:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", INTERFACE, "netns", names[0], "type", "veth", "peer", "name", INTERFACE, "netns", names[1])
        for ns, addr in zip(names, addresses):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", INTERFACE)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
        yield TwoHosts(names, addresses)
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
