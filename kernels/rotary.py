"""Rotary position embedding (half-split layout) in one pass.

    out = rotary(x, cos, sin, positions)   # x [T, H, D] -> [T, H, D], contiguous

With x1, x2 the two halves of each head: out = [x1 cos - x2 sin, x2 cos + x1 sin], computed in
float32 and rounded once. The eager version is ~10 small kernels per call (casts, chunk, four
products, cat) for a few rows at decode; here one program reads a token's heads once and
writes them once. x may be a strided view (q or k sliced out of the fused QKV output).
Head dims: any D whose half is a power of two (a tl.arange length), every dim in
`select_attention.HEAD_DIMS` among them, so that tuple is the one limit the runtime checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
    H,
    stride_xt, stride_xh, stride_cos, stride_ot, stride_oh,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = (heads < H)[:, None]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + cols)[None, :]  # [1, HALF] float32
    sin = tl.load(sin_ptr + pos * stride_cos + cols)[None, :]
    x_row = x_ptr + t * stride_xt + heads.to(tl.int64)[:, None] * stride_xh  # [BLOCK_H, 1]
    x1 = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, HALF]
    x2 = tl.load(x_row + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    o_row = out_ptr + t * stride_ot + heads.to(tl.int64)[:, None] * stride_oh
    dtype = out_ptr.dtype.element_ty
    tl.store(o_row + cols[None, :], (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(o_row + HALF + cols[None, :], (x2 * cos + x1 * sin).to(dtype), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, H, D] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    half = x.shape[2] // 2
    if x.shape[2] % 2 or half & (half - 1):
        raise ValueError(f"head dim {x.shape[2]} must be twice a power of two (e.g. 64, 128)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != half or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [positions, {half}] table, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if positions.shape != (x.shape[0],) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64 [{x.shape[0]}], got {tuple(positions.shape)} {positions.dtype}")
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"dtype {x.dtype} is not supported by the kernel; use fp16/bf16 or rotary_ref")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (fp16/bf16), cos/sin [P, D/2] float32, positions [T] int64 -> [T, H, D]."""
    _check(x, cos, sin, positions)
    T, H, D = x.shape
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _rotary_kernel[(T,)](
            x, cos, sin, positions, out,
            H,
            x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
            HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), num_warps=4,
        )
    return out


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = cos[positions].unsqueeze(1)  # (T, 1, D/2)
    s = sin[positions].unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, H, D/2) each
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
