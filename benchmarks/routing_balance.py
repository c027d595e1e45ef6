"""Per-rank load of the `global` routing scope on real text.

    python benchmarks/routing_balance.py --config configs/smollm2-135m.yaml --text FILE --tp 3

Under the global scope each sequence picks its top-k KV groups over the whole model, and a
rank computes attention only for the (sequence, group) pairs it holds: a rank whose groups are
chosen more often does more work, and the step waits for the busiest rank. This runs the model
(dense prefill, one process) over the text with hooks on every routed layer's router input,
applies the layer's router and top-k to every token (a token's router input in prefill is what
its decode step would see), and reports per layer and tp the load of each rank relative to the
mean (1.0 = balanced; the step's attention time scales with the max). JSON and a markdown table
go to benchmarks/results/routing_balance/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402
from polar_dist.engine.sampling import SamplingParams  # noqa: E402
from polar_dist.models.head_selection import RoutedGroups  # noqa: E402
from polar_dist.parallel.context import init_parallel  # noqa: E402
from polar_dist.runtime import LocalSteps, build_runtime  # noqa: E402
from polar_dist.sparsity.text import read_text_files, token_segments  # noqa: E402


def rank_of_group(G: int, tp: int) -> list[list[int]]:
    """Ranks that compute each group: G / tp contiguous groups per rank, or (tp > G) tp / G
    ranks sharing each replicated group."""
    if G % tp == 0:
        return [[g // (G // tp)] for g in range(G)]
    return [[r for r in range(tp) if r // (tp // G) == g] for g in range(G)]


def _shards(spec, tp: int) -> bool:  # noqa: ANN001
    try:
        spec.check_tp(tp)
    except ValueError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--text", nargs="+", required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=None, help="default: every tp in 2..16 the model allows")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--segment", type=int, default=256)
    args = parser.parse_args()
    cfg = config_from_args(args)
    ctx = init_parallel(cfg.parallel, cfg.model.device)
    rt = build_runtime(cfg, ctx)
    layers = [(i, layer.attn.heads) for i, layer in enumerate(rt.runner.model.layers)
              if isinstance(layer.attn.heads, RoutedGroups)]
    if not layers:
        raise SystemExit("no routed layer: set sparsity.head_density < 1 and sparsity.routers")
    G = rt.spec.num_kv_heads
    if args.tp is None:
        args.tp = [tp for tp in range(2, 17) if _shards(rt.spec, tp)]
    for tp in args.tp:
        rt.spec.check_tp(tp)  # a UserError naming the valid tp sizes
    counts = {i: torch.zeros(G, dtype=torch.float64) for i, _ in layers}
    captured: dict[int, torch.Tensor] = {}
    hooks = [rt.runner.model.layers[i].attn.router_input.register_forward_hook(
        lambda m, inp, out, i=i: captured.__setitem__(i, out)) for i, _ in layers]
    ids = rt.tokenizer.encode(read_text_files(args.text))[: args.max_tokens]
    segments = token_segments(ids, args.segment, args.segment)
    batch = cfg.engine.max_batch_size
    tokens = 0
    for s in range(0, len(segments), batch):
        steps = LocalSteps(rt)
        for seg in segments[s:s + batch]:
            steps.scheduler.add(seg, SamplingParams(max_new_tokens=1, ignore_eos=True), seed=0)
        while (step := steps.next()) is not None:  # dense prefill, chunked under the step token budget
            rt.runner.logits(step)
            steps.feed(step, [0] * len(step.sample_ids))
            tokens += len(step.token_ids)
            for i, heads in layers:
                scores = heads.router(captured[i])  # (T, G)
                top = torch.topk(scores, heads.k, dim=1).indices  # (T, k) global scope
                counts[i] += torch.bincount(top.flatten(), minlength=G).double().cpu()
    for h in hooks:
        h.remove()
    rows = []
    for tp in args.tp:
        owners = rank_of_group(G, tp)
        for i, _ in layers:
            load = torch.zeros(tp, dtype=torch.float64)
            for g, ranks in enumerate(owners):
                load[ranks] += counts[i][g]
            rows.append({"tp": tp, "layer": i, "load_over_mean": (load / load.mean()).tolist(),
                         "max_over_mean": float(load.max() / load.mean())})
    summary = {tp: max(r["max_over_mean"] for r in rows if r["tp"] == tp) for tp in args.tp}
    mean_summary = {tp: sum(r["max_over_mean"] for r in rows if r["tp"] == tp) / len(layers) for tp in args.tp}
    out_dir = Path(__file__).resolve().parent / "results" / "routing_balance"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(args.config).stem
    result = {"model": name, "text": [Path(t).name for t in args.text], "tokens": tokens, "groups": G,
              "k": {i: h.k for i, h in layers}, "rows": rows,
              "worst_max_over_mean": summary, "mean_max_over_mean": mean_summary}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| tp | mean over layers of max/mean load | worst layer |", "|---|---|---|"]
    lines += [f"| {tp} | {mean_summary[tp]:.3f} | {summary[tp]:.3f} |" for tp in args.tp]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ctx.shutdown()


if __name__ == "__main__":
    run_main(main)
