"""ParallelContext set-up that needs no second process: CPU threads shared by the ranks of one
machine. (Launch detection against stray environments is checked end to end in
test_launch_errors.py.)"""

from __future__ import annotations

import pytest
import torch

from polar_dist.parallel import context
from polar_dist.parallel.context import Launcher, LaunchInfo


@pytest.fixture
def threads() -> int:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def info(local_world_size: int) -> LaunchInfo:
    return LaunchInfo(Launcher.DEEPSPEED, 0, local_world_size, 0, "tcp://127.0.0.1:1", local_world_size)


def test_ranks_of_one_machine_share_its_cores(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(context, "_usable_cores", lambda: 16)
    torch.set_num_threads(16)
    context._share_cpu_cores(info(4))
    assert torch.get_num_threads() == 4
    context._share_cpu_cores(info(32))  # more ranks than cores: one thread each
    assert torch.get_num_threads() == 1


def test_one_rank_or_omp_num_threads_leaves_threads_alone(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(context, "_usable_cores", lambda: 16)
    torch.set_num_threads(3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    context._share_cpu_cores(info(1))
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    context._share_cpu_cores(info(4))
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("variable, launcher", [("LOCAL_WORLD_SIZE", "torchrun"), ("LOCAL_SIZE", "deepspeed")])
def test_local_world_size_from_the_launcher(monkeypatch: pytest.MonkeyPatch, variable: str, launcher: str) -> None:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    env = {"RANK": "1", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
           variable: "3"}
    if launcher == "torchrun":
        env["TORCHELASTIC_RUN_ID"] = "x"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = context.detect_launch()
    assert (got.launcher.value, got.rank, got.world_size, got.local_world_size) == (launcher, 1, 6, 3)
