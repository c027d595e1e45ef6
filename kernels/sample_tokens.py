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


from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sample_chain import CHAIN_ROUNDS, top_p_chain
from kernels.sample_common import KEY_INF, KEY_INF_C, check_inputs, draw_chunk, kappa_in, row_max
from kernels.sample_search import SEARCH_TILE, ThresholdSearch

_M32 = 0xFFFFFFFF
_CBLOCK = 1024  # logits per tile in the max and Gumbel passes
_PROGRAMS = 1024  # aim for about this many programs per launch


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
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    ok = (temp > 0.0) & (m > float("-inf")) & (nans == 0)
    if GATED:
        ok = ok & (tl.load(pend_ptr + row) != 0)
    if ok:
        kappa = kappa_in(kappa_ptr, min_p_ptr, row, READ_KAPPA)
        best, best_idx, _, _ = draw_chunk(logits_ptr + row * stride_l, seed_ptr, counter_ptr, row, m, temp, kappa,
                                        KEY_INF_C + 1, c * CH, tl.minimum(c * CH + CH, V), False, BLOCK)
    tl.store(gv_ptr + row * C + c, best)
    tl.store(gi_ptr + row * C + c, best_idx)


@triton.jit
def _final_kernel(temperature_ptr, pm_ptr, pa_ptr, pn_ptr, gv_ptr, gi_ptr, tok_ptr, pend_ptr, out_ptr, C,
                  HOT: tl.constexpr, CHAIN: tl.constexpr, CPAD: tl.constexpr):
    """Per row: greedy's index, the chain's token, or the last Gumbel pass's winner; -1 if bad."""
    row = tl.program_id(0).to(tl.int64)
    m, arg, nans = row_max(pm_ptr, pa_ptr, pn_ptr, row, C, CPAD)
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
    """(CH, C): chunk length (a multiple of SEARCH_TILE) and chunks per row."""
    if chunk is None:
        per_row = max(1, _PROGRAMS // max(R, 1))
        chunk = triton.cdiv(triton.cdiv(V, per_row), SEARCH_TILE) * SEARCH_TILE
        chunk = max(chunk, 2048)
    CH = max(SEARCH_TILE, triton.cdiv(chunk, SEARCH_TILE) * SEARCH_TILE)
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
    """Triton, each row split over chunks (kernels/sample_search.py says how); the same tokens as
    sample_tokens_ref. The any_* hints only skip launches that would do nothing; a wrong False
    gives wrong tokens. The launch sequence depends only on the shape and the arguments after *,
    so it can be captured in a CUDA graph."""
    params = (temperature, top_k, top_p, min_p, seeds, counters)
    check_inputs(logits, params, kernel=True)
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
        search = ThresholdSearch(logits, params, pm, pa, pn, kappa, CH, C) if any_top_k or any_top_p else None
        if any_top_k:
            read = search(mass=False, pending=None, read_kappa=read)
        if chain:
            tok, pend = top_p_chain(logits, params, pm, pa, pn, kappa, gv, gi, read, chain_rounds, CH, C)
        if any_top_p:
            read = search(mass=True, pending=pend if chain else None, read_kappa=read)
        _gumbel_part_kernel[(R, C)](logits, temperature, min_p, seeds, counters, pm, pa, pn, kappa, gv, gi,
                                    pend, V, stride, CH, C, READ_KAPPA=read, GATED=chain, CPAD=CPAD,
                                    BLOCK=_CBLOCK, num_warps=4)
    _final_kernel[(R,)](temperature, pm, pa, pn, gv, gi, tok, pend, out, C, HOT=any_hot, CHAIN=chain, CPAD=CPAD,
                        num_warps=1)
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
    check_inputs(logits, (temperature, top_k, top_p, min_p, seeds, counters), kernel=False)
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

