"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported (triton reads it at import),
so it is decided here, at the top of the first module pytest loads: on a machine without
CUDA the Triton kernels run in the interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0 and let the OS choose)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, fn, args: tuple, errors) -> None:  # noqa: ANN001
    import traceback

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test"})
    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - relayed to the parent with the rank
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world_size: int, *args, timeout_s: float = 240.0) -> None:  # noqa: ANN001
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes that join a gloo
    group through the same environment torchrun sets; fail with every rank's traceback."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = []
    while not errors.empty():
        rank, tb = errors.get()
        reports.append(f"[rank {rank}]\n{tb}")
    if reports or hung or any(p.exitcode for p in procs):
        codes = [p.exitcode for p in procs]
        pytest.fail(f"ranks failed (exit codes {codes}, hung {hung}):\n" + "\n".join(reports), pytrace=False)
