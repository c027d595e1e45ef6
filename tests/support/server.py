"""launch/serve.py as a real process for the server tests: one process (tp=1) or torchrun
(tp=N), on a free port, ready once GET /health answers 200.

    with ServerProcess(config, tp=3, overrides=["engine.max_batch_size=4"]) as server:
        client = server.client()                          # the official openai client
        ...
        assert server.terminate() == 0                    # SIGTERM to rank 0: drain, every rank exits 0

The output of every rank goes to a log file; a server that exits early or never gets ready fails
the test with the end of that log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from support.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, config: Path, tp: int = 1, overrides: list[str] | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = None, ready_timeout_s: float = 240.0) -> None:
        self.config = config
        self.tp = tp
        self.port = free_port()
        self.overrides = [*(overrides or []), f"server.port={self.port}"]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env or {}))
        self.api_key = api_key
        self.ready_timeout_s = ready_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        serve = [str(ROOT / "launch/serve.py"), "--config", str(self.config)]
        for item in self.overrides:
            serve += ["--set", item]
        if self.tp == 1:
            return [sys.executable, *serve]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.tp),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *serve]

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode} before it was ready:\n{self.log()}",
                            pytrace=False)
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"the server was not ready within {self.ready_timeout_s} s:\n{self.log()}", pytrace=False)

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0,
                             timeout=kwargs.pop("timeout", 300), **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0,
                                  timeout=kwargs.pop("timeout", 300), **kwargs)

    def rank0_pid(self) -> int:
        """The pid of the process that serves HTTP (torchrun's worker with RANK=0)."""
        assert self.proc is not None
        if self.tp == 1:
            return self.proc.pid
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "0":
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError(f"no rank 0 among torchrun's children:\n{self.log()}")

    def metric(self, name: str) -> float:
        """A metric's value (the first sample named exactly `name`, labels ignored) from /metrics."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.split("{")[0].split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics:\n{text}")

    def terminate(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to rank 0; returns the launcher's exit code once every rank ended."""
        assert self.proc is not None
        os.kill(self.rank0_pid(), signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not stop within {timeout_s} s of SIGTERM:\n{self.log()}", pytrace=False)

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for p in [psutil.Process(self.proc.pid), *children]:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)
