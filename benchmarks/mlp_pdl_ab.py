"""The sparse MLP's gather pair with and without programmatic dependent launch, in the same run:
without PDL; PDL alone (fc2 waits for fc1 first thing); PDL with fc2's L2 prefetch (each fc2
program asks L2 for the weight rows of its first FC2_PREFETCH_STEPS K steps, then waits:
kernels/gather_gemm_kernels.py).

    PYTHONPATH=. python3 benchmarks/mlp_pdl_ab.py benchmarks/results/<gpu>/ab/mlp_pdl.json [--focused]

OPT-6.7B / 13B / 30B / 66B shapes (one rank, bf16) at M 1-128 and densities 0.05-0.5 (--focused:
ten of them, the ones run 44 moved most either way), the pair with the configs the runtime's
dispatch measures (KernelOps.mlp_plan), every case where it picks the gather pair. Every
variant's output must equal the first's bit for bit; times are GraphTimer's (single replay, and
in_graph) against the floor (max of the selected weight bytes / copy bandwidth and FLOPs / 650
TFLOP/s, as the grid's).
"""

import json
import statistics
import sys

import torch

import kernels.gather_gemm as gather_gemm
from benchmarks.kernel_bench import _copy_tbps
from benchmarks.kernel_grid import OPT_SHAPES, mlp_floor_ms
from kernels.dispatch import Backend, KernelOps
from kernels.graph_timer import GraphTimer
from kernels.mlp_dispatch import MlpPath, run_plan

MS = (1, 16, 32, 64, 128)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
FOCUSED = {("opt-6.7b", 16, 0.1), ("opt-13b", 32, 0.1), ("opt-30b", 16, 0.05), ("opt-30b", 1, 0.1),
           ("opt-66b", 64, 0.1), ("opt-30b", 128, 0.3), ("opt-30b", 128, 0.5), ("opt-30b", 32, 0.5),
           ("opt-66b", 32, 0.3), ("opt-66b", 1, 0.5)}
VARIANTS = {"nopdl": (False, 0), "pdl": (True, 0), "pdl_prefetch2": (True, 2)}  # (pdl, fc2 prefetch steps)


def opt_mlp_weights(n: int, d: int, gen: torch.Generator, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """Random bf16 w1 [N, d], w2t [N, d] (fc2.weight.T, as the runtime holds it) and b1 [N] on dev,
    scaled by 1/sqrt(fan-in) so h and y stay near unit size."""
    w1 = (torch.randn(n, d, generator=gen) / d**0.5).to(dev, torch.bfloat16)
    w2t = (torch.randn(n, d, generator=gen) / n**0.5).to(dev, torch.bfloat16)
    b1 = torch.randn(n, generator=gen).to(dev, torch.bfloat16)
    return w1, w2t, b1


def main(out_path: str, focused: bool) -> None:
    dev = torch.device("cuda")
    bw = _copy_tbps()
    ops = KernelOps(Backend.TRITON)
    timer = GraphTimer(dev, reps=20)
    gen = torch.Generator().manual_seed(0)
    variants = VARIANTS if focused else {v: VARIANTS[v] for v in ("nopdl", "pdl_prefetch2")}
    rows = []
    for name, d in OPT_SHAPES:
        n = 4 * d
        w1, w2t, b1 = opt_mlp_weights(n, d, gen, dev)
        for m in MS:
            x = torch.randn(m, d, generator=gen).to(dev, torch.bfloat16)
            for density in DENSITIES:
                if focused and (name, m, density) not in FOCUSED:
                    continue
                k = round(density * n)
                idx = torch.randperm(n, generator=gen)[:k].sort().values.to(dev, torch.int32)
                plan = ops.mlp_plan(x, w1, b1, w2t, k)
                if plan.path is not MlpPath.GATHER:
                    continue
                row = {"name": name, "M": m, "d": d, "N": n, "k": k, "density": density,
                       "floor_ms": mlp_floor_ms(m, k, d, 2, bw), "plan": plan.describe(), "ms": {}, "ms_in_graph": {}}
                first = None
                for variant, (pdl, steps) in variants.items():
                    gather_gemm.FC2_PREFETCH_STEPS = steps
                    fn = lambda pdl=pdl: run_plan(plan, x, w1, b1, w2t, idx, pdl=pdl)
                    out = fn()
                    if first is None:
                        first = out
                    elif not torch.equal(out, first):
                        print("MISMATCH", name, m, density, variant, flush=True)
                    row["ms"][variant] = timer(fn)
                    row["ms_in_graph"][variant] = timer.in_graph(fn)
                gather_gemm.FC2_PREFETCH_STEPS = VARIANTS["pdl_prefetch2"][1]
                g = row["ms_in_graph"]
                print(f"{name:8} M {m:3} d {density:4}: floor {row['floor_ms']*1e3:6.1f} us | in graph "
                      + " ".join(f"{v} {t*1e3:6.1f}" for v, t in g.items()) + f" ({plan.describe()})", flush=True)
                rows.append(row)
        torch.cuda.empty_cache()
    for key in ("ms", "ms_in_graph"):
        for v in list(variants)[1:]:
            ratios = [r[key][v] / r[key]["nopdl"] for r in rows]
            met = [sum(r["floor_ms"] / r[key][u] >= 0.8 for r in rows) for u in ("nopdl", v)]
            print(f"{key}: {v} / nopdl median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
                  f"{max(ratios):.3f}); >= 80% of floor: {met[0]} -> {met[1]} of {len(rows)}", flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, "variants": variants, "rows": rows},
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], "--focused" in sys.argv[2:])
