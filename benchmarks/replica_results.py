"""A benchmark's results over the ranks and replicas of one job (world = dp x tp), as
benchmarks/throughput.py gathers them.

    comm = timed_comm(ctx)                                   # before the model is built (None at tp = 1)
    comm_ms, calls = comm_pass(comm, steps, run_step, ctx.device)          # per case, on every rank
    gathered = gather_results(ctx, rows, CASE_KEYS, ("step_ms", "comm_ms", "compute_ms"))
    if gathered is not None:                                 # global rank 0 only
        summary = summarize(ctx, gathered, CASE_KEYS, "step_ms")   # {"layout", "replicas", "total"}

All-reduce time apart from compute: a second pass over the same steps times each collective
(polar_dist.parallel.comm.TimedComm, the device synchronized around it) on every rank. Each
replica's driver gathers its ranks' timings, and global rank 0 gathers the replicas' (the one
exchange between replicas, at the end). The replicas run the same cases at the same time, so
row i is the same case on every replica, and tokens/s over replicas is the sum of theirs.
"""

from __future__ import annotations

import socket
import statistics
from typing import Any, Callable, Sequence

import torch

from polar_dist.parallel.comm import TimedComm
from polar_dist.parallel.context import ParallelContext


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_comm(ctx: ParallelContext) -> TimedComm | None:
    """Wrap the tensor-parallel comm so its collectives can be timed (the layers built after this
    keep it); None for a replica of one rank, which has no collectives."""
    if ctx.tp_size == 1:
        return None
    if not isinstance(ctx.tp_comm, TimedComm):
        ctx.tp_comm = TimedComm(ctx.tp_comm, ctx.device)
    return ctx.tp_comm


def comm_pass(comm: TimedComm, steps: Sequence[Any], run_step: Callable[[Any], Any],
              device: torch.device) -> tuple[float, int]:
    """Median collective time per step (ms) over `steps`, each run by `run_step` with the
    collectives timed, and the collectives per step."""
    per_step, calls = [], 0
    comm.timing = True
    try:
        for step in steps:
            comm.seconds, comm.calls = 0.0, 0
            run_step(step)
            sync(device)
            per_step.append(comm.seconds)
            calls = comm.calls
    finally:
        comm.timing = False
    return statistics.median(per_step) * 1e3, calls


def gather_results(ctx: ParallelContext, rows: list[dict], case_keys: Sequence[str],
                   timing_keys: Sequence[str]) -> list[dict] | None:
    """Every rank's timings (`case_keys` and `timing_keys` of each row) to its replica's driver,
    then each driver's rows and its ranks' to global rank 0, which gets one part per replica, in
    replica order: {"replica", "rows", "ranks": [{"rank", "tp_rank", "host", "rows"}]}; the
    others get None. Every rank calls it; the job must run every replica."""
    mine = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "host": socket.gethostname(),
            "rows": [{k: r[k] for k in (*case_keys, *timing_keys)} for r in rows]}
    ranks = ctx.gather_to_driver(mine)
    if not ctx.is_driver:
        return None
    return ctx.gather_replicas({"replica": ctx.replica, "rows": rows, "ranks": ranks})


def replica_rows(part: dict, timing_keys: Sequence[str]) -> list[dict]:
    """A replica's rows: its driver's, with the slowest rank's collective time and every rank's timings."""
    out = []
    for i, row in enumerate(part["rows"]):
        per_rank = [r["rows"][i] for r in part["ranks"]]
        out.append({**row, "comm_ms_max": max(r["comm_ms"] for r in per_rank),
                    "per_rank": [{"rank": r["rank"], "host": r["host"], **{k: r["rows"][i][k] for k in timing_keys}}
                                 for r in part["ranks"]]})
    return out


def summarize(ctx: ParallelContext, gathered: list[dict], case_keys: Sequence[str], step_key: str,
              timing_keys: Sequence[str]) -> dict:
    """Global rank 0: each replica's rows (replica_rows), the totals per case (tokens/s summed
    over replicas, each replica's, the slowest replica's step) and the layout (tp, dp, each
    replica's ranks and hosts)."""
    replicas = [{"replica": g["replica"], "ranks": [r["rank"] for r in g["ranks"]],
                 "hosts": sorted({r["host"] for r in g["ranks"]}), "rows": replica_rows(g, timing_keys)}
                for g in gathered]
    totals = []
    for i, row in enumerate(gathered[0]["rows"]):
        per_replica = [g["rows"][i]["tokens_per_s"] for g in gathered]
        totals.append({**{k: row[k] for k in case_keys}, "tokens_per_s": sum(per_replica),
                       "tokens_per_s_per_replica": per_replica,
                       "slowest_step_ms": max(g["rows"][i][step_key] for g in gathered)})
    layout = {"tp": ctx.tp_size, "dp": ctx.num_replicas, "world_size": ctx.world_size,
              "launcher": ctx.info.launcher.value, "hosts": sorted({h for r in replicas for h in r["hosts"]}),
              "replicas": [{k: r[k] for k in ("replica", "ranks", "hosts")} for r in replicas]}
    return {"layout": layout, "replicas": replicas, "total": totals}


def results_dir_name(device_name: str, ctx: ParallelContext) -> str:
    """benchmarks/results/<device>x<tp>[-dp<R>]: one directory per layout."""
    slug = device_name.lower().replace(" ", "-").replace("/", "-")
    return f"{slug}x{ctx.tp_size}" + (f"-dp{ctx.num_replicas}" if ctx.num_replicas > 1 else "")
