"""Prefill time of one long prompt through the engine (chunked under engine.max_num_batched_tokens),
against transformers' forward over the same tokens when the model has a Hugging Face directory.

    python benchmarks/prefill.py --config configs/smollm2-135m.yaml --tokens 5001 --set engine.max_seq_len=8192
    python benchmarks/prefill.py --config configs/llama-3.1-8b.yaml --tokens 8192 --set engine.max_seq_len=16384 --out r.json

Ours is the wall time of a request with max_new_tokens = 1 (every prefill chunk, the sampling
and the one device-to-host copy), after one warm-up request of 64 tokens. Prints one JSON line:
tokens, ours_s, transformers_s (when a reference ran), same_next_token, and on CUDA the peak
memory allocated during the prefill above what was allocated before it (weights and KV cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def measure(config: str, tokens: int, overrides: list[str], reference: bool) -> dict:
    from polar_dist.config import load_config
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.models.loader import resolve_source
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime, generate_ids

    cfg = load_config(config, overrides)
    ctx = init_parallel(cfg.parallel, cfg.model.device)
    rt = build_runtime(cfg, ctx)
    ids = torch.randint(100, min(rt.spec.vocab_size, 40000), (tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    one = SamplingParams(max_new_tokens=1)
    generate_ids(rt, [ids[:64]], one)  # warm-up: kernels compiled, caches touched
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    done = generate_ids(rt, [ids], one)
    ours = time.perf_counter() - t0
    result: dict = {"tokens": tokens, "ours_s": ours, "config": config, "overrides": overrides,
                    "max_num_batched_tokens": cfg.engine.max_num_batched_tokens, "device": str(ctx.device)}
    if cuda:
        result["peak_prefill_bytes"] = torch.cuda.max_memory_allocated() - before
        result["gpu"] = torch.cuda.get_device_name()
    source = resolve_source(cfg.model)
    if reference and source.directory is not None and done is not None:
        from transformers import AutoModelForCausalLM

        del rt
        model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=getattr(torch, cfg.model.dtype))
        model = model.to(ctx.device).eval()
        with torch.no_grad():
            x = torch.tensor([ids], device=ctx.device)
            model(x[:, :64])  # the same warm-up
            t0 = time.perf_counter()
            next_logits = model(x).logits[0, -1]
            if cuda:
                torch.cuda.synchronize()
            result["transformers_s"] = time.perf_counter() - t0
        result["same_next_token"] = done[0].output_ids[0] == int(next_logits.argmax())
    return result


def main() -> None:
    from polar_dist.cli import run_main

    def run() -> None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--config", required=True)
        parser.add_argument("--set", dest="overrides", action="append", default=[])
        parser.add_argument("--tokens", type=int, default=5001)
        parser.add_argument("--no-reference", action="store_true", help="skip transformers")
        parser.add_argument("--out", default=None, help="also write the JSON here")
        args = parser.parse_args()
        r = measure(args.config, args.tokens, args.overrides, not args.no_reference)
        print(json.dumps(r))
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=1) + "\n")

    run_main(run)


if __name__ == "__main__":
    main()
