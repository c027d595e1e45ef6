"""The batched draw (kernels/sample_tokens.py) on one GPU: tokens equal to the torch reference,
and the chunked kernel against the one-program-per-row kernel.

    python3 benchmarks/sampling_bench.py            # writes results/<gpu>/sampling.json

Checks: B in (1, 8, 64, 256) x V in (32000, 128256) x modes (greedy, T=1, top-k 50, top-p 0.9,
top-k 50 + top-p 0.9, min-p 0.05, mixed rows), logits ~ N(0, 2^2); tokens of the chunked kernel,
the rowwise kernel and the reference. Timing: median of CUDA-event times over 50 calls after
warm-up (each call with its host-side launches), the draw replayed from a CUDA graph (its GPU
time alone), and Sampler.sample wall time with its sync, with its draw graph and without.

Prediction (before the first GPU run), B 64 / V 128256 on an H100: rowwise 0.29 / 3.5 / 6.4 ms
(greedy / T1 top-p / top-k + top-p) -> chunked ~0.02 / ~0.12 / ~0.2 ms: a max pass ~10 us,
4 chunked search passes per threshold of which two read the whole row (~15-20 us each, the
16-way sums are ALU work), the per-row finish over ~100 survivors, a Gumbel pass ~15 us, and
~10-13 launches of a few us each.

Outcome (H100 80GB HBM3, results/nvidia-h100-80gb-hbm3/sampling.json): tokens equal to the
reference in every check (B 1-256, V 32000 / 128256, all modes). B 64 / V 128256, rowwise ->
chunked: greedy 0.309 -> 0.146 ms, T1 top-p 0.9 3.70 -> 0.88 ms, top-k 50 + top-p 0.9 6.60 ->
1.06 ms (4-7x, but 3-5x over the prediction). The time is host-side launch cost, not GPU
work: all-greedy rows without the hints (11 launches that do nothing) take 0.96 ms, T1 with
no filter (3 launches) 0.15 ms, i.e. ~60-80 us per Triton launch of these many-argument
kernels, so the draw is launch-bound at every B up to 64. Next: fewer arguments per launch
(one workspace pointer and offsets), fewer launches (the per-row finish folded into the last
pass through a last-program-per-row counter), or the fixed launch sequence replayed from a
CUDA graph per (R, V, hints).

Top-p chain (the draw checked against the top-p mass, kernels/sample_tokens.py). Prediction,
B 64 / V 128256, T1 top-p 0.9, graph replay: 0.67 ms (two 16-way searches' worth of passes,
ALU-bound on int64 compares) -> ~0.1 ms: a max pass, one draw pass with the kept mass (~40 us,
the hash), one mass pass (~15 us), later rounds for the ~10% of rows whose first draw falls
outside the set, and the gated search's launches doing nothing. Outcome (same GPU, rounds as
`graph_replay_ms_by_chain_rounds`): 0.668 -> 0.141 ms at 3 rounds; top-p 0.5 0.505 -> 0.384 ms
at 3 rounds, 0.234 at 6 (rows left to the search cost ~0.15 ms however few); B 256 top-p 0.9
2.25 -> 0.53 ms. Top-k 50 + top-p 0.9 stays ~0.67 ms: top-k's search is the rest.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.sample_tokens import sample_tokens, sample_tokens_ref  # noqa: E402
from kernels.sample_tokens_rowwise import sample_tokens_rowwise  # noqa: E402

MODES = {
    "greedy": dict(temperature=0.0),
    "T1": dict(temperature=1.0),
    "T1 top-k 50": dict(temperature=1.0, top_k=50),
    "T1 top-p 0.9": dict(temperature=1.0, top_p=0.9),
    "T1 top-p 0.5": dict(temperature=1.0, top_p=0.5),
    "T1 top-k 50 top-p 0.9": dict(temperature=1.0, top_k=50, top_p=0.9),
    "T0.7 min-p 0.05": dict(temperature=0.7, min_p=0.05),
    "mixed": None,
}
MIX = [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9), dict(temperature=0.8, top_k=40, top_p=0.95),
       dict(temperature=1.2, min_p=0.1), dict(temperature=1.0, top_k=1), dict(temperature=0.5, top_k=200, top_p=0.5)]


def make(B: int, V: int, mode: str, dev: str, seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    gen = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(B, V, device=dev, generator=gen) * 2
    rows = [MODES[mode] or MIX[i % len(MIX)] for i in range(B)]
    params = (torch.tensor([r.get("temperature", 1.0) for r in rows], device=dev),
              torch.tensor([r.get("top_k", 0) for r in rows], dtype=torch.int32, device=dev),
              torch.tensor([r.get("top_p", 1.0) for r in rows], device=dev),
              torch.tensor([r.get("min_p", 0.0) for r in rows], device=dev),
              torch.arange(B, dtype=torch.int64, device=dev) * 1000003 + seed,
              torch.full((B,), 17, dtype=torch.int64, device=dev))
    return logits, params


def hints(params: tuple[torch.Tensor, ...], V: int) -> dict:
    temp, top_k, top_p = (p.cpu() for p in params[:3])
    hot = temp > 0
    return {"any_hot": bool(hot.any()), "any_top_k": bool((hot & (top_k > 0) & (top_k < V)).any()),
            "any_top_p": bool((hot & (top_p < 1)).any())}


def event_ms(fn, iters: int = 50) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sampler_ms(B: int, V: int, mode: str, graph_rows: int, iters: int = 50) -> tuple[float, bool]:
    """Sampler.sample wall time (its D2H copy syncs) and whether its tokens equal the reference."""
    from polar_dist.engine.sampling import SampleRow, Sampler, SamplingParams

    sampler = Sampler(V, torch.device("cuda"), use_kernel=True, graph_rows=graph_rows)
    logits, _ = make(B, V, mode, "cuda")
    rows = [SampleRow(SamplingParams(**(MODES[mode] or MIX[i % len(MIX)])), seed=i, counter=5) for i in range(B)]
    for _ in range(5):
        sampler.sample(logits, rows)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler.sample(logits, rows)
        times.append(time.perf_counter() - t0)
    dev = logits.device
    ref = sample_tokens_ref(logits, *(torch.tensor([getattr(r.params, f) for r in rows], dtype=t, device=dev)
                                      for f, t in (("temperature", torch.float32), ("top_k", torch.int32),
                                                   ("top_p", torch.float32), ("min_p", torch.float32))),
                            torch.tensor([r.seed for r in rows], device=dev),
                            torch.tensor([r.counter for r in rows], device=dev))
    return statistics.median(times) * 1e3, sampler.sample(logits, rows).token_ids == ref.tolist()


def graph_ms(logits: torch.Tensor, params: tuple[torch.Tensor, ...], h: dict, **kw: int) -> float:
    """CUDA-event time of the draw replayed from a CUDA graph: its GPU time, no launch cost."""
    sample_tokens(logits, *params, **h, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_tokens(logits, *params, **h, **kw)
    return event_ms(graph.replay)


def main() -> None:
    dev = "cuda"
    name = torch.cuda.get_device_name()
    result: dict = {"device": name, "torch": torch.__version__, "checks": [], "timing": []}
    bad = 0
    for V in (32000, 128256):
        for B in (1, 8, 64, 256):
            for mode in MODES:
                logits, params = make(B, V, mode, dev, seed=B + V)
                ref = sample_tokens_ref(logits, *params)
                new = sample_tokens(logits, *params, **hints(params, V))
                new_all = sample_tokens(logits, *params)
                old = sample_tokens_rowwise(logits, *params)
                row = {"B": B, "V": V, "mode": mode, "new_eq_ref": int((new == ref).sum()),
                       "new_nohint_eq_ref": int((new_all == ref).sum()), "old_eq_ref": int((old == ref).sum())}
                bad += (row["new_eq_ref"] != B) + (row["new_nohint_eq_ref"] != B)
                result["checks"].append(row)
                if row["new_eq_ref"] != B or row["old_eq_ref"] != B:
                    print("mismatch", row, flush=True)
    result["all_equal"] = bad == 0
    print("all_equal", bad == 0, flush=True)
    for V, B in ((128256, 64), (128256, 1), (128256, 8), (128256, 256), (32000, 64)):
        for mode in ("greedy", "T1 top-p 0.9", "T1 top-p 0.5", "T1 top-k 50 top-p 0.9", "T1", "mixed"):
            logits, params = make(B, V, mode, dev)
            h = hints(params, V)
            row = {"B": B, "V": V, "mode": mode,
                   "rowwise_ms": event_ms(lambda: sample_tokens_rowwise(logits, *params), 20 if B >= 64 else 50),
                   "chunked_ms": event_ms(lambda: sample_tokens(logits, *params, **h)),
                   "chunked_nohint_ms": event_ms(lambda: sample_tokens(logits, *params)),
                   "graph_replay_ms": graph_ms(logits, params, h)}
            if h["any_top_p"]:  # the top-p chain's rounds; 0 = the threshold search alone
                row["graph_replay_ms_by_chain_rounds"] = {r: graph_ms(logits, params, h, chain_rounds=r)
                                                          for r in (0, 1, 2, 3, 4, 6, 8)}
            if B == 64 and V == 128256:
                row["sampler_sample_ms"], row["sampler_eq_ref"] = sampler_ms(B, V, mode, graph_rows=B)
                row["sampler_direct_ms"], _ = sampler_ms(B, V, mode, graph_rows=0)
            result["timing"].append(row)
            print(json.dumps(row), flush=True)
    slug = name.lower().replace(" ", "-")
    out = Path(__file__).resolve().parent / "results" / slug / "sampling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
