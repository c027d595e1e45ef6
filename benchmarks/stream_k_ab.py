"""Stream-K against the tile grid (its split counts) and cuBLAS: the gather-GEMM pair at OPT
shapes, and fc1's kernel over every weight row (idx = arange: a dense linear) at Llama shapes.

    PYTHONPATH=. python3 benchmarks/stream_k_ab.py benchmarks/results/<gpu>/stream_k_ab.json [--dense-only]

Each candidate is captured in a CUDA graph and its replays timed with L2 flushed
(kernels/graph_timer.py); every candidate's output is checked against the default config's
(printed as MISMATCH if it differs by more than 2% of the output's scale). Floors: the weight
bytes read / the copy bandwidth measured in the same run. Prints per case the best tile-grid
pair, the best stream-K pair and cuBLAS as % of the floor; writes every candidate's median ms.
The dense linears are also timed in fc2's layout (`t_*`: the weight stored transposed, [d_in,
n_out], its rows summed over arange(d_in): no split-K reduce kernel); --dense-only skips the OPT
section.
"""
import json
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from kernels import gather_gemm as gg
from kernels.graph_timer import time_graphs_ms
from kernels.mlp_dispatch import dense_masked_mlp, split_candidates
from benchmarks.throughput import copy_bandwidth_tbps

def main(out_path: str, dense_only: bool = False) -> None:
    dev = torch.device("cuda")
    bw = copy_bandwidth_tbps(dev)
    sms = gg._num_sms(dev)
    print(f"bw {bw:.3f} TB/s, {sms} SMs", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    def floor_ms(nbytes):
        return nbytes / (bw * 1e12) * 1e3

    def variants(m, n_out, k_loop, fc1):
        base = gg.gpu_config(m, n_out, k_loop, sms, fc1)
        out = {f"grid_s{s}": replace(base, split_k=s) for s in split_candidates(base.split_k, k_loop, base.block_k)}
        t = gg.tile_config(m, fc1)
        for st in (1, 2):
            for stages in sorted({t.num_stages, t.num_stages + 1}):
                out[f"stream{st}_st{stages}"] = replace(t, stream=st, num_stages=stages)
        if m <= 64:
            out["stream2_bk256"] = replace(t, stream=2, block_k=256, num_stages=3)
        return out

    def check(a, b, what):
        err = (a.float() - b.float()).abs().max().item(); scale = b.float().abs().max().item() + 1e-6
        if err > 0.02 * scale: print("MISMATCH", what, err, scale, flush=True)

    for name, d in () if dense_only else (("opt-6.7b", 4096), ("opt-66b", 9216)):
        n = 4 * d
        w1 = (torch.randn(n, d, generator=gen) / d**0.5).to(dev, torch.bfloat16)
        w2t = (torch.randn(n, d, generator=gen) / 64).to(dev, torch.bfloat16)
        b1 = torch.randn(n, generator=gen).to(dev, torch.bfloat16)
        for m in (1, 32, 64, 128, 256):
            x = torch.randn(m, d, generator=gen).to(dev, torch.bfloat16)
            for frac in (0.1, 0.3, 0.5, 0.75):
                k = int(n * frac) - 3
                idx = torch.randperm(n, generator=gen)[:k].sort().values.to(dev, torch.int32)
                h = gg.gather_fc1(x, w1, idx, b1)
                y = gg.gather_fc2(h, w2t, idx, None)
                dense = time_graphs_ms([lambda: dense_masked_mlp(x, w1, b1, w2t, idx)], dev)[0]
                res = {"dense_mlp": dense}
                for fc1, n_out, k_loop in ((True, k, d), (False, d, k)):
                    vs = variants(m, n_out, k_loop, fc1)
                    fns = []
                    for label, c in vs.items():
                        if fc1:
                            check(gg.gather_fc1(x, w1, idx, b1, config=c), h, f"{name} m{m} k{k} fc1 {label}")
                            fns.append(lambda c=c: gg.gather_fc1(x, w1, idx, b1, config=c))
                        else:
                            check(gg.gather_fc2(h, w2t, idx, None, config=c), y, f"{name} m{m} k{k} fc2 {label}")
                            fns.append(lambda c=c: gg.gather_fc2(h, w2t, idx, None, config=c))
                    for label, ms in zip(vs, time_graphs_ms(fns, dev)):
                        res[("fc1_" if fc1 else "fc2_") + label] = ms
                fl = floor_ms(2 * 2 * k * d)
                best = lambda p, pre: min(v for kk, v in res.items() if kk.startswith(p) and kk[4:].startswith(pre))
                g = best("fc1_", "grid") + best("fc2_", "grid"); s = best("fc1_", "stream") + best("fc2_", "stream")
                print(f"{name} M{m:4d} d{frac:.2f}: floor {fl*1e3:7.1f} us | dense {dense*1e3:7.1f} ({fl/dense:4.0%}) | grid {g*1e3:7.1f} ({fl/g:4.0%}) | stream {s*1e3:7.1f} ({fl/s:4.0%})", flush=True)
                print("    fc1:", " ".join(f"{kk[4:]}={v*1e3:.1f}" for v, kk in sorted((v, kk) for kk, v in res.items() if kk.startswith("fc1"))[:5]),
                      "| fc2:", " ".join(f"{kk[4:]}={v*1e3:.1f}" for v, kk in sorted((v, kk) for kk, v in res.items() if kk.startswith("fc2"))[:5]), flush=True)
                rows.append({"model": name, "M": m, "k": k, "d": d, "N": n, "floor_ms": fl, "ms": res})
        del w1, w2t, b1

    # Dense skinny linears (Llama-2-7B / Llama-3.1-8B): fc1 over idx = arange, identity, no bias, vs F.linear.
    for name, shapes in (("llama-2-7b", [(4096, 12288 + 64), (4096, 4096), (4096, 22016), (11008, 4096)]),
                         ("llama-3.1-8b", [(4096, 6144 + 16), (4096, 4096), (4096, 28672), (14336, 4096)])):
        for d_in, n_out in shapes:
            w = (torch.randn(n_out, d_in, generator=gen) / d_in**0.5).to(dev, torch.bfloat16)
            ar = torch.arange(n_out, device=dev, dtype=torch.int32)
            wt = w.t().contiguous()  # [d_in, n_out]
            ar_in = torch.arange(d_in, device=dev, dtype=torch.int32)
            for m in (16, 32, 64, 128):
                x = torch.randn(m, d_in, generator=gen).to(dev, torch.bfloat16)
                ref = F.linear(x, w)
                vs = variants(m, n_out, d_in, True)
                for label, c in vs.items():
                    check(gg.gather_fc1(x, w, ar, None, "identity", config=c), ref, f"{name} {d_in}x{n_out} {label}")
                vt = variants(m, n_out, d_in, False)  # fc2's layout: w^T rows over arange(d_in)
                for label, c in vt.items():
                    check(gg.gather_fc2(x, wt, ar_in, None, config=c), ref, f"{name} {d_in}x{n_out} t_{label}")
                fns = ([lambda: F.linear(x, w)] + [lambda c=c: gg.gather_fc1(x, w, ar, None, "identity", config=c)
                                                   for c in vs.values()]
                       + [lambda c=c: gg.gather_fc2(x, wt, ar_in, None, config=c) for c in vt.values()])
                times = dict(zip(["cublas"] + list(vs) + [f"t_{k}" for k in vt], time_graphs_ms(fns, dev)))
                fl = floor_ms(2 * n_out * d_in)
                top = sorted((v, kk) for kk, v in times.items() if kk != "cublas")[:5]
                print(f"{name} {d_in:5d}->{n_out:5d} M{m:3d}: floor {fl*1e3:6.1f} us cublas {times['cublas']*1e3:6.1f} ({fl/times['cublas']:4.0%}) best " +
                      " ".join(f"{kk}={v*1e3:.1f}({fl/v:.0%})" for v, kk in top), flush=True)
                rows.append({"model": name, "M": m, "d_in": d_in, "n_out": n_out, "floor_ms": fl, "ms": times})
            del w, wt
    json.dump({"device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
               "triton": __import__("triton").__version__}, "bw_tbps": bw, "rows": rows}, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], "--dense-only" in sys.argv[2:])
