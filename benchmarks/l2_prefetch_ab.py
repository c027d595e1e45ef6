"""The next GEMM's weight prefetched into L2 while the kernel before it drains
(the prefetch kernel below), at the decode step's kernel boundaries before a cuBLAS linear:
attention -> out-projection, RMSNorm -> QKV, RMSNorm -> gate/up, SiLU x up -> down (Llama-2-7B
and Llama-3.1-8B shapes, bf16, M 16-64), each sequence timed in a graph (GraphTimer.in_graph, L2
flushed before each) with and without the prefetch, its region and its eviction priority varied.

    PYTHONPATH=. python3 benchmarks/l2_prefetch_ab.py benchmarks/results/<gpu>/ab/l2_prefetch.json

The linear's output must be bit-identical with and without a prefetch (a prefetch is a hint).
Recorded: run 46 (results/nvidia-h200/ab/l2_prefetch_run46.json): no gain anywhere, a loss
with the whole weight; not adopted (benchmarks/KERNELS_NOTES.md). The prefetch kernel: a PDL
kernel between a Triton kernel and the cuBLAS linear after it, scheduled once every program of
the kernel before has started; each of its programs asks L2 for its share of the 128-byte lines
of w[:rows, :cols], then waits for the kernel before, so the linear still starts after it.
"""
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench import BLOCK_SIZE, _block_table, _copy_tbps, _head_table, _paged_kv, runtime_plan
from kernels.graph_timer import GraphTimer, l2_bytes
from kernels.norms import add_rms_norm
from kernels.attention_builds import default_config
from kernels.select_attention import _launch
from kernels.silu_mul import silu_mul
from kernels.pdl import launch_options, wait_then_release
import triton
import triton.language as tl

LINE_BYTES = 128  # an L2 line
_LINES_PER_PROGRAM = 1024  # 8 prefetches per thread at 4 warps


@triton.jit
def _prefetch_l2_kernel(w_ptr, n_lines, row_lines, stride_row, LINE: tl.constexpr, BLOCK: tl.constexpr,
                        EVICT_LAST: tl.constexpr, PDL: tl.constexpr):
    """Lines [pid * BLOCK, +BLOCK) of the region, row-major: line i is row i // row_lines, columns
    from (i % row_lines) * LINE. Indices past the end repeat the last line (a prefetch has no mask)."""
    i = tl.minimum(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), n_lines - 1)
    ptrs = w_ptr + (i // row_lines).to(tl.int64) * stride_row + (i % row_lines) * LINE
    if EVICT_LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
    wait_then_release(PDL)  # last: the prefetches go out before the kernel before this one ends


def region_lines(w: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """(lines in all, lines per row) of w[:rows, :cols]."""
    row_lines = -(-cols * w.element_size() // LINE_BYTES)
    return rows * row_lines, row_lines


def prefetch_l2(w: torch.Tensor, rows: int, cols: int, evict_last: bool = True, pdl: bool = False) -> None:
    """Ask L2 for w[:rows, :cols] (w: 2-D CUDA tensor with unit column stride). pdl: launched with
    programmatic dependent launch, so the requests go out while the kernel before drains; without
    it the kernel only adds a launch."""
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"prefetch_l2 needs a 2-D tensor with contiguous rows, got shape {tuple(w.shape)} "
                         f"strides {w.stride()}")
    if w.device.type != "cuda":
        raise ValueError(f"prefetch_l2 runs on CUDA tensors only (inline PTX), got one on {w.device}")
    if not (0 <= rows <= w.shape[0] and 0 <= cols <= w.shape[1]):
        raise ValueError(f"prefetch region [{rows}, {cols}] is outside the tensor's {tuple(w.shape)}")
    n_lines, row_lines = region_lines(w, rows, cols)
    if n_lines == 0:
        return
    _prefetch_l2_kernel[(triton.cdiv(n_lines, _LINES_PER_PROGRAM),)](
        w, n_lines, row_lines, w.stride(0), LINE=LINE_BYTES // w.element_size(), BLOCK=_LINES_PER_PROGRAM,
        EVICT_LAST=evict_last, PDL=pdl, num_warps=4, **launch_options(pdl))


DEV = torch.device("cuda")
BF16 = torch.bfloat16

ATTN_CASES = [  # name, B, Hq, Hkv, lengths (None: mixed 512-6144), k selected groups
    ("l2-7b B16 2048 k16", 16, 32, 32, [2048] * 16, 16),
    ("l2-7b B16 2048 dense", 16, 32, 32, [2048] * 16, 32),
    ("l2-7b B32 2048 k16", 32, 32, 32, [2048] * 32, 16),
    ("l2-7b B32 2048 dense", 32, 32, 32, [2048] * 32, 32),
    ("l3-8b B64 mixed k4", 64, 32, 8, None, 4),
]
LINEAR_CASES = [  # name, predecessor, K, N
    ("l2-7b qkv", "norm", 4096, 12288),
    ("l2-7b gate_up", "norm", 4096, 22016),
    ("l2-7b down", "silu", 11008, 4096),
    ("l3-8b qkv", "norm", 4096, 6144),
    ("l3-8b gate_up", "norm", 4096, 28672),
    ("l3-8b down", "silu", 14336, 4096),
]
MS = (16, 32, 64)


def _variants(w: torch.Tensor, small: bool) -> dict:
    """name -> (rows, cols, evict_last, pdl) of the prefetch, None for none."""
    n, k = w.shape
    v = {"none": None}
    if small:
        v.update(whole_last=(n, k, True, True), whole_normal=(n, k, False, True), half_rows_last=(n // 2, k, True, True),
                 whole_last_nopdl=(n, k, True, False))
    v.update(cols8_last=(n, k // 8, True, True), cols4_last=(n, k // 4, True, True), cols2_last=(n, k // 2, True, True),
             rows8_last=(n // 8, k, True, True), rows4_last=(n // 4, k, True, True),
             cols4_normal=(n, k // 4, False, True))
    return v


def _time_variants(timer, before, w, x_of, small):
    rows = {}
    ref = None
    for name, pf in _variants(w, small).items():
        def fn(pf=pf):
            a = before()
            if pf is not None:
                prefetch_l2(w, pf[0], pf[1], evict_last=pf[2], pdl=pf[3])
            return F.linear(x_of(a), w)
        out = fn()
        torch.cuda.synchronize()
        if ref is None:
            ref = out.clone()
        elif not torch.equal(out, ref):
            raise AssertionError(f"{name}: the linear's output changed with the prefetch")
        rows[name] = timer.in_graph(fn) * 1e3
    return rows


def main(out_path):
    bw = _copy_tbps()
    timer = GraphTimer(DEV, reps=20)
    gen = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "copy_TBps": bw, "l2_bytes": l2_bytes(DEV),
               "attention": [], "linear": []}
    print(f"copy {bw:.3f} TB/s, L2 {l2_bytes(DEV) / 2**20:.0f} MiB", flush=True)
    wo = (torch.randn(4096, 4096, device=DEV) / 64).to(BF16)
    for name, b, hq, hkv, lens, k in ATTN_CASES:
        if lens is None:
            lens = torch.randint(512, 6145, (b,), generator=gen).tolist()
        kc, vc, perm = _paged_kv(lens, hkv, 128, BF16, gen)
        bt = _block_table(lens, perm, 8192 // BLOCK_SIZE)
        q = torch.randn(b, hq, 128, device=DEV, dtype=BF16)
        sl = torch.tensor(lens, device=DEV, dtype=torch.int32)
        ht = _head_table(b, hkv, k, gen)
        o = torch.empty_like(q)
        plan, info = runtime_plan(lens, k)
        attn = lambda: _launch(q, kc, vc, bt, sl, ht, 128**-0.5, o, plan, default_config(128), pdl=True)
        us = _time_variants(timer, attn, wo, lambda a: a.view(b, hq * 128), small=True)
        us["attn_only"] = timer.in_graph(attn) * 1e3
        us["linear_only"] = timer.in_graph(lambda: F.linear(o.view(b, hq * 128), wo)) * 1e3
        floor_kv = sum(lens) * k * 128 * 2 * 2 / (bw * 1e12) * 1e6
        results["attention"].append({"case": name, "plan": info, "floor_kv_us": floor_kv,
                                     "floor_linear_us": wo.numel() * 2 / (bw * 1e12) * 1e6, "us_in_graph": us})
        base = us["none"]
        print(f"{name:22} attn {us['attn_only']:6.1f} (floor {floor_kv:6.1f}) o_proj alone {us['linear_only']:5.1f} "
              f"pair {base:6.1f} | " + " ".join(f"{v}:{t - base:+5.1f}" for v, t in us.items()
                                                  if v not in ("none", "attn_only", "linear_only")), flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    for name, before_kind, k_in, n in LINEAR_CASES:
        w = (torch.randn(n, k_in, device=DEV) / k_in**0.5).to(BF16)
        small = w.numel() * 2 <= l2_bytes(DEV) * 3 // 4
        for m in MS:
            if before_kind == "norm":
                h = torch.randn(m, k_in, device=DEV, dtype=BF16)
                res = torch.randn(m, k_in, device=DEV, dtype=BF16)
                nw = torch.randn(k_in, device=DEV, dtype=BF16)
                before = lambda: add_rms_norm(h, res, nw, 1e-5, pdl=True)[0]
            else:
                gu = torch.randn(m, 2 * k_in, device=DEV, dtype=BF16)
                before = lambda: silu_mul(gu, pdl=True)
            us = _time_variants(timer, before, w, lambda a: a, small)
            us["before_only"] = timer.in_graph(before) * 1e3
            floor = w.numel() * 2 / (bw * 1e12) * 1e6
            results["linear"].append({"case": name, "M": m, "floor_us": floor, "us_in_graph": us})
            base = us["none"]
            print(f"{name:14} M {m:3} floor {floor:5.1f} before {us['before_only']:4.1f} pair {base:6.1f} | "
                  + " ".join(f"{v}:{t - base:+5.1f}" for v, t in us.items() if v not in ("none", "before_only")),
                  flush=True)
        del w
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
