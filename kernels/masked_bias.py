"""The DENSE MLP plan's bias: b1 on the selected neurons, the dtype's lowest value elsewhere.

    bias = masked_bias(b1, idx, n, dtype, device)   # (N,); idx: (k,) int32 ascending, distinct

relu(x @ w1.T + bias) is then exactly 0 on every unselected neuron, so cuBLAS computes the
sparse MLP's function over the full weights (kernels/mlp_dispatch.py). Built with torch ops
this is three kernels (a fill, a gather of b1, a scatter), each a graph node whose launch and
cold reads cost more than the N elements it writes; here it is one. Program p takes the block
idx[p * BLOCK_I:(p + 1) * BLOCK_I] and owns the columns from just past the previous block's
last id to its own last id (the last program: to N), so every column is written once, by the
program whose ids decide it, with no fill first and no race.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_I = 128  # ids per program
BLOCK_C = 128  # columns per step of a program's range


@triton.jit
def _masked_bias_kernel(b_ptr, idx_ptr, out_ptr, k, n, lowest,
                        HAS_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    pos = p * BLOCK_I + tl.arange(0, BLOCK_I)
    ids = tl.load(idx_ptr + pos, mask=pos < k, other=-1)  # [BLOCK_I]; -1 matches no column
    # columns (previous block's last id, this block's last id]; from 0 for the first, to n for the last
    lo = tl.where(p > 0, tl.load(idx_ptr + tl.maximum(p * BLOCK_I - 1, 0)) + 1, 0)
    last = p == tl.num_programs(0) - 1
    hi = tl.where(last, n, tl.load(idx_ptr + tl.minimum((p + 1) * BLOCK_I, k) - 1) + 1)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        inside = cols < hi
        selected = tl.max((cols[:, None] == ids[None, :]).to(tl.int32), 1) > 0  # [BLOCK_C]
        if HAS_BIAS:
            value = tl.load(b_ptr + cols, mask=inside & selected, other=0.0).to(tl.float32)
        else:
            value = tl.zeros([BLOCK_C], tl.float32)
        tl.store(out_ptr + cols, tl.where(selected, value, lowest).to(out_ptr.dtype.element_ty), mask=inside)


def masked_bias(b1: torch.Tensor | None, idx: torch.Tensor, n: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """(N,) b1 (0 without a bias) at idx, torch.finfo(dtype).min elsewhere: one kernel."""
    if idx.dtype != torch.int32 or idx.dim() != 1 or not idx.is_contiguous():
        raise ValueError(f"idx must be a contiguous 1-D int32 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if b1 is not None and (b1.shape != (n,) or b1.dtype != dtype or not b1.is_contiguous()):
        raise ValueError(f"b1 must be a contiguous ({n},) {dtype} tensor, got {tuple(b1.shape)} {b1.dtype}")
    lowest = torch.finfo(dtype).min
    k = idx.shape[0]
    if k == 0:
        return torch.full((n,), lowest, dtype=dtype, device=device)
    out = torch.empty(n, dtype=dtype, device=device)
    _masked_bias_kernel[(triton.cdiv(k, BLOCK_I),)](
        out if b1 is None else b1, idx, out, k, n, lowest,
        HAS_BIAS=b1 is not None, BLOCK_I=BLOCK_I, BLOCK_C=BLOCK_C,
    )
    return out


def masked_bias_ref(b1: torch.Tensor | None, idx: torch.Tensor, n: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The same with torch ops (a fill, a gather, a scatter); any device."""
    rows = idx.long()
    bias = torch.full((n,), torch.finfo(dtype).min, dtype=dtype, device=device)  # (N,)
    bias.index_copy_(0, rows, torch.zeros(rows.shape, dtype=dtype, device=device) if b1 is None
                     else b1.index_select(0, rows))
    return bias
