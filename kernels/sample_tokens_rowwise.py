"""The one-program-per-row draw: the same tokens as kernels/sample_tokens.py's chunked draw,
kept as the comparison row of benchmarks/sampling_bench.py (it runs every pass over a row in one
program, so a batch of fewer rows than SMs leaves most of the GPU idle).

    tokens = sample_tokens_rowwise(logits, temperature, top_k, top_p, min_p, seeds, counters)

Rules, thresholds and noise: kernels/sample_tokens.py's docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sample_common import KEY_INF_C, check_inputs, fmix32
from kernels.sample_search import SEARCH_TILE, WAYS


@triton.jit
def _smallest_key(base, V, m, temp, hi, target, MASS: tl.constexpr, BLOCK: tl.constexpr, WAYS: tl.constexpr):
    """Smallest key k in [0, hi] with sum over tokens of w(key <= k) >= target (w = exp(x) when
    MASS, else 1); hi when none is smaller."""
    offs = tl.arange(0, BLOCK)
    ways = tl.arange(0, WAYS).to(tl.int64)
    lo = tl.full([], 0, tl.int64)
    hi = hi.to(tl.int64)
    while lo < hi:
        step = (hi - lo + WAYS) // WAYS  # ceil((hi - lo + 1) / WAYS) >= 1
        cand = tl.minimum(lo + ways * step, hi)  # [WAYS], cand[0] = lo
        acc = tl.zeros([WAYS], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            valid = idx < V
            x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp  # [BLOCK]
            key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
            inside = (key[:, None] <= cand[None, :]) & valid[:, None]  # [BLOCK, WAYS]
            if MASS:
                w = tl.exp(x)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            acc += tl.sum(tl.where(inside, w[:, None], 0.0), axis=0)
        first = tl.min(tl.where(acc >= target, ways, WAYS), axis=0)  # first candidate that holds
        new_hi = tl.where(first < WAYS, tl.sum(tl.where(ways == first, cand, 0), axis=0), hi)
        new_lo = tl.where(first > 0, tl.sum(tl.where(ways == first - 1, cand, 0), axis=0) + 1, lo)
        lo = new_lo
        hi = new_hi
    return hi


@triton.jit
def _sample_tokens_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, counter_ptr, out_ptr,
    V, stride_l,
    BLOCK: tl.constexpr, WAYS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK)
    temp = tl.load(temperature_ptr + row)
    # Pass 1: the max, its first index, and whether any logit is NaN.
    m = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], 0, tl.int32)
    nans = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        l = tl.load(base + idx, mask=idx < V, other=float("-inf"))
        nans += tl.sum((l != l).to(tl.int32), axis=0)
        l = tl.where(l != l, float("-inf"), l)
        bm = tl.max(l, axis=0)
        barg = tl.min(tl.where(l == bm, idx, V), axis=0)
        arg = tl.where(bm > m, barg, arg)
        m = tl.maximum(m, bm)
    token = arg.to(tl.int64)
    # A row with a finite logit draws when hot (an all -inf row's x would be NaN: it gives -1 below).
    if (temp > 0.0) & (m > float("-inf")):
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        kappa = tl.full([], KEY_INF_C, tl.int64)
        if min_p > 0.0:
            kappa = (0.0 - tl.log(min_p)).to(tl.int32, bitcast=True).to(tl.int64)
        if top_k > 0:
            if top_k < V:
                kappa = _smallest_key(base, V, m, temp, kappa, top_k.to(tl.float32), False, BLOCK, WAYS)
        if top_p < 1.0:
            kept_mass = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                valid = idx < V
                x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
                key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
                kept_mass += tl.where(valid & (key <= kappa), tl.exp(x), 0.0)
            target = top_p * tl.sum(kept_mass, axis=0)
            kappa = _smallest_key(base, V, m, temp, kappa, target, True, BLOCK, WAYS)
        # Gumbel-max over the kept set; the row key mixes the seed's two halves and the counter.
        seed = tl.load(seed_ptr + row)
        counter = tl.load(counter_ptr + row)
        row_key = fmix32(((seed & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF)
        row_key = fmix32(row_key ^ ((seed >> 32) & 0xFFFFFFFF))
        row_key = fmix32(row_key ^ (counter & 0xFFFFFFFF))
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            valid = idx < V
            x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
            key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
            h = fmix32(row_key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
            h = fmix32((h + row_key) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
            val = tl.where(valid & (key <= kappa), x - tl.log(-tl.log(u)), float("-inf"))
            bv = tl.max(val, axis=0)
            bi = tl.min(tl.where(val == bv, idx, V), axis=0)
            best_idx = tl.where(bv > best, bi, best_idx)
            best = tl.maximum(best, bv)
        token = best_idx.to(tl.int64)
    bad = (nans > 0) | (m == float("-inf"))
    tl.store(out_ptr + row, tl.where(bad, -1, token))


def sample_tokens_rowwise(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          min_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The one-program-per-row kernel (kept for comparison; same tokens as sample_tokens)."""
    params = (temperature, top_k, top_p, min_p, seeds, counters)
    check_inputs(logits, params, kernel=True)
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R:
        _sample_tokens_kernel[(R,)](logits, *params, out, V, logits.stride(0), BLOCK=SEARCH_TILE, WAYS=WAYS,
                                    num_warps=4)
    return out
