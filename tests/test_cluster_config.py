"""Cluster files (configs/cluster/*.yaml): the shipped examples load, bad layouts fail at load
with the fix in the message, and launch/cluster.py's commands carry the layout and the network
settings for each launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polar_dist.cluster import cluster_from_dict, load_cluster
from polar_dist.cluster_commands import node_commands
from polar_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "configs/cluster").glob("*.yaml"))
TWO_NODES = {"nodes": [{"host": "10.0.0.1", "gpus": 8}, {"host": "10.0.0.2", "gpus": 8}], "tp": 8, "dp": 2,
             "network": {"interface": "eth0", "timeout_s": 300}}


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.stem for p in CLUSTERS])
def test_shipped_cluster_files_load(path: Path) -> None:
    c = load_cluster(path)
    assert c.tp * c.dp == c.world_size
    replicas = c.replicas()
    assert [r["ranks"][0] for r in replicas] == [i * c.tp for i in range(c.dp)]
    if not c.tp_spans_nodes:
        assert all(len(r["hosts"]) == 1 for r in replicas)  # every replica inside one node


@pytest.mark.parametrize("change, message", [
    ({"dp": 1}, "tp x dp = 8 x 1 = 8 but the nodes have 16 ranks in all (2 x 8); set dp = 2"),
    ({"tp": 16, "dp": 1}, "tp = 16 spans 2 nodes of 8 ranks: every layer would all-reduce over the network. Set "
                          "tp_spans_nodes: true to run it so, or use tp = 8 and dp = 2"),
    ({"tp": 3, "dp": 5}, "tp x dp = 3 x 5 = 15 but the nodes have 16 ranks"),
    ({"nodes": [{"host": "a", "gpus": 8}, {"host": "a", "gpus": 8}]}, "host(s) ['a'] are listed more than once"),
    ({"nodes": [{"host": "a", "gpus": 8}, {"host": "b", "gpus": 4}], "dp": 1, "tp": 12},
     "nodes have different numbers of ranks [4, 8]"),
    ({"nodes": [{"host": "a", "gpus": 8, "cpu_ranks": 2}]}, "give exactly one of them"),
    ({"nodes": [{"host": "a", "gpus": 6}, {"host": "b", "gpus": 6}], "tp": 4, "dp": 3},
     "tp = 4 does not divide the 6 ranks of a node, so some replica would span two nodes"),
    ({"launcher": "mpirun", "rendezvous": {"host": "10.0.0.2"}}, "mpirun puts rank 0 on the first node (10.0.0.1)"),
    ({"launcher": "slurm"}, "cluster: cluster.launcher = 'slurm' is not one of ['torchrun', 'mpirun', 'deepspeed']"),
    ({"gpus_per_node": 8}, "unknown key(s) ['gpus_per_node']"),
    ({"network": {"env": {"1BAD": "x"}}}, "network.env key '1BAD' is not an environment variable name"),
    ({"remote_shell": "rsh"}, "remote_shell is for launcher mpirun"),
    ({"jobs": "each"}, "cluster: cluster.jobs = 'each' is not one of ['auto', 'one', 'per_replica']"),
    ({"jobs": "per_replica", "rendezvous": {"port": 65535}}, "replica r meets on port 65535 + r, up to 65536"),
])
def test_bad_layouts_name_the_fix(change: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        cluster_from_dict({**TWO_NODES, **change})
    assert message in str(e.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TWO_NODES, "dp": 3}))
    with pytest.raises(UserError, match=r"bad.yaml: tp x dp = 8 x 3"):
        load_cluster(path)
    path.write_text("nodes: [{host: a, gpus: 8}\ntp: 8\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_cluster(path)


def test_torchrun_commands_per_node() -> None:
    c = cluster_from_dict(TWO_NODES, name="two")
    cmds = node_commands(c, "generate", ["--prompt", "Hi"], run_config="configs/llama-3.1-8b.yaml")
    assert [x.host for x in cmds] == ["10.0.0.1", "10.0.0.2"]
    for i, cmd in enumerate(cmds):
        line = cmd.shell()
        assert f"--nnodes 2 --nproc-per-node 8 --node-rank {i} --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500" \
            in line
        assert f"--local-addr 10.0.0.{i + 1} --rdzv-conf is_host={int(i == 0)}" in line
        assert "launch/generate.py --config configs/llama-3.1-8b.yaml --set parallel.tp=8 --set parallel.dp=2 " \
               "--set parallel.timeout_s=300 --prompt Hi" in line
        assert cmd.env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}


def test_mpirun_one_command_with_a_hostfile() -> None:
    c = cluster_from_dict({**TWO_NODES, "launcher": "mpirun", "remote_shell": "/usr/bin/rsh", "jobs": "one"})
    (cmd,) = node_commands(c, "serve", [], run_config="r.yaml", hostfile="/tmp/h")
    assert cmd.files == {"/tmp/h": "10.0.0.1 slots=8\n10.0.0.2 slots=8\n"}
    argv = " ".join(cmd.argv)
    assert "mpirun --hostfile /tmp/h -np 16 --map-by slot --mca plm_rsh_agent /usr/bin/rsh" in argv
    assert "-x MASTER_ADDR=10.0.0.1 -x GLOO_SOCKET_IFNAME=eth0" in argv and "launch/serve.py --config r.yaml" in argv


def test_deepspeed_commands_need_no_ssh() -> None:
    c = cluster_from_dict({**TWO_NODES, "launcher": "deepspeed"})
    cmds = node_commands(c, "throughput", ["--batch", "1"], hostfile="/tmp/h")
    for i, cmd in enumerate(cmds):
        assert cmd.argv[:9] == ["deepspeed", "--hostfile", "/tmp/h", "--no_ssh", "--node_rank", str(i),
                                "--master_addr", "10.0.0.1", "--master_port"]
        assert cmd.argv[-3:] == ["benchmarks/throughput.py", "--batch", "1"]  # no run config: args as given


def test_cluster_cli_prints_commands_and_rejects_unknown_entries() -> None:
    base = [sys.executable, str(ROOT / "launch/cluster.py"), "--cluster",
            str(ROOT / "configs/cluster/one-node-tp4-dp2.yaml")]
    ok = subprocess.run([*base, "--config", str(ROOT / "configs/smollm2-135m.yaml"), "--", "calibrate", "--text", "x"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("# node 0 (127.0.0.1)\n") and "--nproc-per-node 8" in ok.stdout
    assert "launch/calibrate.py --config" in ok.stdout and "--set parallel.dp=2" in ok.stdout
    bad = subprocess.run([*base, "--", "train"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "entry 'train' is not one of ['calibrate', 'generate', 'serve', 'throughput']" \
        in bad.stderr


def test_replicas_follow_the_launchers_rank_order() -> None:
    nodes = {"nodes": [{"host": "10.0.0.9", "gpus": 8}, {"host": "10.0.0.10", "gpus": 8}]}
    by_torchrun = cluster_from_dict({**TWO_NODES, **nodes}).replicas()  # c10d sorts the nodes' addresses
    by_mpirun = cluster_from_dict({**TWO_NODES, **nodes, "launcher": "mpirun", "rendezvous": {"host": ""}}).replicas()
    assert [r["hosts"] for r in by_torchrun] == [["10.0.0.10"], ["10.0.0.9"]]
    assert [r["hosts"] for r in by_mpirun] == [["10.0.0.9"], ["10.0.0.10"]]


def test_serve_starts_a_job_per_replica_by_default() -> None:
    c = cluster_from_dict({"nodes": [{"host": "10.0.0.1", "gpus": 8}], "tp": 4, "dp": 2}, name="one")
    assert (c.jobs, c.jobs_for("serve"), c.jobs_for("generate"), c.jobs_for("run.py")) == \
        ("auto", "per_replica", "one", "one")
    cmds = node_commands(c, "serve", [], run_config="r.yaml")
    assert [(x.replica, x.node, x.host) for x in cmds] == [(0, 0, "10.0.0.1"), (1, 0, "10.0.0.1")]
    for r, cmd in enumerate(cmds):  # each its own world of 4 ranks, rendezvous and GPUs
        line = cmd.shell()
        assert f"--nnodes 1 --nproc-per-node 4 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint " \
               f"10.0.0.1:{29500 + r} --rdzv-id one-replica{r} --local-addr 10.0.0.1 --rdzv-conf is_host=1" in line
        assert f"launch/serve.py --config r.yaml --set parallel.tp=4 --set parallel.dp=2 --set parallel.replica={r}" \
            in line
        assert cmd.env == {"CUDA_VISIBLE_DEVICES": ["0,1,2,3", "4,5,6,7"][r]}
    (shared,) = node_commands(c, "generate", ["--prompt", "Hi"], run_config="r.yaml")  # one world: it gathers
    line = shared.shell()
    assert shared.replica is None and "--nproc-per-node 8" in line and "parallel.replica" not in line
    assert c.replicas("per_replica") == c.replicas() == [{"replica": 0, "ranks": [0, 1, 2, 3], "hosts": ["10.0.0.1"]},
                                                         {"replica": 1, "ranks": [4, 5, 6, 7], "hosts": ["10.0.0.1"]}]


def test_per_replica_jobs_under_mpirun_and_deepspeed() -> None:
    mpi = cluster_from_dict({**TWO_NODES, "launcher": "mpirun", "jobs": "per_replica"}, name="two")
    cmds = node_commands(mpi, "serve", [], run_config="r.yaml", hostfile="/tmp/h.hostfile")
    assert [(x.replica, x.node, x.host) for x in cmds] == [(0, 0, "10.0.0.1"), (1, 1, "10.0.0.2")]
    for r, cmd in enumerate(cmds):  # one mpirun per replica, on its node, with a hostfile of that node
        argv = " ".join(cmd.argv)
        assert cmd.files == {f"/tmp/h-replica{r}.hostfile": f"10.0.0.{r + 1} slots=8\n"}
        assert f"-np 8 --map-by slot -x MASTER_ADDR=10.0.0.{r + 1} " in argv and "CUDA_VISIBLE_DEVICES" not in argv
        assert f"--set parallel.replica={r}" in argv
    ds = cluster_from_dict({"nodes": [{"host": "a", "gpus": 4}], "tp": 2, "dp": 2, "launcher": "deepspeed",
                            "jobs": "per_replica"})
    for r, cmd in enumerate(node_commands(ds, "serve", [], run_config="r.yaml", hostfile="/tmp/h")):
        assert cmd.argv[cmd.argv.index("--master_port") + 1] == str(29500 + r)
        assert cmd.argv[cmd.argv.index("--include") + 1] == ["a:0,1", "a:2,3"][r]
        assert cmd.files == {f"/tmp/h-replica{r}": "a slots=4\n"}  # every slot listed; --include picks


def test_per_replica_jobs_refuse_entries_that_gather() -> None:
    c = cluster_from_dict({**TWO_NODES, "jobs": "per_replica"}, name="two")
    with pytest.raises(UserError, match=r"jobs = per_replica starts each replica as a job of its own, but generate "
                                        r"gathers every replica's results in one world; use jobs: one"):
        node_commands(c, "generate", [], run_config="r.yaml")
    with pytest.raises(UserError, match=r"pass --config RUN.yaml, or use jobs: one"):
        node_commands(c, "serve", [])
    spans = cluster_from_dict({**TWO_NODES, "tp": 16, "dp": 1, "tp_spans_nodes": True, "jobs": "per_replica"})
    assert len(node_commands(spans, "serve", [], run_config="r.yaml")) == 2  # dp = 1: the one job, as before
