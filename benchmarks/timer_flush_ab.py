"""How the L2 flush before each timed replay moves small kernels' times: flushed by writing
(a zero_ of twice the L2, what triton.testing.do_bench and kernels/graph_timer.py do: L2 is
left full of dirty lines that the timed kernel's reads must first write back), by reading
(a sum over twice the L2: every line evicted, the rest clean, as after a decode step's weight
GEMMs), or not at all; and what an empty kernel's replay costs under each.

    PYTHONPATH=. python3 benchmarks/timer_flush_ab.py --out $OUT      # on a CUDA GPU

Cases: the decode attention kernel (as the CUDA-graph path runs it) at batch 1 and 8, MHA-32,
GQA 32/8 and MHA-64 at short contexts, one large case as a control; torch SDPA over a
contiguous cache; cuBLAS skinny linears. Writes <out>/timer_flush_ab.json. Recorded: run 35
(results/nvidia-h200/timer_flush_ab_run35.json), by this script's first form, which held its own
copy of GraphTimer's capture-and-replay loop with the three flushes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.attention_ab import graph_plan
from benchmarks.kernel_bench import BLOCK_SIZE, _block_table, _copy_tbps, _head_table, _paged_kv
from kernels import attention_plan
from kernels.graph_timer import GraphTimer
from kernels.select_attention import select_attention

REPS = 40
CASES = (  # name, Hq, Hkv, D, B, context, KV groups read per sequence
    ("mha32", 32, 32, 128, 1, 4096, (6, 16, 32)),
    ("gqa", 32, 8, 128, 1, 4096, (2, 8)),
    ("mha64-short", 64, 64, 64, 1, 1024, (19, 64)),
    ("mha32", 32, 32, 128, 8, 4096, (10,)),
    ("gqa", 32, 8, 128, 8, 4096, (2, 4)),
    ("mha32", 32, 32, 128, 64, 4096, (10,)),  # control: floor > 50 us
)


@triton.jit
def _empty_kernel(x_ptr):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    bw = _copy_tbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev = torch.device("cuda")
    timers = {f: GraphTimer(dev, REPS, flush=f) for f in ("write", "read", "none")}
    gen = torch.Generator().manual_seed(0)
    rows = []

    def record(label: str, floor_us: float, fn) -> None:
        row = {"case": label, "floor_us": floor_us, **{f: t(fn) * 1e3 for f, t in timers.items()}}
        rows.append(row)
        print(f"{label:36s} floor {floor_us:7.1f} | write {row['write']:7.1f} read {row['read']:7.1f} "
              f"none {row['none']:7.1f} us", flush=True)

    x = torch.empty(1, device="cuda")
    record("empty triton kernel", 0.0, lambda: _empty_kernel[(1,)](x))
    for name, hq, hkv, d, b, ctx, ks in CASES:
        lens = [ctx] * b
        kc, vc, perm = _paged_kv(lens, hkv, d, torch.bfloat16, gen)
        bt = _block_table(lens, perm, 32768 // BLOCK_SIZE)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        for k in ks:
            ht = _head_table(b, hkv, k, gen)
            plan = graph_plan(attention_plan, lens, k, sms)
            floor = b * ctx * k * d * 2 * 2 / (bw * 1e12) * 1e6
            record(f"attn {name} B{b} ctx{ctx} k{k}/{hkv}", floor,
                   lambda: select_attention(q, kc, vc, bt, sl, ht, d**-0.5, out, plan))
        if b == 1:
            kd = torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
            vd = torch.randn_like(kd)
            q4 = q.view(b, hq, 1, d)
            record(f"sdpa {name} B{b} ctx{ctx} dense", b * ctx * hkv * d * 4 / (bw * 1e12) * 1e6,
                   lambda: F.scaled_dot_product_attention(q4, kd, vd, enable_gqa=hq != hkv))
            del kd, vd
        del kc, vc
    for m, k_in, n in ((16, 4096, 4096), (16, 4096, 22016), (64, 4096, 4096), (64, 4096, 28672)):
        xm = torch.randn(m, k_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k_in, device="cuda", dtype=torch.bfloat16)
        record(f"cublas linear M{m} {k_in}->{n}", n * k_in * 2 / (bw * 1e12) * 1e6, lambda: F.linear(xm, w))
        del w
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timer_flush_ab.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "copy_TBps": bw, "reps": REPS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
