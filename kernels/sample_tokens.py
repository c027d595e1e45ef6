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


def sample_tokens(
    logits: torch.Tensor,  # [R, V] float32
    temperature: torch.Tensor,  # [R] float32, 0 = greedy
    top_k: torch.Tensor,  # [R] int32, 0 = off
    top_p: torch.Tensor,  # [R] float32 in (0, 1]
    min_p: torch.Tensor,  # [R] float32 in [0, 1], 0 = off
    seeds: torch.Tensor,  # [R] int64
    counters: torch.Tensor,  # [R] int64: which draw of the sequence this is
) -> torch.Tensor:  # [R] int64, -1 for a row with NaN logits or none finite
    """Triton: one program per row (see the module docstring)."""
    params = (temperature, top_k, top_p, min_p, seeds, counters)
    _check(logits, params, kernel=True)
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R:
        _sample_tokens_kernel[(R,)](logits, *params, out, V, logits.stride(0), BLOCK=_BLOCK, WAYS=_WAYS,
                                    num_warps=4)
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
