"""Print (or start on this host) the per-node commands that run an entry point on a cluster.

    python launch/cluster.py --cluster configs/cluster/two-nodes-tp8-dp2.yaml --config configs/llama-3.1-8b.yaml \
        -- serve
    python launch/cluster.py --cluster configs/cluster/one-node-tp4-dp2.yaml --config configs/llama-3.1-8b.yaml \
        --run -- generate --prompt "Hello" --max-new-tokens 32

ENTRY is serve, generate, calibrate, throughput (benchmarks/decode_throughput.py) or a script
path; the arguments after it go to the entry point. With --config the run config and the
cluster's layout (--set parallel.tp / parallel.dp / parallel.timeout_s) are passed on. Without
--run it prints one shell line per node (mpirun: one, for the first node), with `# node i
(host)` before each; `--format json` prints them as JSON. With --run it starts the commands
whose node is this host (its addresses include the node's host), waits, and exits with the
first non-zero status (stopping the others when one fails). Serving: replica r of `serve` listens on server.port + r.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar_dist.cli import run_main  # noqa: E402


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
    if not args.run:
        if args.format == "json":
            print(json.dumps([c.to_dict() for c in commands], indent=1))
        else:
            for c in commands:
                print(f"# node {c.node} ({c.host})\n{c.shell()}")
            if args.entry == "serve" and run_cfg is not None:
                for r in cluster.replicas():  # what a load balancer and a metrics scraper point at
                    print(f"# replica {r['replica']} serves on {r['hosts'][0]}:{run_cfg.server.port + r['replica']}")
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
        print(f"# node {c.node} ({c.host}): {c.shell()}", file=sys.stderr, flush=True)
        procs.append(subprocess.Popen(c.argv, cwd=c.cwd, env={**os.environ, **c.env}))
    sys.exit(wait_all(procs))


def wait_all(procs: list[subprocess.Popen]) -> int:
    """Wait for every command; when one fails, stop the others (they would wait for its ranks
    until their rendezvous or collective timeout). Returns the first non-zero status, or 0."""
    import time

    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.terminate()  # the launcher passes it on to its ranks
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    run_main(main)
