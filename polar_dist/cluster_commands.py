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

With `jobs: per_replica` (serve's default, polar_dist/cluster.py) each replica gets the commands
above for a cluster of its own nodes only (its own rendezvous on its first node, port
rendezvous.port + r, rendezvous id <id>-replica<r>, hostfile <hostfile>-replica<r>) and
`--set parallel.replica=r`; several replicas on one node of GPUs each take their own GPUs
(CUDA_VISIBLE_DEVICES; the deepspeed launcher: --include host:slots).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from polar_dist.cluster import GATHERING_ENTRIES, ClusterConfig, NodeConfig, RendezvousConfig, ReplicaJob
from polar_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# Entry points by name; a path to a script is taken as it is. serve: its replica r listens on
# server.port + r (ParallelContext.replica).
ENTRIES = {
    "serve": "launch/serve.py",
    "generate": "launch/generate.py",
    "calibrate": "launch/calibrate.py",
    "throughput": "benchmarks/throughput.py",
}


@dataclass(frozen=True)
class NodeCommand:
    """What to run on one node: `argv` with `env` added, in `cwd`; `files` to write first
    (the hostfile), as {path: content}. `replica`: the replica whose job this command is part
    of, None when one job runs every replica; `node` is the node's index in the cluster file."""

    node: int
    host: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    files: dict[str, str] = field(default_factory=dict)
    replica: int | None = None

    def shell(self) -> str:
        """One shell line: write the files, cd, set the environment, run."""
        parts = [f"printf %s {shlex.quote(text)} > {shlex.quote(path)}" for path, text in self.files.items()]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        parts.append(f"cd {shlex.quote(self.cwd)} && " + (f"env {env} " if env else "") + shlex.join(self.argv))
        return " && ".join(parts)

    def to_dict(self) -> dict:
        return {"node": self.node, "host": self.host, "argv": self.argv, "env": self.env, "cwd": self.cwd,
                "files": self.files, "replica": self.replica}


def entry_script(entry: str) -> str:
    if entry in ENTRIES:
        return ENTRIES[entry]
    if entry.endswith(".py"):
        return entry
    raise UserError(f"entry {entry!r} is not one of {sorted(ENTRIES)} nor a .py script; e.g. "
                    "launch/cluster.py --cluster FILE --config RUN.yaml -- generate --prompt Hi")


def run_args(cluster: ClusterConfig, run_config: str | None, args: list[str], replica: int | None = None) -> list[str]:
    """The entry point's arguments: --config, the layout as --set overrides (and the replica of
    a job of one replica), then `args`."""
    if run_config is None:
        if replica is not None:
            raise UserError("jobs: per_replica tells each job its replica through the run config "
                            "(--set parallel.replica=r): pass --config RUN.yaml, or use jobs: one")
        return list(args)
    sets = [f"parallel.tp={cluster.tp}", f"parallel.dp={cluster.dp}"]
    if replica is not None:
        sets.append(f"parallel.replica={replica}")
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
    the first node; with jobs: per_replica, those of every replica's job, replica by replica)."""
    script = entry_script(entry)
    hostfile = hostfile or f"/tmp/polar_dist-{cluster.name or 'cluster'}.hostfile"
    rdzv_id = rdzv_id or cluster.name or "polar_dist"
    if cluster.jobs_for(entry) == "one":
        return _job_commands(cluster, [script, *run_args(cluster, run_config, args)], hostfile, rdzv_id)
    if entry in GATHERING_ENTRIES:
        raise UserError(f"cluster {cluster.name!r}: jobs = per_replica starts each replica as a job of its own, but "
                        f"{entry} gathers every replica's results in one world; use jobs: one (or auto) for {entry}")
    commands = []
    for job in cluster.replica_jobs():
        path = Path(hostfile)
        job_hostfile = str(path.with_name(f"{path.stem}-replica{job.replica}{path.suffix}"))
        commands += _job_commands(_job_cluster(cluster, job), [script, *run_args(cluster, run_config, args,
                                                                                 job.replica)],
                                  job_hostfile, f"{rdzv_id}-replica{job.replica}", job, cluster)
    return commands


def _job_cluster(cluster: ClusterConfig, job: ReplicaJob) -> ClusterConfig:
    """The cluster of one replica's job: its nodes only, meeting at the first of them on a port
    of its own (replicas may share a node), one replica of tp ranks."""
    return dataclasses.replace(cluster, name=f"{cluster.name}-replica{job.replica}", nodes=job.nodes, dp=1,
                               rendezvous=RendezvousConfig(host=job.nodes[0].host,
                                                           port=cluster.rendezvous.port + job.replica))


def _slots(cluster: ClusterConfig, job: ReplicaJob) -> list[int] | None:
    """The GPU indices a replica's job takes on each of its nodes; None when it takes them all."""
    if job.nodes[0].ranks == cluster.ranks_per_node:
        return None
    return list(range(job.first_slot, job.first_slot + job.nodes[0].ranks))


def _job_commands(cluster: ClusterConfig, argv_tail: list[str], hostfile: str, rdzv_id: str,
                  job: ReplicaJob | None = None, full: ClusterConfig | None = None) -> list[NodeCommand]:
    """One launcher job's commands over the nodes of `cluster`: the whole cluster, or the
    cluster of `job` (made by _job_cluster from `full`, whose file order numbers the nodes)."""
    full = full or cluster
    index = {n.host: i for i, n in enumerate(full.nodes)}
    replica = None if job is None else job.replica
    slots = None if job is None else _slots(full, job)
    gpu_env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, slots))} if slots is not None and cluster.uses_gpus else {}
    cwd = cluster.workdir or str(REPO)
    rdzv = f"{cluster.rendezvous_host}:{cluster.rendezvous.port}"
    n_nodes, per_node = len(cluster.nodes), cluster.ranks_per_node
    commands = []
    if cluster.launcher == "mpirun":
        first = cluster.nodes[0]
        exports = {"MASTER_ADDR": cluster.rendezvous_host, **gpu_env, **node_env(cluster, first)}
        argv = ["mpirun", *cluster.launcher_args, "--hostfile", hostfile, "-np", str(cluster.world_size),
                "--map-by", "slot"]
        if cluster.remote_shell:
            argv += ["--mca", "plm_rsh_agent", cluster.remote_shell]
        for k, v in exports.items():
            argv += ["-x", f"{k}={v}"]
        argv += ["-x", "PYTHONPATH", "-x", "PATH"]  # the nodes' ranks import this checkout
        commands.append(NodeCommand(index[first.host], first.host, argv + [cluster.python, *argv_tail],
                                    {"PYTHONPATH": cwd}, cwd, {hostfile: hostfile_text(cluster)}, replica))
        return commands
    for i, node in enumerate(cluster.nodes):
        env = node_env(cluster, node)
        if cluster.launcher == "torchrun":
            argv = [cluster.python, "-m", "torch.distributed.run", *cluster.launcher_args, "--nnodes", str(n_nodes),
                    "--nproc-per-node", str(per_node), "--node-rank", str(i), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", rdzv, "--rdzv-id", rdzv_id, "--local-addr", node.host]
            # said outright: torchrun's guess resolves this machine's hostname, which fails where
            # the hostname has no address (containers, namespaces)
            argv += ["--rdzv-conf", f"is_host={int(node.host == cluster.rendezvous_host)}"]
            commands.append(NodeCommand(index[node.host], node.host, argv + argv_tail, {**gpu_env, **env}, cwd,
                                        replica=replica))
        else:  # deepspeed: the hostfile lists each node's every slot, --include picks this job's
            argv = ["deepspeed", *cluster.launcher_args, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(i),
                    "--master_addr", cluster.rendezvous_host, "--master_port", str(cluster.rendezvous.port)]
            text = hostfile_text(cluster)
            if slots is not None:
                text = "".join(f"{n.host} slots={full.ranks_per_node}\n" for n in cluster.nodes)
                argv += ["--include", "@".join(f"{n.host}:{','.join(map(str, slots))}" for n in cluster.nodes)]
            commands.append(NodeCommand(index[node.host], node.host, argv + argv_tail, env, cwd, {hostfile: text},
                                        replica))
    return commands
