"""Generate text for one or more prompts; rank 0 prints one JSON line per prompt.

    python launch/generate.py --config configs/smollm2-135m.yaml --prompt "Once upon a time" --max-new-tokens 32
    torchrun --nproc_per_node 3 launch/generate.py --config configs/smollm2-135m.yaml --prompt "Hi" --prompt "Bye"
    mpirun --allow-run-as-root --oversubscribe -np 3 python launch/generate.py --config configs/smollm2-135m.yaml --prompt "Hi"
    torchrun --nproc_per_node 4 launch/generate.py --config CONFIG --set parallel.dp=2 --prompt A --prompt B --prompt C

With parallel.dp = R replicas the prompts go round-robin over them (prompt i to replica i mod R),
each replica generates its share independently, and replica 0's driver gathers the results and
prints every line in prompt order: the output is the same as one replica's (for greedy or
seeded sampling), only sooner. Across nodes, see launch/cluster.py.

Output line: {"prompt": ..., "text": ..., "token_ids": [generated ids only], "finish_reason": "stop" | "length" | ...}
(with --logprobs N also "logprobs": [[token id, logprob, [[top id, logprob], ...]], ...])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar_dist.cli import (add_config_args, config_from_args, finite_float, non_negative_float,  # noqa: E402
                            non_negative_int, positive_int, probability, run_main, seed, utf8_text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--prompt", action="append", required=True, type=utf8_text, help="a prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: engine.max_new_tokens")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=probability, default=1.0)
    parser.add_argument("--top-k", type=non_negative_int, default=0)
    parser.add_argument("--min-p", type=non_negative_float, default=0.0, help="in [0, 1]; 0 disables it")
    parser.add_argument("--repetition-penalty", type=non_negative_float, default=1.0, help="> 0; 1 disables it")
    parser.add_argument("--frequency-penalty", type=finite_float, default=0.0)
    parser.add_argument("--presence-penalty", type=finite_float, default=0.0)
    parser.add_argument("--logprobs", type=non_negative_int, default=None,
                        help="report each token's logprob and the top N")
    parser.add_argument("--seed", type=seed, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--stats", action="store_true", help="print throughput to stderr on rank 0")
    args = parser.parse_args()
    cfg = config_from_args(args)

    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime, generate

    max_new_tokens = cfg.engine.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                            seed=args.seed, ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    ctx.require_one_job("launch/generate.py")  # before the model loads
    rt = build_runtime(cfg, ctx)
    mine = list(range(ctx.replica, len(args.prompt), ctx.num_replicas))  # this replica's prompts, round-robin
    t0 = time.perf_counter()
    seqs = generate(rt, [args.prompt[i] for i in mine], params)
    elapsed = time.perf_counter() - t0
    if seqs is not None:  # each replica's driver
        lines = {i: json_line(rt, args.prompt[i], seq) for i, seq in zip(mine, seqs)}
        gathered = ctx.gather_replicas((lines, sum(len(s.output_ids) for s in seqs), elapsed))
        if gathered is not None:  # replica 0's driver prints every replica's lines in prompt order
            everything = {i: line for part, _, _ in gathered for i, line in part.items()}
            for i in range(len(args.prompt)):
                print(json.dumps(everything[i]), flush=True)
            if args.stats:
                n, slowest = sum(g[1] for g in gathered), max(g[2] for g in gathered)
                print(f"generated {n} tokens in {slowest:.2f} s: {n / slowest:.1f} tokens/s"
                      + (f" over {ctx.num_replicas} replicas" if ctx.num_replicas > 1 else ""), file=sys.stderr)
    ctx.shutdown()


def json_line(rt, prompt: str, seq) -> dict:  # noqa: ANN001 - Runtime, Completion (imported after parsing)
    line = {"prompt": prompt, "text": rt.tokenizer.decode(seq.output_ids), "token_ids": seq.output_ids,
            "finish_reason": seq.finish_reason}
    if seq.logprobs is not None:
        line["logprobs"] = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in seq.logprobs]
    return line


if __name__ == "__main__":
    run_main(main)
