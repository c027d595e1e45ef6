"""Bad input ends every rank with a non-zero exit and a message naming the problem, within the
timeout; a rank that dies mid-run ends the others instead of leaving them hanging.

Ranks are started as separate `python launch/generate.py` processes with the environment
torchrun gives them, so each rank's exit code and stderr can be checked on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from support.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 20  # parallel.timeout_s in these runs; every check must end well within 3x this


@pytest.fixture(scope="module")
def tiny_config(tiny_model: Callable[[str], Path]) -> dict:
    return {"model": {"path": str(tiny_model("llama-gqa")), "tokenizer": "bytes", "device": "cpu"},
            "parallel": {"timeout_s": TIMEOUT_S}, "engine": {"max_seq_len": 64, "max_batch_size": 2}}


def start_ranks(config: dict | str, tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    if isinstance(config, dict):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        config = str(path)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "launch/generate.py"), "--config", config, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=3 * TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a rank hung past 3x the configured timeout")
        out.append((p.returncode, err))
    return out


def with_changes(base: dict, **sections: dict) -> dict:
    cfg = {k: dict(v) for k, v in base.items()}
    for section, fields in sections.items():
        cfg.setdefault(section, {}).update(fields)
    return cfg


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_key", "unknown key(s) ['colour']"),
        ("impossible_tp", "parallel.tp = 3"),
        ("missing_model", "does not exist"),
        ("prompt_too_long", "the prompt has 100 tokens but the maximum sequence length is 64"),
    ],
)
def test_bad_input_fails_every_rank(case: str, message: str, tiny_config: dict, tmp_path: Path) -> None:
    cfg, extra = tiny_config, ["--prompt", "hello"]
    if case == "unknown_key":
        cfg = with_changes(tiny_config, model={"colour": "red"})
    elif case == "impossible_tp":
        cfg = with_changes(tiny_config, parallel={"tp": 3})
    elif case == "missing_model":
        cfg = with_changes(tiny_config, model={"path": str(tmp_path / "no-such-model")})
    else:
        extra = ["--prompt", "x" * 100]
    for rank, (code, err) in enumerate(finish(start_ranks(cfg, tmp_path, *extra))):
        assert code != 0, f"rank {rank} exited 0"
        assert message in err, f"rank {rank} stderr:\n{err[-2000:]}"
        assert f"[rank {rank}/{WORLD}]" in err


def test_dead_rank_ends_the_others(tiny_config: dict, tmp_path: Path) -> None:
    cfg = with_changes(tiny_config, engine={"max_seq_len": 256})
    procs = start_ranks(cfg, tmp_path, "--prompt", "a long run", "--max-new-tokens", "240", "--ignore-eos")
    seen = []
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while time.monotonic() < deadline:  # wait until the model is loaded and generation starts
        line = procs[0].stderr.readline()
        seen.append(line)
        if "loaded" in line or not line:
            break
    assert any("loaded" in line for line in seen), "".join(seen)
    procs[1].send_signal(signal.SIGKILL)  # rank 1 dies in the middle of the run
    t0 = time.monotonic()
    (code0, err0), _ = finish(procs)
    assert code0 != 0, "rank 0 finished normally without its peer"
    assert "[rank 0/2] error:" in err0
    assert time.monotonic() - t0 < TIMEOUT_S, "rank 0 should notice the closed connection before the timeout"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK=0 and WORLD_SIZE=2 are set in the environment but MASTER_ADDR is not"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK=2 and WORLD_SIZE=2 in the environment are "
                                                                         "inconsistent"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' in the environment is not an integer"),
    ],
)
def test_stray_launcher_variables_fail_at_once(env: dict, message: str, tiny_config: dict, tmp_path: Path) -> None:
    """Variables a launcher would set, left in a shell: fail before any rendezvous (which would
    wait parallel.timeout_s for ranks nobody started)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--config", str(path), "--prompt", "hi"],
                          env={**clean, **env}, capture_output=True, text=True, timeout=3 * TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < TIMEOUT_S
