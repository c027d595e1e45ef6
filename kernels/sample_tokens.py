"""Next-token draw for a batch of rows: temperature, min-p, top-k, top-p and a seeded
Gumbel-max draw, each row split over chunks so a batch of any size fills the GPU.

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

Thresholds on keys, no sort: sorting a (64, 128256) float32 batch costs about as much as the
rest of sampling together. key = bits(0 - x) is an int32 order that equals the float order for
x <= 0. Min-p's threshold is a formula; top-k's is found by a 16-way search over keys (4 bits
of the key per pass over the row's survivors).

Top-p without its threshold: with the noise g fixed, the token is t* = argmax over the top-p set
N of x + g. Draw t1 = argmax over the whole kept set D1; if t1 is in N it is t* (N is a subset of
D1). t is in N exactly when the mass of the tokens with smaller keys is below top_p of the kept
mass, one pass over the row. If t1 is not in N, every token of N has a smaller key than t1: draw
t2 over D2 = {key < key(t1)}, which still holds N, and so on. Each draw comes from softmax over a
set whose mass outside N is at most (1 - top_p) of it, so a row needs another round with
probability about 1 - top_p; after CHAIN_ROUNDS rounds the rows still undecided take the
threshold search (16-way, as top-k) and one more draw. The tokens are those of the reference,
which sorts.
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
CHAIN_ROUNDS = 6  # top-p draw + check rounds; measured on an H100 (benchmarks/sampling_bench.py): 3 left
# enough rows to the search at top-p 0.5 to cost 0.38 ms at B 64 against 0.23 ms with 6, while each
# round costs ~4 us once most rows are decided


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
def _searching(temp, m, nans, top_k_ptr, top_p_ptr, pend_ptr, row, V, MASS: tl.constexpr, GATED: tl.constexpr):
    """Whether this threshold search applies to the row (GATED: only to rows the chain left pending)."""
    ok = (temp > 0.0) & (m > float("-inf")) & (nans == 0)
    if GATED:
        ok = ok & (tl.load(pend_ptr + row) != 0)
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
    keys_ptr, cnt_ptr, kappa_ptr, st_in_ptr, tg_in_ptr, part_in_ptr, st_out_ptr, tg_out_ptr, part_out_ptr, pend_ptr,
    V, stride_l, CH, C,
    FIRST: tl.constexpr, MASS: tl.constexpr, READ_KAPPA: tl.constexpr, GATED: tl.constexpr, CPAD: tl.constexpr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, PPAD: tl.constexpr, NPART: tl.constexpr,
):
    """One pass of a 16-way threshold search over chunk c of a row. The first pass reads the
    logits and keeps (in the chunk's slot of `keys`) the keys <= kappa; later passes read that
    slot and keep, in place, the keys in the search's current range [lo, hi]."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, pend_ptr, row, V, MASS, GATED):
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
    keys_ptr, cnt_ptr, kappa_ptr, st_ptr, tg_ptr, part_ptr, pend_ptr,
    V, CH, C,
    MASS: tl.constexpr, READ_KAPPA: tl.constexpr, GATED: tl.constexpr, CPAD: tl.constexpr,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, PPAD: tl.constexpr, NPART: tl.constexpr,
):
    """Per row: the last chunked pass's step, then the rest of the search over the survivors
    of all chunks' slots; writes kappa (unchanged for a row this search does not apply to)."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, pend_ptr, row, V, MASS, GATED):
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
    gv_ptr, gi_ptr, pend_ptr, V, stride_l, CH, C,
    READ_KAPPA: tl.constexpr, GATED: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gumbel-max over chunk c's kept tokens: the chunk's best value and its first index
    (GATED: only for rows the chain left pending)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    ok = (temp > 0.0) & (m > float("-inf")) & (nans == 0)
    if GATED:
        ok = ok & (tl.load(pend_ptr + row) != 0)
    if ok:
        kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        best, best_idx, _, _ = _draw_chunk(logits_ptr + row * stride_l, seed_ptr, counter_ptr, row, m, temp, kappa,
                                        _KEY_INF + 1, c * CH, tl.minimum(c * CH + CH, V), False, BLOCK)
    tl.store(gv_ptr + row * C + c, best)
    tl.store(gi_ptr + row * C + c, best_idx)


@triton.jit
def _draw_chunk(base, seed_ptr, counter_ptr, row, m, temp, kappa, lim, begin, end,
                MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Gumbel-max over the tokens of [begin, end) with key <= kappa and key < lim: (best value,
    its first index, its key, and when MASS their fixed-point mass)."""
    row_key = _row_key(seed_ptr, counter_ptr, row)
    offs = tl.arange(0, BLOCK)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    best_key = tl.full([], 0, tl.int64)
    mass = tl.full([], 0, tl.int64)
    for start in range(begin, end, BLOCK):
        idx = start + offs
        valid = idx < end
        x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
        key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
        inside = valid & (key <= kappa) & (key < lim)
        h = _fmix32(row_key ^ ((idx.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
        h = _fmix32((h + row_key) & 0xFFFFFFFF)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # (0, 1), 24 bits
        val = tl.where(inside, x - tl.log(-tl.log(u)), float("-inf"))
        bv = tl.max(val, axis=0)
        bi = tl.min(tl.where(val == bv, idx, 2147483647), axis=0)
        bk = tl.sum(tl.where(idx == bi, key, 0), axis=0)
        best_idx = tl.where(bv > best, bi, best_idx)
        best_key = tl.where(bv > best, bk, best_key)
        best = tl.maximum(best, bv)
        if MASS:
            mass += tl.sum(tl.where(inside, (tl.exp(x) * _FIX).to(tl.int64), 0), axis=0)
    return best, best_idx, best_key, mass


@triton.jit
def _mass_below(base, row, m, temp, kappa, lim, begin, end, BLOCK: tl.constexpr):
    """Fixed-point mass of the tokens of [begin, end) with key <= kappa and key < lim."""
    offs = tl.arange(0, BLOCK)
    mass = tl.full([], 0, tl.int64)
    for start in range(begin, end, BLOCK):
        idx = start + offs
        valid = idx < end
        x = (tl.load(base + idx, mask=valid, other=float("-inf")) - m) / temp
        key = (0.0 - x).to(tl.int32, bitcast=True).to(tl.int64)
        inside = valid & (key <= kappa) & (key < lim)
        mass += tl.sum(tl.where(inside, (tl.exp(x) * _FIX).to(tl.int64), 0), axis=0)
    return mass


# Top-p chain state per row, (active, lim, cand, ckey) int64 + the target (float64), written by
# each launch's chunk-0 program into the buffer the next launch reads (two buffers, alternating).
@triton.jit
def _chain_draw_kernel(
    logits_ptr, temperature_ptr, min_p_ptr, seed_ptr, counter_ptr, pm_ptr, pa_ptr, pn_ptr, kappa_ptr,
    st_in_ptr, tg_in_ptr, pz_in_ptr, st_out_ptr, tg_out_ptr, pz_out_ptr, gv_ptr, gi_ptr, gk_ptr,
    V, stride_l, CH, C,
    FIRST: tl.constexpr, READ_KAPPA: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """A draw round over chunk c. First: every hot row draws over its kept set, and the kept mass
    is summed (for the target). Later: the previous check decides; a row whose candidate is in
    the top-p set is done, the others draw again below the candidate's key."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    if FIRST:
        active = ((temp > 0.0) & (m > float("-inf")) & (nans == 0)).to(tl.int64)
        lim = tl.full([], _KEY_INF + 1, tl.int64)
        cand = tl.full([], -1, tl.int64)
        ckey = tl.full([], 0, tl.int64)
        target = tl.full([], -1.0, tl.float64)
    else:
        active = tl.load(st_in_ptr + row * 4)
        lim = tl.load(st_in_ptr + row * 4 + 1)
        cand = tl.load(st_in_ptr + row * 4 + 2)
        ckey = tl.load(st_in_ptr + row * 4 + 3)
        target = tl.load(tg_in_ptr + row)
        if active != 0:
            cs = tl.arange(0, CPAD)
            below = tl.sum(tl.load(pz_in_ptr + row * C + cs, mask=cs < C, other=0), axis=0)
            if below.to(tl.float64) < target:
                active = tl.full([], 0, tl.int64)  # cand is in the top-p set: it is the token
            else:
                lim = ckey
    if c == 0:
        tl.store(st_out_ptr + row * 4, active)
        tl.store(st_out_ptr + row * 4 + 1, lim)
        tl.store(st_out_ptr + row * 4 + 2, cand)
        tl.store(st_out_ptr + row * 4 + 3, ckey)
        tl.store(tg_out_ptr + row, target)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    best_key = tl.full([], 0, tl.int64)
    mass = tl.full([], 0, tl.int64)
    if active != 0:
        kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        best, best_idx, best_key, mass = _draw_chunk(logits_ptr + row * stride_l, seed_ptr, counter_ptr, row, m,
                                                     temp, kappa, lim, c * CH, tl.minimum(c * CH + CH, V), FIRST,
                                                     BLOCK)
    tl.store(gv_ptr + row * C + c, best)
    tl.store(gi_ptr + row * C + c, best_idx)
    tl.store(gk_ptr + row * C + c, best_key)
    if FIRST:
        tl.store(pz_out_ptr + row * C + c, mass)


@triton.jit
def _chain_check_kernel(
    logits_ptr, temperature_ptr, top_p_ptr, min_p_ptr, pm_ptr, pa_ptr, pn_ptr, kappa_ptr,
    st_in_ptr, tg_in_ptr, gv_ptr, gi_ptr, gk_ptr, pz_kept_ptr, st_out_ptr, tg_out_ptr, pz_out_ptr,
    V, stride_l, CH, C,
    FIRST: tl.constexpr, READ_KAPPA: tl.constexpr, CPAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """A check round over chunk c: the row's candidate is the previous draw's winner; sum the
    mass of the kept tokens with smaller keys (the next draw compares it with the target). First:
    the target is top_p of the kept mass, and a row without top-p is done with its draw."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    temp = tl.load(temperature_ptr + row)
    m, arg, nans = _row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    active = tl.load(st_in_ptr + row * 4)
    lim = tl.load(st_in_ptr + row * 4 + 1)
    cand = tl.load(st_in_ptr + row * 4 + 2)
    ckey = tl.load(st_in_ptr + row * 4 + 3)
    target = tl.load(tg_in_ptr + row)
    base = logits_ptr + row * stride_l
    if active != 0:
        cs = tl.arange(0, CPAD)
        cm = cs < C
        gv = tl.load(gv_ptr + row * C + cs, mask=cm, other=float("-inf"))
        gi = tl.load(gi_ptr + row * C + cs, mask=cm, other=2147483647)
        gk = tl.load(gk_ptr + row * C + cs, mask=cm, other=0)
        cand = tl.min(tl.where(gv == tl.max(gv, axis=0), gi, 2147483647), axis=0)
        ckey = tl.sum(tl.where(gi == cand, gk, 0), axis=0)  # chunks hold disjoint indices
        cand = cand.to(tl.int64)
        if FIRST:
            top_p = tl.load(top_p_ptr + row)
            kept = tl.sum(tl.load(pz_kept_ptr + row * C + cs, mask=cm, other=0), axis=0)
            target = top_p.to(tl.float64) * kept.to(tl.float64)
            if top_p >= 1.0:
                active = tl.full([], 0, tl.int64)
    if c == 0:
        tl.store(st_out_ptr + row * 4, active)
        tl.store(st_out_ptr + row * 4 + 1, lim)
        tl.store(st_out_ptr + row * 4 + 2, cand)
        tl.store(st_out_ptr + row * 4 + 3, ckey)
        tl.store(tg_out_ptr + row, target)
    mass = tl.full([], 0, tl.int64)
    if active != 0:
        kappa = _kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        mass = _mass_below(base, row, m, temp, kappa, ckey, c * CH, tl.minimum(c * CH + CH, V), BLOCK)
    tl.store(pz_out_ptr + row * C + c, mass)


@triton.jit
def _chain_finish_kernel(st_ptr, tg_ptr, pz_ptr, tok_ptr, pend_ptr, C, CPAD: tl.constexpr):
    """Per row, after the last check: the chain's token, or pending for the threshold search."""
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(st_ptr + row * 4)
    pending = tl.full([], 0, tl.int32)
    if active != 0:
        cs = tl.arange(0, CPAD)
        below = tl.sum(tl.load(pz_ptr + row * C + cs, mask=cs < C, other=0), axis=0)
        pending = (below.to(tl.float64) >= tl.load(tg_ptr + row)).to(tl.int32)
    tl.store(tok_ptr + row, tl.load(st_ptr + row * 4 + 2))
    tl.store(pend_ptr + row, pending)


@triton.jit
def _final_kernel(temperature_ptr, pm_ptr, pa_ptr, pn_ptr, gv_ptr, gi_ptr, tok_ptr, pend_ptr, out_ptr, C,
                  HOT: tl.constexpr, CHAIN: tl.constexpr, CPAD: tl.constexpr):
    """Per row: greedy's index, the chain's token, or the last Gumbel pass's winner; -1 if bad."""
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
            if CHAIN:
                if tl.load(pend_ptr + row) == 0:
                    token = tl.load(tok_ptr + row)
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
    chain_rounds: int = CHAIN_ROUNDS,  # top-p draw rounds before the threshold search; 0: search only
) -> torch.Tensor:  # [R] int64, -1 for a row with NaN logits or none finite
    """Triton, each row split over chunks (see the comment above _FIX); the same tokens as
    sample_tokens_ref. The any_* hints only skip launches that would do nothing; a wrong False
    gives wrong tokens. The launch sequence depends only on the shape and the arguments after *,
    so it can be captured in a CUDA graph."""
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
    gws = torch.empty(R * C * 2, dtype=torch.int32, device=dev)
    gv, gi = gws[:R * C].view(torch.float32), gws[R * C:]
    tok = pend = out  # read only when chaining
    chain = any_hot and any_top_p and chain_rounds > 0
    if any_hot:
        kappa = torch.empty(R, dtype=torch.int64, device=dev)
        read = False  # whether kappa holds a search's threshold (else min-p's, from its formula)
        search = _ThresholdSearch(logits, params, pm, pa, pn, kappa, CH, C) if any_top_k or any_top_p else None
        if any_top_k:
            read = search(mass=False, pending=None, read_kappa=read)
        if chain:
            tok, pend = _top_p_chain(logits, params, pm, pa, pn, kappa, gv, gi, read, chain_rounds, CH, C)
        if any_top_p:
            read = search(mass=True, pending=pend if chain else None, read_kappa=read)
        _gumbel_part_kernel[(R, C)](logits, temperature, min_p, seeds, counters, pm, pa, pn, kappa, gv, gi,
                                    pend, V, stride, CH, C, READ_KAPPA=read, GATED=chain, CPAD=CPAD,
                                    BLOCK=_CBLOCK, num_warps=4)
    _final_kernel[(R,)](temperature, pm, pa, pn, gv, gi, tok, pend, out, C, HOT=any_hot, CHAIN=chain, CPAD=CPAD,
                        num_warps=1)
    return out


class _ThresholdSearch:
    """16-way threshold searches over (rows, chunks), narrowing kappa [R]; one workspace for both
    (top-k's, then top-p's)."""

    def __init__(self, logits: torch.Tensor, params: tuple[torch.Tensor, ...], pm: torch.Tensor, pa: torch.Tensor,
                 pn: torch.Tensor, kappa: torch.Tensor, CH: int, C: int) -> None:
        R, V = logits.shape
        dev = logits.device
        temperature, top_k, top_p, min_p, _, _ = params
        self.keys = torch.empty(R, V, dtype=torch.int32, device=dev)  # each chunk's surviving keys
        self.cnt = torch.empty(R, C, dtype=torch.int32, device=dev)  # survivors per chunk
        self.st = torch.empty(2, R, 3, dtype=torch.int64, device=dev)  # (lo, hi, mass below lo) per row
        self.tg = torch.empty(2, R, dtype=torch.float64, device=dev)  # target per row
        self.part = torch.empty(2, R, C, _NPART, dtype=torch.int64, device=dev)
        self.common = (logits, temperature, top_k, top_p, min_p, pm, pa, pn, self.keys, self.cnt, kappa)
        self.tail = (temperature, top_k, top_p, min_p, pm, pa, pn, self.keys, self.cnt, kappa)
        self.shape = (R, V, logits.stride(0), CH, C, triton.next_power_of_2(C))

    def __call__(self, mass: bool, pending: torch.Tensor | None, read_kappa: bool) -> bool:
        """Top-p's search when mass, else top-k's; only the rows with pending != 0 when given.
        Returns True: kappa now holds the threshold for the next pass to read."""
        R, V, stride, CH, C, CPAD = self.shape
        st, tg, part = self.st, self.tg, self.part
        gate = pending if pending is not None else self.cnt
        for r in range(_ROUNDS):
            i, o = (r + 1) % 2, r % 2
            _search_pass_kernel[(R, C)](*self.common, st[i], tg[i], part[i], st[o], tg[o], part[o], gate, V, stride,
                                        CH, C, FIRST=r == 0, MASS=mass, READ_KAPPA=read_kappa,
                                        GATED=pending is not None, CPAD=CPAD, BLOCK=_BLOCK, WAYS=_WAYS, PPAD=_PPAD,
                                        NPART=_NPART, num_warps=4)
        o = (_ROUNDS - 1) % 2
        _search_finish_kernel[(R,)](*self.tail, st[o], tg[o], part[o], gate, V, CH, C, MASS=mass,
                                    READ_KAPPA=read_kappa, GATED=pending is not None, CPAD=CPAD, BLOCK=_BLOCK,
                                    WAYS=_WAYS, PPAD=_PPAD, NPART=_NPART, num_warps=4)
        return True


def _top_p_chain(logits: torch.Tensor, params: tuple[torch.Tensor, ...], pm: torch.Tensor, pa: torch.Tensor,
                 pn: torch.Tensor, kappa: torch.Tensor, gv: torch.Tensor, gi: torch.Tensor, read_kappa: bool,
                 rounds: int, CH: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p chain (module docstring): `rounds` draw + check launches over (rows, chunks);
    (token [R] int64, pending [R] int32), pending = 1 where the threshold search must decide."""
    temperature, _, top_p, min_p, seeds, counters = params
    R, V = logits.shape
    dev = logits.device
    CPAD = triton.next_power_of_2(C)
    st = torch.empty(2, R, 4, dtype=torch.int64, device=dev)
    tg = torch.empty(2, R, dtype=torch.float64, device=dev)
    pz = torch.empty(2, R, C, dtype=torch.int64, device=dev)  # [0]: kept mass, [1]: mass below the candidate
    gk = torch.empty(R, C, dtype=torch.int64, device=dev)
    stride = logits.stride(0)
    for r in range(rounds):
        _chain_draw_kernel[(R, C)](logits, temperature, min_p, seeds, counters, pm, pa, pn, kappa, st[1], tg[1],
                                   pz[1], st[0], tg[0], pz[0], gv, gi, gk, V, stride, CH, C, FIRST=r == 0,
                                   READ_KAPPA=read_kappa, CPAD=CPAD, BLOCK=_CBLOCK, num_warps=4)
        _chain_check_kernel[(R, C)](logits, temperature, top_p, min_p, pm, pa, pn, kappa, st[0], tg[0], gv, gi, gk,
                                    pz[0], st[1], tg[1], pz[1], V, stride, CH, C, FIRST=r == 0,
                                    READ_KAPPA=read_kappa, CPAD=CPAD, BLOCK=_CBLOCK, num_warps=4)
    tok = torch.empty(R, dtype=torch.int64, device=dev)
    pend = torch.empty(R, dtype=torch.int32, device=dev)
    _chain_finish_kernel[(R,)](st[1], tg[1], pz[1], tok, pend, C, CPAD=CPAD, num_warps=1)
    return tok, pend


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
