"""The gather-GEMM pair's Triton kernels (kernels/gather_gemm.py launches them and documents
the work split): a tile grid over (output tile, M tile, K slice), stream-K, and the split-K
epilogue. Both main kernels compute fc1 (FC1) or fc2 through the same tile helpers.

PDL (kernels/pdl.py): fc1 and the epilogue wait for the previous kernel before anything. fc2's
programs first ask L2 for the weight rows of their first K steps (`_prefetch_rows`: idx and
w2t only, which the kernels just before fc2 do not write), then wait for fc1 and read h: while
fc1 drains, fc2's first weights are already on their way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.pdl import wait_then_release


@triton.jit
def _prefetch_rows(w_ptr, idx_ptr, col0, k_lo, k_end, stride_wn, ROWS: tl.constexpr):
    """Ask L2 (evict_last) for the 128-byte lines at column col0 of w's rows idx[k_lo, min(k_lo +
    ROWS, k_end)): one line per row, a 64-column bf16/fp16 tile's width. GPU only (inline PTX)."""
    k = k_lo + tl.arange(0, ROWS)
    rows = tl.load(idx_ptr + k, mask=k < k_end, other=0).to(tl.int64)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];", "=r,l", [w_ptr + rows * stride_wn + col0],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _tile_sum(a_ptr, w_ptr, idx_ptr, offs_n, rows, m_mask, neuron, k_lo, k_full, k_hi, stride_am, stride_wn,
              n_mask, FC1: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, ROW_MASK: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] (the output tile, transposed) summed over [k_lo, k_hi): whole BLOCK_K
    tiles up to k_full with loads unmasked along K (ROW_MASK: activation rows past M masked), then
    the tail 16 at a time.
    fc1: a = x [M, d], w = w1 [N, d] read at rows `neuron`, k runs over d.
    fc2: a = h [M, k], w = w2t [N, d] read at rows idx[k] and columns offs_n, k runs over the selection."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_lo + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if FC1:
        w_ptrs = w_ptr + neuron[:, None] * stride_wn + (k_lo + offs_k)[None, :]  # [BLOCK_N, BLOCK_K] gathered
        for _ in range(k_lo, k_full, BLOCK_K):
            w = tl.load(w_ptrs)
            if ROW_MASK:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs)
            if UPCAST:  # the interpreter computes bf16 on raw bit patterns (env.md section 2)
                w = w.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(w, tl.trans(a), acc)
            w_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
    else:
        for k0 in range(k_lo, k_full, BLOCK_K):
            rows_w = tl.load(idx_ptr + k0 + offs_k).to(tl.int64)  # [BLOCK_K] rows of w2t
            w = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_n[None, :], mask=n_mask[None, :],
                        other=0.0)  # [BLOCK_K, BLOCK_N] gathered
            if ROW_MASK:
                a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs)
            if UPCAST:
                w = w.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(tl.trans(w), tl.trans(a), acc)
            a_ptrs += BLOCK_K
    offs_t = tl.arange(0, 16)  # the K tail: 16 is the smallest K a tl.dot compiles for
    for k0 in range(k_full, k_hi, 16):
        t = k0 + offs_t
        t_mask = t < k_hi
        a_mask = t_mask[None, :]
        if ROW_MASK:
            a_mask = m_mask[:, None] & a_mask
        a = tl.load(a_ptr + rows[:, None] * stride_am + t[None, :], mask=a_mask, other=0.0)
        if FC1:
            w = tl.load(w_ptr + neuron[:, None] * stride_wn + t[None, :], mask=t_mask[None, :], other=0.0)
        else:
            rows_w = tl.load(idx_ptr + t, mask=t_mask, other=0).to(tl.int64)
            w = tl.trans(tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_n[None, :],
                                 mask=t_mask[:, None] & n_mask[None, :], other=0.0))
        if UPCAST:
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(w, tl.trans(a), acc)
    return acc


@triton.jit
def _tile_store(acc, bias_ptr, out_ptr, offs_n, offs_m, neuron, n_mask, m_mask, stride_om,
                FC1: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    """out[m, n] = act(acc[n, m] + bias): fc1's bias by neuron, fc2's by output column."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + (neuron if FC1 else offs_n), mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _tile_coords(tile_n, tile_m, idx_ptr, M, N_OUT, FC1: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """A tile's columns (fc1: slots of idx; fc2: output columns), rows, and fc1's neuron ids. Slots
    past k read neuron 0 and rows past M address row M - 1: valid memory, so the K loop's weight
    loads need no mask (see the module docstring); the store drops those rows and columns.
    ROW_MASK (the launch sets it when M is not a multiple of BLOCK_M) masks those rows' activation
    loads off: re-reading row M - 1 for them made a batch of 96 or 192 rows slower than one of
    128 or 256 with the same tile, by up to 1.5x (H200 run 63); masked, it is no slower."""
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N_OUT  # fc2: constant along each 16-column run (D_OUT specializes to a multiple of 16)
    m_mask = offs_m < M
    if FC1:
        neuron = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N] rows of w1
    else:
        neuron = offs_n.to(tl.int64)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)  # [BLOCK_M]
    return offs_n, offs_m, n_mask, m_mask, neuron, rows


@triton.jit(do_not_specialize=["M", "K_SEL"])  # one compiled kernel for every batch size and selection length
def _gather_kernel(
    a_ptr, w_ptr, idx_ptr, bias_ptr, out_ptr, ws_ptr,
    M, K_SEL, D, split_len,
    stride_am, stride_wn, stride_om, stride_wsm,
    FC1: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    ROW_MASK: tl.constexpr,
):
    """fc1 (FC1) or fc2 over a grid of (output tile, M tile, K slice) programs. D is d: fc1's
    input width, fc2's output width."""
    n_out = K_SEL if FC1 else D
    k_loop = D if FC1 else K_SEL
    if PDL and not FC1 and PREFETCH > 0:
        k_first = tl.program_id(2) * split_len
        _prefetch_rows(w_ptr, idx_ptr, tl.program_id(0) * BLOCK_N, k_first, tl.minimum(k_first + split_len, k_loop),
                       stride_wn, PREFETCH)
    wait_then_release(PDL)
    offs_n, offs_m, n_mask, m_mask, neuron, rows = _tile_coords(
        tl.program_id(0), tl.program_id(1), idx_ptr, M, n_out, FC1, BLOCK_M, BLOCK_N)
    k_lo = tl.program_id(2) * split_len  # slice [k_lo, +split_len) of the K loop
    k_hi = tl.minimum(k_lo + split_len, k_loop)
    k_full = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K  # end of the whole tiles
    acc = _tile_sum(a_ptr, w_ptr, idx_ptr, offs_n, rows, m_mask, neuron, k_lo, k_full, k_hi, stride_am, stride_wn,
                    n_mask, FC1, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, ROW_MASK)
    if SPLIT:  # fp32 partial [pid_k, M, stride_wsm]; _split_k_epilogue_kernel adds bias and activation
        ws_ptrs = ws_ptr + (tl.program_id(2) * M + offs_m.to(tl.int64))[None, :] * stride_wsm + offs_n[:, None]
        tl.store(ws_ptrs, acc, mask=n_mask[:, None] & m_mask[None, :])
    else:
        _tile_store(acc, bias_ptr, out_ptr, offs_n, offs_m, neuron, n_mask, m_mask, stride_om, FC1, HAS_BIAS, RELU)


@triton.jit(do_not_specialize=["M", "K_SEL"])
def _gather_stream_kernel(
    a_ptr, w_ptr, idx_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, K_SEL, D, n_full, per, total, m_tiles,
    stride_am, stride_wn, stride_om,
    FC1: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    ROW_MASK: tl.constexpr,
):
    """fc1 or fc2 with the work split evenly ("stream-K"): the output tiles' whole BLOCK_K steps,
    n_full per tile and `total` in all, are laid end to end and program p takes steps
    [p * per, (p + 1) * per), so every program reads the same bytes whatever the tile count. A
    tile that one program covers whole is written directly; the pieces of a tile cut between
    programs go to fp32 partials (two slots per program: its first and its last piece), and the
    last piece to arrive (kernels/arrivals.py) sums them and writes the tile."""
    p = tl.program_id(0)
    n_out = K_SEL if FC1 else D
    k_loop = D if FC1 else K_SEL
    start = p * per
    end = tl.minimum(total, start + per)
    if PDL and not FC1 and PREFETCH > 0:  # the rows of this program's first piece
        first_tile = start // n_full
        k_first = (start - first_tile * n_full) * BLOCK_K
        _prefetch_rows(w_ptr, idx_ptr, (first_tile // m_tiles) * BLOCK_N, k_first,
                       tl.minimum(k_first + (end - start) * BLOCK_K, k_loop), stride_wn, PREFETCH)
    wait_then_release(PDL)
    cells = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]  # a partial's layout
    it = start
    while it < end:
        tile = it // n_full
        k_first = it - tile * n_full  # this piece's steps [k_first, k_last) of the tile
        k_last = tl.minimum(n_full, k_first + end - it)
        offs_n, offs_m, n_mask, m_mask, neuron, rows = _tile_coords(
            tile // m_tiles, tile % m_tiles, idx_ptr, M, n_out, FC1, BLOCK_M, BLOCK_N)
        k_hi = tl.where(k_last == n_full, k_loop, k_last * BLOCK_K)  # the tile's last piece adds the tail
        acc = _tile_sum(a_ptr, w_ptr, idx_ptr, offs_n, rows, m_mask, neuron, k_first * BLOCK_K, k_last * BLOCK_K, k_hi,
                        stride_am, stride_wn, n_mask, FC1, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, ROW_MASK)
        if (k_first == 0) & (k_last == n_full):
            _tile_store(acc, bias_ptr, out_ptr, offs_n, offs_m, neuron, n_mask, m_mask, stride_om, FC1, HAS_BIAS,
                        RELU)
        else:
            slot = 2 * p + (it != start).to(tl.int32)  # this program's first piece, or its last
            tl.store(ws_ptr + slot.to(tl.int64) * (BLOCK_N * BLOCK_M) + cells, acc)
            tl.debug_barrier()  # every thread's partial stored before the count below releases them
            first = tile * n_full // per  # the programs holding a piece of this tile
            last = ((tile + 1) * n_full - 1) // per
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == last - first:  # the last piece
                tl.atomic_xchg(count_ptr + tile, 0)  # zero again for the next launch
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for q in range(first, last + 1):
                    q_slot = 2 * q + (q * per < tile * n_full).to(tl.int32)  # q began in an earlier tile: its last
                    acc += tl.load(ws_ptr + q_slot.to(tl.int64) * (BLOCK_N * BLOCK_M) + cells, cache_modifier=".cg")
                _tile_store(acc, bias_ptr, out_ptr, offs_n, offs_m, neuron, n_mask, m_mask, stride_om, FC1,
                            HAS_BIAS, RELU)
        it += k_last - k_first


@triton.jit(do_not_specialize=["M", "N_OUT"])
def _split_k_epilogue_kernel(
    ws_ptr, idx_ptr, bias_ptr, out_ptr,
    M, N_OUT, num_splits,
    stride_wsm, stride_om,
    HAS_BIAS: tl.constexpr, BIAS_BY_IDX: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    """out = act(sum over splits of ws[s] + bias); ws [num_splits, M, stride_wsm] fp32."""
    wait_then_release(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N_OUT
    m_mask = offs_m < M
    mask = m_mask[:, None] & n_mask[None, :]
    # The partials are read up to the padded row stride (a multiple of 16, so 16-byte loads; a
    # mask at N_OUT, unknown at compile time, made them scalar); the pad columns hold garbage
    # that the store below drops.
    ws_mask = m_mask[:, None] & (offs_n < stride_wsm)[None, :]
    ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * stride_wsm + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(ws_ptrs + s * M * stride_wsm, mask=ws_mask, other=0.0)
    if HAS_BIAS:
        if BIAS_BY_IDX:  # fc1: the bias of each selected neuron
            cols = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            cols = offs_n.to(tl.int64)
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
