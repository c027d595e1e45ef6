"""A markdown table of benchmarks/throughput.py results: each case's dense and sparse steps against
their floors, the floor model's speedup and transformers where the run timed it.

    python benchmarks/throughput_table.py benchmarks/results/nvidia-h200x1/throughput-llama-2-7b.json ...

One line per (file, batch, context, sparse variant): ms per step and x its floor for our dense
step (density 1.0, no MLP sparsity), the sparse variant, the share of the floor model's speedup
the sparse step reaches ((dense ms / sparse ms) / (dense floor / sparse floor)), and transformers'
compiled step with our sparse step's speedup over it. Every figure is read from the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADER = ("| file | dtype | copy TB/s | batch | context | dense ms (x floor) | sparse | sparse ms (x floor) "
          "| of the floor model's speedup | transformers ms | sparse vs transformers |")


def _key(row: dict) -> tuple:
    return row["batch"], str(row["context"])


def table_lines(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    rows = result["rows"]
    dense = {_key(r): r for r in rows if r["variant"] == "ours_dense"}
    hf = {_key(r): r for r in rows if r["variant"] == "hf_compiled" and r.get("ms_per_step")}
    lines = []
    for r in rows:
        if r["variant"] != "ours_sparse" or _key(r) not in dense:
            continue
        d, key = dense[_key(r)], _key(r)
        speedup_share = (d["ms_per_step"] / r["ms_per_step"]) / (d["floor_ms"] / r["floor_ms"])
        sparse = f"d {r['density']:g}" + (" + MLP" if r["mlp_sparse"] else "")
        h = hf.get(key)
        hf_cols = (f"{h['ms_per_step']:.3f} | {h['ms_per_step'] / r['ms_per_step']:.2f}x" if h else "- | -")
        lines.append(f"| {path.name} | {result['dtype']} | {result['copy_TBps']:.2f} | {r['batch']} | {r['context']} "
                     f"| {d['ms_per_step']:.3f} ({d['ms_per_step'] / d['floor_ms']:.2f}x) | {sparse} "
                     f"| {r['ms_per_step']:.3f} ({r['ms_per_step'] / r['floor_ms']:.2f}x) | {speedup_share:.0%} "
                     f"| {hf_cols} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="throughput-<model>.json files")
    args = parser.parse_args()
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for path in args.files:
        for line in table_lines(path):
            print(line)


if __name__ == "__main__":
    main()
