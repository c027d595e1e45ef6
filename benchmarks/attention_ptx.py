"""Compile the decode attention kernel's default builds for sm_90a on a machine without a GPU and
print what ptxas gives each (head dim, query heads per KV group): registers, spills, shared
memory, and the programs an SM can hold by them, against the plan's RESIDENT_PER_SM.

    python3 benchmarks/attention_ptx.py

As benchmarks/gather_gemm_ptx.py (whose compile_stats it uses): Triton's wheel ships ptxas, so
no CUDA device is needed. Strides get the 16-divisibility a real launch gives them (head dims
that are multiples of 16); the build is the one `default_config` picks, launched with PDL.
Programs per SM as benchmarks/plan_waves_ab.py's `programs_per_sm` counts them.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 160, 192, 256)
GROUPS = (1, 4, 8, 16, 32, 64)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import triton

    from benchmarks.gather_gemm_ptx import compile_stats
    from benchmarks.plan_waves_ab import programs_per_sm
    from kernels.attention_plan import padded_head_dim, resident_per_sm, tile_split
    from kernels.select_attention import _select_attention_kernel, default_config

    ptrs = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptrs.update({name: "*i32" for name in ("bt_ptr", "seq_lens_ptr", "ht_ptr", "count_ptr", "items_ptr", "seqs_ptr",
                                            "arrivals_ptr")})
    ptrs.update({name: "*fp32" for name in ("o_part_ptr", "m_part_ptr", "l_part_ptr")})
    div16 = ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kt", "stride_vb", "stride_vh", "stride_vt",
             "stride_ob", "stride_oh")
    for d in HEAD_DIMS:
        config = default_config(d)
        for g in GROUPS:
            c = dict(G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=padded_head_dim(d), D_A=tile_split(d)[0],
                     D_B=tile_split(d)[1], BLOCK_SIZE=16,
                     BLOCK_N=config.block_n, UPCAST=False, PERSISTENT=False, PDL=True)
            r = compile_stats(_select_attention_kernel, ptrs, c, config.num_warps, config.num_stages, div16,
                              scalar_types={"scale_log2": "fp32"})
            fits = programs_per_sm(r["regs"], round(r["smem_KiB"] * 1024), config.num_warps)
            print(f"D {d:3} {'+'.join(str(w) for w in tile_split(d) if w):>6} G {g:2} BLOCK_N {config.block_n} stages {config.num_stages}: {r['regs']:3} registers, "
                  f"spills {r['spill_bytes']} B, shared {r['smem_KiB']:.1f} KiB, mma {r['mma']} -> {fits} per SM "
                  f"(plan: {resident_per_sm(d, g)})", flush=True)


if __name__ == "__main__":
    main()
