"""Next-token draw for a batch of rows in one launch: temperature, min-p, top-k, top-p and a
seeded Gumbel-max draw, one program per row.

    tokens = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, counters)  # (R,) int64

Row r: x = (logits - max) / T (so x <= 0, the best token at 0). The kept set is, in order:
min-p (x >= log(min_p)), then the top_k largest of those, then the smallest set of the largest
whose probability mass reaches top_p of what is left. Ties at a threshold are all kept (so
top_k = 1 keeps every token tied for the best). The token is argmax over the kept set of
x + g, g = -log(-log(u)) Gumbel noise, which is an exact draw from softmax(x) restricted to
the set. u comes from a counter-based hash of (seed, counter, token id): the same row gets the
same token whatever else is in the batch, and no generator state lives anywhere.
T = 0 is greedy: the first index of the largest logit. A row with a NaN logit, or with every
logit -inf, gives -1.

Why thresholds on keys and no sort: sorting a (64, 128256) float32 batch costs about as much
as the rest of sampling together. Every threshold is instead found by a search over
key = bits(0 - x) (an int32 order that equals the float order for x <= 0): a 16-way search
narrows the key range 16x per pass over the row, so a threshold takes at most 8 passes, each
reading the row from L2. The counts and masses of the 16 candidates come from one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KEY_INF = 0x7F800000  # bits of +inf: the key of x = -inf, the largest key a threshold needs
_KEY_INF = tl.constexpr(KEY_INF)  # the same, readable inside kernels (a GPU compile rejects plain globals)
_M32 = 0xFFFFFFFF
_WAYS = 16  # candidates per search pass: 4 bits of the key per pass
_BLOCK = 256  # logits per tile; the (BLOCK, WAYS) comparison tile is 4096 elements


@triton.jit
def _fmix32(h):
    # murmur3's finaliser in int64 lanes, masked to 32 bits after each multiply: the same bits
    # as the torch reference (which has no uint32 arithmetic).
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


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
        kappa = tl.full([], _KEY_INF, tl.int64)
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
        row_key = _fmix32(((seed & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF)
        row_key = _fmix32(row_key ^ ((seed >> 32) & 0xFFFFFFFF))
        row_key = _fmix32(row_key ^ (counter & 0xFFFFFFFF))
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            valid = idx < V
            x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
            key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
            h = _fmix32(row_key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
            h = _fmix32((h + row_key) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
            val = tl.where(valid & (key <= kappa), x - tl.log(-tl.log(u)), float("-inf"))
            bv = tl.max(val, axis=0)
            bi = tl.min(tl.where(val == bv, idx, V), axis=0)
            best_idx = tl.where(bv > best, bi, best_idx)
            best = tl.maximum(best, bv)
        token = best_idx.to(tl.int64)
    bad = (nans > 0) | (m == float("-inf"))
    tl.store(out_ptr + row, tl.where(bad, -1, token))


def _check(logits: torch.Tensor, params: tuple[torch.Tensor, ...], kernel: bool) -> None:
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


def sample_tokens_rowwise(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          min_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The one-program-per-row kernel (kept for comparison; same tokens as sample_tokens)."""
    params = (temperature, top_k, top_p, min_p, seeds, counters)
    _check(logits, params, kernel=True)
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R:
        _sample_tokens_kernel[(R,)](logits, *params, out, V, logits.stride(0), BLOCK=_BLOCK, WAYS=_WAYS,
                                    num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Chunked version: every pass over a row is split over CH-logit chunks, grid (rows, chunks).
# Per-chunk partials go to small buffers; the next launch reduces them in a fixed order (each of
# its programs redundantly: C x 17 integers), so there is no float atomic and no host sync.
# Masses are summed in 2^-44 fixed point (int64): exact and associative, so a threshold does
# not depend on the chunking or on the order programs run in.
# ---------------------------------------------------------------------------------------------

_FIX = tl.constexpr(17592186044416.0)  # 2^44: exp(x) <= 1 in fixed point; a row's sum stays < 2^61
_NPART = 17  # per chunk and search pass: F at the 16 candidates, then F over the whole range
_PPAD = 32
_CBLOCK = 1024  # logits per tile in the max and Gumbel passes
_ROUNDS = 4  # chunked search passes per threshold; the rest runs per row over the survivors
_PROGRAMS = 1024  # aim for about this many programs per launch


@triton.jit
def _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD: tl.constexpr):
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
def _max_part_kernel(logits_ptr, pm_ptr, pa_ptr, pn_ptr, V, stride_l, CH, C, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    base = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], 2147483647, tl.int32)
    nans = tl.full([], 0, tl.int32)
    end = tl.minimum(c * CH + CH, V)
    for start in range(c * CH, end, BLOCK):
        idx = start + offs
        l = tl.load(base + idx, mask=idx < end, other=float("-inf"))
        nans += tl.sum((l != l).to(tl.int32), axis=0)
        l = tl.where(l != l, float("-inf"), l)
        bm = tl.max(l, axis=0)
        barg = tl.min(tl.where(l == bm, idx, 2147483647), axis=0)
        arg = tl.where(bm > m, barg, arg)
        m = tl.maximum(m, bm)
    arg = tl.where(m == float("-inf"), c * CH, arg)  # an all -inf chunk: its first index
    tl.store(pm_ptr + row * C + c, m)
    tl.store(pa_ptr + row * C + c, arg)
    tl.store(pn_ptr + row * C + c, nans)


@triton.jit
def _kappa_in(kappa_ptr, min_p_ptr, row, READ: tl.constexpr):
    """The key threshold before this search: the previous search's result, else min-p's."""
    if READ:
        kappa = tl.load(kappa_ptr + row)
    else:
        min_p = tl.load(min_p_ptr + row)
        kappa = tl.full([], _KEY_INF, tl.int64)
        if min_p > 0.0:
            kappa = (0.0 - tl.log(min_p)).to(tl.int32, bitcast=True).to(tl.int64)
    return kappa


@triton.jit
def _searching(temp, m, nans, top_k_ptr, top_p_ptr, row, V, MASS: tl.constexpr):
    ok = (temp > 0.0) & (m > float("-inf")) & (nans == 0)
    if MASS:
        ok = ok & (tl.load(top_p_ptr + row) < 1.0)
    else:
        k = tl.load(top_k_ptr + row)
        ok = ok & (k > 0) & (k < V)
    return ok


@triton.jit
def _cands(lo, hi, WAYS: tl.constexpr):
    ways = tl.arange(0, WAYS).to(tl.int64)
    step = (hi - lo + WAYS) // WAYS  # ceil((hi - lo + 1) / WAYS) >= 1
    return tl.minimum(lo + ways * step, hi)  # [WAYS], cand[0] = lo


@triton.jit
def _resolve(lo, hi, below, target, acc, total, top_p, WAYS: tl.constexpr):
    """One step of the search from a pass's sums: acc[j] = F(cand[j]) - below over the range,
    total = F(hi) - below. A negative target is top-p's, set here from the first pass's total."""
    ways = tl.arange(0, WAYS).to(tl.int64)
    if target < 0.0:
        target = top_p.to(tl.float64) * (below + total).to(tl.float64)
    cand = _cands(lo, hi, WAYS)
    F = (below + acc).to(tl.float64)
    first = tl.min(tl.where(F >= target, ways, WAYS), axis=0)  # first candidate that holds
    new_hi = tl.where(first < WAYS, tl.sum(tl.where(ways == first, cand, 0), axis=0), hi)
    new_lo = tl.where(first > 0, tl.sum(tl.where(ways == first - 1, cand, 0), axis=0) + 1, lo)
    new_below = tl.where(first > 0, tl.sum(tl.where(ways == first - 1, below + acc, 0), axis=0), below)
    return new_lo, new_hi, new_below, target


@triton.jit
def _tile_sums(key, keep, cand, MASS: tl.constexpr):
    """F contributions of one tile at the candidates, and over the whole range (int64)."""
    if MASS:
        x = 0.0 - key.to(tl.float32, bitcast=True)
        w = (tl.exp(x) * _FIX).to(tl.int64)
    else:
        w = tl.full(key.shape, 1, tl.int64)
    w = tl.where(keep, w, 0)
    inside = key.to(tl.int64)[:, None] <= cand[None, :]
    return tl.sum(tl.where(inside, w[:, None], 0), axis=0), tl.sum(w, axis=0)


@triton.jit
def _search_pass_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, pm_ptr, pa_ptr, pn_ptr,
    keys_ptr, cnt_ptr, kappa_ptr, st_in_ptr, tg_in_ptr, part_in_ptr, st_out_ptr, tg_out_ptr, part_out_ptr,
    V, stride_l, CH, C,
    FIRST: tl.constexpr, MASS: tl.constexpr, READ_KAPPA: tl.constexpr, CPAD: tl.constexpr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, PPAD: tl.constexpr, NPART: tl.constexpr,
):
    """One pass of a 16-way threshold search over chunk c of a row. The first pass reads the
    logits and keeps (in the chunk's slot of `keys`) the keys <= kappa; later passes read that
    slot and keep, in place, the keys in the search's current range [lo, hi]."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, row, V, MASS):
        top_p = tl.load(top_p_ptr + row)
        if FIRST:
            lo = tl.full([], 0, tl.int64)
            hi = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
            below = tl.full([], 0, tl.int64)
            if MASS:
                target = tl.full([], -1.0, tl.float64)
            else:
                target = tl.load(top_k_ptr + row).to(tl.float64)
        else:
            lo = tl.load(st_in_ptr + row * 3)
            hi = tl.load(st_in_ptr + row * 3 + 1)
            below = tl.load(st_in_ptr + row * 3 + 2)
            target = tl.load(tg_in_ptr + row)
            if lo < hi:
                cs = tl.arange(0, CPAD)
                ps = tl.arange(0, PPAD)
                pmask = (cs[:, None] < C) & (ps[None, :] < NPART)
                part = tl.load(part_in_ptr + (row * C + cs[:, None]) * NPART + ps[None, :], mask=pmask, other=0)
                sums = tl.sum(part, axis=0)  # [PPAD]
                total = tl.sum(tl.where(ps == WAYS, sums, 0), axis=0)
                acc = tl.sum(tl.where(ps[:, None] == tl.arange(0, WAYS)[None, :], sums[:, None], 0), axis=0)
                lo, hi, below, target = _resolve(lo, hi, below, target, acc, total, top_p, WAYS)
        if c == 0:
            tl.store(st_out_ptr + row * 3, lo)
            tl.store(st_out_ptr + row * 3 + 1, hi)
            tl.store(st_out_ptr + row * 3 + 2, below)
            tl.store(tg_out_ptr + row, target)
        acc = tl.zeros([WAYS], dtype=tl.int64)
        tot = tl.full([], 0, tl.int64)
        n_out = tl.full([], 0, tl.int32)
        if lo < hi:
            cand = _cands(lo, hi, WAYS)
            offs = tl.arange(0, BLOCK)
            slot = keys_ptr + row * V + c * CH
            if FIRST:
                base = logits_ptr + row * stride_l
                n_in = tl.minimum(c * CH + CH, V) - c * CH
            else:
                n_in = tl.load(cnt_ptr + row * C + c)
            for start in range(0, n_in, BLOCK):
                i = start + offs
                valid = i < n_in
                if FIRST:
                    x = (tl.load(base + c * CH + i, mask=valid, other=float("-inf")) - m) / temp
                    key = (0.0 - x).to(tl.int32, bitcast=True)
                else:
                    key = tl.load(slot + i, mask=valid, other=0)
                keep = valid & (key.to(tl.int64) >= lo) & (key.to(tl.int64) <= hi)
                a, t = _tile_sums(key, keep, cand, MASS)
                acc += a
                tot += t
                pos = n_out + tl.cumsum(keep.to(tl.int32), axis=0) - 1
                tl.store(slot + pos, key, mask=keep)
                n_out += tl.sum(keep.to(tl.int32), axis=0)
        tl.store(cnt_ptr + row * C + c, n_out)
        ways = tl.arange(0, WAYS)
        tl.store(part_out_ptr + (row * C + c) * NPART + ways, acc)
        tl.store(part_out_ptr + (row * C + c) * NPART + WAYS, tot)


@triton.jit
def _search_finish_kernel(
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, pm_ptr, pa_ptr, pn_ptr,
    keys_ptr, cnt_ptr, kappa_ptr, st_ptr, tg_ptr, part_ptr,
    V, CH, C,
    MASS: tl.constexpr, READ_KAPPA: tl.constexpr, CPAD: tl.constexpr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, PPAD: tl.constexpr, NPART: tl.constexpr,
):
    """Per row: the last chunked pass's step, then the rest of the search over the survivors
    of all chunks' slots; writes kappa (unchanged for a row this search does not apply to)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, row, V, MASS):
        top_p = tl.load(top_p_ptr + row)
        lo = tl.load(st_ptr + row * 3)
        hi = tl.load(st_ptr + row * 3 + 1)
        below = tl.load(st_ptr + row * 3 + 2)
        target = tl.load(tg_ptr + row)
        if lo < hi:
            cs = tl.arange(0, CPAD)
            ps = tl.arange(0, PPAD)
            pmask = (cs[:, None] < C) & (ps[None, :] < NPART)
            part = tl.load(part_ptr + (row * C + cs[:, None]) * NPART + ps[None, :], mask=pmask, other=0)
            sums = tl.sum(part, axis=0)
            total = tl.sum(tl.where(ps == WAYS, sums, 0), axis=0)
            acc = tl.sum(tl.where(ps[:, None] == tl.arange(0, WAYS)[None, :], sums[:, None], 0), axis=0)
            lo, hi, below, target = _resolve(lo, hi, below, target, acc, total, top_p, WAYS)
        offs = tl.arange(0, BLOCK)
        while lo < hi:
            cand = _cands(lo, hi, WAYS)
            acc = tl.zeros([WAYS], dtype=tl.int64)
            tot = tl.full([], 0, tl.int64)
            for c in range(0, C):
                n_in = tl.load(cnt_ptr + row * C + c)
                for start in range(0, n_in, BLOCK):
                    i = start + offs
                    valid = i < n_in
                    key = tl.load(keys_ptr + row * V + c * CH + i, mask=valid, other=0)
                    keep = valid & (key.to(tl.int64) >= lo) & (key.to(tl.int64) <= hi)
                    a, t = _tile_sums(key, keep, cand, MASS)
                    acc += a
                    tot += t
            lo, hi, below, target = _resolve(lo, hi, below, target, acc, tot, top_p, WAYS)
        kappa = hi
    tl.store(kappa_ptr + row, kappa)


@triton.jit
def _row_key(seed_ptr, counter_ptr, row):
    seed = tl.load(seed_ptr + row)
    counter = tl.load(counter_ptr + row)
    row_key = _fmix32(((seed & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF)
    row_key = _fmix32(row_key ^ ((seed >> 32) & 0xFFFFFFFF))
    return _fmix32(row_key ^ (counter & 0xFFFFFFFF))


@triton.jit
def _gumbel_part_kernel(
    logits_ptr, temperature_ptr, min_p_ptr, seed_ptr, counter_ptr, pm_ptr, pa_ptr, pn_ptr, kappa_ptr,
    gv_ptr, gi_ptr, V, stride_l, CH, C,
    READ_KAPPA: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gumbel-max over chunk c's kept tokens: the chunk's best value and its first index."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    if (temp > 0.0) & (m > float("-inf")) & (nans == 0):
        kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        row_key = _row_key(seed_ptr, counter_ptr, row)
        base = logits_ptr + row * stride_l
        offs = tl.arange(0, BLOCK)
        end = tl.minimum(c * CH + CH, V)
        for start in range(c * CH, end, BLOCK):
            idx = start + offs
            valid = idx < end
            x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
            key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
            h = _fmix32(row_key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
            h = _fmix32((h + row_key) & 0xFFFFFFFF)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
            val = tl.where(valid & (key <= kappa), x - tl.log(-tl.log(u)), float("-inf"))
            bv = tl.max(val, axis=0)
            bi = tl.min(tl.where(val == bv, idx, 2147483647), axis=0)
            best_idx = tl.where(bv > best, bi, best_idx)
            best = tl.maximum(best, bv)
    tl.store(gv_ptr + row * C + c, best)
    tl.store(gi_ptr + row * C + c, best_idx)


@triton.jit
def _final_kernel(temperature_ptr, pm_ptr, pa_ptr, pn_ptr, gv_ptr, gi_ptr, out_ptr, C,
                  HOT: tl.constexpr, CPAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    token = arg.to(tl.int64)
    if HOT:
        if tl.load(temperature_ptr + row) > 0.0:
            cs = tl.arange(0, CPAD)
            cm = cs < C
            gv = tl.load(gv_ptr + row * C + cs, mask=cm, other=float("-inf"))
            gi = tl.load(gi_ptr + row * C + cs, mask=cm, other=2147483647)
            best = tl.max(gv, axis=0)
            token = tl.min(tl.where(gv == best, gi, 2147483647), axis=0).to(tl.int64)
    bad = (nans > 0) | (m == float("-inf"))
    tl.store(out_ptr + row, tl.where(bad, -1, token))


def _chunking(R: int, V: int, chunk: int | None) -> tuple[int, int]:
    """(CH, C): chunk length (a multiple of _BLOCK) and chunks per row."""
    if chunk is None:
        per_row = max(1, _PROGRAMS // max(R, 1))
        chunk = triton.cdiv(triton.cdiv(V, per_row), _BLOCK) * _BLOCK
        chunk = max(chunk, 2048)
    CH = max(_BLOCK, triton.cdiv(chunk, _BLOCK) * _BLOCK)
    return CH, triton.cdiv(V, CH)


def sample_tokens(
    logits: torch.Tensor,  # [R, V] float32
    temperature: torch.Tensor,  # [R] float32, 0 = greedy
    top_k: torch.Tensor,  # [R] int32, 0 = off
    top_p: torch.Tensor,  # [R] float32 in (0, 1]
    min_p: torch.Tensor,  # [R] float32 in [0, 1], 0 = off
    seeds: torch.Tensor,  # [R] int64
    counters: torch.Tensor,  # [R] int64: which draw of the sequence this is
    *,
    any_hot: bool = True,  # False: every row is greedy (a promise; skips the draw)
    any_top_k: bool = True,  # False: no row has 0 < top_k < V
    any_top_p: bool = True,  # False: no row has top_p < 1
    chunk: int | None = None,  # logits per chunk (rounded up to 256); None: from the shape
) -> torch.Tensor:  # [R] int64, -1 for a row with NaN logits or none finite
    """Triton, each row split over chunks (see the comment above _FIX); the same tokens as
    sample_tokens_rowwise and sample_tokens_ref. The any_* hints only skip launches that would
    do nothing; a wrong False gives wrong tokens."""
    params = (temperature, top_k, top_p, min_p, seeds, counters)
    _check(logits, params, kernel=True)
    R, V = logits.shape
    dev = logits.device
    out = torch.empty(R, dtype=torch.int64, device=dev)
    if not R:
        return out
    CH, C = _chunking(R, V, chunk)
    CPAD = triton.next_power_of_2(C)
    stride = logits.stride(0)
    ws = torch.empty(R * C * 3, dtype=torch.int32, device=dev)
    pm, pa, pn = ws[:R * C].view(torch.float32), ws[R * C:2 * R * C], ws[2 * R * C:]
    _max_part_kernel[(R, C)](logits, pm, pa, pn, V, stride, CH, C, BLOCK=_CBLOCK, num_warps=4)
    gv = gi = pm  # unused when no row is hot
    if any_hot:
        read = False
        kappa = torch.empty(R, dtype=torch.int64, device=dev)
        if any_top_k or any_top_p:
            keys = torch.empty(R, V, dtype=torch.int32, device=dev)
            cnt = torch.empty(R, C, dtype=torch.int32, device=dev)
            st = torch.empty(2, R, 3, dtype=torch.int64, device=dev)
            tg = torch.empty(2, R, dtype=torch.float64, device=dev)
            part = torch.empty(2, R, C, _NPART, dtype=torch.int64, device=dev)
            common = (logits, temperature, top_k, top_p, min_p, pm, pa, pn, keys, cnt, kappa)
            for mass, on in ((False, any_top_k), (True, any_top_p)):
                if not on:
                    continue
                for r in range(_ROUNDS):
                    i, o = (r + 1) % 2, r % 2
                    _search_pass_kernel[(R, C)](*common, st[i], tg[i], part[i], st[o], tg[o], part[o], V, stride,
                                                CH, C, FIRST=r == 0, MASS=mass, READ_KAPPA=read, CPAD=CPAD,
                                                BLOCK=_BLOCK, WAYS=_WAYS, PPAD=_PPAD, NPART=_NPART, num_warps=4)
                o = (_ROUNDS - 1) % 2
                _search_finish_kernel[(R,)](temperature, top_k, top_p, min_p, pm, pa, pn, keys, cnt, kappa, st[o],
                                            tg[o], part[o], V, CH, C, MASS=mass, READ_KAPPA=read, CPAD=CPAD,
                                            BLOCK=_BLOCK, WAYS=_WAYS, PPAD=_PPAD, NPART=_NPART, num_warps=4)
                read = True
        gws = torch.empty(R * C * 2, dtype=torch.int32, device=dev)
        gv, gi = gws[:R * C].view(torch.float32), gws[R * C:]
        _gumbel_part_kernel[(R, C)](logits, temperature, min_p, seeds, counters, pm, pa, pn, kappa, gv, gi, V,
                                    stride, CH, C, READ_KAPPA=read, CPAD=CPAD, BLOCK=_CBLOCK, num_warps=4)
    _final_kernel[(R,)](temperature, pm, pa, pn, gv, gi, out, C, HOT=any_hot, CPAD=CPAD, num_warps=1)
    return out


def gumbel_noise_ref(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 Gumbel noise, bit for bit the kernel's hash (its logs may differ by an ulp)."""

    def fmix(h: torch.Tensor) -> torch.Tensor:
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & _M32
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & _M32
        return h ^ (h >> 16)

    row_key = fmix(((seeds & _M32) + 0x9E3779B9) & _M32)
    row_key = fmix(row_key ^ ((seeds >> 32) & _M32))
    row_key = fmix(row_key ^ (counters & _M32))[:, None]  # (R, 1)
    ids = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)[None, :]  # (1, V)
    h = fmix(row_key ^ ((ids * 0x9E3779B1) & _M32))
    h = fmix((h + row_key) & _M32)
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def sample_tokens_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      min_p: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference with the kernel's rules; thresholds from a sort instead of a search."""
    _check(logits, (temperature, top_k, top_p, min_p, seeds, counters), kernel=False)
    R, V = logits.shape
    nan = torch.isnan(logits)
    l = logits.masked_fill(nan, float("-inf"))
    m, greedy = l.max(dim=1)  # the first index of the max
    bad = nan.any(dim=1) | (m == float("-inf"))
    hot = temperature > 0
    temp = torch.where(hot, temperature, torch.ones_like(temperature))
    x = (l - m[:, None]) / temp[:, None]  # (R, V) <= 0
    key = (0.0 - x).view(torch.int32).long()  # (R, V)
    kappa = torch.full((R,), KEY_INF, dtype=torch.int64, device=l.device)
    use_min_p = min_p > 0
    if use_min_p.any():
        lmp = (0.0 - torch.log(torch.where(use_min_p, min_p, torch.ones_like(min_p)))).view(torch.int32).long()
        kappa = torch.where(use_min_p, lmp, kappa)
    sorted_keys = torch.sort(key, dim=1).values  # (R, V) ascending: best first
    use_k = (top_k > 0) & (top_k < V)
    if use_k.any():
        kth = sorted_keys.gather(1, (top_k.long().clamp(1, V) - 1)[:, None])[:, 0]
        kappa = torch.where(use_k, torch.minimum(kth, kappa), kappa)
    use_p = top_p < 1
    if use_p.any():
        e = torch.where(key <= kappa[:, None], torch.exp(x), torch.zeros_like(x))
        order = torch.sort(key, dim=1, stable=True).indices
        cum = e.gather(1, order).cumsum(dim=1)  # mass of the best i + 1 tokens
        target = top_p * e.sum(dim=1)
        first = (cum < target[:, None]).sum(dim=1).clamp(max=V - 1)  # first index reaching the target
        kp = sorted_keys.gather(1, first[:, None])[:, 0]
        kappa = torch.where(use_p, torch.minimum(kp, kappa), kappa)
    val = torch.where(key <= kappa[:, None], x + gumbel_noise_ref(seeds, counters, V), float("-inf"))
    drawn = val.argmax(dim=1)  # the first index of the max
    token = torch.where(hot, drawn, greedy)
    return torch.where(bad, torch.full_like(token, -1), token)
