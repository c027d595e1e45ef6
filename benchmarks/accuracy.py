"""Perplexity (and multiple-choice accuracy) of sparse decode, through the runtime's decode path.

    PYTHONPATH=. python benchmarks/accuracy.py --config configs/smollm2-135m.yaml --text news.txt \
        --densities 1.0,0.67,0.34 --oracle --max-tokens 8192 --mc next_sentence.jsonl \
        --out benchmarks/results/accuracy/smollm2-135m-news.json

The text (any UTF-8 files) is tokenized and cut into segments of --seg-len tokens; each segment's
first --prefix-len tokens are prefilled and the rest are teacher-forced through decode steps,
max_batch_size segments at a time, so routers, selective attention and the paged cache run
exactly as in serving. Only tokens scored by decode steps count (see polar_dist/sparsity/evaluate.py).

One runtime is built per setting (density x routing x allocation): routing `router` always,
`oracle` too with --oracle (true top-k groups by output norm: the labels the routers learn).
Settings that compute the same model (density 1.0 under any routing, or densities that round
to the same k per layer) run once and are reported under each. Rank 0 prints one JSON line per
setting, {"density", "routing", "allocation", "routers", "tokens", "perplexity"[, "mc_accuracy", ...]},
and writes the table as --out JSON plus a markdown table and a PNG beside it.

Without a router artifact, pass --set sparsity.routers=random (random routers: a floor to
compare the oracle with) or give an artifact with --set sparsity.routers=routers/<model>
(relative to the config file). Under torchrun every rank runs the same steps.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_dist.cli import add_config_args, config_from_args, run_main  # noqa: E402
from polar_dist.config import RunConfig, load_config  # noqa: E402
from polar_dist.errors import UserError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from polar_dist.sparsity.evaluate import PREFIX_LEN, SEGMENT_LEN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s) to measure perplexity on")
    parser.add_argument("--densities", default="1.0,0.5", help="comma-separated head densities, e.g. 1.0,0.67,0.34")
    parser.add_argument("--allocation", default="uniform", help="comma-separated: uniform, per_layer")
    parser.add_argument("--oracle", action="store_true", help="also run oracle routing (true top-k groups)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of the text")
    parser.add_argument("--seg-len", type=int, default=SEGMENT_LEN, help="tokens per segment")
    parser.add_argument("--prefix-len", type=int, default=PREFIX_LEN, help="dense prefill tokens per segment")
    parser.add_argument("--mc", default=None, help="multiple-choice JSONL ({context, choices, label} per line)")
    parser.add_argument("--out", default=None, help="table JSON (default results/accuracy/<config name>.json); "
                        "the markdown and PNG go beside it")
    return parser.parse_args(argv)


def comma_list(raw: str, what: str, cast=str) -> list:  # noqa: ANN001 - a type to cast each item to
    try:
        values = [cast(v.strip()) for v in raw.split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"--{what} {raw!r}: {e}") from e
    if not values:
        raise UserError(f"--{what} is empty")
    return values


def settings(densities: list[float], routings: list[str], allocations: list[str]) -> list[tuple[float, str, str]]:
    return [(d, r, a) for a in allocations for r in routings for d in densities]


def setting_config(args: argparse.Namespace, density: float, routing: str, allocation: str,
                   max_seq_len: int) -> RunConfig:
    """The run config of one setting: the user's, with the setting applied as overrides (so it
    is validated like any --set)."""
    return load_config(args.config, [*args.overrides, f"sparsity.head_density={density}", f"sparsity.routing={routing}",
                                     f"sparsity.head_allocation={allocation}", f"engine.max_seq_len={max_seq_len}"])


def write_report(table: dict, out: Path) -> list[Path]:
    """The markdown table and (with matplotlib) the PNG beside `out`; returns what was written."""
    rows = table["rows"]
    dense = {(r["routing"], r["allocation"]): r for r in rows if r["density"] >= 1.0}
    has_mc = any("mc_accuracy" in r for r in rows)
    lines = [f"# Decode-path accuracy: {table['model']}", "",
             f"Text: {', '.join(Path(t['path']).name for t in table['text'])}; {table['segments']} segments of "
             f"{table['seg_len']} tokens, {table['prefix_len']} prefilled, the rest teacher-forced through decode "
             f"steps; perplexity over the {rows[0]['tokens']} decode-scored tokens. "
             f"Mean density counts the dense layer 0.", ""]
    header = "| density | routing | allocation | routers | mean density | perplexity | vs dense |"
    rule = "|---|---|---|---|---|---|---|"
    if has_mc:
        header += " MC acc | MC acc (per byte) |"
        rule += "---|---|"
        lines.insert(3, f"Multiple choice: {Path(table['mc']['path']).name}, {table['mc']['items']} items.")
    lines += [header, rule]
    for r in rows:
        base = dense.get((r["routing"], r["allocation"]))
        rel = f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%" if base else "-"
        line = (f"| {r['density']} | {r['routing']} | {r['allocation']} | {r['routers'] or '-'} | "
                f"{r['mean_density']:.3f} | {r['perplexity']:.3f} | {rel} |")
        if has_mc:
            line += f" {r['mc_accuracy']:.3f} | {r['mc_accuracy_norm']:.3f} |"
        lines.append(line)
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    written = [md]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no PNG was written (pip install matplotlib); the table is in {md}",
              file=sys.stderr)
        return written
    fig, axes = plt.subplots(1, 2 if has_mc else 1, figsize=(11 if has_mc else 6, 4), squeeze=False)
    for key in sorted({(r["routing"], r["allocation"]) for r in rows}):
        curve = sorted((r for r in rows if (r["routing"], r["allocation"]) == key), key=lambda r: r["density"])
        label = f"{key[0]} ({curve[0]['routers']})" if key[0] == "router" and curve[0]["routers"] else key[0]
        label += f", {key[1]}"
        axes[0][0].plot([r["density"] for r in curve], [r["perplexity"] for r in curve], "o-", label=label)
        if has_mc:
            axes[0][1].plot([r["density"] for r in curve], [r["mc_accuracy_norm"] for r in curve], "o-", label=label)
    axes[0][0].set(xlabel="head density (KV groups read per sparse layer)", ylabel="perplexity",
                   title=f"{table['model']}: decode-path perplexity")
    if has_mc:
        axes[0][1].set(xlabel="head density", ylabel="accuracy (per-byte log-likelihood)",
                       title=f"{Path(table['mc']['path']).stem}, {table['mc']['items']} items")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_from_args(args)
    densities = comma_list(args.densities, "densities", float)
    allocations = comma_list(args.allocation, "allocation")
    routings = ["router", "oracle"] if args.oracle else ["router"]

    from polar_dist.log import configure_logging
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime, make_tokenizer, resolve_source_once
    from polar_dist.sparsity.choice_tasks import read_choice_items
    from polar_dist.sparsity.evaluate import choice_token_split, perplexity_segments, score_choices, segment_perplexity
    from polar_dist.sparsity.text import read_text_files

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    configure_logging(ctx.tp_rank, ctx.tp_size, ctx.replica, ctx.num_replicas)
    if ctx.replica > 0:  # every replica would compute the same table
        if ctx.is_driver:
            print(f"replica {ctx.replica}: nothing to do, replica 0 evaluates", file=sys.stderr, flush=True)
        ctx.shutdown()
        return
    source = resolve_source_once(cfg, ctx)
    tokenizer = make_tokenizer(cfg, source)
    segments = perplexity_segments(tokenizer.encode(read_text_files(args.text)), args.seg_len, args.max_tokens)
    lengths = [args.seg_len]
    items = read_choice_items(args.mc) if args.mc else []
    for item in items:
        lengths += [sum(map(len, choice_token_split(tokenizer, item.context, c))) for c in item.choices]
    # Size the KV cache for the longest sequence evaluated, unless the config caps it lower (then
    # the evaluation says which request is too long).
    limit = cfg.engine.max_seq_len or source.spec.max_position_embeddings
    max_seq_len = max(lengths) if max(lengths) <= limit else cfg.engine.max_seq_len

    rows: list[dict] = []
    done: dict[tuple, dict] = {}  # (routing, head_k) -> its row: settings that compute the same model run once
    for density, routing, allocation in settings(densities, routings, allocations):
        t0 = time.perf_counter()
        rt = build_runtime(setting_config(args, density, routing, allocation, max_seq_len), ctx)
        key = ("dense",) if rt.policy.is_dense else (routing, tuple(rt.policy.head_k))
        if key in done:  # e.g. density 1.0 under each routing, or two densities that round to the same k
            row = {**done[key], "density": density, "routing": routing, "allocation": allocation}
        else:
            ppl = segment_perplexity(rt, segments, args.prefix_len)
            routers = cfg.sparsity.routers if routing == "router" and not rt.policy.is_dense else ""
            row = {"density": density, "routing": routing, "allocation": allocation,
                   "routers": Path(routers).name if routers not in ("", "random") else routers,
                   "tokens": ppl.tokens, "perplexity": ppl.perplexity, "nll_sum": ppl.nll_sum,
                   "head_k": list(rt.policy.head_k),
                   "mean_density": sum(rt.policy.head_k) / (len(rt.policy.head_k) * rt.policy.num_groups)}
            if items:
                mc = score_choices(rt, items)
                row.update(mc_items=len(items), mc_accuracy=mc.accuracy, mc_accuracy_norm=mc.accuracy_norm)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            done[key] = row
        del rt
        gc.collect()
        rows.append(row)
        if ctx.is_driver:
            print(json.dumps(row), flush=True)
    if ctx.is_driver:
        out = Path(args.out) if args.out else RESULTS / f"{Path(args.config).stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        table = {
            "model": cfg.model.path if cfg.model.path.startswith("embedded:") else Path(cfg.model.path).name,
            "config": args.config, "overrides": args.overrides, "dtype": cfg.model.dtype, "tp": ctx.tp_size,
            "device": str(ctx.device), "torch": torch.__version__,
            "text": [{"path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in args.text],
            "seg_len": args.seg_len, "prefix_len": args.prefix_len, "max_tokens": args.max_tokens,
            "segments": len(segments), "max_batch_size": cfg.engine.max_batch_size,
            "mc": {"path": args.mc, "items": len(items)} if items else None,
            "rows": rows,
        }
        out.write_text(json.dumps(table, indent=1) + "\n")
        for path in [out] + write_report(table, out):
            print(f"wrote {path}", file=sys.stderr)
    ctx.shutdown()


if __name__ == "__main__":
    run_main(main)
