"""Per-step control cost of the cross-rank protocol at a steady decode batch, on CPU.

    python benchmarks/control_traffic.py --batch 256 --context 1024 --world 2 --out results.json

A pretend workload, no model: `batch` sequences decode with `context` cached tokens each
(block size 16), and each step goes through what the engine does around the forward:
rank 0 schedules, encodes the step delta, sends it, and turns it into the Step through its
BatchMirror; a worker receives it and turns it into the same Step. Measured, per step (median):
- schedule_us: the scheduler's decision (rank 0 only; not part of the traffic);
- encode_us, apply_us: packing the delta, and a mirror turning it into the Step (every rank);
(host figures: the best of --repeats medians, as other processes share the machine)
- message_bytes: what crosses per step (the fixed buffer holds it in one broadcast);
- transport_us: one-way time of that message through the engine's ControlChannel between
  processes on this machine (the shared-memory ring), half of a ping-pong (rank 0 sends the
  message, rank 1 answers with one word through a ring of its own);
- gloo_transport_us: the same over the gloo broadcast of the fixed buffer (what ranks on
  several machines use; rank 1 answers with an 8-byte broadcast), small_message_us: gloo with
  an 8-byte message (the floor of TCP between processes);
- control_us = encode + apply + transport: the protocol's cost per step (gloo_control_us with
  the gloo transport);
and, for comparison, the previous protocol: the whole Step (token ids, positions, lengths and
every block table as Python lists) pickled through broadcast_object_list each step.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

BLOCK = 16


def _scheduler(batch: int, context: int, max_seq_len: int):  # noqa: ANN202
    from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.engine.scheduler import Scheduler

    s = Scheduler(BlockAllocator(batch * (blocks_needed(max_seq_len, BLOCK) + 2)), BLOCK, batch, max_seq_len,
                  eos_token_ids=(0,), vocab_size=32000, max_num_batched_tokens=max(2048, batch))
    params = SamplingParams(max_new_tokens=max_seq_len, ignore_eos=True)
    for i in range(batch):
        s.add([1 + (i + j) % 30000 for j in range(context)], params, seed=i)
    return s


def _warm_to_decode(s, mirror, worker) -> None:  # noqa: ANN001
    """Prefill everything (unmeasured) so that every step after is a pure decode step."""
    from polar_dist.engine.sampling import SampleOutput
    from polar_dist.engine.step import encode

    while s.waiting or any(not q.is_decoding for q in s.running):
        msg = encode(s.schedule())
        step = mirror.apply(msg)
        worker.apply(msg.copy())
        n = len(step.sample_ids)
        s.accept(step, SampleOutput([7] * n, [None] * n, []))


def host_costs(batch: int, context: int, steps: int) -> dict:
    from polar_dist.engine.sampling import SampleOutput
    from polar_dist.engine.step import BatchMirror, encode

    # room for the prefill steps (batch * context / 2048 of them, decoding as they go) and the measured ones
    max_seq_len = context + batch * context // 2048 + steps + 64
    s = _scheduler(batch, context, max_seq_len)
    mirror = BatchMirror(batch, max_seq_len // BLOCK + 1, BLOCK)
    worker = BatchMirror(batch, max_seq_len // BLOCK + 1, BLOCK)
    _warm_to_decode(s, mirror, worker)
    t_sched, t_enc, t_apply, t_accept, sizes, old_pickle, old_bytes = [], [], [], [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        delta = s.schedule()
        t1 = time.perf_counter()
        msg = encode(delta)
        t2 = time.perf_counter()
        step = mirror.apply(msg)
        t3 = time.perf_counter()
        worker.apply(msg.copy())
        n = len(step.sample_ids)
        t4 = time.perf_counter()
        s.accept(step, SampleOutput([7] * n, [None] * n, []))
        t5 = time.perf_counter()
        t_sched.append(t1 - t0)
        t_enc.append(t2 - t1)
        t_apply.append(t3 - t2)
        t_accept.append(t5 - t4)
        sizes.append(msg.nbytes)
        old = _old_step(s)
        t6 = time.perf_counter()
        blob = pickle.dumps(old)
        pickle.loads(blob)
        old_pickle.append(time.perf_counter() - t6)
        old_bytes.append(len(blob))
    assert step.is_decode and step.batch_size == batch
    med = statistics.median
    return {"schedule_us": med(t_sched) * 1e6, "encode_us": med(t_enc) * 1e6, "apply_us": med(t_apply) * 1e6,
            "accept_us": med(t_accept) * 1e6, "message_bytes": int(med(sizes)),
            "old_pickle_us": med(old_pickle) * 1e6, "old_message_bytes": int(med(old_bytes))}


def _old_step(s) -> dict:  # noqa: ANN001
    """The previous protocol's per-step object: every list of the decode step, block tables included."""
    seqs = s.running
    positions = [q.num_computed - 1 for q in seqs]
    return {"kind": "decode", "token_ids": [q.output_ids[-1] for q in seqs], "positions": positions,
            "query_lens": [1] * len(seqs), "seq_lens": [p + 1 for p in positions],
            "block_tables": [list(q.blocks) for q in seqs]}


def _transport_rank(rank: int, world_size: int, capacity: int, msg_len: int, old_bytes: int, iters: int,
                    out: str) -> None:
    import numpy as np
    import torch.distributed as dist

    from polar_dist.config import ParallelConfig
    from polar_dist.engine.control import ControlChannel
    from polar_dist.engine.shm_ring import ShmRing
    from polar_dist.parallel.context import init_parallel

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    ctx = init_parallel(ParallelConfig(timeout_s=60.0), "cpu")
    buf = torch.zeros(capacity, dtype=torch.int64)
    ack = torch.zeros(1, dtype=torch.int64)
    blob = [bytes(old_bytes)]

    def pingpong(send, answer) -> float:  # noqa: ANN001
        times = []
        for _ in range(iters):
            dist.barrier()
            t0 = time.perf_counter()
            send()
            answer()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / 2

    gloo_ack = lambda: dist.broadcast(ack, src=1)  # noqa: E731
    new = pingpong(lambda: dist.broadcast(buf, src=0), gloo_ack)
    ack_only = pingpong(lambda: dist.broadcast(ack, src=0), gloo_ack)
    old = pingpong(lambda: dist.broadcast_object_list(blob if rank == 0 else [None], src=0), gloo_ack)

    # The control channel as the engine builds it (shared memory, every rank on this machine);
    # rank 1 answers through a one-word ring of its own.
    channel = ControlChannel(ctx, capacity, timeout_s=60.0)
    assert channel.transport == "shm", "every rank is on this machine: the channel must use shared memory"
    name = ctx.broadcast_object(f"polar-bench-ack-{os.getpid()}") if rank == 0 else ctx.broadcast_object()
    back = ShmRing.create(name, 1, 64) if rank == 1 else None
    dist.barrier()
    if rank == 0:
        back = ShmRing.open(name, 1, 64, reader=0)
    dist.barrier()
    if rank == 1:
        back.unlink()
    msg = np.zeros(msg_len, dtype=np.int64)
    msg[:2] = 1, msg_len  # a STEP message of the measured size
    word = np.array([2, 2], dtype=np.int64)
    if rank == 0:
        shm = pingpong(lambda: channel.send(msg), lambda: back.read(60.0))
    elif rank == 1:
        shm = pingpong(lambda: channel.recv(), lambda: back.write(word, 60.0))
    else:
        shm = pingpong(lambda: channel.recv(), lambda: None)
    if rank == 0:
        Path(out).write_text(json.dumps({"transport_us": shm * 1e6, "gloo_transport_us": new * 1e6,
                                         "small_message_us": ack_only * 1e6, "old_transport_us": old * 1e6}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from polar_dist.engine.control import buffer_capacity

    # Other processes share this machine: each figure is the best of `repeats` medians.
    runs = [host_costs(args.batch, args.context, args.steps) for _ in range(args.repeats)]
    host = {k: min(r[k] for r in runs) for k in runs[0]}
    capacity = buffer_capacity(args.batch)
    assert host["message_bytes"] <= capacity * 8, "a decode step must fit the fixed buffer"
    import tempfile

    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.json")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mp.spawn(_transport_rank, args=(args.world, capacity, host["message_bytes"] // 8, host["old_message_bytes"],
                                        args.steps, out),
                 nprocs=args.world)
        transport = json.loads(Path(out).read_text())
    result = {"measured": "CPU only, no model: host cost of the step protocol at a steady decode batch, and the "
                          "control channel's latency between processes on one machine (shared memory; gloo for "
                          "comparison)", "repeats": args.repeats,
              "batch": args.batch, "context": args.context, "world": args.world, "buffer_bytes": capacity * 8,
              **host, **transport}
    result["control_us"] = result["encode_us"] + result["apply_us"] + result["transport_us"]
    result["gloo_control_us"] = result["encode_us"] + result["apply_us"] + result["gloo_transport_us"]
    result["old_control_us"] = result["old_pickle_us"] + result["old_transport_us"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
