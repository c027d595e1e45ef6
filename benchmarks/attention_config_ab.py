"""The attention kernel's block configs (K/V tile tokens, warps, pipeline stages) at small and
large decode shapes, timed in a graph (GraphTimer.in_graph) and by single replays; outputs
checked against the default config's.

    PYTHONPATH=. python3 benchmarks/attention_config_ab.py benchmarks/results/<gpu>/ab/attention_config.json

Cases: the end-to-end shapes (Llama-2-7B MHA 32 at B 1-32, ctx 2048; Llama-3.1-8B GQA 32/8 B 64
over mixed 512-6144) and the grid's small ones (B 1 and 8, one long among short), block table
padded to 8k tokens, plans as the runtime builds them. Recorded: run 42
(results/nvidia-h200/ab/attention_config_run42.json).
"""
import json
import sys
import torch
from benchmarks.kernel_bench import _paged_kv, _block_table, _head_table, runtime_plan, BLOCK_SIZE, _copy_tbps
from kernels.attention_builds import AttentionConfig
from kernels.select_attention import _launch
from kernels.graph_timer import GraphTimer

CONFIGS = {"bn64_w4_st3": AttentionConfig(), "bn64_w4_st2": AttentionConfig(num_stages=2),
           "bn32_w4_st3": AttentionConfig(block_n=32), "bn32_w4_st4": AttentionConfig(block_n=32, num_stages=4),
           "bn32_w4_st6": AttentionConfig(block_n=32, num_stages=6), "bn32_w2_st4": AttentionConfig(block_n=32, num_warps=2, num_stages=4),
           "bn16_w4_st6": AttentionConfig(block_n=16, num_stages=6), "bn64_w8_st3": AttentionConfig(num_warps=8),
           "bn128_w8_st2": AttentionConfig(block_n=128, num_warps=8, num_stages=2)}
CASES = [  # name, B, Hq, Hkv, lengths, k
    ("mha32 B1 2048 dense", 1, 32, 32, [2048], 32),
    ("mha32 B1 4096 k6", 1, 32, 32, [4096], 6),
    ("gqa B1 4096 k2", 1, 32, 8, [4096], 2),
    ("mha32 B8 2048 dense", 8, 32, 32, [2048] * 8, 32),
    ("mha32 B8 4096 k16", 8, 32, 32, [4096] * 8, 16),
    ("gqa B8 4096 k4", 8, 32, 8, [4096] * 8, 4),
    ("mha32 B8 one-long k10", 8, 32, 32, [4096] + [400] * 7, 10),
    ("mha32 B16 2048 dense", 16, 32, 32, [2048] * 16, 32),
    ("gqa B32 4096 k4", 32, 32, 8, [4096] * 32, 4),
    ("mha32 B32 2048 k16", 32, 32, 32, [2048] * 32, 16),
    ("gqa B64 mixed k4", 64, 32, 8, None, 4),
]


def main(out):
    dev = torch.device("cuda")
    bw = _copy_tbps()
    timer = GraphTimer(dev, reps=20)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, b, hq, hkv, lens, k in CASES:
        if lens is None:
            lens = torch.randint(512, 6145, (b,), generator=gen).tolist()
        kc, vc, perm = _paged_kv(lens, hkv, 128, torch.bfloat16, gen)
        bt = _block_table(lens, perm, 8192 // BLOCK_SIZE)
        q = torch.randn(b, hq, 128, device=dev, dtype=torch.bfloat16)
        sl = torch.tensor(lens, device=dev, dtype=torch.int32)
        ht = _head_table(b, hkv, k, gen)
        out_t = torch.empty_like(q)
        plan, info = runtime_plan(lens, k)
        floor_us = sum(lens) * k * 128 * 2 * 2 / (bw * 1e12) * 1e6
        ref = None
        row = {"case": name, "floor_us": floor_us, "plan": info, "us": {}, "us_in_graph": {}}
        for cname, cfg in CONFIGS.items():
            fn = lambda: _launch(q, kc, vc, bt, sl, ht, 128**-0.5, out_t, plan, cfg, pdl=True)
            try:
                fn(); torch.cuda.synchronize()
            except Exception as e:
                print(name, cname, "FAILED", type(e).__name__, str(e)[:200], flush=True); continue
            if ref is None:
                ref = out_t.clone()
            elif (out_t.float() - ref.float()).abs().max().item() > 2e-2:
                print("MISMATCH", name, cname, flush=True)
            row["us"][cname] = timer(fn) * 1e3
            row["us_in_graph"][cname] = timer.in_graph(fn) * 1e3
        g = row["us_in_graph"]
        base = g["bn64_w4_st3"]
        print(f"{name:24} floor {floor_us:7.1f} | " + " ".join(f"{c}:{v:7.1f}" for c, v in g.items())
              + f" | best {min(g, key=g.get)} {min(g.values())/base:.3f}x", flush=True)
        rows.append(row)
        del kc, vc
        torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": bw, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
