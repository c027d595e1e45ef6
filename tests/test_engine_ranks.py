"""The engine across real gloo processes (tp=3, a tiny random Llama with 3 KV groups): workers
follow rank 0's step deltas, so requests added while others run, chunked prefill and aborts
give the tp=1 tokens and free every block; an idle engine still serves after 3x
parallel.timeout_s (the heartbeat); a killed rank ends every other rank within the timeout."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from support.ranks import run_ranks, start_ranks
from support.tiny_models import VOCAB
from polar_dist.config import config_from_dict
from polar_dist.engine.engine import Engine, EngineDeadError, worker_loop
from polar_dist.engine.sampling import SamplingParams
from polar_dist.parallel.context import init_parallel
from polar_dist.runtime import Runtime, build_runtime

pytestmark = pytest.mark.slow

ARCH = dict(model_type="llama", vocab_size=VOCAB, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=3, head_dim=32, max_position_embeddings=256)
PROMPTS = [[5, 6, 7], list(range(10, 40)), list(range(100, 117)), [9, 8]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
HOT = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)


def _runtime(timeout_s: float = 60.0) -> Runtime:
    cfg = config_from_dict({
        "model": {"init": "random", "seed": 3, "architecture": ARCH, "tokenizer": "bytes", "device": "cpu"},
        "parallel": {"timeout_s": timeout_s},
        "engine": {"max_seq_len": 128, "max_batch_size": 4, "max_num_batched_tokens": 8}})
    return build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))


def _serve(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]],
           aborts: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Step until done, adding arrivals[i] and aborting request aborts[i] before step i."""
    tokens: dict[int, list[int]] = {}
    i = 0
    while engine.has_unfinished() or i <= max(arrivals):
        for prompt, params in arrivals.get(i, []):
            tokens[engine.add_request(prompt, params)] = []
        if aborts and i in aborts:
            engine.abort(aborts[i])
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        i += 1
    return tokens


def _workload(engine: Engine) -> dict:
    got = _serve(engine, {0: [(PROMPTS[0], GREEDY), (PROMPTS[1], HOT)], 3: [(PROMPTS[2], GREEDY)],
                          5: [(PROMPTS[3], GREEDY), (PROMPTS[1], GREEDY)]}, aborts={7: 4})
    return {"tokens": [got[i] for i in sorted(got)], "free": engine.num_free_blocks,
            "blocks": engine.runner.num_blocks}


def _engine_ranks(rank: int, world_size: int, out: str) -> None:
    rt = _runtime()
    if rank:
        worker_loop(rt)
        return
    with Engine(rt) as engine:
        result = _workload(engine)
    Path(out).write_text(json.dumps(result))


def test_tp3_engine_with_arrivals_and_aborts_equals_tp1(tmp_path: Path) -> None:
    with Engine(_runtime()) as engine:
        single = _workload(engine)
    out = tmp_path / "tp3.json"
    run_ranks(_engine_ranks, 3, str(out))
    sharded = json.loads(out.read_text())
    assert sharded["tokens"][:4] == single["tokens"][:4]
    assert len(sharded["tokens"][4]) < 12  # aborted part-way
    assert sharded["free"] == sharded["blocks"] and single["free"] == single["blocks"]


def _idle_ranks(rank: int, world_size: int, timeout_s: float, out: str) -> None:
    rt = _runtime(timeout_s)
    if rank:
        worker_loop(rt)
        return
    with Engine(rt) as engine:
        first = _serve(engine, {0: [(p, GREEDY) for p in PROMPTS]})
        start = time.monotonic()
        while time.monotonic() - start < 3 * timeout_s:  # a serving loop with nothing to do
            assert engine.step() == []
            time.sleep(0.05)
        second = _serve(engine, {0: [(p, GREEDY) for p in PROMPTS]})
    Path(out).write_text(json.dumps({"first": list(first.values()), "second": list(second.values())}))


def test_idle_engine_is_still_serving_after_three_timeouts(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    run_ranks(_idle_ranks, 3, 2.0, str(out))
    result = json.loads(out.read_text())
    assert result["first"] == result["second"] and all(len(t) == 12 for t in result["first"])


def _killed_ranks(rank: int, world_size: int, victim: int, timeout_s: float, out_dir: str) -> None:
    directory = Path(out_dir)
    served = directory / "served"
    try:
        rt = _runtime(timeout_s)
        if rank == victim:
            def die() -> None:
                while not served.exists():
                    time.sleep(0.01)
                time.sleep(0.5)  # everyone is idle now
                (directory / "killed").write_text(str(time.time()))
                os._exit(9)

            threading.Thread(target=die, daemon=True).start()
        if rank:
            worker_loop(rt)
            return
        engine = Engine(rt)
        _serve(engine, {0: [(PROMPTS[0], GREEDY)]})
        served.write_text("")
        deadline = time.monotonic() + 10 * timeout_s
        while time.monotonic() < deadline:
            engine.step()
            time.sleep(0.05)
        raise AssertionError("rank 0 did not notice the dead rank")
    except BaseException as e:
        (directory / f"error-{rank}").write_text(f"{type(e).__name__}: {e}")
        if not isinstance(e, EngineDeadError):
            raise
    finally:
        (directory / f"ended-{rank}").write_text(str(time.time()))


@pytest.mark.parametrize("victim", [2, 0])
def test_a_killed_rank_ends_every_rank_within_the_timeout(victim: int, tmp_path: Path) -> None:
    timeout_s = 3.0
    procs, _ = start_ranks(_killed_ranks, 3, victim, timeout_s, str(tmp_path))
    for p in procs:
        p.join(120)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} still running"
    killed = float((tmp_path / "killed").read_text())
    for r in range(3):
        if r != victim:
            waited = float((tmp_path / f"ended-{r}").read_text()) - killed
            assert waited <= timeout_s + 2.0, f"rank {r} ended {waited:.1f} s after rank {victim} was killed"
            assert procs[r].exitcode != 0 or r == 0  # rank 0 catches EngineDeadError itself
            error = (tmp_path / f"error-{r}").read_text()
            assert f"rank {victim} (pid {procs[victim].pid} on" in error and "ended" in error, error  # names it
