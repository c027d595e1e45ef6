"""Cost of the head routers in a decode step, against the dense step (CUDA graphs, one GPU).

    python benchmarks/router_cost.py --config configs/llama-2-7b.yaml --batch 32 --context 2048

Times, by CUDA-graph replay: the dense decode step; the sparse step (random routers at
--density: the selection count is what costs); and the routers alone (every routed layer's
router GEMM + top-k + head table, captured as one graph over the same batch). Prints a table
and writes JSON under benchmarks/results/<gpu>/router_cost-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import WARMUP_STEPS, decode_steps  # noqa: E402
from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402
from polar_dist.engine.kv_cache import blocks_needed  # noqa: E402
from polar_dist.parallel.context import init_parallel  # noqa: E402
from polar_dist.runtime import build_runtime  # noqa: E402


def _replay_ms(fn, iters: int = 50) -> float:  # noqa: ANN001
    """Median ms of a captured graph of `fn`, timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _step_ms(cfg, batch: int, context: int, steps: int) -> tuple[float, object]:  # noqa: ANN001
    rt = build_runtime(cfg, init_parallel(cfg.parallel, cfg.model.device))
    for k, v in rt.runner.kv_caches:
        k.normal_()
        v.normal_()
    times = []
    for i, step in enumerate(decode_steps(rt, [context] * batch, steps + WARMUP_STEPS)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        rt.runner.execute(step)
        end.record()
        torch.cuda.synchronize()
        if i >= WARMUP_STEPS:
            times.append(start.elapsed_time(end))
    return statistics.median(times), rt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    bs, steps = 16, args.steps + WARMUP_STEPS
    args.overrides += [f"engine.max_batch_size={args.batch}", f"engine.block_size={bs}",
                       f"engine.max_seq_len={args.context + steps + bs}",
                       f"engine.kv_cache_blocks={args.batch * blocks_needed(args.context + steps, bs)}"]
    dense_cfg = config_from_args(args)
    args.overrides += [f"sparsity.head_density={args.density}", "sparsity.routers=random"]
    sparse_cfg = config_from_args(args)
    dense_ms, rt = _step_ms(dense_cfg, args.batch, args.context, args.steps)
    del rt
    torch.cuda.empty_cache()
    sparse_ms, rt = _step_ms(sparse_cfg, args.batch, args.context, args.steps)
    model = rt.runner.model
    selections = [layer.attn.heads for layer in model.layers if hasattr(layer.attn.heads, "router")]
    x = torch.randn(args.batch, rt.spec.hidden_size, dtype=next(model.parameters()).dtype, device=rt.ctx.device)
    dense_table = rt.runner.head_table[:args.batch]
    routers_ms = _replay_ms(lambda: [sel.table(x, dense_table) for sel in selections])
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": rt.spec.model_type,
           "architecture": dict(rt.cfg.model.architecture), "dtype": rt.cfg.model.dtype, "batch": args.batch,
           "context": args.context, "density": args.density, "routed_layers": len(selections),
           "dense_step_ms": dense_ms, "sparse_step_ms": sparse_ms, "routers_ms": routers_ms,
           "routers_over_dense_step": routers_ms / dense_ms}
    print(f"{'dense step ms':>14} {'sparse step ms':>15} {'routers ms':>11} {'routers / dense':>16}")
    print(f"{dense_ms:14.3f} {sparse_ms:15.3f} {routers_ms:11.4f} {routers_ms / dense_ms:16.2%}")
    out = Path(__file__).resolve().parent / "results" / torch.cuda.get_device_name().lower().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config).stem
    (out / f"router_cost-{name}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
