"""Compile the decode attention kernel's default builds for sm_90a on a machine without a GPU and
print what ptxas gives each (head dim, query heads per KV group): registers, spills, shared
memory, and the programs an SM can hold by them, against the plan's RESIDENT_PER_SM.

    python3 benchmarks/attention_ptx.py [--head-dims 80 96] [--groups 1 8] [--check]

--check exits 1 if the plan's table counts more programs per SM than a build fits (a plan cut
for slots that do not exist runs part-empty extra waves: 1.24x, H200 run 72); tests run it on
the head dims the runtime's models use.

As benchmarks/gather_gemm_ptx.py (whose compile_stats it uses): Triton's wheel ships ptxas, so
no CUDA device is needed. Strides get the 16-divisibility a real launch gives them (head dims
that are multiples of 16); the build is the one `default_config` picks, launched with PDL.
Programs per SM as benchmarks/plan_waves_ab.py's `programs_per_sm` counts them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 160, 192, 256)
GROUPS = (1, 4, 8, 16, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
    ap.add_argument("--groups", type=int, nargs="+", default=GROUPS, help="query heads per KV group")
    ap.add_argument("--check", action="store_true", help="exit 1 where the plan counts more programs than fit")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import triton

    from benchmarks.gather_gemm_ptx import compile_stats
    from benchmarks.plan_waves_ab import programs_per_sm
    from kernels.attention_builds import default_config, padded_head_dim, resident_per_sm, tile_split
    from kernels.select_attention import _select_attention_kernel

    ptrs = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update({name: "*i32" for name in ("bt_ptr", "seq_lens_ptr", "ht_ptr", "count_ptr", "items_ptr", "seqs_ptr",
                                            "arrivals_ptr")})
    ptrs.update({name: "*fp32" for name in ("o_part_ptr", "m_part_ptr", "l_part_ptr")})
    div16 = ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kt", "stride_vb", "stride_vh", "stride_vt",
             "stride_ob", "stride_oh")
    over = []
    for d in args.head_dims:
        config = default_config(d)
        for g in args.groups:
            main, tail = tile_split(d)
            c = dict(G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=padded_head_dim(d), D_A=main,
                     D_B=tail, BLOCK_SIZE=16, BLOCK_N=config.block_n, UPCAST=False, PERSISTENT=False, PDL=True)
            r = compile_stats(_select_attention_kernel, ptrs, c, config.num_warps, config.num_stages, div16,
                              scalar_types={"scale_log2": "fp32"})
            fits = programs_per_sm(r["regs"], round(r["smem_KiB"] * 1024), config.num_warps)
            plan = resident_per_sm(d, g)
            tiles = f"{main}+{tail}" if tail else str(main)
            print(f"D {d:3} {tiles:>6} G {g:2} BLOCK_N {config.block_n} stages {config.num_stages}: "
                  f"{r['regs']:3} registers, spills {r['spill_bytes']} B, shared {r['smem_KiB']:.1f} KiB, "
                  f"mma {r['mma']} -> {fits} per SM (plan: {plan})", flush=True)
            if plan > fits:
                over.append(f"D {d} G {g}: plan {plan} > {fits}")
    if args.check and over:
        sys.exit("the plan counts more programs per SM than fit: " + "; ".join(over))


if __name__ == "__main__":
    main()
