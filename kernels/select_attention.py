"""Head-selective paged decode attention (Polar Sparsity, Selective Head Attention).

One query token per sequence attends to its paged KV cache, but only for the KV groups
listed in ``head_table[b]``; every other query head's output is exactly 0. With
``head_table[b] = arange(Hkv)`` it is plain dense paged decode attention.

Work split: one program per (plan item, head-table slot). An item is a chunk of one
sequence's tokens, cut by the step's work plan from the real lengths
(kernels/attention_plan.py), so the cost depends on the tokens cached, not on how wide the
block tables are padded. A program loads each K/V tile of its group once and uses it for all
G = Hq // Hkv query heads of the group (rows of a tl.dot, padded to 16). A sequence kept whole
writes its output directly; the chunks of a cut sequence write fp32 partials, and the last chunk
to finish merges them (log-sum-exp, the group's heads at once) in the same launch
(kernels/arrivals.py). B more programs of the same launch write the zeros of each sequence's
unselected heads (no memset of out first).
The grid depends only on the plan's capacity and k_max, so with a static-capacity plan a call
captures into a CUDA graph; empty plan rows and slots whose head_table entry is -1 exit at once.

    plan = plan_attention(lens, groups=k_max, num_sms=...).to(device)
    out = select_attention(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, plan=plan)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import arrivals
from kernels.attention_builds import (AttentionConfig, default_config, padded_head_dim, resident_per_sm,
                                      tile_split)
from kernels.attention_plan import SEQ_FIELDS, AttentionPlan, num_sms, plan_attention
from kernels.pdl import launch_options, wait_then_release

# Head dims: any up to MAX_HEAD_DIM. tl.arange lengths are powers of two (>= 16 for tl.dot), so
# a head dim between powers of two is tiled as a main and a tail tile (attention_builds.tile_split:
# 96 = 64 + 32, 80 = 64 + 32 masked to 16), each K/V tile loaded and multiplied on its own;
# columns past D are never read or written (the masks exist only in those builds).
# The fp32 partials and their merge are D_PAD = padded_head_dim(D) wide. The torch reference
# takes any head dim.
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def head_dim_supported(head_dim: int) -> bool:
    return 1 <= head_dim <= MAX_HEAD_DIM


# The interpreter runs one numpy pass per program and tile: larger tiles keep CPU tests fast.
_INTERPRETER_CONFIG = AttentionConfig(block_n=64, num_warps=4, num_stages=1)


@triton.jit
def _zero_unselected(ht_ptr, out_ptr, b, k_max, hq, stride_htb, stride_ob, stride_oh,
                     G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """out[b, h, :] = 0 for every query head h whose KV group is not in head_table[b]. Done in
    the attention launch instead of a memset of all of out first: one graph node less (~2 us
    at decode sizes). Heads and slots go in chunks of 16 with runtime bounds, so Hq and k_max
    are not constexprs (no recompile per density)."""
    b64 = b.to(tl.int64)
    cols = tl.arange(0, D_PAD)
    for h0 in range(0, hq, 16):
        heads = h0 + tl.arange(0, 16)
        hit = tl.zeros([16], tl.int32)
        for s0 in range(0, k_max, 16):
            slots = s0 + tl.arange(0, 16)
            ht = tl.load(ht_ptr + b64 * stride_htb + slots, mask=slots < k_max, other=-1)  # [16]
            hit = tl.maximum(hit, tl.max((ht[None, :] == (heads // G)[:, None]).to(tl.int32), 1))
        o_ptrs = out_ptr + b64 * stride_ob + heads[:, None].to(tl.int64) * stride_oh + cols[None, :]
        tl.store(o_ptrs, tl.zeros([16, D_PAD], out_ptr.dtype.element_ty),
                 mask=((hit == 0) & (heads < hq))[:, None] & (cols < D)[None, :])


@triton.jit
def _select_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, ht_ptr, out_ptr, count_ptr, items_ptr, seqs_ptr,
    o_part_ptr, m_part_ptr, l_part_ptr, arrivals_ptr,
    scale_log2, k_max, batch, hq,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_btb, stride_htb, stride_ob, stride_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, D_A: tl.constexpr,
    D_B: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PERSISTENT: tl.constexpr, PDL: tl.constexpr,
):
    """Work w < n_work is (item w // k_max, slot w % k_max); the batch jobs after it write the
    0s of one sequence's unselected heads. PERSISTENT: a fixed grid of resident programs strides
    over the plan's real work (its count read on the device), so the plan's empty rows cost
    nothing; else one program per work item of the plan's whole capacity."""
    wait_then_release(PDL)
    pid = tl.program_id(0)
    if PERSISTENT:
        n_work = tl.load(count_ptr) * k_max
        for w in range(pid, n_work + batch, tl.num_programs(0)):
            _work(w, n_work, q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, ht_ptr, out_ptr, items_ptr, seqs_ptr,
                  o_part_ptr, m_part_ptr, l_part_ptr, arrivals_ptr, scale_log2, k_max, hq, stride_qb, stride_qh,
                  stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                  stride_btb, stride_htb, stride_ob, stride_oh, G, G_PAD, D, D_PAD, D_A, D_B, BLOCK_SIZE, BLOCK_N,
                  UPCAST)
    else:
        _work(pid, tl.num_programs(0) - batch, q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, ht_ptr, out_ptr,
              items_ptr, seqs_ptr, o_part_ptr, m_part_ptr, l_part_ptr, arrivals_ptr, scale_log2, k_max, hq,
              stride_qb, stride_qh,
              stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
              stride_btb, stride_htb, stride_ob, stride_oh, G, G_PAD, D, D_PAD, D_A, D_B, BLOCK_SIZE, BLOCK_N,
              UPCAST)


@triton.jit
def _work(w, n_work, q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, ht_ptr, out_ptr, items_ptr, seqs_ptr,
          o_part_ptr, m_part_ptr, l_part_ptr, arrivals_ptr, scale_log2, k_max, hq, stride_qb, stride_qh,
          stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
          stride_btb, stride_htb, stride_ob, stride_oh,
          G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, D_A: tl.constexpr,
          D_B: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """One work item (see the kernel): skipped when the plan row is empty or the slot unselected."""
    if w >= n_work:
        _zero_unselected(ht_ptr, out_ptr, w - n_work, k_max, hq, stride_htb, stride_ob, stride_oh, G, D, D_PAD)
    else:
        item = w // k_max
        slot = w % k_max
        b = tl.load(items_ptr + item)  # -1: an empty row of a static-capacity plan
        grp = tl.load(ht_ptr + tl.maximum(b, 0).to(tl.int64) * stride_htb + slot)  # -1: an unselected slot
        if (b >= 0) & (grp >= 0):
            piece = item - tl.load(seqs_ptr + b * 4)  # this item's piece of sequence b
            size = tl.load(seqs_ptr + b * 4 + 1)  # tokens per piece
            start = piece * size
            end = tl.minimum(start + size, tl.load(seq_lens_ptr + b))
            first_part = tl.load(seqs_ptr + b * 4 + 2)
            n_parts = tl.load(seqs_ptr + b * 4 + 3)  # 0: the item is the whole sequence, write the output
            b64 = b.to(tl.int64)
            grp64 = grp.to(tl.int64)
            _attend_group(q_ptr + b64 * stride_qb + grp64 * G * stride_qh, k_ptr + grp64 * stride_kh,
                          v_ptr + grp64 * stride_vh, bt_ptr + b64 * stride_btb,
                          out_ptr + b64 * stride_ob + grp64 * G * stride_oh, o_part_ptr, m_part_ptr, l_part_ptr,
                          arrivals_ptr + b64 * k_max + slot, first_part, piece, n_parts, slot, k_max, start, end,
                          scale_log2, stride_qh, stride_oh, stride_kb, stride_kt,
                          stride_vb, stride_vt, G, G_PAD, D, D_PAD, D_A, D_B, BLOCK_SIZE, BLOCK_N, UPCAST)


@triton.jit
def _rows(base, page, tok, valid, stride_b, stride_t, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
          UPCAST: tl.constexpr):
    """Columns [C0, C0 + W) of the cache rows of tokens `tok` on pages `page`: [BLOCK_N, W], 0 for
    tokens not `valid` and for columns past D."""
    cols = C0 + tl.arange(0, W)
    if C0 + W <= D:
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (cols < D)[None, :]
    rows = base + page * stride_b + tok * stride_t  # [BLOCK_N] row pointers
    x = tl.load(rows[:, None] + cols[None, :], mask=mask, other=0.0)  # rows contiguous
    if UPCAST:  # the interpreter computes bf16 on raw bit patterns (env.md section 2)
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_cols(ptr, rows, stride_h, row_mask, C0: tl.constexpr, W: tl.constexpr, D: tl.constexpr,
               UPCAST: tl.constexpr):
    """Columns [C0, C0 + W) of the group's query rows: [G_PAD, W], 0 past D and in pad rows."""
    cols = C0 + tl.arange(0, W)
    x = tl.load(ptr + rows[:, None] * stride_h + cols[None, :], mask=row_mask & (cols < D)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend_group(q_row, k_base, v_base, bt_row, o_row, o_part_ptr, m_part_ptr, l_part_ptr, arrival_ptr,
                  first_part, piece, n_parts, slot, k_max, start, end, scale_log2, stride_qh, stride_oh,
                  stride_kb, stride_kt, stride_vb, stride_vt,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  D_A: tl.constexpr, D_B: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """The G query heads of one KV group over tokens [start, end): each K/V tile feeds all G rows
    through tl.dot, the rows padded to 16. (Multiply-adds in registers for MHA's one row, with
    no MMA, ran at 55-65% of the floor where this path runs at ~100%: the reductions over D and
    over tokens cross threads and warps; benchmarks/KERNELS_NOTES.md, "Work plan".)
    The head's columns are a D_A-wide main tile and, where D is not a power of two, a D_B-wide
    tail tile (attention_builds.tile_split: 96 = 64 + 32): two dots a step, no padded columns read.
    A sequence cut into n_parts pieces: each piece writes fp32 partials, and the last of the
    (sequence, slot)'s pieces to finish merges them into the output (kernels/arrivals.py)."""
    TAIL: tl.constexpr = D_B > 0  # a constexpr branch: without a tail none of its code or registers exist
    rows = tl.arange(0, G_PAD)
    cols_a = tl.arange(0, D_A)
    row_mask = (rows < G)[:, None]  # [G_PAD, 1]
    offs_n = tl.arange(0, BLOCK_N)
    q_a = _head_cols(q_row, rows, stride_qh, row_mask, 0, D_A, D, UPCAST)  # [G_PAD, D_A]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([G_PAD], tl.float32)  # running softmax denominator
    acc_a = tl.zeros([G_PAD, D_A], tl.float32)  # columns past D stay 0 (V's are loaded as 0)
    if TAIL:
        cols_b = D_A + tl.arange(0, D_B)
        q_b = _head_cols(q_row, rows, stride_qh, row_mask, D_A, D_B, D, UPCAST)  # [G_PAD, D_B]
        acc_b = tl.zeros([G_PAD, D_B], tl.float32)
    page_next = tl.load(bt_row + (start + offs_n) // BLOCK_SIZE, mask=start + offs_n < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        page = page_next.to(tl.int64)
        page_next = tl.load(bt_row + (pos + BLOCK_N) // BLOCK_SIZE, mask=pos + BLOCK_N < end, other=0)
        valid = pos < end
        tok = (pos % BLOCK_SIZE).to(tl.int64)
        k_a = _rows(k_base, page, tok, valid, stride_kb, stride_kt, 0, D_A, D, UPCAST)  # [BLOCK_N, D_A]
        v_a = _rows(v_base, page, tok, valid, stride_vb, stride_vt, 0, D_A, D, UPCAST)
        qk = tl.dot(q_a, tl.trans(k_a))  # [G_PAD, BLOCK_N], fp32
        if TAIL:
            k_b = _rows(k_base, page, tok, valid, stride_kb, stride_kt, D_A, D_B, D, UPCAST)  # [BLOCK_N, D_B]
            v_b = _rows(v_base, page, tok, valid, stride_vb, stride_vt, D_A, D_B, D, UPCAST)
            qk += tl.dot(q_b, tl.trans(k_b))
        qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_a = acc_a * alpha[:, None] + tl.dot(p.to(v_a.dtype), v_a)
        if TAIL:
            acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v_b.dtype), v_b)
        m_i = m_new
    if n_parts == 0:
        tl.store(o_row + rows[:, None] * stride_oh + cols_a[None, :],
                 (acc_a / l_i[:, None]).to(o_row.dtype.element_ty), mask=row_mask & (cols_a < D)[None, :])
        if TAIL:
            tl.store(o_row + rows[:, None] * stride_oh + cols_b[None, :],
                     (acc_b / l_i[:, None]).to(o_row.dtype.element_ty), mask=row_mask & (cols_b < D)[None, :])
    else:
        prow = ((first_part + piece).to(tl.int64) * k_max + slot) * G + rows  # [G_PAD] partial rows, D_PAD wide
        tl.store(o_part_ptr + prow[:, None] * D_PAD + cols_a[None, :], acc_a, mask=row_mask & (cols_a < D)[None, :])
        if TAIL:
            tl.store(o_part_ptr + prow[:, None] * D_PAD + cols_b[None, :], acc_b,
                     mask=row_mask & (cols_b < D)[None, :])
        tl.store(m_part_ptr + prow, m_i, mask=rows < G)
        tl.store(l_part_ptr + prow, l_i, mask=rows < G)
        tl.debug_barrier()  # every thread's partials stored before the count below releases them
        if tl.atomic_add(arrival_ptr, 1, sem="acq_rel") == n_parts - 1:  # the last piece to finish
            tl.atomic_xchg(arrival_ptr, 0)  # zero again for the next launch
            _merge_group(o_part_ptr, m_part_ptr, l_part_ptr, o_row, stride_oh, first_part, n_parts, slot, k_max,
                         G, D, D_PAD)


@triton.jit
def _merge_group(o_part_ptr, m_part_ptr, l_part_ptr, o_row, stride_oh, first_part, n_parts, slot, k_max,
                 G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Log-sum-exp merge of the n_parts partials of a (sequence, slot)'s G query heads, all heads
    at once: each pass loads a [parts, heads, D] tile (32 rows: 32 parts of one head, 8 of four,
    ...), so a group's merge costs as many dependent L2 round trips as one head's. The partials
    are read from L2 (.cg): other programs wrote them during this launch."""
    GM: tl.constexpr = triton.next_power_of_2(G)  # heads padded to a power of two (reshape)
    PARTS: tl.constexpr = max(1, 32 // GM)
    cols = tl.arange(0, D_PAD)
    heads = tl.arange(0, GM)
    j = tl.arange(0, PARTS * GM)  # row j: part j // GM, head j % GM
    head = j % GM
    m_run = tl.full([GM], float("-inf"), tl.float32)
    l_run = tl.zeros([GM], tl.float32)
    acc = tl.zeros([GM, D_PAD], tl.float32)
    for p0 in range(0, n_parts, PARTS):
        part = p0 + j // GM
        valid = (part < n_parts) & (head < G)
        prow = ((first_part + part).to(tl.int64) * k_max + slot) * G + head  # [PARTS * GM]
        m = tl.load(m_part_ptr + prow, mask=valid, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(l_part_ptr + prow, mask=valid, other=0.0, cache_modifier=".cg")
        o = tl.load(o_part_ptr + prow[:, None] * D_PAD + cols[None, :], mask=valid[:, None] & (cols < D)[None, :],
                    other=0.0, cache_modifier=".cg")  # columns past D: never written
        m = tl.reshape(tl.where(head < G, m, 0.0), [PARTS, GM])  # padding heads: finite, never stored
        l_s = tl.reshape(tl.where(head < G, l_s, 1.0), [PARTS, GM])
        o = tl.reshape(o, [PARTS, GM, D_PAD])
        m_new = tl.maximum(m_run, tl.max(m, 0))  # [GM]; finite: every pass holds >= 1 part read >= 1 token
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new[None, :])  # [PARTS, GM]; 0 for parts past n_parts
        l_run = l_run * alpha + tl.sum(w * l_s, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        m_run = m_new
    tl.store(o_row + heads[:, None] * stride_oh + cols[None, :], (acc / l_run[:, None]).to(o_row.dtype.element_ty),
             mask=(heads < G)[:, None] & (cols < D)[None, :])


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
    if kernel and not head_dim_supported(d):  # the torch reference takes any head dim
        raise ValueError(f"head dim {d} is not supported by the kernel (1-{MAX_HEAD_DIM}); use float32 / the CPU, "
                         "where the torch reference runs")
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


def _check_plan(plan: AttentionPlan, batch: int, device: torch.device) -> None:
    for name, t, shape in (("plan.count", plan.count, (1,)), ("plan.items", plan.items, (plan.capacity,)),
                           ("plan.seqs", plan.seqs, (batch, SEQ_FIELDS))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be a contiguous int32 {shape} tensor on {device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}; build it with kernels.attention_plan.plan_attention")


def host_plan(seq_lens: torch.Tensor, k_max: int, device: torch.device, block_n: int,
              head_dim: int = 128, group: int = 1) -> AttentionPlan:
    """The plan for a call that did not bring one: from seq_lens read back to the host (a sync)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("select_attention under CUDA-graph capture needs a plan (its lengths cannot be read "
                         "back while capturing): build one with kernels.attention_plan.plan_attention and pass "
                         "plan=, with a static capacity (plan_capacity)")
    return plan_attention(seq_lens.tolist(), groups=k_max, num_sms=num_sms(device), block_n=block_n,
                          resident=resident_per_sm(head_dim, group)).to(device)


def _launch(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out,
            plan: AttentionPlan | None = None, config: AttentionConfig | None = None,
            pdl: bool = False) -> torch.Tensor:
    """The kernel launch; tests and benchmarks pass a config to pin it."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, head_table, out, kernel=True)
    batch, hq, d = q.shape
    k_max = head_table.shape[1]
    group = hq // k_cache.shape[1]
    interpret = q.device.type != "cuda"
    if config is None:
        config = _INTERPRETER_CONFIG if interpret else default_config(d)
    if k_max == 0:  # no group selected: every head reads exactly 0, and nothing to launch
        return torch.zeros_like(q) if out is None else out.zero_()
    if out is None:
        out = torch.empty_like(q)  # the launch writes every element, the 0s included
    if batch == 0:
        return out
    tiles = tile_split(d) if config.tiles is None else config.tiles
    if config.tiles is not None and not (sum(tiles) >= d and all(w == 0 or (w >= 16 and w & (w - 1) == 0)
                                                                  for w in tiles) and tiles[0]):
        raise ValueError(f"config.tiles {tiles} must be a power-of-two main tile >= 16 and a tail of 0 or a power "
                         f"of two >= 16 covering head dim {d}; leave it None for tile_split's")
    if plan is None:
        plan = host_plan(seq_lens, k_max, q.device, config.block_n, d, group)
    _check_plan(plan, batch, q.device)
    if plan.num_parts:
        part_rows = plan.num_parts * k_max * group
        o_part = torch.empty(part_rows, padded_head_dim(d), device=q.device, dtype=torch.float32)
        m_part = torch.empty(part_rows, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
    else:  # dummies: no item writes a partial
        o_part = m_part = l_part = out
    # batch more programs than (item, slot) pairs: one per sequence writes its 0s.
    work = plan.capacity * k_max + batch
    persistent = config.resident_per_sm is not None
    grid = min(work, config.resident_per_sm * num_sms(q.device)) if persistent else work
    _select_attention_kernel[(grid,)](
        q, k_cache, v_cache, block_tables, seq_lens, head_table, out, plan.count, plan.items, plan.seqs,
        o_part, m_part, l_part, arrivals.counters(q.device, batch * k_max),
        scale * math.log2(math.e), k_max, batch, hq,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), head_table.stride(0), out.stride(0), out.stride(1),
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d, D_PAD=padded_head_dim(d),
        D_A=tiles[0], D_B=tiles[1], BLOCK_SIZE=k_cache.shape[2],
        BLOCK_N=config.block_n, UPCAST=interpret, PERSISTENT=persistent, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl),
        **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
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
    plan: AttentionPlan | None = None,  # the step's work plan (kernels/attention_plan.py); None: one
    # is built from seq_lens, which reads them back to the host
    pdl: bool = False,  # launch with programmatic dependent launch (kernels/pdl.py)
) -> torch.Tensor:  # [B, Hq, D]; heads of unselected groups are exactly 0
    """Triton head-selective paged decode attention (see the module docstring)."""
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out, plan, pdl=pdl)


def select_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, head_table: torch.Tensor, scale: float, out: torch.Tensor | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference, computed in q's dtype (softmax in fp32); any device. `plan` is
    accepted for the kernel's signature and not needed: the reference reads every token."""
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
