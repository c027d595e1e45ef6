"""Cluster runs across two hosts, started from the commands launch/cluster.py prints: two network
namespaces joined by a veth pair are the hosts (tests/support/netns.py), each with its own
address and nothing else in common, so the rendezvous and every collective cross the veth link
(a namespace cannot reach the other's loopback). launch/generate.py's tokens must equal the
single-process run for tp=2 (one rank per host) and tp=2 x dp=2 (two ranks per host, each
replica inside one host) under torchrun (c10d rendezvous), mpirun (hostfile; Open MPI starts the
second host's daemon with `ip netns exec` as its plm_rsh_agent instead of ssh) and the deepspeed
launcher (hostfile, --no_ssh: one command per host). Where namespaces cannot be made the
namespace tests skip saying why; the loopback test runs two torchrun nodes on 127.0.0.1 and
127.0.0.2 either way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from support.netns import TwoHosts, two_hosts
from support.ranks import listen_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = ["hello", "a longer prompt than the first", "third", "and a fourth one"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    path = tmp_path_factory.mktemp("cluster") / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_model("llama-gqa")), "tokenizer": "bytes",
                                              "device": "cpu"}, "engine": {"max_seq_len": 64}}))
    return path


def generate_args() -> list[str]:
    return [x for p in PROMPTS for x in ("--prompt", p)] + ["--max-new-tokens", "8", "--ignore-eos"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}")


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def single(run_config: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--config", str(run_config),
                           *generate_args()], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json_lines(proc.stdout)
    assert [x["prompt"] for x in lines] == PROMPTS and all(len(x["token_ids"]) == 8 for x in lines)
    return lines


def cluster_file(tmp_path: Path, hosts: list[str], ranks_per_host: int, tp: int, launcher: str,
                 interface: str = "", **extra: object) -> Path:
    path = tmp_path / f"{launcher}-tp{tp}.yaml"
    path.write_text(yaml.safe_dump({
        "nodes": [{"host": h, "cpu_ranks": ranks_per_host} for h in hosts], "launcher": launcher,
        "rendezvous": {"port": listen_port()}, "network": {"interface": interface, "timeout_s": 60},
        "tp": tp, "dp": len(hosts) * ranks_per_host // tp, "tp_spans_nodes": tp > ranks_per_host,
        "python": sys.executable, "workdir": str(ROOT), **extra}))
    return path


def commands(cluster: Path, run_config: Path, tmp_path: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "launch/cluster.py"), "--cluster", str(cluster), "--config",
                           str(run_config), "--format", "json", "--hostfile", str(tmp_path / "hostfile"),
                           "--", "generate", *generate_args()], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_nodes(cmds: list[dict], wrap: Callable[[int, list[str]], list[str]], logs: Path) -> list[tuple[str, str]]:
    """Start every node's command (wrapped, e.g. into its namespace) at once; (stdout, stderr) each.
    Output goes to files: a node blocked on a full pipe would stall the others' collectives."""
    procs, files = [], []
    for c in cmds:
        for path, text in c["files"].items():
            Path(path).write_text(text)
        out, err = logs / f"node{c['node']}.out", logs / f"node{c['node']}.err"
        files.append((out, err))
        with out.open("w") as o, err.open("w") as e:
            procs.append(subprocess.Popen(wrap(c["node"], c["argv"]), cwd=c["cwd"], env={**env(), **c["env"]},
                                          stdout=o, stderr=e, text=True))
    deadline = time.monotonic() + 240
    try:  # until all are done, one fails (the others would wait for its ranks), or the deadline
        while time.monotonic() < deadline and any(p.poll() is None for p in procs) \
                and not any(p.poll() for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [(out.read_text(), err.read_text()) for out, err in files]
    failed = [f"node {i} exit {p.returncode}:\n{err[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outputs))
              if p.returncode]
    assert not failed, "\n".join(failed)
    return outputs


def check_tokens(outputs: list[tuple[str, str]], single: list[dict], addresses: tuple[str, ...]) -> None:
    lines = [x for out, _ in outputs for x in json_lines(out)]
    assert lines == single  # global rank 0 prints every replica's lines, in prompt order
    joined = re.findall(r"joining \d+ ranks at tcp://([\d.]+):", "".join(err for _, err in outputs))
    assert joined and set(joined) <= set(addresses), joined  # the ranks met at a host's own address


@pytest.fixture(scope="module")
def hosts() -> TwoHosts:
    with two_hosts() as h:
        yield h


@pytest.mark.parametrize("ranks_per_host, tp", [(1, 2), (2, 2)], ids=["tp2", "tp2xdp2"])
def test_torchrun_across_two_namespaces(hosts: TwoHosts, run_config: Path, single: list[dict], tmp_path: Path,
                                        ranks_per_host: int, tp: int) -> None:
    cluster = cluster_file(tmp_path, list(hosts.addresses), ranks_per_host, tp, "torchrun", hosts.interface)
    check_tokens(run_nodes(commands(cluster, run_config, tmp_path), hosts.exec, tmp_path), single, hosts.addresses)


def test_mpirun_across_two_namespaces(hosts: TwoHosts, run_config: Path, single: list[dict], tmp_path: Path) -> None:
    # Open MPI starts its daemon on the second host through this agent instead of ssh:
    # `agent HOST COMMAND...` runs COMMAND inside HOST's namespace, under its own hostname.
    agent = tmp_path / "netns-agent.sh"
    cases = "".join(f"  {addr}) ns={ns} ;;\n" for addr, ns in zip(hosts.addresses, hosts.namespaces))
    agent.write_text(f'#!/bin/sh\nhost="$1"; shift\ncase "$host" in\n{cases}  *) exit 255 ;;\nesac\n'
                     f'exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $ns; $*"\n')
    agent.chmod(0o755)
    cluster = cluster_file(tmp_path, list(hosts.addresses), 2, 2, "mpirun", hosts.interface,
                           remote_shell=str(agent), launcher_args=["--allow-run-as-root"])
    cmds = commands(cluster, run_config, tmp_path)
    assert len(cmds) == 1  # one mpirun, on the first host
    check_tokens(run_nodes(cmds, hosts.exec, tmp_path), single, hosts.addresses)


def test_deepspeed_across_two_namespaces(hosts: TwoHosts, run_config: Path, single: list[dict],
                                         tmp_path: Path) -> None:
    cluster = cluster_file(tmp_path, list(hosts.addresses), 1, 2, "deepspeed", hosts.interface)
    check_tokens(run_nodes(commands(cluster, run_config, tmp_path), hosts.exec, tmp_path), single, hosts.addresses)


def test_torchrun_two_nodes_on_loopback(run_config: Path, single: list[dict], tmp_path: Path) -> None:
    """The same tp=2 x dp=2 run with the two nodes on 127.0.0.1 and 127.0.0.2 (no namespaces
    needed), started by `launch/cluster.py --run`: both nodes are this host, so it starts both."""
    cluster = cluster_file(tmp_path, ["127.0.0.1", "127.0.0.2"], 2, 2, "torchrun")
    proc = subprocess.run([sys.executable, str(ROOT / "launch/cluster.py"), "--cluster", str(cluster), "--config",
                           str(run_config), "--run", "--", "generate", *generate_args()], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("--rdzv-backend c10d") == 2  # each node's command, as started
    check_tokens([(proc.stdout, proc.stderr)], single, ("127.0.0.1", "127.0.0.2"))


def test_throughput_over_two_nodes_on_loopback(run_config: Path, tmp_path: Path) -> None:
    """The multi-node throughput benchmark as a cluster runs it: `launch/cluster.py --run --
    throughput` starts one torchrun node on 127.0.0.1 and one on 127.0.0.2 (one job, two replicas
    of tp 2, each inside one node); global rank 0 gets every rank's timings and sums tokens/s."""
    cluster = cluster_file(tmp_path, ["127.0.0.1", "127.0.0.2"], 2, 2, "torchrun")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/cluster.py"), "--cluster", str(cluster), "--config",
                           str(run_config), "--run", "--", "throughput", "--batch", "2", "--context", "24",
                           "--steps", "2", "--density", "1.0", "0.5", "--out", str(out)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("--rdzv-backend c10d") == 2  # each node's command, as started
    result = json.loads((out / f"throughput-{run_config.stem}.json").read_text())
    layout = result["layout"]
    assert (layout["tp"], layout["dp"], layout["world_size"], layout["launcher"]) == (2, 2, 4, "torchrun")
    assert [r["ranks"] for r in result["replicas"]] == [[0, 1], [2, 3]]
    assert [(t["variant"], t["density"]) for t in result["total"]] == [("ours_dense", 1.0), ("ours_sparse", 0.5)]
    for i, total in enumerate(result["total"]):
        rows = [rep["rows"][i] for rep in result["replicas"]]
        assert total["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in rows))
        for row in rows:  # tp 2 inside each replica: every rank timed its all-reduces
            assert len(row["per_rank"]) == 2 and all(r["comm_ms"] > 0 for r in row["per_rank"])
