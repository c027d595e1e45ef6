"""16-way threshold searches over keys (kernels/sample_tokens.py): top-k's threshold, and top-p's
for the rows the top-p chain left undecided (kernels/sample_chain.py). No sort: each pass over a
row's survivors sums F (count, or fixed-point mass) at 16 candidate keys and keeps the range that
holds the target, 4 bits of the key per pass.

Chunked: every pass over a row is split over CH-logit chunks, grid (rows, chunks). Per-chunk
partials go to small buffers; the next launch reduces them in a fixed order (each of its
programs redundantly: C x 17 integers), so there is no float atomic and no host sync. After
ROUNDS chunked passes one program per row finishes over the survivors of all chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sample_common import FIX, kappa_in, row_max

WAYS = 16  # candidates per search pass: 4 bits of the key per pass
SEARCH_TILE = 256  # logits per tile; the (TILE, WAYS) comparison tile is 4096 elements
_NPART = 17  # per chunk and search pass: F at the 16 candidates, then F over the whole range
_PPAD = 32
_ROUNDS = 4  # chunked search passes per threshold; the rest runs per row over the survivors


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
def _resolve_parts(part_ptr, row, C, lo, hi, below, target, top_p, CPAD: tl.constexpr, PPAD: tl.constexpr,
                   NPART: tl.constexpr, WAYS: tl.constexpr):
    """_resolve from the previous pass's partials of the row's C chunks, summed in chunk order."""
    cs = tl.arange(0, CPAD)
    ps = tl.arange(0, PPAD)
    pmask = (cs[:, None] < C) & (ps[None, :] < NPART)
    part = tl.load(part_ptr + (row * C + cs[:, None]) * NPART + ps[None, :], mask=pmask, other=0)
    sums = tl.sum(part, axis=0)  # [PPAD]
    total = tl.sum(tl.where(ps == WAYS, sums, 0), axis=0)
    acc = tl.sum(tl.where(ps[:, None] == tl.arange(0, WAYS)[None, :], sums[:, None], 0), axis=0)
    return _resolve(lo, hi, below, target, acc, total, top_p, WAYS)


@triton.jit
def _tile_sums(key, keep, cand, MASS: tl.constexpr):
    """F contributions of one tile at the candidates, and over the whole range (int64)."""
    if MASS:
        x = 0.0 - key.to(tl.float32, bitcast=True)
        w = (tl.exp(x) * FIX).to(tl.int64)
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
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, pend_ptr, row, V, MASS, GATED):
        top_p = tl.load(top_p_ptr + row)
        if FIRST:
            lo = tl.full([], 0, tl.int64)
            hi = kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
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
                lo, hi, below, target = _resolve_parts(part_in_ptr, row, C, lo, hi, below, target, top_p, CPAD, PPAD,
                                                       NPART, WAYS)
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
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    kappa = kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
    if _searching(temp, m, nans, top_k_ptr, top_p_ptr, pend_ptr, row, V, MASS, GATED):
        top_p = tl.load(top_p_ptr + row)
        lo = tl.load(st_ptr + row * 3)
        hi = tl.load(st_ptr + row * 3 + 1)
        below = tl.load(st_ptr + row * 3 + 2)
        target = tl.load(tg_ptr + row)
        if lo < hi:
            lo, hi, below, target = _resolve_parts(part_ptr, row, C, lo, hi, below, target, top_p, CPAD, PPAD, NPART,
                                                   WAYS)
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


class ThresholdSearch:
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
                                        GATED=pending is not None, CPAD=CPAD, BLOCK=SEARCH_TILE, WAYS=WAYS, PPAD=_PPAD,
                                        NPART=_NPART, num_warps=4)
        o = (_ROUNDS - 1) % 2
        _search_finish_kernel[(R,)](*self.tail, st[o], tg[o], part[o], gate, V, CH, C, MASS=mass,
                                    READ_KAPPA=read_kappa, GATED=pending is not None, CPAD=CPAD, BLOCK=SEARCH_TILE,
                                    WAYS=WAYS, PPAD=_PPAD, NPART=_NPART, num_warps=4)
        return True
