"""Compile the gather-GEMM kernels for sm_90a on a machine without a GPU and print what ptxas
gives each entry of the tile table: registers, spills, shared memory, MMA kind, global load widths.

    python3 benchmarks/gather_gemm_ptx.py            # bf16; --dtype fp16 for fp16; --pdl: as the
                                                     # runtime launches them (fc2's L2 prefetch, waits)

Triton's wheel ships ptxas and cuobjdump, so this needs no CUDA device (and no TRITON_INTERPRET).
It is how the claims in kernels/gather_gemm.py's tile-table comment were read: every entry uses
wgmma, 16-byte cp.async loads in the K loop, and no local memory (spills). Integer arguments get
the 16-divisibility Triton gives them at a real launch (strides, d, split length); M and k are
not specialized (the kernels say do_not_specialize).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def compile_stats(fn, ptr_types: dict, constexprs: dict, num_warps: int, num_stages: int, div16: tuple,
                  scalar_types: dict | None = None) -> dict:
    """ptxas's figures for fn compiled for sm_90a: pointers typed by ptr_types (16-byte aligned),
    integer arguments i32 unless scalar_types says otherwise, those in div16 divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params]
    types = {**(scalar_types or {}), **ptr_types}
    signature = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in fn.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptr_types or n in div16}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    loads: collections.Counter = collections.Counter()
    for ins in re.findall(r"(?:ld\.global|cp\.async\.c[ag]\.shared\.global)[^;]*", ptx):
        loads["cp.async " + ins.split(",")[2].strip() + " B" if ins.startswith("cp.async") else ins.split()[0]] += 1
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)), "spill_bytes": int(re.search(r"STACK:(\d+)",
            usage).group(1)), "smem_KiB": kernel.metadata.shared / 1024,
            "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none", "loads": dict(loads),
            "l2_prefetch": ptx.count("prefetch.global.L2"), "griddep": ptx.count("griddepcontrol")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--pdl", action="store_true", help="compile with PDL=True")
    ap.add_argument("--row-mask", action="store_true", help="compile with ROW_MASK=True (M not a multiple of BLOCK_M)")
    args = ap.parse_args()
    dt = args.dtype
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels.gather_gemm as gg
    import kernels.gather_gemm_kernels as gk

    ptrs = {name: f"*{dt}" for name in ("a_ptr", "w_ptr", "bias_ptr", "out_ptr")}
    ptrs.update(idx_ptr="*i32", ws_ptr="*fp32", count_ptr="*i32")
    div16 = ("stride_am", "stride_wn", "stride_om", "stride_wsm", "D", "split_len")
    tiles = [(fc1, t) for max_m, *_ in gg._M_TILES for fc1 in (True, False) for t in gg.tile_candidates(max_m, fc1)]
    for fc1, t in tiles:
        bm, bn, bk, warps, stages = t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages
        c = dict(FC1=fc1, HAS_BIAS=fc1, RELU=fc1, UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=args.pdl,
                 PREFETCH=2 * bk if args.pdl and not fc1 else 0, ROW_MASK=args.row_mask)
        for kind in ("grid", "split", "stream"):
            if kind == "stream":
                r = compile_stats(gk._gather_stream_kernel, ptrs, c, warps, stages, div16)
            else:
                r = compile_stats(gk._gather_kernel, ptrs, {**c, "SPLIT": kind == "split"}, warps, stages, div16)
            print(f"{'fc1' if fc1 else 'fc2'} BLOCK_M {bm:3} BLOCK_N {bn:3} BLOCK_K {bk:3} warps {warps} stages {stages} "
                  f"{kind:6} {r}")


if __name__ == "__main__":
    main()
