"""Head-selective paged decode attention (Polar Sparsity, Selective Head Attention).

One query token per sequence attends to its paged KV cache, but only for the KV groups
listed in ``head_table[b]``; every other query head's output is exactly 0. With
``head_table[b] = arange(Hkv)`` it is plain dense paged decode attention.

Work split: one program per (sequence, selected group, split of the sequence). A program
loads each K/V tile of its group once and uses it for all G = Hq // Hkv query heads of the
group (rows of a tl.dot, padded to 16). Splits are merged by a second kernel with a
log-sum-exp merge. B more programs of the same launch write the zeros of each sequence's
unselected heads (no memset of out first). The split count comes from static shapes only
(B, k_max, max_blocks, SM count), never from seq_lens values, so a call never syncs with the
host and its grid is fixed for a fixed k_max (CUDA-graph capturable). Programs whose split lies past their
sequence's length, or whose head_table entry is -1, exit at once.

    out = select_attention(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Head dims the kernel is tested for (D is a tl.arange length, so a power of two). Public: the
# runtime checks a model's head dim against it; the torch reference takes any head dim.
HEAD_DIMS = (64, 128)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# At least this many tokens per split: shorter splits spend more on the merge than they
# gain in parallelism.
_MIN_SPLIT_TOKENS = 256
# The merge kernel loads all splits of a head as one [SPLITS_PAD, D] fp32 tile.
_MAX_SPLITS = 64
# Programs wanted per SM when the unsplit grid is short (< 8 per SM). The kernel holds 255
# registers x 128 threads, so 2 programs run per SM and the grid runs in waves; a short grid
# leaves a long idle tail, which splitting fills (a 2.4-wave grid ran at 83% of the bandwidth
# floor, the same work split to 9.7 waves at 95%). The partials a split adds (fp32 acc, max,
# sum: ~(D + 2) x 4 B per head, written and read once) are < 1% of the >= 256 tokens of K/V
# the split reads.
_PROGRAMS_PER_SM = 16
_SHORT_GRID_PROGRAMS_PER_SM = 8
# From 8 programs per SM up, the best split count follows no wave model; the rule is measured
# (H100, 132 SMs, block 64 x 4 warps, N 1920 and 3968; the band edges and their margins are in
# benchmarks/KERNELS_NOTES.md, "Rules in the code"):
# * programs longer than _LONG_TOKENS tokens, < 15 programs per SM: split into pieces of
#   _LONG_SPLIT_TOKENS (N 3968: 4 splits, 0-6% faster than unsplit at 9.2-14.1 programs per
#   SM; unsplit faster at 15.5);
# * shorter programs at 14-24 programs per SM: 2 splits (N 1920: 1-3% faster at 14.1-20.8 per
#   SM; unsplit faster at 10.7 and 24.2).
_LONG_TOKENS = 2048
_LONG_SPLIT_TOKENS = 1024
_LONG_MAX_PROGRAMS_PER_SM = 15
_SHORT_BAND_PROGRAMS_PER_SM = (14, 24)


@dataclass(frozen=True)
class AttentionConfig:
    block_n: int = 64  # tokens per K/V tile; 64 x 128 fp16 = 16 KiB per tile and stage
    num_warps: int = 4
    # Pipeline depth asked of Triton. The K/V loads are pointer gathers through the block
    # table, which Triton 3.7 does not multi-buffer (ptxas: the same 22.5 KiB of shared memory,
    # dot operands only, and 255 registers at 2, 3 and 4 stages). On Triton 3.6, 2 stages timed
    # 0-2% faster at the few rows where it was tried; every recorded time uses 3, which stays
    # the default until the whole table is timed with 2.
    num_stages: int = 3
    # ptxas register cap (None: Triton's, which lands at 255 with ~0.6 KiB of spills at 64 x 4
    # warps: 2 programs per SM). 168 fits 3 programs, 128 fits 4, at the cost of more spills.
    maxnreg: int | None = None


# The interpreter runs one numpy pass per program and tile: larger tiles keep CPU tests fast.
_INTERPRETER_CONFIG = AttentionConfig(block_n=64, num_warps=4, num_stages=1)


@triton.jit
def _zero_unselected(ht_ptr, out_ptr, b, k_max, hq, stride_htb, stride_ob, stride_oh,
                     G: tl.constexpr, D: tl.constexpr):
    """out[b, h, :] = 0 for every query head h whose KV group is not in head_table[b]. Done in
    the attention launch instead of a memset of all of out first: one graph node less (~2 us
    at decode sizes). Heads and slots go in chunks of 16 with runtime bounds, so Hq and k_max
    are not constexprs (no recompile per density)."""
    b64 = b.to(tl.int64)
    cols = tl.arange(0, D)
    for h0 in range(0, hq, 16):
        heads = h0 + tl.arange(0, 16)
        hit = tl.zeros([16], tl.int32)
        for s0 in range(0, k_max, 16):
            slots = s0 + tl.arange(0, 16)
            ht = tl.load(ht_ptr + b64 * stride_htb + slots, mask=slots < k_max, other=-1)  # [16]
            hit = tl.maximum(hit, tl.max((ht[None, :] == (heads // G)[:, None]).to(tl.int32), 1))
        o_ptrs = out_ptr + b64 * stride_ob + heads[:, None].to(tl.int64) * stride_oh + cols[None, :]
        tl.store(o_ptrs, tl.zeros([16, D], out_ptr.dtype.element_ty), mask=((hit == 0) & (heads < hq))[:, None])


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Tokens per split of one sequence: its own length over the grid's splits (whole BLOCK_N
    tiles, at least MIN_SPLIT), so the work does not depend on how wide the block table is."""
    n = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(n, MIN_SPLIT)


@triton.jit
def _select_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, ht_ptr, out_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr,
    scale_log2, k_max, num_splits, hq,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_btb, stride_htb, stride_ob, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
):
    pair = tl.program_id(0)  # b * k_max + slot; pairs B * k_max + b zero sequence b
    split = tl.program_id(1)
    n_pairs = tl.num_programs(0) - tl.num_programs(0) // (k_max + 1)  # B * k_max
    if pair >= n_pairs:  # one program per sequence writes the 0s of its unselected heads
        if split == 0:
            _zero_unselected(ht_ptr, out_ptr, pair - n_pairs, k_max, hq, stride_htb, stride_ob,
                             stride_oh, G, D)
        return
    b = pair // k_max
    slot = pair % k_max
    grp = tl.load(ht_ptr + b.to(tl.int64) * stride_htb + slot)
    seq_len = tl.load(seq_lens_ptr + b)
    split_tokens = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    start = split * split_tokens
    # The grid is static; the work is not: skip unselected slots and splits past the end.
    if (grp < 0) | (start >= seq_len):
        return
    end = tl.minimum(start + split_tokens, seq_len)

    b64 = b.to(tl.int64)
    grp64 = grp.to(tl.int64)
    rows = tl.arange(0, G_PAD)  # query head within the group, padded to 16 rows for tl.dot
    cols = tl.arange(0, D)
    row_mask = rows < G
    q_ptrs = q_ptr + b64 * stride_qb + (grp64 * G + rows[:, None]) * stride_qh + cols[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None], other=0.0)  # [G_PAD, D]
    if UPCAST:  # the interpreter computes bf16 on raw bit patterns (env.md section 2)
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([G_PAD], tl.float32)  # running softmax denominator
    acc = tl.zeros([G_PAD, D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + grp64 * stride_kh
    v_base = v_ptr + grp64 * stride_vh
    bt_row = bt_ptr + b64 * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # logical token positions [BLOCK_N]
        valid = pos < end
        # Page of each token; entries past the sequence are never read (masked).
        page = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        tok = (pos % BLOCK_SIZE).to(tl.int64)
        k_rows = k_base + page * stride_kb + tok * stride_kt  # [BLOCK_N] row pointers
        v_rows = v_base + page * stride_vb + tok * stride_vt
        k = tl.load(k_rows[:, None] + cols[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D], rows contiguous
        v = tl.load(v_rows[:, None] + cols[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k)) * scale_log2  # [G_PAD, BLOCK_N], fp32
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if DIRECT:  # one split: normalise and write the output here, no merge kernel
        o_ptrs = out_ptr + b64 * stride_ob + (grp64 * G + rows[:, None]) * stride_oh + cols[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (pair.to(tl.int64) * num_splits + split) * G + rows  # [G_PAD] partial rows
        tl.store(o_part_ptr + part[:, None] * D + cols[None, :], acc, mask=row_mask[:, None])
        tl.store(m_part_ptr + part, m_i, mask=row_mask)
        tl.store(l_part_ptr + part, l_i, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    o_part_ptr, m_part_ptr, l_part_ptr, ht_ptr, seq_lens_ptr, out_ptr,
    k_max, num_splits,
    stride_htb, stride_ob, stride_oh,
    G: tl.constexpr, D: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * k_max + slot) * G + r
    r = pid % G
    pair = pid // G
    b = pair // k_max
    slot = pair % k_max
    grp = tl.load(ht_ptr + b.to(tl.int64) * stride_htb + slot)
    if grp < 0:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    n_valid = tl.cdiv(seq_len, _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT))  # splits that ran
    s = tl.arange(0, SPLITS_PAD)
    s_mask = s < n_valid
    cols = tl.arange(0, D)
    part = (pair.to(tl.int64) * num_splits + s) * G + r  # [SPLITS_PAD]
    m = tl.load(m_part_ptr + part, mask=s_mask, other=float("-inf"))
    l_s = tl.load(l_part_ptr + part, mask=s_mask, other=0.0)
    o = tl.load(o_part_ptr + part[:, None] * D + cols[None, :], mask=s_mask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # [SPLITS_PAD]; 0 for splits that did not run
    res = tl.sum(w[:, None] * o, 0) / tl.sum(w * l_s, 0)  # [D]
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + (grp.to(tl.int64) * G + r) * stride_oh + cols
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_plan(batch: int, k_max: int, max_tokens: int, num_sms: int, block_n: int) -> tuple[int, int]:
    """(num_splits, split_tokens) from static shapes only (B, k_max, the block table's width,
    the SM count): never from seq_lens, so no host sync and a fixed grid per k_max. The kernel
    then splits each sequence into num_splits pieces of its own length (_split_len): the work
    does not depend on how far the table is padded past the lengths (measured on an H100,
    benchmarks/results/nvidia-h100-80gb-hbm3/kernels_padded.json: one 6,000-token sequence among
    63 of 300 tokens, table padded to 32,768 tokens, 0.213 ms -> 0.089 ms)."""
    pairs = max(batch * k_max, 1)  # programs of the unsplit grid
    lo, hi = _SHORT_BAND_PROGRAMS_PER_SM
    if pairs < _SHORT_GRID_PROGRAMS_PER_SM * num_sms:
        want = triton.cdiv(_PROGRAMS_PER_SM * num_sms, pairs)
    elif max_tokens > _LONG_TOKENS and pairs < _LONG_MAX_PROGRAMS_PER_SM * num_sms:
        want = triton.cdiv(max_tokens, _LONG_SPLIT_TOKENS)
    elif max_tokens <= _LONG_TOKENS and lo * num_sms <= pairs < hi * num_sms:
        want = 2
    else:
        want = 1
    splits = max(1, min(want, triton.cdiv(max_tokens, _MIN_SPLIT_TOKENS), _MAX_SPLITS))
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, splits), block_n) * block_n
    return triton.cdiv(max_tokens, split_tokens), split_tokens


def _check(q, k_cache, v_cache, block_tables, seq_lens, head_table, out, kernel: bool) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
            "[num_blocks, Hkv, block_size, D]"
        )
    batch, hq, d = q.shape
    _, hkv, block_size, d_cache = k_cache.shape
    if d_cache != d:
        raise ValueError(f"q head dim ({d}) != cache head dim ({d_cache})")
    if kernel and d not in HEAD_DIMS:  # the torch reference takes any head dim
        raise ValueError(f"head dim {d} is not supported by the kernel; use one of {HEAD_DIMS}, or float32 / the "
                         "CPU, where the torch reference runs")
    if hq % hkv:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size ({block_size}) must be a power of two >= 16")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if kernel and q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported by the kernel; use fp16/bf16 or select_attention_ref")
    for name, t, ndim in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1), ("head_table", head_table, 2)):
        if t.dtype != torch.int32 or t.dim() != ndim or t.shape[0] != batch:
            raise ValueError(
                f"{name} must be int32 with {ndim} dims and batch {batch} first, got {t.dtype} {tuple(t.shape)}"
            )
    if head_table.shape[1] > hkv:
        raise ValueError(f"head_table has {head_table.shape[1]} slots but there are only {hkv} KV groups")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    if kernel:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                        ("seq_lens", seq_lens), ("head_table", head_table)):
            # the tables' rows are read through their row stride: a slice of rows or columns is fine
            ok = t.stride(-1) == 1 if name in ("block_tables", "head_table") else t.is_contiguous()
            if not ok:
                raise ValueError(f"{name} must be contiguous (the tables: in their last dim); call .contiguous() "
                                 "once when it is built")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        for name, t in (("q", q), ("out", out)):
            if t is not None and t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dim (stride 1), got stride {t.stride(-1)}")


def _launch(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out,
            num_splits: int | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """The kernel launch; tests and benchmarks pass num_splits / config to pin them."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, head_table, out, kernel=True)
    batch, hq, d = q.shape
    _, hkv, block_size, _ = k_cache.shape
    k_max = head_table.shape[1]
    group = hq // hkv
    interpret = q.device.type != "cuda"
    if config is None:
        config = _INTERPRETER_CONFIG if interpret else AttentionConfig()
    max_tokens = block_tables.shape[1] * block_size
    if num_splits is None:
        num_sms = 4 if interpret else _num_sms(q.device)
        num_splits, _ = _split_plan(batch, k_max, max_tokens, num_sms, config.block_n)
    # whole tiles, and the same for tables a few tiles wider (a graph's padded table and an eager step's)
    min_split = min(_MIN_SPLIT_TOKENS, triton.cdiv(triton.cdiv(max_tokens, num_splits), config.block_n) * config.block_n)
    if k_max == 0:  # no group selected: every head reads exactly 0, and nothing to launch
        return torch.zeros_like(q) if out is None else out.zero_()
    if out is None:
        out = torch.empty_like(q)  # the launch writes every element, the 0s included
    if batch == 0:
        return out
    direct = num_splits == 1
    rows = batch * k_max * group
    if direct:  # dummies: the partial buffers are not touched when DIRECT
        o_part = m_part = l_part = out
    else:
        o_part = torch.empty(rows * num_splits, d, device=q.device, dtype=torch.float32)
        m_part = torch.empty(rows * num_splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    # B more programs along dim 0 than pairs: one per sequence (split 0 only) writes its 0s.
    _select_attention_kernel[(batch * k_max + batch, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, head_table, out,
        o_part, m_part, l_part,
        scale * math.log2(math.e), k_max, num_splits, hq,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), head_table.stride(0), out.stride(0), out.stride(1),
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d, BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n, MIN_SPLIT=min_split, DIRECT=direct, UPCAST=interpret,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
    )
    if not direct:
        _merge_splits_kernel[(rows,)](
            o_part, m_part, l_part, head_table, seq_lens, out,
            k_max, num_splits,
            head_table.stride(0), out.stride(0), out.stride(1),
            G=group, D=d, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), BLOCK_N=config.block_n,
            MIN_SPLIT=min_split, num_warps=4,
        )
    return out


def select_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, each in [1, max_blocks * block_size]
    head_table: torch.Tensor,  # [B, k_max] int32 selected KV groups, -1 = none
    scale: float,
    out: torch.Tensor | None = None,  # [B, Hq, D]
) -> torch.Tensor:  # [B, Hq, D]; heads of unselected groups are exactly 0
    """Triton head-selective paged decode attention (see the module docstring)."""
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out)


def select_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, head_table: torch.Tensor, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference, computed in q's dtype (softmax in fp32); any device."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, head_table, out, kernel=False)
    batch, hq, d = q.shape
    num_blocks, hkv, block_size, _ = k_cache.shape
    group = hq // hkv
    max_blocks = block_tables.shape[1]
    pages = block_tables.long().clamp(0, num_blocks - 1)  # entries past a length are arbitrary
    k = k_cache[pages].permute(0, 2, 1, 3, 4).reshape(batch, hkv, max_blocks * block_size, d)  # (B, Hkv, T, D)
    v = v_cache[pages].permute(0, 2, 1, 3, 4).reshape(batch, hkv, max_blocks * block_size, d)  # (B, Hkv, T, D)
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    v = v.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    scores = torch.einsum("bhd,bhtd->bht", q, k).float() * scale  # (B, Hq, T)
    pos = torch.arange(max_blocks * block_size, device=q.device)
    scores = scores.masked_fill(pos[None, None, :] >= seq_lens.long()[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    res = torch.einsum("bht,bhtd->bhd", p, v)  # (B, Hq, D)
    selected = torch.zeros(batch, hkv + 1, dtype=torch.bool, device=q.device)
    selected.scatter_(1, head_table.long().clamp(min=-1) % (hkv + 1), True)  # -1 lands in column hkv
    keep = selected[:, :hkv].repeat_interleave(group, dim=1)  # (B, Hq)
    res = torch.where(keep[:, :, None], res, torch.zeros((), dtype=res.dtype, device=res.device))
    if out is None:
        return res
    out.copy_(res)
    return out
