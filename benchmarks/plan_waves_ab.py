"""The attention work plan's cut: the wave-filling rule (kernels/attention_plan.py, the default)
against fixed program counts per SM (the older rule; 16 was its default), at the end-to-end
decode shapes, the grid's mid-size GQA rows, and small / one-long / head-dim-64 rows, each plan
timed in a graph (GraphTimer.in_graph, L2 flushed before each call); outputs checked against
the default plan's. Also prints the kernel's registers and shared memory per head dim, and the
programs per SM they allow.

    PYTHONPATH=. python3 benchmarks/plan_waves_ab.py benchmarks/results/<gpu>/ab/plan_waves.json [--min-chunks 128 256 512]

Recorded: run 47 (`results/nvidia-h200/ab/plan_waves_run47.json`, before the wave rule: the
fixed counts 3-32 per SM x shortest chunks 128 / 256 / 512 at the first 11 cases), run 48
(`plan_waves_run48.json`, the wave rule against the fixed counts).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench import BLOCK_SIZE, _block_table, _copy_tbps, _head_table, _paged_kv, runtime_plan
from benchmarks.kernel_grid import attention_floor_ms
from kernels.graph_timer import GraphTimer
from kernels.attention_builds import default_config
from kernels.select_attention import _launch, _select_attention_kernel

CASES = [  # name, B, Hq, Hkv, D, lengths ("mixed": 512-6144, "spread": 10-100% of 4096, "one_long"), k
    ("l2-7b B8 2048 k16", 8, 32, 32, 128, [2048] * 8, 16),
    ("l2-7b B16 2048 k16", 16, 32, 32, 128, [2048] * 16, 16),
    ("l2-7b B16 2048 dense", 16, 32, 32, 128, [2048] * 16, 32),
    ("l2-7b B32 2048 k16", 32, 32, 32, 128, [2048] * 32, 16),
    ("l2-7b B32 2048 dense", 32, 32, 32, 128, [2048] * 32, 32),
    ("l3-8b B64 mixed k4", 64, 32, 8, 128, "mixed", 4),
    ("l3-8b B64 6144 k4", 64, 32, 8, 128, [6144] * 64, 4),
    ("gqa B32 4096 k4", 32, 32, 8, 128, [4096] * 32, 4),
    ("gqa B64 4096 k2", 64, 32, 8, 128, [4096] * 64, 2),
    ("gqa B64 spread k4", 64, 32, 8, 128, "spread", 4),
    ("mha32 B32 spread k6", 32, 32, 32, 128, "spread", 6),
    ("mha32 B1 4096 k6", 1, 32, 32, 128, [4096], 6),
    ("mha32 B1 2048 dense", 1, 32, 32, 128, [2048], 32),
    ("gqa B8 4096 k4", 8, 32, 8, 128, [4096] * 8, 4),
    ("mha32 B8 one_long k10", 8, 32, 32, 128, "one_long", 10),
    ("mha32 B64 one_long k10", 64, 32, 32, 128, "one_long", 10),
    ("mha32 B64 spread k6", 64, 32, 32, 128, "spread", 6),
    ("mha32 B128 4096 k6", 128, 32, 32, 128, [4096] * 128, 6),
    ("gqa B128 spread k2", 128, 32, 8, 128, "spread", 2),
    ("gqa B256 4096 k4", 256, 32, 8, 128, [4096] * 256, 4),
    ("mha64 B64 1024 k19", 64, 64, 64, 128, [1024] * 64, 19),
    ("gqa-d64 B64 4096 k2", 64, 32, 8, 64, [4096] * 64, 2),
    ("gqa-d64 B64 spread k4", 64, 32, 8, 64, "spread", 4),
    ("gqa-d64 B8 4096 k4", 8, 32, 8, 64, [4096] * 8, 4),
    ("mha32-d64 B64 4096 k10", 64, 32, 32, 64, [4096] * 64, 10),
]
PER_SM = (3, 6, 8, 12, 16)


def _lengths(spec, b, gen):
    if spec == "mixed":
        return torch.randint(512, 6145, (b,), generator=gen).tolist()
    if spec == "spread":
        return torch.linspace(410, 4096, b).round().int().tolist()
    if spec == "one_long":
        return [4096] + [400] * (b - 1)
    return spec


def paged_case(spec, b: int, hq: int, hkv: int, d: int, k: int, gen: torch.Generator):
    """A case's lengths and its bf16 decode inputs on the GPU: paged K/V in shuffled 16-token
    blocks, the block table padded to 8k tokens, q, the lengths, a random head table of k slots."""
    lens = _lengths(spec, b, gen)
    kc, vc, perm = _paged_kv(lens, hkv, d, torch.bfloat16, gen)
    bt = _block_table(lens, perm, 8192 // BLOCK_SIZE)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
    return lens, kc, vc, bt, q, sl, _head_table(b, hkv, k, gen)


def sdpa_in_graph_us(timer: GraphTimer, q: torch.Tensor, hkv: int, length: int) -> float:
    """torch SDPA over a contiguous cache of q's batch of `length`-token sequences, every head
    read (q [B, Hq, D]; K/V [B, Hkv, length, D] random, 4-D for the fused kernels), us in a graph."""
    b, hq, d = q.shape
    kd = torch.randn(b, hkv, length, d, device=q.device, dtype=q.dtype)
    vd = torch.randn_like(kd)
    q4 = q.view(b, hq, 1, d)
    return timer.in_graph(lambda: F.scaled_dot_product_attention(q4, kd, vd, scale=d**-0.5,
                                                                 enable_gqa=hq != hkv)) * 1e3


def variants_row(case: tuple, variants: dict, timer: GraphTimer, bw: float, gen: torch.Generator, *,
                 tol: float = 2e-2, sdpa: bool = True) -> dict:
    """One row of an attention A/B: the case (name, B, Hq, Hkv, D, lengths, k) timed in a graph
    under each variant {name: (AttentionConfig or None for default_config, runtime_plan's rule:
    resident=, programs_per_sm=, longest_first=, ...)}; every output checked against the first
    variant's within `tol` (other cuts sum in another order: 2e-2; 0 for the same pieces); and
    with `sdpa`, torch SDPA over a contiguous cache where every head is read at equal lengths."""
    name, b, hq, hkv, d, spec, k = case
    lens, kc, vc, bt, q, sl, ht = paged_case(spec, b, hq, hkv, d, k, gen)
    out_t = torch.empty_like(q)
    row = {"case": name, "floor_us": attention_floor_ms(sum(lens), k, d, 2, bw) * 1e3, "us_in_graph": {}, "plans": {}}
    ref = None
    for key, (config, rule) in variants.items():
        plan, info = runtime_plan(lens, k, head_dim=d, **rule)
        config = config or default_config(d)
        fn = lambda: _launch(q, kc, vc, bt, sl, ht, d**-0.5, out_t, plan, config, pdl=True)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        if ref is None:
            ref = out_t.clone()
        elif (out_t.float() - ref.float()).abs().max().item() > tol:
            print("MISMATCH", name, key, (out_t.float() - ref.float()).abs().max().item(), flush=True)
        row["plans"][key] = info
        row["us_in_graph"][key] = timer.in_graph(fn) * 1e3
    if sdpa and k == hkv and len(set(lens)) == 1:
        row["us_in_graph"]["sdpa"] = sdpa_in_graph_us(timer, q, hkv, lens[0])
    del kc, vc
    torch.cuda.empty_cache()
    return row


def time_cases(cases: list[tuple], variants_of, describe, **row_kw) -> tuple[float, list[dict]]:  # noqa: ANN001
    """Every case timed under its variants (variants_row(case, variants_of(case), ...)), each
    printed as describe(case, row); returns the copy bandwidth (TB/s) and the rows. The A/B
    scripts' one loop: one timer, one generator drawn case after case."""
    bw = _copy_tbps()
    timer = GraphTimer(torch.device("cuda"), reps=20)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in cases:
        row = variants_row(case, variants_of(case), timer, bw, gen, **row_kw)
        print(describe(case, row), flush=True)
        rows.append(row)
    return bw, rows


def write_rows(out: str, bw: float, rows: list[dict], **extra) -> None:
    """The A/B scripts' JSON: device, copy bandwidth, `extra`, the rows."""
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, **extra, "rows": rows}, f, indent=1)


def programs_per_sm(regs: int, smem_bytes: int, warps: int) -> int:
    """Programs of a kernel one sm_90 SM holds: 64K registers (allocated per warp in units of
    256), 228 KiB of shared memory with 1 KiB of it reserved per program, at most 32."""
    by_regs = 65536 // (-(-regs * 32 // 256) * 256 * warps)
    return min(by_regs, 233472 // (smem_bytes + 1024), 32)


def occupancy() -> list[dict]:
    """Registers, shared memory and programs per SM of each compiled attention kernel."""
    out = []
    for cache in getattr(_select_attention_kernel, "device_caches", {}).values():
        for kernel in cache[0].values():
            regs, smem, warps = kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps
            consts = {str(k): v for k, v in getattr(kernel.src, "constants", {}).items()} if hasattr(kernel, "src") else {}
            out.append({"regs": regs, "spills": kernel.n_spills, "shared": smem, "warps": warps,
                        "per_sm": programs_per_sm(regs, smem, warps),
                        "constants": consts})
    return out


def main(out, min_chunks):
    rules = {"wave": {}} | {f"{p}/{c}": {"programs_per_sm": p, "min_chunk": c} for p in PER_SM for c in min_chunks}

    def describe(case: tuple, row: dict) -> str:
        g = row["us_in_graph"]
        old = g["16/256"] if "16/256" in g else g[f"16/{min_chunks[0]}"]
        best = min(g, key=g.get)
        return (f"{case[0]:24} floor {row['floor_us']:6.1f} wave {g['wave']:6.1f} ({g['wave'] / old:.3f}x of 16/SM, "
                f"{row['plans']['wave']['items']} items) best {best} {g[best]:6.1f} | "
                + " ".join(f"{p}:{g[f'{p}/{min_chunks[0]}']:6.1f}" for p in PER_SM))

    bw, rows = time_cases(CASES, lambda case: {key: (None, rule) for key, rule in rules.items()}, describe,
                          sdpa=False)
    occ = occupancy()
    print("occupancy", occ, flush=True)
    write_rows(out, bw, rows, occupancy=occ)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--min-chunks", type=int, nargs="+", default=[256])
    args = parser.parse_args()
    main(args.out, args.min_chunks)
