"""Device pieces every pass of the batched draw (kernels/sample_tokens.py) shares: a logit's key,
the counter-based hash behind the Gumbel noise, a row's max reduced from its chunks' partials,
the key threshold in force, and the Gumbel-max over one chunk.

key = bits(0 - x), x = (logit - max) / T <= 0: an int32 order equal to the float order, so a
threshold is a key. Masses are summed in 2^-44 fixed point (int64): exact and associative, so a
threshold does not depend on the chunking or on the order programs run in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KEY_INF = 0x7F800000  # bits of +inf: the key of x = -inf, the largest key a threshold needs
KEY_INF_C = tl.constexpr(KEY_INF)  # the same, readable inside kernels (a GPU compile rejects plain globals)
FIX = tl.constexpr(17592186044416.0)  # 2^44: exp(x) <= 1 in fixed point; a row's sum stays < 2^61


def check_inputs(logits: torch.Tensor, params: tuple[torch.Tensor, ...], kernel: bool) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be (R, V) float32, got {tuple(logits.shape)} {logits.dtype}")
    R = logits.shape[0]
    names = ("temperature", "top_k", "top_p", "min_p", "seeds", "counters")
    dtypes = (torch.float32, torch.int32, torch.float32, torch.float32, torch.int64, torch.int64)
    for name, t, dtype in zip(names, params, dtypes):
        if t.shape != (R,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be ({R},) {dtype} on {logits.device}, got {tuple(t.shape)} {t.dtype} "
                             f"on {t.device}")
    if kernel and logits.stride(1) != 1:
        raise ValueError("logits need a contiguous last dim")


@triton.jit
def fmix32(h):
    # murmur3's finaliser in int64 lanes, masked to 32 bits after each multiply: the same bits
    # as the torch reference (which has no uint32 arithmetic).
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def row_seed_key(seed_ptr, counter_ptr, row):
    seed = tl.load(seed_ptr + row)
    counter = tl.load(counter_ptr + row)
    row_key = fmix32(((seed & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF)
    row_key = fmix32(row_key ^ ((seed >> 32) & 0xFFFFFFFF))
    return fmix32(row_key ^ (counter & 0xFFFFFFFF))


@triton.jit
def row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD: tl.constexpr):
    """Reduce the max pass's partials: (max, first index of the max, NaN count)."""
    cs = tl.arange(0, CPAD)
    cm = cs < C
    pm = tl.load(pm_ptr + row * C + cs, mask=cm, other=float("-inf"))
    pa = tl.load(pa_ptr + row * C + cs, mask=cm, other=2147483647)
    pn = tl.load(pn_ptr + row * C + cs, mask=cm, other=0)
    m = tl.max(pm, axis=0)
    arg = tl.min(tl.where(pm == m, pa, 2147483647), axis=0)  # chunks are in index order
    return m, arg, tl.sum(pn, axis=0)


@triton.jit
def kappa_in(kappa_ptr, min_p_ptr, row, READ: tl.constexpr):
    """The key threshold before this search: the previous search's result, else min-p's."""
    if READ:
        kappa = tl.load(kappa_ptr + row)
    else:
        min_p = tl.load(min_p_ptr + row)
        kappa = tl.full([], KEY_INF_C, tl.int64)
        if min_p > 0.0:
            kappa = (0.0 - tl.log(min_p)).to(tl.int32, bitcast=True).to(tl.int64)
    return kappa


@triton.jit
def tile_keys(base, idx, end, m, temp, kappa, lim):
    """Of the tokens idx (those < end): x = (logit - max) / T, their keys, and which are kept
    (key <= kappa and key < lim)."""
    valid = idx < end
    x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
    key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
    return x, key, valid & (key <= kappa) & (key < lim)


@triton.jit
def kept_mass(x, inside):
    """Fixed-point mass of the tokens `inside`."""
    return tl.sum(tl.where(inside, (tl.exp(x) * FIX).to(tl.int64), 0), axis=0)


@triton.jit
def draw_chunk(base, seed_ptr, counter_ptr, row, m, temp, kappa, lim, begin, end,
               MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Gumbel-max over the tokens of [begin, end) with key <= kappa and key < lim: (best value,
    its first index, its key, and when MASS their fixed-point mass)."""
    row_key = row_seed_key(seed_ptr, counter_ptr, row)
    offs = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    best_key = tl.full([], 0, tl.int64)
    mass = tl.full([], 0, tl.int64)
    for start in range(begin, end, BLOCK):
        idx = start + offs
        x, key, inside = tile_keys(base, idx, end, m, temp, kappa, lim)
        h = fmix32(row_key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
        h = fmix32((h + row_key) & 0xFFFFFFFF)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
        val = tl.where(inside, x - tl.log(-tl.log(u)), float("-inf"))
        bv = tl.max(val, axis=0)
        bi = tl.min(tl.where(val == bv, idx, 2147483647), axis=0)
        bk = tl.sum(tl.where(idx == bi, key, 0), axis=0)
        best_idx = tl.where(bv > best, bi, best_idx)
        best_key = tl.where(bv > best, bk, best_key)
        best = tl.maximum(best, bv)
        if MASS:
            mass += kept_mass(x, inside)
    return best, best_idx, best_key, mass
