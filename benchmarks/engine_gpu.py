"""Engine figures on one GPU: sampling's share of a decode step, a long prompt's prefill (time and
peak memory, chunked and not), and the KV-cache sizing line.

    python3 benchmarks/engine_gpu.py --config configs/llama-3.1-8b.yaml --out results.json

Sampling share: `batch` requests with `context`-token prompts are prefilled, then `steps`
steady decode steps run through Engine.step (schedule, H2D, graph replay, sampling, the one
D2H copy), once greedy and once at temperature 1 + top-p 0.9 (+ top-k 50 in a third run).
The sampler alone (Sampler.sample on the last step's logits, D2H copy included) is timed
over 20 calls, so sample_ms / step_ms is its share of a step; sample_direct_ms is the same
without the draw's CUDA graph. The Triton draw is checked
against the torch reference on the same logits (tokens must agree), and the reference's time
is reported beside it. Prefill: one `prefill`-token prompt with max_new_tokens = 1 at
max_num_batched_tokens 2048 and `prefill` (one chunk); the next token and its logprob must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _sync_time(fn, iters: int) -> float:  # noqa: ANN001
    """Median seconds per call of fn() (each call ends with a device sync)."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sampling_share(rt, params, batch: int, context: int, steps: int) -> dict:  # noqa: ANN001
    from kernels.sample_tokens import sample_tokens, sample_tokens_ref
    from polar_dist.engine.engine import Engine
    from polar_dist.engine.sampling import Sampler, as_signed64

    captured = {}
    execute = rt.runner.execute

    def recording(step, rows=None, prompt=None):  # noqa: ANN001, ANN202
        captured["step"], captured["rows"] = step, rows
        return execute(step, rows, prompt)

    rt.runner.execute = recording
    engine = Engine(rt)
    gen = torch.Generator().manual_seed(1)
    for i in range(batch):
        engine.add_request(torch.randint(100, 100000, (context,), generator=gen).tolist(), params)
    t0 = time.perf_counter()
    while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
        engine.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(3):  # graph capture and first launches
        engine.step()
    step_s = _sync_time(engine.step, steps)
    step, rows = captured["step"], captured["rows"]
    assert step.is_decode and step.batch_size == batch
    logits = rt.runner.logits(step)
    sample_s = _sync_time(lambda: rt.runner.sampler.sample(logits, rows), 20)
    direct = Sampler(rt.runner.sampler.vocab_size, logits.device, use_kernel=True, graph_rows=0)  # no CUDA graph
    direct_s = _sync_time(lambda: direct.sample(logits, rows), 20)
    forward_s = _sync_time(lambda: rt.runner.logits(step), 20)
    dev = logits.device
    args = (torch.tensor([r.params.temperature for r in rows], device=dev),
            torch.tensor([r.params.top_k for r in rows], dtype=torch.int32, device=dev),
            torch.tensor([r.params.top_p for r in rows], device=dev),
            torch.tensor([r.params.min_p for r in rows], device=dev),
            torch.tensor([as_signed64(r.seed) for r in rows], dtype=torch.int64, device=dev),
            torch.tensor([r.counter for r in rows], dtype=torch.int64, device=dev))
    kernel_s = _sync_time(lambda: sample_tokens(logits, *args), 20)
    ref_s = _sync_time(lambda: sample_tokens_ref(logits, *args), 5)
    same = torch.equal(sample_tokens(logits, *args), sample_tokens_ref(logits, *args))
    engine.shutdown()
    rt.runner.execute = execute
    return {"batch": batch, "context": context, "prefill_s": prefill_s, "step_ms": step_s * 1e3,
            "forward_ms": forward_s * 1e3, "sample_ms": sample_s * 1e3, "sample_share": sample_s / step_s,
            "sample_direct_ms": direct_s * 1e3, "sampler_graph_equals_direct": direct.sample(logits, rows).token_ids
            == rt.runner.sampler.sample(logits, rows).token_ids,
            "draw_kernel_ms": kernel_s * 1e3, "draw_torch_ref_ms": ref_s * 1e3, "kernel_equals_ref": same}


def prefill(rt, tokens: int, budget: int) -> dict:  # noqa: ANN001
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.runtime import generate_ids

    cfg = dataclasses.replace(rt.cfg, engine=dataclasses.replace(rt.cfg.engine, max_num_batched_tokens=budget))
    rt_b = dataclasses.replace(rt, cfg=cfg)
    ids = torch.randint(100, 100000, (tokens,), generator=torch.Generator().manual_seed(2)).tolist()
    one = SamplingParams(max_new_tokens=1, logprobs=0)
    generate_ids(rt_b, [ids[:256]], one)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    done = generate_ids(rt_b, [ids], one)
    seconds = time.perf_counter() - t0
    assert done is not None and done[0].logprobs is not None
    return {"tokens": tokens, "max_num_batched_tokens": budget, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_above_weights_and_kv_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
            "next_token": done[0].output_ids[0], "logprob": done[0].logprobs[0].logprob}


def main() -> None:
    from polar_dist.config import load_config
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama-3.1-8b.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    configure_logging(0, 1)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("polar_dist").addHandler(Keep())
    cfg = load_config(args.config, [f"engine.max_seq_len={2 * args.prefill}", f"engine.max_batch_size={args.batch}",
                                    *args.overrides])
    t0 = time.perf_counter()
    rt = build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
                    "build_s": time.perf_counter() - t0, "kv_cache_log": [m for m in lines if "KV cache" in m],
                    "num_blocks": rt.runner.num_blocks, "gpu_memory_utilization": cfg.engine.gpu_memory_utilization}
    print(json.dumps(result), flush=True)
    runs = {"greedy": SamplingParams(max_new_tokens=100000, ignore_eos=True),
            "temperature 1, top-p 0.9": SamplingParams(max_new_tokens=100000, temperature=1.0, top_p=0.9,
                                                       ignore_eos=True),
            "temperature 1, top-k 50, top-p 0.9": SamplingParams(max_new_tokens=100000, temperature=1.0, top_k=50,
                                                                 top_p=0.9, ignore_eos=True)}
    result["sampling"] = {}
    for name, params in runs.items():
        result["sampling"][name] = sampling_share(rt, params, args.batch, args.context, args.steps)
        print(name, json.dumps(result["sampling"][name]), flush=True)
    result["prefill"] = [prefill(rt, args.prefill, b) for b in (2048, args.prefill)]
    a, b = result["prefill"]
    result["prefill_chunked_equals_whole"] = a["next_token"] == b["next_token"] and abs(a["logprob"] - b["logprob"]) < 0.05
    print(json.dumps(result["prefill"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
