"""Replicas as jobs of their own (launch/cluster.py --run, `jobs: auto`, which is per_replica for
serve): two replicas of tp = 2 on CPU, each its own torchrun job with a tiny random model, answer
on server.port and server.port + 1 through the official openai client. SIGKILL to replica 1's
worker (or driver) ends replica 1's other rank within parallel.timeout_s with an error naming the
replica (its /health answers 503, or nothing), while replica 0 keeps answering with the same
tokens and all its processes stay alive; SIGTERM to launch/cluster.py then drains replica 0.
Every process the test started is killed at the end, whatever happened."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")
psutil = pytest.importorskip("psutil")
import requests  # noqa: E402
import yaml  # noqa: E402

from support.ranks import listen_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 6.0  # parallel.timeout_s: short, so that a lost rank ends its replica quickly
ARCH = dict(model_type="llama", vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
pytestmark = pytest.mark.slow


def port_pair() -> int:
    """A port p such that p and p + 1 are both free (replica r serves on p + r, meets on p + r)."""
    for _ in range(100):
        port = listen_port()
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def health(port: int) -> int | None:
    """GET /health's status, None when nothing answers."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except requests.RequestException:
        return None


def ended(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped by its launcher
    except psutil.NoSuchProcess:
        return True


def completion(port: int) -> tuple[str, list[int]]:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model="tiny", prompt="Two replicas,", max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True})
    choice = out.choices[0]
    return choice.text, choice.model_extra["token_ids"]


# What the rank left in replica 1 says when it ends, by the rank killed (tp rank 1: the worker, 0: the driver).
ERRORS = {1: r"error: RuntimeError: replica 1 of 2, ranks \[0, 1\] of its own job: the engine failed, so the server",
          0: r"error: RuntimeError: rank 1 \(replica 1 of 2, ranks \[0, 1\] of its own job\): the driver \(rank 0\) "
             r"sent no step or heartbeat within parallel.timeout_s"}


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "driver"])
def test_a_dead_replica_leaves_the_other_serving(victim: int, tmp_path: Path) -> None:
    port = port_pair()
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({
        "model": {"init": "random", "seed": 3, "architecture": ARCH, "tokenizer": "bytes", "device": "cpu"},
        "parallel": {"timeout_s": TIMEOUT_S}, "engine": {"max_seq_len": 64, "max_batch_size": 4},
        "server": {"port": port, "model_name": "tiny"}}))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({
        "nodes": [{"host": "127.0.0.1", "cpu_ranks": 4}], "launcher": "torchrun", "rendezvous": {"port": port_pair()},
        "tp": 2, "dp": 2, "python": sys.executable, "workdir": str(ROOT)}))
    log_path = tmp_path / "cluster.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    seen: list[psutil.Process] = []  # everything started, found while it still had its parent
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch/cluster.py"), "--cluster", str(cluster), "--config",
                                 str(run_config), "--run", "--", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def text() -> str:
        return log_path.read_text(errors="replace")

    def track() -> None:  # while they are still its descendants: a launcher that dies orphans its ranks
        try:
            seen.extend(p for p in psutil.Process(proc.pid).children(recursive=True) if p not in seen)
        except psutil.Error:
            pass

    try:
        deadline = time.monotonic() + 120
        while not all(health(port + r) == 200 for r in (0, 1)):
            track()
            assert proc.poll() is None, f"launch/cluster.py exited with {proc.returncode}:\n{text()[-4000:]}"
            assert time.monotonic() < deadline, f"the replicas were not ready within 120 s:\n{text()[-4000:]}"
            time.sleep(0.25)
        agents = {int(r): psutil.Process(int(pid)) for r, pid in
                  re.findall(r"# replica (\d), node 0 \(127.0.0.1\): pid (\d+), process group", text())}
        assert sorted(agents) == [0, 1], text()[-4000:]
        ranks = {r: {int(c.environ()["RANK"]): c for c in agent.children()} for r, agent in agents.items()}
        track()
        assert all(sorted(rs) == [0, 1] for rs in ranks.values()), ranks  # each job is a world of its own tp ranks
        assert all(f"--set parallel.replica={r}" in " ".join(p.cmdline()) for r in ranks for p in ranks[r].values())

        before = {r: completion(port + r) for r in (0, 1)}
        assert before[0] == before[1] and len(before[0][1]) == 8  # one model, one answer, from either port
        metrics = requests.get(f"http://127.0.0.1:{port + 1}/metrics", timeout=10).text
        assert 'polar_replica_info{replica="1",replicas="2",tp="2"} 1' in metrics

        ranks[1][victim].kill()
        killed, survivor = time.monotonic(), ranks[1][1 - victim]
        statuses = set()
        while not ended(survivor) and time.monotonic() - killed < 3 * TIMEOUT_S:
            statuses.add(health(port + 1))
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert ended(survivor), f"replica 1's other rank still runs {took:.1f} s after the kill:\n{text()[-4000:]}"
        assert took <= TIMEOUT_S, f"replica 1's other rank took {took:.1f} s to end (parallel.timeout_s = {TIMEOUT_S})"
        assert statuses & {503, None} and health(port + 1) is None, statuses  # 503 while it ends, then nothing
        deadline = time.monotonic() + 30
        while "replica 1, node 0 (127.0.0.1): exited with status" not in text() and time.monotonic() < deadline:
            time.sleep(0.1)
        out = text()
        assert "replica 1, node 0 (127.0.0.1): exited with status 1" in out, out[-4000:]
        assert re.search(ERRORS[victim], out), out[-4000:]  # an error naming the replica, not a drain
        assert "[dp 1/2 tp 0/2] INFO polar_dist.server.serve: server stopped" not in out

        assert completion(port) == before[0]  # replica 0 answers as before
        assert health(port) == 200 and proc.poll() is None
        assert not any(ended(p) for p in [agents[0], *ranks[0].values()])

        # SIGTERM to launch/cluster.py goes on to replica 0's torchrun and its ranks: the driver
        # drains and stops (torchrun itself exits 1 after a signal, as it always does)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0, text()[-4000:]
        assert "[dp 0/2 tp 0/2] INFO polar_dist.server.serve: server stopped" in text()
        assert not any(p.is_running() and not ended(p) for p in seen)
    finally:
        track()
        proc.kill()
        for p in seen:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait(30)
