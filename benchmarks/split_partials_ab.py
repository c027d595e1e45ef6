"""A row-parallel linear (out-projection, down projection) as split-K fp32 partials that the
following residual add + RMSNorm sums, against cuBLAS then the norm kernel: what the fusion
would save in a decode step (Llama shapes, bf16, M 8-128).

    PYTHONPATH=. python3 benchmarks/split_partials_ab.py benchmarks/results/<gpu>/ab/split_partials_norm.json

The linear is gather_gemm's tile kernel over every weight row (idx = arange), K in s slices
written as fp32 partials [s, M, N]; the norm kernel here sums the slices in a fixed order (no
atomics: the same bits every run), rounds to bf16 as cuBLAS rounds its output, then adds the
residual and normalises, as kernels/norms.py does. Each variant's output is checked against
cuBLAS + norms.add_rms_norm; times are GraphTimer's (single replay, and in_graph).
Recorded: run 41 (results/nvidia-h200/ab/split_partials_norm_run41.json); not adopted, see
benchmarks/KERNELS_NOTES.md.
"""
import json
import sys
from dataclasses import replace
import torch, triton, triton.language as tl
import torch.nn.functional as F
from kernels import gather_gemm as gg
from kernels.gather_gemm_kernels import _gather_kernel
from kernels.graph_timer import GraphTimer
from kernels.norms import add_rms_norm
from kernels.pdl import wait_then_release, launch_options


@triton.jit
def _partials_norm_kernel(ws_ptr, res_ptr, w_ptr, out_ptr, h_ptr, S, M, D, eps, stride_ws, stride_res, stride_out,
                          BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + (s * M + row) * stride_ws + cols, mask=mask, other=0.0)
    x = acc.to(h_ptr.dtype.element_ty)  # the linear's output, rounded as cuBLAS rounds it
    r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
    x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused(x, w, idx, residual, nw, config, pdl=True):
    m, k = x.shape
    n = w.shape[0]
    splits, split_len = gg._split_plan(config, k)
    ws = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    _gather_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), splits)](
        x, w, idx, x, ws, ws, m, n, k, split_len, x.stride(0), w.stride(0), n, n,
        FC1=True, HAS_BIAS=False, RELU=False, UPCAST=not x.is_cuda, SPLIT=True,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    out = torch.empty_like(residual); h = torch.empty_like(residual)
    _partials_norm_kernel[(m,)](ws, residual, nw, out, h, splits, m, n, 1e-5, n, residual.stride(0), out.stride(0),
                                BLOCK_D=triton.next_power_of_2(n), PDL=pdl, num_warps=4 if n <= 4096 else 8,
                                **launch_options(pdl))
    return out, h


def main(out_path):
    dev = torch.device("cuda")
    timer = GraphTimer(dev, reps=15)
    rows = []
    for name, n, k in (("o_proj", 4096, 4096), ("down-l2", 4096, 11008), ("down-l31", 4096, 14336)):
        w = (torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16)
        idx = torch.arange(n, device=dev, dtype=torch.int32)
        nw = torch.randn(n, device=dev).to(torch.bfloat16)
        for m in (8, 16, 32, 64, 128):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            res = torch.randn(m, n, device=dev).to(torch.bfloat16)
            base = lambda: add_rms_norm(F.linear(x, w), res, nw, 1e-5, pdl=True)
            ref_o, ref_h = base()
            variants = {"cublas+norm": base, "cublas": lambda: F.linear(x, w)}
            t = gg.tile_config(m, fc1=True)
            for s in (1, 2, 3, 4, 6, 8):
                if k // s < 2 * t.block_k:
                    continue
                for st in sorted({t.num_stages, t.num_stages + 1}):
                    c = replace(t, split_k=s, num_stages=st)
                    variants[f"fused_s{s}_st{st}"] = (lambda c=c: fused(x, w, idx, res, nw, c))
            res_row = {"name": name, "n": n, "k": k, "m": m, "ms": {}, "ms_in_graph": {}}
            for vname, fn in variants.items():
                if vname.startswith("fused"):
                    o, h = fn()
                    err = max((o.float() - ref_o.float()).abs().max().item(), (h.float() - ref_h.float()).abs().max().item())
                    if err > 0.05 * (ref_o.float().abs().max().item()):
                        print("MISMATCH", name, m, vname, err, flush=True)
                res_row["ms"][vname] = timer(fn)
                res_row["ms_in_graph"][vname] = timer.in_graph(fn)
            best = min((v for v in variants if v.startswith("fused")), key=lambda v: res_row["ms_in_graph"][v])
            g = res_row["ms_in_graph"]
            print(f"{name:9} M {m:3}: cublas {g['cublas']*1e3:6.1f} cublas+norm {g['cublas+norm']*1e3:6.1f} "
                  f"best fused {best} {g[best]*1e3:6.1f} us (in graph)", flush=True)
            rows.append(res_row)
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
