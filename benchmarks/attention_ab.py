"""Same-run A/B of the decode attention kernel against a previous revision of it, and of the
DENSE MLP plan's bias build (torch ops, the one-kernel build, cuBLASLt's ReLU epilogue).

    mkdir -p /tmp/old && git show REV:kernels/attention_plan.py > /tmp/old/old_attention_plan.py
    git show REV:kernels/select_attention.py \
        | sed 's/from kernels.attention_plan import/from old_attention_plan import/' > /tmp/old/old_select_attention.py
    python3 benchmarks/attention_ab.py --old /tmp/old --out $OUT [--skip-mlp]      # on a CUDA GPU

Cases: GQA 32/8 and MHA 32 at 4k (uniform, spread, one long among short), the end-to-end
shapes of benchmarks/throughput.py (Llama-2-7B B 32 ctx 2048, Llama-3.1-8B B 64 ctx 6144 and
mixed 512-6144), MHA 64 short contexts; block tables padded as the CUDA-graph path pads them.
Each variant runs on an output poisoned with NaN and must match the previous kernel's output;
timing as kernel_bench._bench (CUDA-graph replays, L2 flushed). Writes <out>/ab_attn.json.
Recorded: run 28 (REV 9761053 against the item-record plan and plan/config variants of commit
67c4fda: results/nvidia-h200/attention_ab_run28.json) and run 33 (REV 9761053 against the
group merge: attention_ab_run33.json); benchmarks/KERNELS_NOTES.md, runs 28-33.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench import BLOCK_SIZE, _bench, _block_table, _copy_tbps, _head_table, _paged_kv

HEAD_DIM = 128
CASES = (  # (name, Hq, Hkv, B, lengths, longest, table tokens, KV groups per sequence)
    *[("gqa", 32, 8, b, "uniform", 4096, 32768, (2, 4, 8)) for b in (1, 8, 32, 64, 128)],
    *[("gqa", 32, 8, b, dist, 4096, 32768, (2, 4)) for b in (8, 32, 64) for dist in ("spread", "one_long")],
    *[("mha32", 32, 32, b, "uniform", 4096, 32768, (6, 16)) for b in (1, 8, 32)],
    ("mha32", 32, 32, 32, "one_long", 4096, 32768, (6, 16)),
    ("mha32", 32, 32, 32, "spread", 4096, 32768, (6, 16)),
    ("e2e-mixed-l3", 32, 8, 64, (512, 6144), 6144, 8192, (4, 8)),
    ("e2e-l2-2048", 32, 32, 32, "uniform", 2048, 4096, (16, 32)),
    ("e2e-l3-6144", 32, 8, 64, "uniform", 6144, 8192, (4, 8)),
    ("mha64-short", 64, 64, 64, "spread", 1024, 32768, (19,)),
)
MLP_SHAPES = (("opt-6.7b", 4096, 16384), ("opt-13b", 5120, 20480), ("opt-30b", 7168, 28672), ("opt-66b", 9216, 36864))


def lengths(dist, batch: int, longest: int, gen: torch.Generator) -> list[int]:
    if dist == "uniform":
        return [longest] * batch
    if dist == "spread":
        return torch.randint(max(1, longest // 10), longest + 1, (batch,), generator=gen).tolist()
    if dist == "one_long":
        return [longest] + [max(1, longest // 16)] * (batch - 1)
    lo, hi = dist
    return torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()


def graph_plan(module, lens: list[int], k: int, sms: int):
    """The plan as the CUDA-graph path passes it: the bucket's capacity, partials for all of it."""
    cap = module.plan_capacity(len(lens), k, sms)
    return module.plan_attention(lens, groups=k, num_sms=sms, capacity=cap).to("cuda", num_parts=cap)


def attention_ab(old, new, bw: float) -> list[dict]:
    """Each case and density: both kernels on a NaN-poisoned output (the new must match the old),
    then each timed."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, hq, hkv, b, dist, longest, table, ks in CASES:
        lens = lengths(dist, b, longest, gen)
        kc, vc, perm = _paged_kv(lens, hkv, HEAD_DIM, torch.bfloat16, gen)
        bt = _block_table(lens, perm, table // BLOCK_SIZE)
        q = torch.randn(b, hq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        for k in ks:
            ht = _head_table(b, hkv, k, gen)
            launches = {label: (lambda m=m, plan=graph_plan(plan_module, lens, k, sms):
                                m._launch(q, kc, vc, bt, sl, ht, HEAD_DIM**-0.5, out, plan))
                        for label, (m, plan_module) in (("old", old), ("new", new))}
            row = {"case": name, "B": b, "dist": str(dist), "k": k, "hkv": hkv,
                   "floor_us": sum(lens) * k * HEAD_DIM * 2 * 2 / (bw * 1e12) * 1e6}
            ref = None
            for label, fn in launches.items():
                out.fill_(float("nan"))
                fn()
                ref = out.float().clone() if ref is None else ref
                row[f"{label}_err"] = (out.float() - ref).abs().max().item()  # NaN if an element was not written
                row[label] = _bench(fn) * 1e3
            rows.append(row)
            print(f"{name:14s} B{b:4d} {str(dist):14s} k{k:2d} floor {row['floor_us']:7.1f} | old {row['old']:7.1f} "
                  f"new {row['new']:7.1f} | err {row['new_err']:.3g}", flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    ratios = [r["new"] / r["old"] for r in rows]
    print("new / old time: median", round(statistics.median(ratios), 3), "min", round(min(ratios), 3),
          "max", round(max(ratios), 3))
    return rows


def mlp_bias_ab() -> list[dict]:
    """The DENSE plan at density 0.75 with each bias build, against plain dense cuBLAS."""
    from kernels.masked_bias import masked_bias, masked_bias_ref

    rows = []
    for name, d, n in MLP_SHAPES:
        w1 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16) / d**0.5
        w2t = torch.randn(n, d, device="cuda", dtype=torch.bfloat16) / n**0.5
        b1 = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        idx = torch.randperm(n)[: int(0.75 * n)].sort().values.int().cuda()
        built = masked_bias(b1, idx, n, b1.dtype, b1.device)
        assert torch.equal(built, masked_bias_ref(b1, idx, n, b1.dtype, b1.device))
        for m in (64, 256):
            x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
            variants = {
                "plain": lambda: F.linear(F.linear(x, w1, b1).relu_(), w2t.t()),
                "plain_addmm_act": lambda: F.linear(torch._addmm_activation(b1, x, w1.t()), w2t.t()),
                "masked_torch": lambda: F.linear(x, w1, masked_bias_ref(b1, idx, n, x.dtype, x.device)).relu_() @ w2t,
                "masked_kernel": lambda: F.linear(x, w1, masked_bias(b1, idx, n, x.dtype, x.device)).relu_() @ w2t,
                "masked_kernel_addmm_act":
                    lambda: torch._addmm_activation(masked_bias(b1, idx, n, x.dtype, x.device), x, w1.t()) @ w2t,
            }
            row = {"shape": name, "M": m, **{label: _bench(fn) * 1e3 for label, fn in variants.items()}}
            rows.append(row)
            print(name, m, " ".join(f"{label} {row[label]:.1f}" for label in variants), flush=True)
        del w1, w2t
        torch.cuda.empty_cache()
    return rows


def compile_stats(*kernels) -> list[dict]:
    """Registers, spills and shared memory of every variant the device's Triton built."""
    stats = []
    for label, fn in kernels:
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                stats.append({"kernel": label, "regs": compiled.n_regs, "spills": compiled.n_spills,
                              "smem": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                              "num_stages": compiled.metadata.num_stages})
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, type=Path, help="folder holding old_select_attention.py and "
                    "old_attention_plan.py (see the module docstring)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--skip-mlp", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(args.old))
    import old_attention_plan
    import old_select_attention

    import kernels.attention_plan
    import kernels.select_attention

    bw = _copy_tbps()
    print("copy TB/s", round(bw, 3), flush=True)
    rows = attention_ab((old_select_attention, old_attention_plan),
                        (kernels.select_attention, kernels.attention_plan), bw)
    mlp = [] if args.skip_mlp else mlp_bias_ab()
    stats = compile_stats(("old", old_select_attention._select_attention_kernel),
                          ("new", kernels.select_attention._select_attention_kernel))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab_attn.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": bw, "attention": rows,
         "mlp_dense": mlp, "compiled": stats}, indent=1))


if __name__ == "__main__":
    main()
