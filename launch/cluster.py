"""Print (or start on this host) the per-node commands that run an entry point on a cluster.

    python launch/cluster.py --cluster configs/cluster/two-nodes-tp8-dp2.yaml --config configs/llama-3.1-8b.yaml \
        -- serve
    python launch/cluster.py --cluster configs/cluster/one-node-tp4-dp2.yaml --config configs/llama-3.1-8b.yaml \
        --run -- generate --prompt "Hello" --max-new-tokens 32

ENTRY is serve, generate, calibrate, throughput (benchmarks/throughput.py) or a script
path; the arguments after it go to the entry point. With --config the run config and the
cluster's layout (--set parallel.tp / parallel.dp / parallel.timeout_s) are passed on. Without
--run it prints one shell line per node (mpirun: one, for the first node), with `# node i
(host)` before each; `--format json` prints them as JSON. Serving: replica r of `serve` listens
on server.port + r.

The cluster file's `jobs` (polar_dist/cluster.py) says whether one launcher job starts every
replica or each replica is a job of its own (`per_replica`, serve's default: then each has its
own rendezvous and `--set parallel.replica=r`, and the lines say `# replica r, node i (host)`).

With --run it starts the commands whose node is this host (its addresses include the node's
host), each in a process group of its own (`kill -- -PGID` stops one replica's job alone; the
pids are printed), passes SIGINT and SIGTERM on to all of them, and waits. When a command
fails, the other commands of its job are stopped (they would wait for its ranks until their
timeout); other replicas' jobs go on. It exits with the first non-zero status once every
command has ended, and says when each one ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar_dist.cli import run_main  # noqa: E402
from polar_dist.cluster_commands import NodeCommand  # noqa: E402


def is_local(host: str) -> bool:
    """Whether `host` is an address of this machine (binding a socket to it succeeds)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
                return True
        except OSError:
            continue
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s --cluster FILE [--config RUN_CONFIG] [--run] -- ENTRY [ARGS]")
    parser.add_argument("--cluster", required=True, help="cluster YAML, e.g. configs/cluster/one-node-tp8.yaml")
    parser.add_argument("--config", default=None, help="run config YAML passed to the entry point")
    parser.add_argument("--run", action="store_true", help="start the commands of this host's node(s)")
    parser.add_argument("--format", choices=["shell", "json"], default="shell")
    parser.add_argument("--hostfile", default=None, help="hostfile path for mpirun / deepspeed "
                        "(default /tmp/polar_dist-<cluster>.hostfile)")
    parser.add_argument("--rdzv-id", default=None, help="torchrun rendezvous id (default: the cluster's name)")
    parser.add_argument("entry", help="serve | generate | calibrate | throughput | a .py script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the entry point")
    args = parser.parse_args()

    from polar_dist.cluster import load_cluster
    from polar_dist.cluster_commands import node_commands
    from polar_dist.config import load_config
    from polar_dist.errors import UserError

    cluster = load_cluster(args.cluster)
    run_cfg = load_config(args.config) if args.config is not None else None  # a bad one fails here, not on the nodes
    entry_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    commands = node_commands(cluster, args.entry, entry_args, args.config, args.hostfile, args.rdzv_id)
    served = []
    if args.entry == "serve" and run_cfg is not None:  # what a load balancer and a metrics scraper point at
        served = [f"# replica {r['replica']} serves on {r['hosts'][0]}:{run_cfg.server.port + r['replica']}"
                  for r in cluster.replicas(cluster.jobs_for(args.entry))]
    if not args.run:
        if args.format == "json":
            print(json.dumps([c.to_dict() for c in commands], indent=1))
        else:
            for c in commands:
                print(f"# {describe(c)}\n{c.shell()}")
            for line in served:
                print(line)
        return
    mine = [c for c in commands if is_local(c.host)]
    if not mine:
        raise UserError(f"no node of {args.cluster} is this host (its nodes: {[c.host for c in commands]}); run "
                        "launch/cluster.py --run on each node, or without --run to print the commands")
    procs = []
    for c in mine:
        for path, text in c.files.items():
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        print(f"# {describe(c)}: {c.shell()}", file=sys.stderr, flush=True)
        # its own process group: a signal to one job (or to this process's group) reaches no other job
        p = subprocess.Popen(c.argv, cwd=c.cwd, env={**os.environ, **c.env}, start_new_session=True)
        print(f"# {describe(c)}: pid {p.pid}, process group {p.pid}", file=sys.stderr, flush=True)
        procs.append((c, p))
    for line in served:
        print(line, file=sys.stderr, flush=True)

    def pass_on(signum: int, _frame: object) -> None:  # the launchers pass it on to their ranks
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    sys.exit(wait_jobs(procs))


def describe(c: NodeCommand) -> str:
    node = f"node {c.node} ({c.host})"
    return node if c.replica is None else f"replica {c.replica}, {node}"


STOP_GRACE_S = 30.0  # after SIGTERM, a launcher's time to stop its ranks before SIGKILL


def wait_jobs(procs: list[tuple[NodeCommand, subprocess.Popen]]) -> int:
    """Wait for every command; when one fails, stop the other commands of its job (they would
    wait for its ranks until their rendezvous or collective timeout), leaving other jobs alone.
    Returns the first non-zero status (128 + N for a command ended by signal N), or 0."""
    status, ended, stopping = 0, set(), {}  # stopping: index -> when to kill
    while len(ended) < len(procs):
        for i, (c, p) in enumerate(procs):
            code = p.poll()
            if code is None or i in ended:
                continue
            ended.add(i)
            code = 128 - code if code < 0 else code
            print(f"# {describe(c)}: exited with status {code}", file=sys.stderr, flush=True)
            if code == 0:
                continue
            status = status or code
            for j, (other, q) in enumerate(procs):
                if other.replica == c.replica and q.poll() is None and j not in stopping:
                    q.terminate()  # the launcher passes it on to its ranks
                    stopping[j] = time.monotonic() + STOP_GRACE_S
        for j, deadline in stopping.items():
            if procs[j][1].poll() is None and time.monotonic() > deadline:
                procs[j][1].kill()
        time.sleep(0.2)
    return status


if __name__ == "__main__":
    run_main(main)
