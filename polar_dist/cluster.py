"""Cluster description: configs/cluster/*.yaml -> a frozen, validated ClusterConfig.

A cluster file says where the ranks run and how they are started; a run config (configs/*.yaml)
says what they run. They are kept apart so that one model config runs on any cluster.

    nodes:                       # in rank order: node i holds the next ranks_per_node ranks
      - {host: 10.0.0.1, gpus: 8}
      - {host: 10.0.0.2, gpus: 8}   # CPU nodes give cpu_ranks instead of gpus
    launcher: torchrun           # torchrun (c10d rendezvous) | mpirun (hostfile) | deepspeed (hostfile)
    rendezvous: {host: 10.0.0.1, port: 29500}    # host defaults to the first node's
    network: {interface: eth0, timeout_s: 300, env: {NCCL_IB_DISABLE: "1"}}
    tp: 8
    dp: 2
    jobs: auto                   # auto | one | per_replica: how many launcher jobs start the replicas

World = tp x dp ranks; contiguous ranks form a replica (polar_dist.parallel.context), so with tp
dividing the ranks of a node every replica stays inside one node. A tp larger than a node's
ranks all-reduces over the network at every layer: allowed only with `tp_spans_nodes: true`.

`jobs` says how the replicas are started:
- `one`: one launcher job for all tp x dp ranks (one rendezvous, one world). The replicas can
  gather their results at the end (generate.py's lines, a benchmark's totals), but a launcher
  stops every rank of its job when one fails (torchrun's agent, mpirun, the deepspeed
  launcher), so a replica that dies takes the others with it.
- `per_replica`: one job per replica, each its own world of tp ranks and its own rendezvous
  (replica r meets at its first node, on rendezvous.port + r), told its index with
  `--set parallel.replica=r`: it serves on server.port + r, and a replica that fails ends only
  its own job while the others keep serving. Replicas fill the nodes in file order.
- `auto` (the default): `per_replica` for serve, which must survive a lost replica behind its
  load balancer; `one` for the rest (generate, throughput, calibrate and scripts), which want one
  world and a result gathered over it.
Errors name the file, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polar_dist.config import _build, _parse_yaml
from polar_dist.errors import UserError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Entry points that gather every replica's results in one world at the end: never per_replica.
GATHERING_ENTRIES = ("generate", "throughput")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """One machine. `gpus`: ranks on its GPUs (one each); `cpu_ranks`: ranks on its CPU (gloo).
    `interface`: this node's network interface when it differs from network.interface."""

    host: str = ""
    gpus: int = 0
    cpu_ranks: int = 0
    interface: str = ""

    @property
    def ranks(self) -> int:
        return self.gpus or self.cpu_ranks


@dataclass(frozen=True, kw_only=True)
class RendezvousConfig:
    """Where the ranks meet: torchrun's c10d store, mpirun's and deepspeed's MASTER_ADDR/PORT."""

    host: str = ""  # "": the first node's host
    port: int = 29500


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """`interface` becomes NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (the interface the ranks'
    sockets use; without it gloo picks the address the hostname resolves to, often loopback).
    `timeout_s` > 0 sets the run's parallel.timeout_s. `env`: more variables for every rank."""

    interface: str = ""
    timeout_s: float = 0.0
    env: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """`python`: the interpreter on every node; `workdir`: this repository's path on every node
    ("": the path of the checkout that makes the commands). `remote_shell`: for mpirun, the
    command that starts Open MPI's daemon on another node (Open MPI's plm_rsh_agent; default
    ssh). `launcher_args`: extra arguments for the launcher, e.g. [--allow-run-as-root]."""

    name: str = ""
    nodes: tuple[NodeConfig, ...] = ()  # read from the list by cluster_from_dict
    launcher: Literal["torchrun", "mpirun", "deepspeed"] = "torchrun"
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    tp: int
    dp: int = 1
    jobs: Literal["auto", "one", "per_replica"] = "auto"
    tp_spans_nodes: bool = False
    python: str = "python"
    workdir: str = ""
    remote_shell: str = ""
    launcher_args: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return sum(n.ranks for n in self.nodes)

    @property
    def ranks_per_node(self) -> int:
        return self.nodes[0].ranks

    @property
    def uses_gpus(self) -> bool:
        return self.nodes[0].gpus > 0

    @property
    def rendezvous_host(self) -> str:
        return self.rendezvous.host or self.nodes[0].host

    def interface_of(self, node: NodeConfig) -> str:
        return node.interface or self.network.interface

    def nodes_in_rank_order(self) -> list[NodeConfig]:
        """The nodes in the order their ranks are numbered. mpirun (hostfile, --map-by slot) and
        deepspeed (--node_rank) follow the file; torchrun's c10d rendezvous numbers the nodes by
        their address strings, sorted (`--local-addr` is the node's host), e.g. 10.0.0.10 before 10.0.0.9."""
        return sorted(self.nodes, key=lambda n: n.host) if self.launcher == "torchrun" else list(self.nodes)

    def jobs_for(self, entry: str) -> Literal["one", "per_replica"]:
        """How `entry` (an ENTRIES name or a script) is started: `jobs`, with `auto` resolved."""
        if self.dp == 1:
            return "one"  # one replica is one job either way
        if self.jobs == "auto":
            return "per_replica" if entry == "serve" else "one"
        return self.jobs

    def replica_jobs(self) -> list[ReplicaJob]:
        """Each replica as a job of its own: replicas fill the nodes in file order."""
        per_node, jobs = self.ranks_per_node, []
        for r in range(self.dp):
            first = r * self.tp
            if self.tp <= per_node:  # inside one node, on tp of its slots
                node = self.nodes[first // per_node]
                share = {"gpus": self.tp} if self.uses_gpus else {"cpu_ranks": self.tp}
                jobs.append(ReplicaJob(r, (dataclasses.replace(node, **share),), first % per_node))
            else:  # whole nodes (tp_spans_nodes); torchrun's c10d numbers them by address
                span = self.nodes[first // per_node:(first + self.tp) // per_node]
                ordered = sorted(span, key=lambda n: n.host) if self.launcher == "torchrun" else list(span)
                jobs.append(ReplicaJob(r, tuple(ordered), 0))
        return jobs

    def replicas(self, jobs: Literal["one", "per_replica"] = "one") -> list[dict[str, Any]]:
        """Each replica's ranks (numbered over the cluster) and the hosts they run on (in rank
        order: the first runs the replica's driver and server)."""
        if jobs == "per_replica":
            return [{"replica": j.replica, "ranks": list(range(j.replica * self.tp, (j.replica + 1) * self.tp)),
                     "hosts": [n.host for n in j.nodes]} for j in self.replica_jobs()]
        hosts = [n.host for n in self.nodes_in_rank_order() for _ in range(n.ranks)]
        return [{"replica": r, "ranks": list(range(r * self.tp, (r + 1) * self.tp)),
                 "hosts": sorted(set(hosts[r * self.tp:(r + 1) * self.tp]), key=hosts.index)}
                for r in range(self.dp)]

    def layout(self, entry: str = "") -> dict[str, Any]:
        """The layout as plain data (benchmark JSON, logs), as `entry` would be started."""
        jobs = self.jobs_for(entry)
        return {"name": self.name, "launcher": self.launcher, "tp": self.tp, "dp": self.dp, "jobs": jobs,
                "world_size": self.world_size, "device": "cuda" if self.uses_gpus else "cpu",
                "nodes": [{"host": n.host, "ranks": n.ranks} for n in self.nodes], "replicas": self.replicas(jobs)}


@dataclass(frozen=True)
class ReplicaJob:
    """One replica started as a job of its own: the nodes its tp ranks run on, in the job's
    rank order, each with only this job's ranks (gpus or cpu_ranks), and the first of each
    node's slots (GPU index) the job takes: several replicas may share a node."""

    replica: int
    nodes: tuple[NodeConfig, ...]
    first_slot: int = 0


def load_cluster(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cluster file {str(path)!r} does not exist; pass --cluster configs/cluster/<name>.yaml")
    raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    return cluster_from_dict(raw, where=str(path), name=path.stem)


def cluster_from_dict(raw: Any, where: str = "cluster", name: str = "") -> ClusterConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the top level must be a mapping (nodes, launcher, tp, ...), got {raw!r}")
    raw = dict(raw)
    nodes = raw.pop("nodes", None)
    if not isinstance(nodes, list) or not nodes:
        raise UserError(f"{where}: nodes must be a non-empty list of {{host, gpus | cpu_ranks}}, got {nodes!r}")
    if "tp" not in raw:
        raise UserError(f"{where}: tp is missing; set tp (ranks per replica) and dp (replicas)")
    launcher_args = raw.pop("launcher_args", [])
    if not isinstance(launcher_args, list) or not all(isinstance(a, str) for a in launcher_args):
        raise UserError(f"{where}: launcher_args = {launcher_args!r} must be a list of strings")
    parsed = tuple(_build(NodeConfig, n, f"{where}: nodes[{i}]") for i, n in enumerate(nodes))
    cluster = dataclasses.replace(_build(ClusterConfig, raw, where), nodes=parsed, launcher_args=tuple(launcher_args))
    if not cluster.name:
        cluster = dataclasses.replace(cluster, name=name)
    validate_cluster(cluster, where)
    return cluster


def validate_cluster(c: ClusterConfig, where: str = "cluster") -> None:
    for i, n in enumerate(c.nodes):
        if not n.host.strip():
            raise UserError(f"{where}: nodes[{i}].host is empty; give the node's address or hostname")
        if n.gpus < 0 or n.cpu_ranks < 0 or (n.gpus > 0) == (n.cpu_ranks > 0):
            raise UserError(f"{where}: nodes[{i}] ({n.host}) has gpus = {n.gpus} and cpu_ranks = {n.cpu_ranks}; give "
                            "exactly one of them, > 0 (gpus: one rank per GPU; cpu_ranks: gloo ranks on the CPU)")
    hosts = [n.host for n in c.nodes]
    repeated = sorted({h for h in hosts if hosts.count(h) > 1})
    if repeated:
        raise UserError(f"{where}: host(s) {repeated} are listed more than once; list each node once and give it "
                        "all its ranks (gpus or cpu_ranks)")
    if len({n.gpus > 0 for n in c.nodes}) > 1:
        raise UserError(f"{where}: some nodes give gpus and others cpu_ranks; a run is all GPU (NCCL) or all CPU "
                        "(gloo): use one kind on every node")
    per_node = {n.ranks for n in c.nodes}
    if len(per_node) > 1:
        raise UserError(f"{where}: nodes have different numbers of ranks {sorted(per_node)}; the launchers start the "
                        f"same number on every node: give every node {min(per_node)} (leave the rest out)")
    if c.tp < 1 or c.dp < 1:
        raise UserError(f"{where}: tp = {c.tp} and dp = {c.dp} must both be >= 1")
    world, node = c.world_size, c.ranks_per_node
    if c.tp * c.dp != world:
        hint = f"dp = {world // c.tp}" if world % c.tp == 0 else f"a tp dividing {world}"
        raise UserError(f"{where}: tp x dp = {c.tp} x {c.dp} = {c.tp * c.dp} but the nodes have {world} ranks in all "
                        f"({len(c.nodes)} x {node}); set {hint}, or change the nodes")
    if c.tp > node:
        if c.tp % node:
            raise UserError(f"{where}: tp = {c.tp} is not a multiple of the {node} ranks per node, so replicas would "
                            f"share nodes unevenly; use tp = {node * (c.tp // node) or node} or a divisor of {node}")
        if not c.tp_spans_nodes:
            raise UserError(f"{where}: tp = {c.tp} spans {c.tp // node} nodes of {node} ranks: every layer would "
                            f"all-reduce over the network. Set tp_spans_nodes: true to run it so, or use tp = {node} "
                            f"and dp = {world // node} (one replica per node)")
    elif node % c.tp:
        raise UserError(f"{where}: tp = {c.tp} does not divide the {node} ranks of a node, so some replica would span "
                        f"two nodes; use a tp dividing {node}")
    port = c.rendezvous.port
    if not 0 < port < 65536:
        raise UserError(f"{where}: rendezvous.port = {port} must be in [1, 65535]")
    if c.jobs != "one" and c.dp > 1 and port + c.dp - 1 > 65535:
        raise UserError(f"{where}: rendezvous.port = {port}: with jobs = {c.jobs} replica r meets on port {port} + r, "
                        f"up to {port + c.dp - 1}, past 65535; choose a lower rendezvous.port")
    if c.launcher in ("mpirun", "deepspeed") and c.rendezvous_host not in hosts[:1]:
        raise UserError(f"{where}: rendezvous.host = {c.rendezvous.host!r} but {c.launcher} puts rank 0 on the first "
                        f"node ({hosts[0]}), where the ranks meet; leave rendezvous.host empty or set it to {hosts[0]}")
    if c.network.timeout_s < 0:
        raise UserError(f"{where}: network.timeout_s = {c.network.timeout_s} must be > 0 (or 0: the run config's "
                        "parallel.timeout_s)")
    for key, value in c.network.env.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise UserError(f"{where}: network.env key {key!r} is not an environment variable name")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: network.env.{key} = {value!r} must be a string or a number (quote it)")
    if c.remote_shell and c.launcher != "mpirun":
        raise UserError(f"{where}: remote_shell is for launcher mpirun (Open MPI's plm_rsh_agent); {c.launcher} "
                        "starts each node with its own command: remove remote_shell")
