"""The per-node commands that start an entry point on a cluster (polar_dist.cluster).

    cmds = node_commands(load_cluster("configs/cluster/two-nodes-tp8-dp2.yaml"), "generate",
                         ["--prompt", "Hi"], run_config="configs/llama-3.1-8b.yaml")
    for c in cmds: print(c.shell())          # one line per node (mpirun: one line, on the first node)

- torchrun: one command per node, c10d rendezvous at rendezvous.host:port; `--local-addr` is the
  node's host, so the store and the workers' MASTER_ADDR use the address the other nodes reach
  (not whatever the hostname resolves to); each node says whether it hosts the rendezvous store
  (`is_host=1|0`) instead of torchrun guessing from the hostname, which fails where the
  hostname has no address (containers, network namespaces).
- mpirun: one command on the first node with a generated hostfile (`host slots=N`, ranks filled
  node by node, so replicas stay inside nodes); MASTER_ADDR tells rank 0 which address to
  bind; Open MPI starts the other nodes' daemons over ssh, or over `remote_shell`.
- deepspeed: one command per node with the same hostfile and `--no_ssh --node_rank i`, so no
  node needs ssh into another.

Every rank gets NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (network.interface), network.env, and
the run config's parallel.tp / parallel.dp (and parallel.timeout_s) as --set overrides.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from polar_dist.cluster import ClusterConfig, NodeConfig
from polar_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Entry points by name; a path to a script is taken as it is. serve: its replica r listens on
# server.port + r (ParallelContext.replica).
ENTRIES = {
    "serve": "launch/serve.py",
    "generate": "launch/generate.py",
    "calibrate": "launch/calibrate.py",
    "throughput": "benchmarks/decode_throughput.py",
}


@dataclass(frozen=True)
class NodeCommand:
    """What to run on one node: `argv` with `env` added, in `cwd`; `files` to write first
    (the hostfile), as {path: content}."""

    node: int
    host: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    files: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """One shell line: write the files, cd, set the environment, run."""
        parts = [f"printf %s {shlex.quote(text)} > {shlex.quote(path)}" for path, text in self.files.items()]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        parts.append(f"cd {shlex.quote(self.cwd)} && " + (f"env {env} " if env else "") + shlex.join(self.argv))
        return " && ".join(parts)

    def to_dict(self) -> dict:
        return {"node": self.node, "host": self.host, "argv": self.argv, "env": self.env, "cwd": self.cwd,
                "files": self.files}


def entry_script(entry: str) -> str:
    if entry in ENTRIES:
        return ENTRIES[entry]
    if entry.endswith(".py"):
        return entry
    raise UserError(f"entry {entry!r} is not one of {sorted(ENTRIES)} nor a .py script; e.g. "
                    "launch/cluster.py --cluster FILE --config RUN.yaml -- generate --prompt Hi")


def run_args(cluster: ClusterConfig, run_config: str | None, args: list[str]) -> list[str]:
    """The entry point's arguments: --config, the layout as --set overrides, then `args`."""
    if run_config is None:
        return list(args)
    sets = [f"parallel.tp={cluster.tp}", f"parallel.dp={cluster.dp}"]
    if cluster.network.timeout_s > 0:
        sets.append(f"parallel.timeout_s={cluster.network.timeout_s:g}")
    if not cluster.uses_gpus:
        sets.append("model.device=cpu")
    return ["--config", run_config, *[x for s in sets for x in ("--set", s)], *args]


def node_env(cluster: ClusterConfig, node: NodeConfig) -> dict[str, str]:
    env = {}
    interface = cluster.interface_of(node)
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
        if cluster.uses_gpus:
            env["NCCL_SOCKET_IFNAME"] = interface
    env.update({k: str(v) for k, v in cluster.network.env.items()})
    return env


def hostfile_text(cluster: ClusterConfig) -> str:
    return "".join(f"{n.host} slots={n.ranks}\n" for n in cluster.nodes)


def node_commands(cluster: ClusterConfig, entry: str, args: list[str], run_config: str | None = None,
                  hostfile: str | None = None, rdzv_id: str | None = None) -> list[NodeCommand]:
    """The commands that start `entry` with `args` on every node of `cluster` (mpirun: one, on
    the first node)."""
    script = entry_script(entry)
    argv_tail = [script, *run_args(cluster, run_config, args)]
    cwd = cluster.workdir or str(REPO)
    hostfile = hostfile or f"/tmp/polar_dist-{cluster.name or 'cluster'}.hostfile"
    rdzv = f"{cluster.rendezvous_host}:{cluster.rendezvous.port}"
    n_nodes, per_node = len(cluster.nodes), cluster.ranks_per_node
    commands = []
    if cluster.launcher == "mpirun":
        first = cluster.nodes[0]
        exports = {"MASTER_ADDR": cluster.rendezvous_host, **node_env(cluster, first)}
        argv = ["mpirun", *cluster.launcher_args, "--hostfile", hostfile, "-np", str(cluster.world_size),
                "--map-by", "slot"]
        if cluster.remote_shell:
            argv += ["--mca", "plm_rsh_agent", cluster.remote_shell]
        for k, v in exports.items():
            argv += ["-x", f"{k}={v}"]
        argv += ["-x", "PYTHONPATH", "-x", "PATH"]  # the nodes' ranks import this checkout
        commands.append(NodeCommand(0, first.host, argv + [cluster.python, *argv_tail], {"PYTHONPATH": cwd}, cwd,
                                    {hostfile: hostfile_text(cluster)}))
        return commands
    for i, node in enumerate(cluster.nodes):
        env = node_env(cluster, node)
        if cluster.launcher == "torchrun":
            argv = [cluster.python, "-m", "torch.distributed.run", *cluster.launcher_args, "--nnodes", str(n_nodes),
                    "--nproc-per-node", str(per_node), "--node-rank", str(i), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", rdzv, "--rdzv-id", rdzv_id or (cluster.name or "polar_dist"),
                    "--local-addr", node.host]
            # said outright: torchrun's guess resolves this machine's hostname, which fails where
            # the hostname has no address (containers, namespaces)
            argv += ["--rdzv-conf", f"is_host={int(node.host == cluster.rendezvous_host)}"]
            commands.append(NodeCommand(i, node.host, argv + argv_tail, env, cwd))
        else:  # deepspeed
            argv = ["deepspeed", *cluster.launcher_args, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(i),
                    "--master_addr", cluster.rendezvous_host, "--master_port", str(cluster.rendezvous.port)]
            commands.append(NodeCommand(i, node.host, argv + argv_tail, env, cwd, {hostfile: hostfile_text(cluster)}))
    return commands
