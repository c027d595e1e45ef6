"""Benchmark the Polar Sparsity kernels against dense torch baselines and the bandwidth floor.

    python3 benchmarks/kernel_bench.py --out benchmarks/results/<gpu>   # on a CUDA GPU
    python3 benchmarks/kernel_bench.py --plot-from benchmarks/results/<gpu>/kernels.json
    python3 benchmarks/kernel_bench.py --grid --out $OUT   # serving conditions: benchmarks/kernel_grid.py

Writes <out>/kernels.json: {"device", "versions", "copy_TBps", "rows": [{op, shape, dtype, density,
variant, ms}]} and prints a table. With --sweep, attention rows of >= 512 unsplit programs are also
timed at split counts 1, 2, 3, 4, 6 and (CONFIG_ROWS) other block configs, each checked against
SDPA on the gathered selected groups; --mlp-sweep times other gather-GEMM configs. Target rows
(B = 64 attention at density 0.3; M = 64 MLP at 10%) are timed twice ("ours_rerun": the
run-to-run spread). Every variant is captured in a CUDA graph and its replays are timed (median
of 50, L2 flushed by a read before each: kernels/graph_timer.py); inputs are random, never
zeros. The floor is the bytes the op must read (selected KV, or selected weights) over the copy
bandwidth measured in the same run. The exact command of the recorded run:

    python3 benchmarks/kernel_bench.py --out $OUT --sweep

"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import astuple
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.graph_timer import GraphTimer

ATTN_SHAPES = [  # (name, B, Hq, Hkv, N)
    ("opt-66b", 64, 72, 72, 1920),
    ("llama2-7b", 64, 32, 32, 3968),
    ("llama3-8b-gqa", 64, 32, 8, 8192),
]
ATTN_DENSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
BATCH_SWEEP = [1, 8, 32, 128, 256]  # llama2-7b heads, N = 3968
BATCH_DENSITIES = [0.3, 0.5, 1.0]
MLP_SHAPES = [("opt-6.7b", 4096, 16384), ("opt-66b", 9216, 36864)]  # (name, d, N)
MLP_MS = [1, 16, 64, 256]
MLP_FRACS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
D_HEAD = 128
BLOCK_SIZE = 16


BENCH_REPS = 50  # timed replays per case (median)
IN_GRAPH_REPS = 15  # replays of each in-graph pair (GraphTimer.in_graph: 10 flushed calls per replay)


@functools.lru_cache(maxsize=None)
def _graph_timer() -> GraphTimer:
    return GraphTimer(torch.device("cuda"), BENCH_REPS)


@functools.lru_cache(maxsize=None)
def _in_graph_timer() -> GraphTimer:
    return GraphTimer(torch.device("cuda"), IN_GRAPH_REPS)


def _bench(fn, graph: bool = True) -> float:
    """Median ms of fn. With graph, fn is captured once in a CUDA graph and its replays are
    timed as a decode runtime runs it, L2 flushed by a read before each (kernels/graph_timer.py):
    host launch overhead (~0.1 ms for a few Python-side launches, more than the kernels take at
    small sizes) drops out, and the capture itself proves the op never syncs with the host.
    Without, triton's do_bench times fn eagerly (the copy bandwidth)."""
    if graph:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph's private pool cannot reuse the eager run's blocks
        return _graph_timer()(fn)
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def _try_bench(fn, in_graph: bool = False) -> tuple[float, dict]:
    """Time fn; a failure (OOM, capture error) becomes a NaN row that carries the error. in_graph:
    also fn's cost inside a graph of several flushed calls (`ms_in_graph`, GraphTimer.in_graph),
    where the graph's launch is not charged to it."""
    try:
        ms = _bench(fn)
        if not in_graph:
            return ms, {}
        torch.cuda.empty_cache()
        return ms, {"ms_in_graph": _in_graph_timer().in_graph(fn)}
    except Exception as e:  # noqa: BLE001 - OOM, capture error, a sweep config Triton cannot build: kept in the row
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        return float("nan"), {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _copy_tbps() -> float:
    n = 1 << 30  # 2 GiB fp16 source, far beyond L2
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e12  # bytes read + written


def _paged(k: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Contiguous [B, Hkv, N, D] -> paged cache [B * N/16, Hkv, 16, D]; logical block j of
    sequence b goes to physical block perm[b * N/16 + j] (K and V must share perm)."""
    b, hkv, n, d = k.shape
    nblk = n // BLOCK_SIZE
    cache = torch.empty(b * nblk, hkv, BLOCK_SIZE, d, device="cuda", dtype=k.dtype)
    cache[perm] = k.view(b, hkv, nblk, BLOCK_SIZE, d).transpose(1, 2).reshape(b * nblk, hkv, BLOCK_SIZE, d)
    return cache


def _head_table(b: int, hkv: int, k: int, gen: torch.Generator, device="cuda") -> torch.Tensor:
    """[B, k] int32: k distinct random KV groups per sequence."""
    return torch.stack([torch.randperm(hkv, generator=gen)[:k] for _ in range(b)]).int().to(device)


# Attention sweep (--sweep). CHUNK_SWEEP: work-plan chunk sizes in tokens (None: the planner's
# rule; the whole sequence: uncut) timed at the default block config on every row whose uncut
# grid has >= SWEEP_MIN_PAIRS programs. CONFIG_SWEEP: other block configs at CONFIG_ROWS, the
# target rows and the llama2-7b rows most sensitive to the cut (3-6% between cuts in run 5).
SWEEP_MIN_PAIRS = 512
CHUNK_SWEEP = (None, 512, 1024, 2048, 1 << 20)
CONFIG_SWEEP = [  # label, (block_n, num_warps, num_stages, maxnreg)
    ("st2", (64, 4, 2, None)), ("w8", (64, 8, 3, None)), ("bn128_w8", (128, 8, 3, None)),
    ("r168", (64, 4, 3, 168)), ("r128", (64, 4, 3, 128)), ("bn32_r128", (32, 4, 3, 128)),
]
CONFIG_ROWS = {  # (name, B, k_max): chunk sizes to time each CONFIG_SWEEP config at
    ("opt-66b", 64, 22): CHUNK_SWEEP, ("llama2-7b", 64, 10): CHUNK_SWEEP,  # targets (d 0.3)
    ("llama2-7b", 64, 19): (None, 1024), ("llama2-7b", 64, 29): (None, 1024), ("llama2-7b", 128, 10): (None, 1024),
}


def runtime_plan(lens: list[int], k: int, device="cuda", head_dim: int = 128, **rule) -> tuple[object, dict]:
    """The attention work plan as the runtime's CUDA-graph path passes it (the bucket's static
    capacity, partials for all of it, the room StepPlanner's cuts leave), and what it holds;
    `rule`: plan_attention's chunk_tokens (forces the cut), programs_per_sm (the fixed-count
    rule), min_chunk, room."""
    from kernels.attention_builds import resident_per_sm
    from kernels.attention_plan import KEPT_ROOM, PROGRAMS_PER_SM, num_sms, plan_attention, plan_capacity

    sms = num_sms(torch.device(device))
    rule.setdefault("resident", resident_per_sm(head_dim))
    rule.setdefault("room", KEPT_ROOM)
    cap = plan_capacity(len(lens), k, sms, rule.get("programs_per_sm") or PROGRAMS_PER_SM)
    if rule.get("chunk_tokens") is not None:
        cap = max(cap, sum(-(-n // rule["chunk_tokens"]) for n in lens))
    host = plan_attention(lens, groups=k, num_sms=sms, capacity=cap, **rule)
    info = {"items": host.num_items, "capacity": cap, "parts": host.num_parts, "chunk_tokens": host.chunk_tokens}
    return host.to(device, num_parts=cap), info


def _row_adder(rows: list, op: str, shape: dict):
    """add(variant, density, ms, extra=None, **more) appends one JSON row of op at shape."""
    def add(variant: str, density: float, ms: float, extra: dict | None = None, **more) -> None:
        rows.append({"op": op, "shape": shape, "dtype": "float16", "density": density,
                     "variant": variant, "ms": ms, **(extra or {}), **more})
    return add


def bench_attention(name, b, hq, hkv, n, densities, bw, rows, sweep=False):
    from kernels.attention_builds import AttentionConfig, default_config
    from kernels.select_attention import _launch, select_attention

    gen = torch.Generator().manual_seed(0)
    g = hq // hkv
    q = torch.randn(b, hq, D_HEAD, device="cuda", dtype=torch.float16)
    k = torch.randn(b, hkv, n, D_HEAD, device="cuda", dtype=torch.float16)
    v = torch.randn(b, hkv, n, D_HEAD, device="cuda", dtype=torch.float16)
    perm = torch.randperm(b * (n // BLOCK_SIZE), generator=gen).cuda()  # shuffled physical blocks
    kc, vc = _paged(k, perm), _paged(v, perm)
    bt = perm.view(b, n // BLOCK_SIZE).int()  # (B, max_blocks)
    seq_lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    scale = D_HEAD**-0.5
    shape = {"name": name, "B": b, "Hq": hq, "Hkv": hkv, "N": n, "D": D_HEAD, "block_size": BLOCK_SIZE}
    add = _row_adder(rows, "attention", shape)
    q4 = q.view(b, hq, 1, D_HEAD)
    add("sdpa_dense", 1.0, *_try_bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=g > 1)))
    out = torch.empty_like(q)
    bidx = torch.arange(b, device="cuda")[:, None]
    for dens in densities:
        kmax = max(1, round(dens * hkv))
        ht = _head_table(b, hkv, kmax, gen)
        real = kmax / hkv
        add("floor", real, b * kmax * n * D_HEAD * 2 * 2 / (bw * 1e12) * 1e3)
        plan, _ = runtime_plan([n] * b, kmax)
        add("ours", real, *_try_bench(lambda: select_attention(q, kc, vc, bt, seq_lens, ht, scale, out=out, plan=plan)))
        if kmax == hkv:  # all groups selected: must equal dense SDPA (a GPU-side check of ours)
            dense_out = F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=g > 1).view(b, hq, D_HEAD)
            diff = out.float() - dense_out.float()
            rows[-1]["max_err_vs_sdpa"] = diff.abs().max().item()
            rows[-1]["rel_err_vs_sdpa"] = (diff.norm() / dense_out.float().norm()).item()
        if b == 64 and dens == 0.3:  # a target row: time it again (spread)
            add("ours_rerun", real, *_try_bench(lambda: select_attention(q, kc, vc, bt, seq_lens, ht, scale, out=out,
                                                                         plan=plan)))

        def gather_sdpa():
            ks, vs = k[bidx, ht], v[bidx, ht]  # (B, kmax, N, D) copies
            qs = q.view(b, hkv, g, D_HEAD)[bidx, ht].reshape(b, kmax * g, 1, D_HEAD)
            return F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=g > 1)

        if b * kmax * n * D_HEAD * 4 < 24e9:  # the copies must fit beside the two caches
            add("gather_sdpa", real, *_try_bench(gather_sdpa))
        if not sweep or b * kmax < SWEEP_MIN_PAIRS:
            continue
        # Reference for the sweep's checks: SDPA on the gathered selected groups (B, kmax * G, D).
        ref = gather_sdpa().view(b, kmax * g, D_HEAD).float()
        qheads = (ht.long()[:, :, None] * g + torch.arange(g, device="cuda")).reshape(b, kmax * g)
        unsel = torch.ones(b, hq, dtype=torch.bool, device="cuda")
        unsel[bidx, qheads] = False

        def timed_check(fn):
            """Time fn (which writes out), then check what its last graph replay left in out."""
            out.fill_(float("nan"))
            ms, err = _try_bench(fn)
            err["max_err"] = (out[bidx, qheads].float() - ref).abs().max().item()  # NaN if unwritten
            err["unselected_zero"] = bool((out[unsel] == 0).all().item())
            return ms, err

        cfg_splits = CONFIG_ROWS.get((name, b, kmax), ())
        for label, cfg in [("default", astuple(default_config(D_HEAD)))] + (CONFIG_SWEEP if cfg_splits else []):
            c = AttentionConfig(*cfg)
            for chunk in CHUNK_SWEEP if label == "default" else cfg_splits:
                cut, _ = runtime_plan([n] * b, kmax, chunk_tokens=chunk)
                ms, extra = timed_check(lambda: _launch(q, kc, vc, bt, seq_lens, ht, scale, out, cut, config=c))
                add("sweep", real, ms, extra, config={"label": label, "block_n": cfg[0], "num_warps": cfg[1],
                                                      "num_stages": cfg[2], "maxnreg": cfg[3], "chunk_tokens": chunk},
                    pairs=b * kmax)


PADDED_SHAPES = [("llama3-8b-gqa", 64, 32, 8), ("llama2-7b", 64, 32, 32)]  # (name, B, Hq, Hkv)
PADDED_LENGTHS = [("uniform 1000-5000", 1000, 5000), ("one long among short", 300, 6000)]
PADDED_WIDTHS = [None, 8192, 32768]  # table width in tokens; None: exactly the longest sequence


def _paged_kv(lens: list[int], hkv: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator, device="cuda"):
    """K and V caches [blocks + 1, Hkv, 16, D] holding sequences of `lens` tokens in shuffled
    blocks (perm: the blocks in sequence order); the last block is the padding's."""
    total_blocks = sum(-(-n // BLOCK_SIZE) for n in lens)
    kc = torch.randn(total_blocks + 1, hkv, BLOCK_SIZE, head_dim, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    perm = torch.randperm(total_blocks, generator=gen).int()
    return kc, vc, perm


def _block_table(lens: list[int], perm: torch.Tensor, cols: int, device="cuda",
                 block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """[B, cols] int32: each sequence's blocks from perm, then the spare block (index len(perm))
    up to the table width, as the CUDA-graph decode path pads its table to max_seq_len."""
    bt = torch.full((len(lens), cols), perm.numel(), dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        bt[i, :nb] = perm[at:at + nb]
        at += nb
    return bt.to(device)


def bench_padded(bw, rows, select_attention, variant="ours"):
    """Mixed lengths in one batch, the block table as wide as the longest sequence or padded to
    a max_seq_len (as the CUDA-graph decode path pads it): time and floor of the real lengths."""
    gen = torch.Generator().manual_seed(1)
    for name, b, hq, hkv in PADDED_SHAPES:
        for dist, lo, hi in PADDED_LENGTHS:
            if dist.startswith("one long"):
                lens = [lo] * (b - 1) + [hi]
            else:
                lens = torch.randint(lo, hi + 1, (b,), generator=gen).tolist()
            longest = -(-max(lens) // BLOCK_SIZE)
            kc, vc, perm = _paged_kv(lens, hkv, D_HEAD, torch.float16, gen)
            q = torch.randn(b, hq, D_HEAD, device="cuda", dtype=torch.float16)
            seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
            out = torch.empty_like(q)
            for width in PADDED_WIDTHS:
                cols = longest if width is None else width // BLOCK_SIZE
                bt = _block_table(lens, perm, cols)
                shape = {"name": name, "B": b, "Hq": hq, "Hkv": hkv, "D": D_HEAD, "block_size": BLOCK_SIZE,
                         "lengths": dist, "min_len": min(lens), "max_len": max(lens), "mean_len": sum(lens) / b,
                         "table_tokens": cols * BLOCK_SIZE}
                add = _row_adder(rows, "attention_padded", shape)
                for dens in (0.25, 0.5, 1.0):
                    kmax = max(1, round(dens * hkv))
                    ht = _head_table(b, hkv, kmax, gen)
                    floor = sum(lens) * kmax * D_HEAD * 2 * 2 / (bw * 1e12) * 1e3
                    # an older module (--compare-module) plans by itself
                    kw = {"plan": runtime_plan(lens, kmax)[0]} if variant == "ours" else {}
                    ms, extra = _try_bench(lambda: select_attention(q, kc, vc, bt, seq_lens, ht, D_HEAD**-0.5,
                                                                    out=out, **kw))
                    add(variant, kmax / hkv, ms, extra, floor_ms=floor)
                    print(f"{name} {dist} width {cols * BLOCK_SIZE} d {kmax / hkv:.2f} {variant}: {ms:.3f} ms, "
                          f"{100 * floor / ms:.0f}% of floor", flush=True)
            del kc, vc
            torch.cuda.empty_cache()


def bench_mlp(name, d, n, ms_list, fracs, bw, rows, sweep_configs=()):
    from kernels.gather_gemm import GemmConfig, gather_fc1, gather_fc2

    gen = torch.Generator(device="cuda").manual_seed(1)
    w1 = torch.randn(n, d, device="cuda", dtype=torch.float16, generator=gen) / d**0.5
    w2 = torch.randn(d, n, device="cuda", dtype=torch.float16, generator=gen) / n**0.5  # fc2.weight
    w2t = w2.T.contiguous()  # made once at load, as the runtime does
    b1 = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
    b2 = torch.randn(d, device="cuda", dtype=torch.float16, generator=gen)
    for m in ms_list:
        x = torch.randn(m, d, device="cuda", dtype=torch.float16, generator=gen)
        add = _row_adder(rows, "mlp", {"name": name, "M": m, "d": d, "N": n})
        add("cublas_dense", 1.0, *_try_bench(lambda: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)))
        for frac in fracs:
            k = int(n * frac) // 16 * 16
            idx = torch.randperm(n, device="cuda", generator=gen)[:k].int()
            real = k / n
            add("floor", real, 2 * k * d * 2 / (bw * 1e12) * 1e3)
            add("ours", real, *_try_bench(lambda: gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)))
            if m == 64 and frac == 0.1:  # a target row: time it again (spread)
                add("ours_rerun", real, *_try_bench(lambda: gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)))
            ii = idx.long()
            add("gather_cublas", real, *_try_bench(lambda: F.linear(x, w1[ii], b1[ii]).relu_() @ w2t[ii] + b2))
            h = gather_fc1(x, w1, idx, b1)
            for which, cfg in sweep_configs if m == 64 and frac in (0.1, 1.0) else ():
                c = None if cfg is None else GemmConfig(*cfg)
                if which == "fc1":
                    fn = lambda: gather_fc1(x, w1, idx, b1, config=c)  # noqa: E731
                else:
                    fn = lambda: gather_fc2(h, w2t, idx, b2, config=c)  # noqa: E731
                t, err = _try_bench(fn)
                add("sweep", real, t, err, config={"kernel": which, "cfg": cfg or "default"})


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _print_table(data: dict) -> None:
    print(f"device {data['device']}  copy {data['copy_TBps']:.2f} TB/s  {data['versions']}")
    groups: dict = {}
    for r in data["rows"]:
        if r["variant"] == "sweep":
            continue
        key = (r["op"], json.dumps(r["shape"], sort_keys=True))
        groups.setdefault(key, []).append(r)
    for (op, shape), rs in groups.items():
        dense = [r["ms"] for r in rs if r["variant"] in ("sdpa_dense", "cublas_dense")][0]
        s = json.loads(shape)
        print(f"\n{op} {s}  dense {dense:.4f} ms")
        print(f"{'density':>8} {'ours':>8} {'floor':>8} {'gather':>8} {'dense/ours':>10} {'floor/ours':>10}"
              f" {'rerun':>8}")
        by_d: dict = {}
        for r in rs:
            by_d.setdefault(round(r["density"], 4), {})[r["variant"]] = r["ms"]
        for dens, vs in sorted(by_d.items()):
            if "ours" not in vs:
                continue
            gather = vs.get("gather_sdpa", vs.get("gather_cublas", float("nan")))
            print(f"{dens:8.3f} {vs['ours']:8.4f} {vs['floor']:8.4f} {gather:8.4f} "
                  f"{dense / vs['ours']:10.2f} {vs['floor'] / vs['ours']:10.2f}"
                  f" {vs.get('ours_rerun', float('nan')):8.4f}")
        for r in rs:
            if "max_err_vs_sdpa" in r:
                print(f"  ours vs SDPA dense at density 1: max abs err {r['max_err_vs_sdpa']:.3g}, "
                      f"rel (L2) err {r['rel_err_vs_sdpa']:.3g}")
    sweeps = [r for r in data["rows"] if r["variant"] == "sweep"]
    checked = [r for r in data["rows"] if "max_err" in r]
    if checked:
        worst = max(r["max_err"] for r in checked)  # NaN compares False: count those separately
        bad = [r for r in checked if not (r["max_err"] <= 5e-3 and r["unselected_zero"])]
        print(f"\nsweep checks vs gathered SDPA: {len(checked)} launches, worst max abs err {worst:.3g}, "
              f"{len(bad)} failed (err > 5e-3, NaN, or an unselected head not 0)")
    if any(r["op"] == "attention" for r in sweeps):
        print("\nattention sweep: ms by split count (runs up to 5) or chunk tokens")
        line: dict = {}
        for r in sweeps:
            if r["op"] != "attention":
                continue
            s = r["shape"]
            key = (s["name"], s["B"], round(r["density"], 3), r["pairs"], r["config"]["label"])
            cut = r["config"].get("chunk_tokens", r["config"].get("num_splits"))
            line.setdefault(key, []).append(f"{cut}:{r['ms']:.4f}")
        for (nm, b, dens, pairs, label), cells in line.items():
            print(f"{nm:14} B {b:3} d {dens:5.3f} pairs {pairs:5} {label:10} " + " ".join(cells))
    for r in sweeps:
        if r["op"] == "mlp":
            print(f"{r['op']:9} {r['shape']['name']:14} {r['shape'].get('M')} {r.get('error', '')}"
                  f"d={r['density']:.3f} {r['config']} {r['ms']:.4f}")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("attention", s[0], "B") for s in ATTN_SHAPES] + [("mlp", "opt-66b", 64), ("mlp", "opt-6.7b", 64)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (op, name, extra) in zip(axes, panels):
        rs = [r for r in data["rows"] if r["op"] == op and r["shape"]["name"] == name
              and (op == "attention" and r["shape"]["B"] == 64 or op == "mlp" and r["shape"]["M"] == extra)]
        for variant, style in (("ours", "o-"), ("floor", "k--"), ("gather_sdpa", "s:"), ("gather_cublas", "s:")):
            pts = sorted((r["density"], r["ms"]) for r in rs if r["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), style, label=variant)
        top = None
        for r in rs:
            if r["variant"] in ("sdpa_dense", "cublas_dense"):
                ax.axhline(r["ms"], color="r", label=r["variant"])
                top = 1.6 * r["ms"]  # the gather baselines run far above dense: clip them
        s = rs[0]["shape"] if rs else {}
        ax.set_title(f"{op} {name} " + ("B=64" if op == "attention" else f"M={extra}") + f" (N={s.get('N')})")
        ax.set_xlabel("density (heads or neurons)")
        ax.set_ylabel("ms (median)")
        ax.set_ylim(0, top)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['device']}, fp16; floor = bytes / {data['copy_TBps']:.2f} TB/s copy bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for kernels.json (default benchmarks/results/<gpu>)")
    ap.add_argument("--plot-from", type=Path, help="only print the table and plot this kernels.json")
    ap.add_argument("--sweep", action="store_true", help="also time attention split counts and block configs")
    ap.add_argument("--mlp-sweep", action="store_true", help="also time alternative gather-GEMM configs")
    ap.add_argument("--padded", action="store_true",
                    help="only mixed lengths with padded block tables (writes kernels_padded.json)")
    ap.add_argument("--compare-module", default=None,
                    help="with --padded: also time this module's select_attention (variant 'compare')")
    ap.add_argument("--grid", action="store_true",
                    help="only the serving-conditions grid (benchmarks/kernel_grid.py; writes kernels_grid.json/.png)")
    ap.add_argument("--smoke", action="store_true", help="with --grid: a few tiny cases on the CPU (torch references)")
    ap.add_argument("--only", choices=("attention", "mlp"), help="with --grid: time one op's cases")
    args = ap.parse_args()
    if args.smoke and not args.grid:
        ap.error("--smoke goes with --grid")
    if args.plot_from:
        data = json.loads(args.plot_from.read_text())
        if data.get("grid"):
            from benchmarks.kernel_grid import plot_from

            plot_from(args.plot_from)
            return
        _print_table(data)
        plot(data, args.plot_from.with_name("kernels.png"))
        return
    if args.grid and args.smoke:
        from benchmarks.kernel_grid import run_grid

        run_grid(args.out or Path("benchmarks/results/cpu"), smoke=True)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_bench.py needs a CUDA GPU (use --plot-from to plot saved results, "
                 "--grid --smoke for the grid's CPU smoke run)")
    import triton

    device = torch.cuda.get_device_name()
    out_dir = args.out or Path("benchmarks/results") / _slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.grid:
        from benchmarks.kernel_grid import run_grid

        run_grid(out_dir, smoke=False, only=args.only)
        return
    bw = _copy_tbps()
    rows: list = []
    versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if args.padded:
        from kernels.select_attention import select_attention

        bench_padded(bw, rows, select_attention)
        if args.compare_module:
            import importlib

            bench_padded(bw, rows, importlib.import_module(args.compare_module).select_attention, "compare")
        data = {"device": device, "versions": versions, "copy_TBps": bw, "rows": rows}
        (out_dir / "kernels_padded.json").write_text(json.dumps(data, indent=1))
        return
    for name, b, hq, hkv, n in ATTN_SHAPES:
        bench_attention(name, b, hq, hkv, n, ATTN_DENSITIES, bw, rows, args.sweep)
        torch.cuda.empty_cache()  # hand the caches of this shape back before the next one
        print(f"attention {name} done", flush=True)
    for b in BATCH_SWEEP:
        bench_attention("llama2-7b", b, 32, 32, 3968, BATCH_DENSITIES, bw, rows, args.sweep)
        torch.cuda.empty_cache()
    print("batch sweep done", flush=True)
    # kernel, GemmConfig fields (block_m, block_n, block_k, num_warps, num_stages, split_k); None = default
    mlp_sweep = [(kern, c) for kern in ("fc1", "fc2") for c in (
        None, (64, 16, 128, 4, 4, 1), (64, 128, 64, 4, 4, 1), (64, 64, 128, 4, 4, 1), (64, 64, 128, 4, 4, 2),
        (64, 64, 128, 4, 4, 4), (64, 32, 256, 4, 3, 1), (64, 32, 128, 4, 4, 2), (64, 64, 64, 4, 5, 1), (64, 128, 64, 4, 4, 2))] if args.mlp_sweep else []
    for name, d, n in MLP_SHAPES:
        bench_mlp(name, d, n, MLP_MS, MLP_FRACS, bw, rows, mlp_sweep)
        print(f"mlp {name} done", flush=True)
    data = {
        "device": device,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "copy_TBps": bw,
        "rows": rows,
    }
    (out_dir / "kernels.json").write_text(json.dumps(data, indent=1))
    _print_table(data)
    try:
        plot(data, out_dir / "kernels.png")
    except ImportError:
        print("matplotlib missing here: plot later with --plot-from", out_dir / "kernels.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's kernels package
    main()
