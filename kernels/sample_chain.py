"""The top-p chain (kernels/sample_tokens.py's docstring): draw over the kept set, check whether the
token is in the top-p set by the mass of the tokens with smaller keys, draw again below it if not;
CHAIN_ROUNDS rounds of (draw, check) launches over (rows, chunks), then the rows still undecided
go to the threshold search (kernels/sample_search.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sample_common import KEY_INF_C, draw_chunk, kappa_in, kept_mass, row_max, tile_keys

CHAIN_ROUNDS = 6  # top-p draw + check rounds; measured on an H100 (benchmarks/sampling_bench.py): 3 left
# enough rows to the search at top-p 0.5 to cost 0.38 ms at B 64 against 0.23 ms with 6, while each
# round costs ~4 us once most rows are decided
CHAIN_TILE = 1024  # logits per tile


@triton.jit
def _mass_below(base, row, m, temp, kappa, lim, begin, end, BLOCK: tl.constexpr):
    """Fixed-point mass of the tokens of [begin, end) with key <= kappa and key < lim."""
    offs = tl.arange(0, BLOCK)
    mass = tl.full([], 0, tl.int64)
    for start in range(begin, end, BLOCK):
        x, _, inside = tile_keys(base, start + offs, end, m, temp, kappa, lim)
        mass += kept_mass(x, inside)
    return mass



# Top-p chain state per row, (active, lim, cand, ckey) int64 + the target (float64), written by
# each launch's chunk-0 program into the buffer the next launch reads (two buffers, alternating).
@triton.jit
def _store_state(st_ptr, tg_ptr, row, active, lim, cand, ckey, target):
    tl.store(st_ptr + row * 4, active)
    tl.store(st_ptr + row * 4 + 1, lim)
    tl.store(st_ptr + row * 4 + 2, cand)
    tl.store(st_ptr + row * 4 + 3, ckey)
    tl.store(tg_ptr + row, target)


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
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    if FIRST:
        active = ((temp > 0.0) & (m > float("-inf")) & (nans == 0)).to(tl.int64)
        lim = tl.full([], KEY_INF_C + 1, tl.int64)
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
        _store_state(st_out_ptr, tg_out_ptr, row, active, lim, cand, ckey, target)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    best_key = tl.full([], 0, tl.int64)
    mass = tl.full([], 0, tl.int64)
    if active != 0:
        kappa = kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        best, best_idx, best_key, mass = draw_chunk(logits_ptr + row * stride_l, seed_ptr, counter_ptr, row, m,
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
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
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
        _store_state(st_out_ptr, tg_out_ptr, row, active, lim, cand, ckey, target)
    mass = tl.full([], 0, tl.int64)
    if active != 0:
        kappa = kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
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


def top_p_chain(logits: torch.Tensor, params: tuple[torch.Tensor, ...], pm: torch.Tensor, pa: torch.Tensor,
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
                                   READ_KAPPA=read_kappa, CPAD=CPAD, BLOCK=CHAIN_TILE, num_warps=4)
        _chain_check_kernel[(R, C)](logits, temperature, top_p, min_p, pm, pa, pn, kappa, st[0], tg[0], gv, gi, gk,
                                    pz[0], st[1], tg[1], pz[1], V, stride, CH, C, FIRST=r == 0,
                                    READ_KAPPA=read_kappa, CPAD=CPAD, BLOCK=CHAIN_TILE, num_warps=4)
    tok = torch.empty(R, dtype=torch.int64, device=dev)
    pend = torch.empty(R, dtype=torch.int32, device=dev)
    _chain_finish_kernel[(R,)](st[1], tg[1], pz[1], tok, pend, C, CPAD=CPAD, num_warps=1)
    return tok, pend
