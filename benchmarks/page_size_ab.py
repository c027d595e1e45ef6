"""The KV cache's page size (engine.block_size: 16, the default, 32, 64, 128 tokens) under the
decode attention kernel, against torch SDPA over a contiguous cache of the same bytes, at the
grid's density-1.0 comparison shapes and some sparse and unequal-length ones; timed in a graph
(GraphTimer.in_graph, L2 flushed before each call), block tables padded to 8k tokens, plans as
the runtime builds them. Every page size holds the same tokens (one logical K/V laid out in
shuffled pages of each size), so every output must equal the 16-token pages' bit for bit.

    PYTHONPATH=. python3 benchmarks/page_size_ab.py benchmarks/results/<gpu>/ab/page_size.json

Why: a 64-token K/V tile spans 64 / block_size pages, each a separate 2 * block_size * D-byte
run per head in the cache ([blocks, Hkv, block_size, D]) found through its own block-table
entry; SDPA reads one run per (sequence, head).
"""
import json
import statistics
import sys

import torch

from benchmarks.kernel_bench import _block_table, _copy_tbps, _head_table, runtime_plan
from benchmarks.kernel_grid import attention_floor_ms
from benchmarks.plan_waves_ab import _lengths, sdpa_in_graph_us
from kernels.graph_timer import GraphTimer
from kernels.attention_builds import default_config
from kernels.select_attention import _launch

PAGES = (16, 32, 64, 128)
CASES = [  # name, B, Hq, Hkv, D, lengths, k
    ("mha32 B8 4096 dense", 8, 32, 32, 128, [4096] * 8, 32),
    ("mha32 B32 4096 dense", 32, 32, 32, 128, [4096] * 32, 32),
    ("mha32 B64 4096 dense", 64, 32, 32, 128, [4096] * 64, 32),
    ("mha32 B32 2048 k16", 32, 32, 32, 128, [2048] * 32, 16),
    ("mha32 B64 spread dense", 64, 32, 32, 128, "spread", 32),
    ("gqa B64 4096 dense", 64, 32, 8, 128, [4096] * 64, 8),
    ("gqa B64 mixed k4", 64, 32, 8, 128, "mixed", 4),
    ("gqa B8 4096 dense", 8, 32, 8, 128, [4096] * 8, 8),
    ("mha32-d64 B64 4096 dense", 64, 32, 32, 64, [4096] * 64, 32),
]


def paged(logical: torch.Tensor, lens: list[int], page: int, perm: torch.Tensor) -> torch.Tensor:
    """[blocks + 1, Hkv, page, D]: the sequences of logical [tokens, Hkv, D] (laid end to end,
    `lens` long) in pages of `page` tokens, block j of the sequences in order at perm[j]."""
    hkv, d = logical.shape[1:]
    cache = torch.zeros(perm.numel() + 1, hkv, page, d, device=logical.device, dtype=logical.dtype)
    at_tok = at_blk = 0
    for n in lens:
        nb = -(-n // page)
        seq = torch.zeros(nb * page, hkv, d, device=logical.device, dtype=logical.dtype)
        seq[:n] = logical[at_tok:at_tok + n]
        cache[perm[at_blk:at_blk + nb].long()] = seq.view(nb, page, hkv, d).transpose(1, 2)
        at_tok, at_blk = at_tok + n, at_blk + nb
    return cache


def main(out: str) -> None:
    dev = torch.device("cuda")
    bw = _copy_tbps()
    timer = GraphTimer(dev, reps=20)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, b, hq, hkv, d, spec, k in CASES:
        lens = _lengths(spec, b, gen)
        q = torch.randn(b, hq, d, device=dev, dtype=torch.bfloat16)
        sl = torch.tensor(lens, device=dev, dtype=torch.int32)
        ht = _head_table(b, hkv, k, gen)
        plan, info = runtime_plan(lens, k, head_dim=d)
        row = {"case": name, "floor_us": attention_floor_ms(sum(lens), k, d, 2, bw) * 1e3, "plan": info,
               "us_in_graph": {}}
        logical_k = torch.randn(sum(lens), hkv, d, device=dev, dtype=torch.bfloat16)
        logical_v = torch.randn_like(logical_k)
        ref = None
        for page in PAGES:
            perm = torch.randperm(sum(-(-n // page) for n in lens), generator=gen).int()
            kc, vc = paged(logical_k, lens, page, perm), paged(logical_v, lens, page, perm)
            bt = _block_table(lens, perm, 8192 // page, block_size=page)
            out_t = torch.empty_like(q)
            fn = lambda: _launch(q, kc, vc, bt, sl, ht, d**-0.5, out_t, plan, default_config(d), pdl=True)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            if ref is None:
                ref = out_t.clone()
            elif not torch.equal(out_t, ref):
                print("MISMATCH", name, page, (out_t.float() - ref.float()).abs().max().item(), flush=True)
            row["us_in_graph"][f"page{page}"] = timer.in_graph(fn) * 1e3
            del kc, vc
            torch.cuda.empty_cache()
        del logical_k, logical_v
        if k == hkv:  # density 1.0: SDPA over a contiguous cache of the same bytes (B sequences of the mean length)
            row["us_in_graph"]["sdpa"] = sdpa_in_graph_us(timer, q, hkv, round(sum(lens) / b))
        g = row["us_in_graph"]
        print(f"{name:26} floor {row['floor_us']:6.1f} | " + " ".join(f"{key} {t:6.1f}" for key, t in g.items()),
              flush=True)
        rows.append(row)
    for page in PAGES[1:]:
        ratios = [r["us_in_graph"][f"page{page}"] / r["us_in_graph"]["page16"] for r in rows]
        print(f"page {page} / page 16: median {statistics.median(ratios):.3f} min {min(ratios):.3f} "
              f"max {max(ratios):.3f}", flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
