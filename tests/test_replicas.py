"""Data-parallel replicas (world = dp x tp) across real gloo processes: the layout and its
errors; tp=2 x dp=2 engines give the single-process tokens; and replicas are independent -
killing one replica's rank ends that replica's ranks within parallel.timeout_s with a message
naming the replica, while the other replica keeps serving."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from support.ranks import run_ranks, start_ranks
from support.tiny_models import VOCAB
from polar_dist.config import ParallelConfig, config_from_dict
from polar_dist.engine.engine import Engine, EngineDeadError, worker_loop
from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.parallel.context import init_parallel
from polar_dist.parallel.layout import ReplicaLayout, resolve_layout
from polar_dist.runtime import Runtime, build_runtime

ARCH = dict(model_type="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9, 8]]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
HOT = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)


def test_layout_from_tp_and_dp() -> None:
    assert resolve_layout(ParallelConfig(tp=0, dp=2), 8) == ReplicaLayout(4, 2)
    assert resolve_layout(ParallelConfig(tp=2, dp=3), 6) == ReplicaLayout(2, 3)
    layout = ReplicaLayout(tp_size=4, num_replicas=2)
    assert layout.ranks_of(1) == [4, 5, 6, 7] and layout.drivers() == [0, 4]
    assert [layout.replica_of(r) for r in range(8)] == [0] * 4 + [1] * 4


def test_a_job_of_one_replica() -> None:
    layout = resolve_layout(ParallelConfig(tp=2, dp=3, replica=2), 2)  # launch/cluster.py with jobs: per_replica
    assert layout == ReplicaLayout(2, 1, first_replica=2, dp=3) and resolve_layout(ParallelConfig(dp=3, replica=2), 2) \
        == layout
    assert (layout.world_size, layout.total_replicas, layout.one_job) == (2, 3, False)
    assert [layout.replica_of(r) for r in range(2)] == [2, 2] and layout.ranks_of(2) == [0, 1]
    with pytest.raises(UserError, match=r"parallel.replica = 2 runs one replica of parallel.tp = 2 ranks as its own "
                                        r"job, but the launcher started 4; start --nproc_per_node 2"):
        resolve_layout(ParallelConfig(tp=2, dp=3, replica=2), 4)
    with pytest.raises(UserError, match=r"parallel.replica = 3 must be in \[0, parallel.dp = 3\)"):
        config_from_dict({"model": {"init": "random", "architecture": ARCH}, "parallel": {"dp": 3, "replica": 3}})


@pytest.mark.parametrize("tp, dp, world, message", [
    (4, 2, 6, "parallel.tp = 4 x parallel.dp = 2 needs 8 process(es) but the launcher started 6; start "
              "--nproc_per_node 8"),
    (0, 4, 6, "parallel.dp = 4 does not divide the launcher's 6 process(es)"),
    (2, 1, 4, "parallel.tp = 2 needs 2 process(es) but the launcher started 4"),
])
def test_layout_errors_name_the_fix(tp: int, dp: int, world: int, message: str) -> None:
    with pytest.raises(UserError) as e:
        resolve_layout(ParallelConfig(tp=tp, dp=dp), world)
    assert message in str(e.value)


def test_dp_must_be_positive() -> None:
    with pytest.raises(UserError, match=r"parallel.dp = 0 must be >= 1"):
        config_from_dict({"model": {"init": "random", "architecture": ARCH}, "parallel": {"dp": 0}})


def _runtime(dp: int, timeout_s: float = 60.0) -> Runtime:
    cfg = config_from_dict({
        "model": {"init": "random", "seed": 3, "architecture": ARCH, "tokenizer": "bytes", "device": "cpu"},
        "parallel": {"dp": dp, "timeout_s": timeout_s},
        "engine": {"max_seq_len": 96, "max_batch_size": 4, "max_num_batched_tokens": 16}})
    return build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))


def _generate(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p, params in requests]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


def _requests(replica: int) -> list[tuple[list[int], SamplingParams]]:
    """Replica r serves different requests from the other replica: its prompts rotated by r."""
    prompts = PROMPTS[replica:] + PROMPTS[:replica]
    return [(p, HOT if i == 1 else GREEDY) for i, p in enumerate(prompts)]


def _replica_ranks(rank: int, world_size: int, out_dir: str) -> None:
    rt = _runtime(dp=2)
    ctx = rt.ctx
    tp = world_size // 2
    assert (ctx.tp_size, ctx.num_replicas, ctx.replica, ctx.tp_rank) == (tp, 2, rank // tp, rank % tp)
    assert ctx.rank == rank and ctx.world_size == world_size and ctx.is_driver == (rank % tp == 0)
    assert ctx.tp_comm.size == tp and ctx.tp_comm.rank == rank % tp
    if not ctx.is_driver:
        worker_loop(rt)
    else:
        with Engine(rt) as engine:
            tokens = _generate(engine, _requests(ctx.replica))
        Path(out_dir, f"replica-{ctx.replica}.json").write_text(json.dumps(tokens))
        gathered = ctx.gather_replicas(ctx.replica * 10)
        assert gathered == ([0, 10] if ctx.replica == 0 else None)
    # Process groups left to the interpreter's exit can abort it: gloo's worker threads may still
    # hold finished work whose tensors they free without the interpreter (see pytorch/pytorch#179291).
    ctx.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 2], ids=["tp2xdp2", "tp1xdp2"])
def test_replicas_give_the_single_process_tokens(world_size: int, tmp_path: Path) -> None:
    run_ranks(_replica_ranks, world_size, str(tmp_path))
    for replica in range(2):
        with Engine(_runtime(dp=1)) as engine:
            single = _generate(engine, _requests(replica))
        assert json.loads((tmp_path / f"replica-{replica}.json").read_text()) == single
        assert all(len(t) == 10 for t in single)


def _killed_replica_ranks(rank: int, world_size: int, victim: int, timeout_s: float, out_dir: str) -> None:
    directory = Path(out_dir)
    served = directory / "served"
    mark = directory / f"ended-{rank}"
    try:
        rt = _runtime(dp=2, timeout_s=timeout_s)
        if rank == victim:
            def die() -> None:
                while not served.exists():
                    time.sleep(0.01)
                time.sleep(0.5)  # every replica is idle now
                (directory / "killed").write_text(str(time.time()))
                os._exit(9)

            threading.Thread(target=die, daemon=True).start()
        if not rt.ctx.is_driver:
            worker_loop(rt)
            mark.write_text(json.dumps({"t": time.time(), "error": None}))
            return
        engine = Engine(rt)
        first = _generate(engine, _requests(rt.ctx.replica))
        if rt.ctx.replica == 0:
            served.write_text("")
        else:
            while not served.exists():
                time.sleep(0.01)
        # Both replicas keep serving: replica 1 loses its rank, replica 0 must not notice.
        deadline = time.monotonic() + 3 * timeout_s
        later = None
        while time.monotonic() < deadline:
            engine.step()
            time.sleep(0.05)
        later = _generate(engine, _requests(rt.ctx.replica))
        engine.shutdown()
        directory.joinpath(f"tokens-{rank}.json").write_text(json.dumps({"first": first, "later": later}))
        mark.write_text(json.dumps({"t": time.time(), "error": None}))
    except (EngineDeadError, RuntimeError) as e:
        mark.write_text(json.dumps({"t": time.time(), "error": f"{type(e).__name__}: {e}"}))
        raise


@pytest.mark.slow
@pytest.mark.parametrize("victim", [3, 2])  # replica 1's worker, then its driver
def test_killing_one_replica_leaves_the_other_serving(victim: int, tmp_path: Path) -> None:
    timeout_s = 3.0
    procs, _ = start_ranks(_killed_replica_ranks, 4, victim, timeout_s, str(tmp_path))
    for p in procs:
        p.join(180)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} still running"
    killed = float((tmp_path / "killed").read_text())
    # replica 0 (ranks 0 and 1) served before and after the kill, and ended cleanly
    assert [procs[r].exitcode for r in (0, 1)] == [0, 0]
    tokens = json.loads((tmp_path / "tokens-0.json").read_text())
    assert tokens["first"] == tokens["later"] and all(len(t) == 10 for t in tokens["first"])
    for r in (0, 1):
        assert json.loads((tmp_path / f"ended-{r}").read_text())["error"] is None
    # the other rank of replica 1 ended on its own, with an error, within the timeout
    survivor = 5 - victim
    ended = json.loads((tmp_path / f"ended-{survivor}").read_text())
    assert procs[survivor].exitcode != 0 and ended["error"] is not None
    assert ended["t"] - killed <= timeout_s + 2.0, f"rank {survivor} took {ended['t'] - killed:.1f} s"
    if survivor == 3:  # the worker's message names its replica and its driver
        assert "replica 1 of 2, ranks [2, 3]" in ended["error"] and "the driver (rank 2)" in ended["error"]
    else:
        assert ended["error"].startswith("EngineDeadError")
