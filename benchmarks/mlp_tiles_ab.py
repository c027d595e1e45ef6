"""The gather pair's tile shapes at M 96-256, side by side in one run, each kernel (fc1, fc2) on
its own, against cuBLAS over the same bytes (the selected rows made contiguous beforehand).

    PYTHONPATH=. python3 benchmarks/mlp_tiles_ab.py benchmarks/results/<gpu>/ab/mlp_tiles.json \
        [--ms 96 128 ...] [--shapes opt-13b ...] [--densities 0.2 ...] [--variants table ...]

Run 63 ran it with a switch since removed, timing every variant twice: the last M tile's rows
past M read as row M - 1 (as the kernels then did) and masked off (`+mask` in its JSON), which
the kernels now do whenever M is not a multiple of BLOCK_M. "table" is the tile table of the
code that ran (kernels/gather_gemm._M_TILES: runs 62-63 had 64 neurons at M 129-256 for fc1).

Per (OPT shape, M, density) and kernel, every tile variant below is timed with each work split
the dispatch could give it (split-K 1/2/4 where K allows, stream-K 1 and 2 programs per SM) and
its best is kept: the question is which tile, once the dispatch has picked its split. Times are
GraphTimer's inside a graph (`in_graph`), bf16, one rank. Each variant's output is checked
against cuBLAS's: max |diff| <= 2^-6 of max |cuBLAS| (bf16 output rounding is 2^-8 of a value;
the sums' order differs by split).
"""

import argparse
import gc
import json
import statistics
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton

import kernels.gather_gemm as gather_gemm
from benchmarks.kernel_bench import _copy_tbps
from benchmarks.kernel_grid import OPT_SHAPES
from benchmarks.mlp_pdl_ab import opt_mlp_weights
from kernels.gather_gemm import GemmConfig
from kernels.graph_timer import GraphTimer

MS = (96, 128, 192, 256)  # M 64: the table's tile won at every OPT-6.7B case of run 62's first try
DENSITIES = (0.2, 0.3, 0.5)
MMA_FLOP_PER_S = 650e12


def variants(m: int, fc1: bool) -> dict[str, GemmConfig]:
    """Tile variants for M rows (BLOCK_M = M rounded up to a power of two)."""
    out = {"table": gather_gemm.tile_config(m, fc1)}
    bm = out["table"].block_m
    out["n128_k64_w8"] = GemmConfig(bm, 128, 64, 8, 3 if fc1 else 4)
    out["n128_k32_w8"] = GemmConfig(bm, 128, 32, 8, 4 if fc1 else 5)
    out["n64_k32_w4"] = GemmConfig(bm, 64, 32, 4, 5 if fc1 else 6)
    out["n64_k64_w8"] = GemmConfig(bm, 64, 64, 8, 3 if fc1 else 5)  # runs 62-63: the table's tile at M 129-256
    if bm <= 128:
        out["n128_k64_w4"] = GemmConfig(bm, 128, 64, 4, 3 if fc1 else 4)
        out["n256_k32_w8"] = GemmConfig(bm, 256, 32, 8, 3 if fc1 else 4)
    return out


def work_splits(config: GemmConfig, k_loop: int) -> list[GemmConfig]:
    out = [replace(config, split_k=s) for s in (1, 2, 4) if s == 1 or k_loop // s >= 2 * config.block_k]
    return out + [replace(config, stream=s) for s in (1, 2)]


def main(out_path: str, ms: list[int], shapes: list[str], densities: list[float], names: list[str] | None) -> None:
    dev = torch.device("cuda")
    bw = _copy_tbps()
    timer = GraphTimer(dev, reps=7)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, d in OPT_SHAPES:
        if name not in shapes:
            continue
        n = 4 * d
        w1, w2t, b1 = opt_mlp_weights(n, d, gen, dev)
        for m in ms:
            x = torch.randn(m, d, generator=gen).to(dev, torch.bfloat16)
            for density in densities:
                k = round(density * n)
                idx = torch.randperm(n, generator=gen)[:k].sort().values.to(dev, torch.int32)
                w1c, w2c, b1c = w1[idx.long()].contiguous(), w2t[idx.long()].contiguous(), b1[idx.long()]
                h = gather_gemm.gather_fc1(x, w1, idx, b1)
                for side, fc1 in (("fc1", True), ("fc2", False)):
                    n_out, k_loop = (k, d) if fc1 else (d, k)
                    floor = max(2 * n_out * k_loop / (bw * 1e12), 2 * m * n_out * k_loop / MMA_FLOP_PER_S) * 1e3
                    if fc1:
                        dense = lambda: F.linear(x, w1c, b1c).relu_()  # noqa: E731
                    else:
                        dense = lambda: h @ w2c  # noqa: E731
                    ref = dense().float()
                    row = {"name": name, "M": m, "d": d, "N": n, "k": k, "density": density, "kernel": side,
                           "floor_ms": floor, "cublas_ms": timer.in_graph(dense), "ms": {}, "best": {}}
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                    row["cublaslt_ms"] = timer.in_graph(dense)
                    torch.backends.cuda.preferred_blas_library("cublas")
                    tiles = {v: base for v, base in variants(m, fc1).items() if names is None or v in names}
                    for vname, base in tiles.items():
                        best = None
                        for c in work_splits(base, k_loop):
                            fn = ((lambda c=c: gather_gemm.gather_fc1(x, w1, idx, b1, config=c)) if fc1
                                  else (lambda c=c: gather_gemm.gather_fc2(h, w2t, idx, None, config=c)))
                            try:
                                err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                                t = timer.in_graph(fn)
                            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: recorded
                                row["ms"][f"{vname}/{c.split_k}/{c.stream}"] = repr(e)[:120]
                                continue
                            if err > 2**-6:
                                print("MISMATCH", name, m, density, side, vname, c, err, flush=True)
                                continue
                            row["ms"][f"{vname}/{c.split_k}/{c.stream}"] = t
                            if best is None or t < best[0]:
                                best = (t, f"s{c.split_k}" if not c.stream else f"st{c.stream}")
                        if best:
                            row["best"][vname] = best
                    b = row["best"]
                    print(f"{name:8} M {m:3} d {density:4} {side}: floor {floor*1e3:6.1f} cuBLAS {row['cublas_ms']*1e3:6.1f}"
                          f" Lt {row['cublaslt_ms']*1e3:6.1f} | " + " ".join(
                              f"{v} {t*1e3:6.1f}{s}" for v, (t, s) in b.items()), flush=True)
                    rows.append(row)
                    gc.collect()  # the captured graphs' pools go back (they are cached until emptied)
                    torch.cuda.empty_cache()
                del w1c, w2c
        torch.cuda.empty_cache()
        _dump(out_path, bw, rows)  # after each shape: a run cut short keeps what it timed
    for v in sorted({v for r in rows for v in r["best"]}):
        rs = [r for r in rows if v in r["best"] and "table" in r["best"]]
        ratios = [r["best"][v][0] / r["best"]["table"][0] for r in rs]
        print(f"{v:12} / table: median {statistics.median(ratios):.3f} min {min(ratios):.3f} max {max(ratios):.3f}"
              f" over {len(rs)}", flush=True)


def _dump(out_path: str, bw: float, rows: list) -> None:
    json.dump({"device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
               "triton": triton.__version__}, "copy_TBps": bw, "rows": rows}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS))
    parser.add_argument("--shapes", nargs="+", default=[s for s, _ in OPT_SHAPES])
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--variants", nargs="+", default=None)
    args = parser.parse_args()
    main(args.out, args.ms, args.shapes, args.densities, args.variants)
