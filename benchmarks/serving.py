"""Serving latency and throughput under load: Poisson arrivals at each request rate, prompt and
output lengths drawn from ranges, streaming requests through the openai client.

    python benchmarks/serving.py --config configs/smollm2-135m.yaml --tp 1 --rates 0.5,1,2 --num-requests 40
    python benchmarks/serving.py --url http://127.0.0.1:8000 --model smollm2-135m --rates 4   # a running server

With --config it starts launch/serve.py (torchrun for --tp > 1) on a free port and stops it with
SIGTERM afterwards. Per rate: requests/s and output tokens/s over the run, time to first token
(TTFT), inter-token latency (ITL: the gaps between a stream's token chunks) and end-to-end latency,
p50/p90/p99, and errors. Prompts are slices of benchmarks/data/macbeth.txt of --prompt-words words
(their token counts come back in usage); outputs are exactly the drawn length (ignore_eos).
Writes results/<device>/serving_<name>.json and a PNG of the figures against the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "benchmarks/data/macbeth.txt"


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(v)}


async def one_request(client: Any, model: str, prompt: str, max_tokens: int, t_arrival: float,
                      sampling: dict[str, float]) -> dict[str, Any]:
    chunks: list[tuple[float, int]] = []  # (time, tokens in the chunk)
    usage = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, **sampling, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            n = sum(len(getattr(c, "token_ids", None) or []) for c in chunk.choices)
            if n:
                chunks.append((now, n))
    except Exception as e:  # noqa: BLE001 - counted and reported: a benchmark must finish its run
        return {"error": f"{type(e).__name__}: {e}"}
    if not chunks:
        return {"error": "no tokens"}
    times = [t for t, _ in chunks]
    return {"ttft": times[0] - t_arrival, "itl": [b - a for a, b in zip(times, times[1:])],
            "latency": times[-1] - t_arrival, "output_tokens": sum(n for _, n in chunks),
            "prompt_tokens": usage.prompt_tokens if usage else None}


async def run_rate(url: str, model: str, api_key: str, rate: float, n: int, prompt_words: tuple[int, int],
                   output_len: tuple[int, int], seed: int, sampling: dict[str, float]) -> dict[str, Any]:
    import openai

    rng = random.Random(seed)
    words = TEXT.read_text().split()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=3600)
    tasks = []
    t0 = time.perf_counter()
    t_next = t0
    for _ in range(n):
        k = rng.randint(*prompt_words)
        start = rng.randrange(0, len(words) - k)
        prompt = " ".join(words[start:start + k])
        max_tokens = rng.randint(*output_len)
        if rate != float("inf"):
            t_next += rng.expovariate(rate)  # Poisson arrivals: exponential gaps
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        tasks.append(asyncio.create_task(one_request(client, model, prompt, max_tokens, time.perf_counter(), sampling)))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "rate": rate, "num_requests": n, "completed": len(ok), "errors": len(errors), "error_samples": errors[:3],
        "duration_s": elapsed, "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
        "mean_prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in ok if r["prompt_tokens"]) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r["itl"]]),
        "latency_s": percentiles([r["latency"] for r in ok]),
    }


def start_server(config: str, tp: int, overrides: list[str]) -> tuple[subprocess.Popen, str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.ranks import free_port

    port = free_port()
    serve = [str(ROOT / "launch/serve.py"), "--config", config, "--set", f"server.port={port}"]
    for item in overrides:
        serve += ["--set", item]
    cmd = [sys.executable, *serve] if tp == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *serve]
    log = Path(f"/tmp/serving-bench-{port}.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server was not ready in 600 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, tp: int) -> int:
    if tp == 1:
        proc.send_signal(signal.SIGTERM)
    else:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.environ().get("RANK") == "0":
                child.send_signal(signal.SIGTERM)
    return proc.wait(120)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def plot(results: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] if r["rate"] != float("inf") else max(x["requests_per_s"] for x in results) * 2
             for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(rates, [r["output_tokens_per_s"] for r in results], "o-", label="output tokens/s")
    axes[0].set_xlabel("request rate (req/s)")
    axes[0].set_ylabel("output tokens/s")
    twin = axes[0].twinx()
    twin.plot(rates, [r["requests_per_s"] for r in results], "s--", color="gray", label="requests/s")
    twin.set_ylabel("completed requests/s")
    axes[0].set_title("throughput")
    for ax, key, name in ((axes[1], "ttft_s", "time to first token"), (axes[2], "itl_s", "inter-token latency")):
        for q in ("p50", "p90", "p99"):
            ax.plot(rates, [1000 * (r[key][q] or 0) for r in results], "o-", label=q)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (else --config starts one)")
    p.add_argument("--config", help="run config for launch/serve.py")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for the server")
    p.add_argument("--model", default=None, help="model id (default: the server's first in /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("POLAR_API_KEY", ""))
    p.add_argument("--rates", default="1", help="requests/s, comma-separated; inf sends all at once")
    p.add_argument("--num-requests", type=int, default=32, help="per rate")
    p.add_argument("--prompt-words", type=_range, default=(16, 128), help="LO:HI words per prompt")
    p.add_argument("--output-len", type=_range, default=(16, 64), help="LO:HI tokens per output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0,
                   help="requests sent at once before measuring (reach every batch size the runs will see)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; OpenAI clients default to 1")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--name", default=None, help="results file name part (default: the model and tp)")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device>")
    args = p.parse_args()
    if not args.url and not args.config:
        p.error("give --url of a running server or --config to start one")
    proc = None
    if args.config:
        proc, url, log = start_server(args.config, args.tp, args.overrides)
    else:
        url = args.url.rstrip("/")
    try:
        import openai

        model = args.model or openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "unused").models.list() \
            .data[0].id
        results = []
        sampling = {"temperature": args.temperature, "top_p": args.top_p}
        if args.warmup:  # first uses capture CUDA graphs and compile kernels per batch bucket: not measured
            w = asyncio.run(run_rate(url, model, args.api_key, float("inf"), args.warmup, args.prompt_words,
                                     (min(args.output_len[1], 16),) * 2, args.seed + 1, sampling))
            print(f"warm-up: {w['completed']}/{w['num_requests']} ok in {w['duration_s']:.1f} s", flush=True)
        for rate in [float(r) for r in args.rates.split(",")]:
            r = asyncio.run(run_rate(url, model, args.api_key, rate, args.num_requests, args.prompt_words,
                                     args.output_len, args.seed, sampling))
            results.append(r)
            print(f"rate {rate:g}/s: {r['completed']}/{r['num_requests']} ok, {r['errors']} errors, "
                  f"{r['requests_per_s']:.2f} req/s, {r['output_tokens_per_s']:.1f} tok/s | TTFT ms p50/p90/p99 "
                  + "/".join(f"{1000 * (r['ttft_s'][q] or 0):.0f}" for q in ("p50", "p90", "p99"))
                  + " | ITL ms " + "/".join(f"{1000 * (r['itl_s'][q] or 0):.0f}" for q in ("p50", "p90", "p99")),
                  flush=True)
    finally:
        if proc is not None:
            rc = stop_server(proc, args.tp)
            print(f"server stopped (exit {rc})", file=sys.stderr)
    device = device_name() if args.url is None else "remote"
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks/results" / device
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{model}_tp{args.tp}"
    meta = {"model": model, "tp": args.tp, "config": args.config, "overrides": args.overrides, "device": device,
            "host": platform.node(), "cpus": os.cpu_count(), "prompt_words": args.prompt_words,
            "output_len": args.output_len, "num_requests": args.num_requests, "temperature": args.temperature,
            "top_p": args.top_p, "warmup": args.warmup, "command": " ".join(sys.argv)}
    (out_dir / f"serving_{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, f"{model}, tp={args.tp}, {device}", out_dir / f"serving_{name}.png")
    print(f"wrote {out_dir / f'serving_{name}.json'} and .png")


if __name__ == "__main__":
    main()
