"""Rotary position embedding (half-split layout) and the paged KV-cache store, in one pass.

    q, k = rotary_store_kv(q, k, v, slots, k_cache, v_cache, cos, sin, positions)
    # q [T, Hq, D], k, v [T, Hkv, D] -> q, k rotated [T, Hq, D], [T, Hkv, D], contiguous;
    # rotated k and v written to the caches (num_blocks, Hkv, block_size, D) at `slots`

With x1, x2 the two halves of each head: rotated = [x1 cos - x2 sin, x2 cos + x1 sin], computed
in float32 and rounded once. Without cos/sin (OPT: learned positions) nothing is rotated and the
kernel only stores K/V (and returns q contiguous). The eager version is ~10 small kernels per
rotation plus four for the store (block, offset, two index_puts); at decode each is a few
microseconds of launch for a few kilobytes, so one layer's share of them cost more than its
norms. Here program (t, 0) reads token t's query heads once and writes them once; program (t, 1)
does its key and value heads and their cache rows. q, k, v may be strided views (sliced out of
the fused QKV output). Every row is stored: CUDA-graph padding rows point at a scratch block.
Head dims: any even D (the halves are padded to a power of two and masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_then_release

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, out_ptr, t, H, HALF, cols, col_mask, cos, sin,
                  BLOCK_H: tl.constexpr, ROTATE: tl.constexpr):
    """Token t's H heads of x, rotated, to out (T, H, 2 * HALF); returns the halves in out's dtype."""
    heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    mask = (heads < H) & col_mask[None, :]
    row = x_ptr + t * stride_t + heads * stride_h + cols[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    dtype = out_ptr.dtype.element_ty
    y1, y2 = x1.to(dtype), x2.to(dtype)
    out = out_ptr + (t * H + heads) * (2 * HALF) + cols[None, :]
    tl.store(out, y1, mask=mask)
    tl.store(out + HALF, y2, mask=mask)
    return y1, y2


@triton.jit
def _store_kv(k1, k2, v_ptr, stride_vt, stride_vh, slot_ptr, k_cache_ptr, v_cache_ptr, t, H, HALF, cols, col_mask,
              stride_cb, stride_ch, stride_cs, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token t's rotated key halves and its value heads into the caches at its slot."""
    heads = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    mask = (heads < H) & col_mask[None, :]
    vrow = v_ptr + t * stride_vt + heads * stride_vh + cols[None, :]
    v1 = tl.load(vrow, mask=mask, other=0.0)
    v2 = tl.load(vrow + HALF, mask=mask, other=0.0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = (slot // BLOCK_SIZE) * stride_cb + heads * stride_ch + (slot % BLOCK_SIZE) * stride_cs + cols[None, :]
    tl.store(k_cache_ptr + dst, k1, mask=mask)
    tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
    tl.store(v_cache_ptr + dst, v1, mask=mask)
    tl.store(v_cache_ptr + dst + HALF, v2, mask=mask)


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr,
    HQ, HKV, HALF,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_cb, stride_ch, stride_cs,  # caches: (block, head, slot in block); the last dim is contiguous
    BLOCK_SIZE: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    ROTATE: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.zeros([1, BLOCK_HALF], dtype=tl.float32)  # unused without rotation
    sin = tl.zeros([1, BLOCK_HALF], dtype=tl.float32)
    if ROTATE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cos + cols, mask=col_mask, other=0.0)[None, :]  # [1, BLOCK_HALF]
        sin = tl.load(sin_ptr + pos * stride_cos + cols, mask=col_mask, other=0.0)[None, :]
    if tl.program_id(1) == 0:  # the query heads
        _rotate_heads(q_ptr, stride_qt, stride_qh, q_out_ptr, t, HQ, HALF, cols, col_mask, cos, sin, BLOCK_HQ, ROTATE)
    else:  # the key and value heads, and their cache rows
        k1, k2 = _rotate_heads(k_ptr, stride_kt, stride_kh, k_out_ptr, t, HKV, HALF, cols, col_mask, cos, sin,
                               BLOCK_HKV, ROTATE)
        _store_kv(k1, k2, v_ptr, stride_vt, stride_vh, slot_ptr, k_cache_ptr, v_cache_ptr, t, HKV, HALF, cols,
                  col_mask, stride_cb, stride_ch, stride_cs, BLOCK_SIZE, BLOCK_HKV)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
           positions: torch.Tensor | None) -> None:
    T, D = q.shape[0], q.shape[-1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[0] != T or x.shape[2] != D or x.stride(-1) != 1:
            raise ValueError(f"{name} must be [T={T}, heads, D={D}] with a contiguous last dim, got "
                             f"{tuple(x.shape)} strides {x.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if D % 2:
        raise ValueError(f"head dim {D} must be even")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[1] != k.shape[1] or c.shape[3] != D or c.stride(-1) != 1 or c.dtype != q.dtype:
            raise ValueError(f"{name} must be (num_blocks, {k.shape[1]}, block_size, {D}) {q.dtype} with a "
                             f"contiguous last dim, got {tuple(c.shape)} {c.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32/int64 [{T}], got {tuple(slots.shape)} {slots.dtype}")
    if (cos is None) != (sin is None) or (cos is None) != (positions is None):
        raise ValueError("give cos, sin and positions, or none of them (no rotation)")
    if cos is not None and sin is not None and positions is not None:
        for name, c in (("cos", cos), ("sin", sin)):
            if c.dim() != 2 or c.shape[1] != D // 2 or c.dtype != torch.float32 or not c.is_contiguous():
                raise ValueError(f"{name} must be a contiguous float32 [positions, {D // 2}] table, got "
                                 f"{tuple(c.shape)} {c.dtype}")
        if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"positions must be int32/int64 [{T}], got {tuple(positions.shape)} {positions.dtype}")
    if q.dtype not in _KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: the kernel takes one of fp16/bf16; "
                         "use rotary_store_kv_ref")


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D] (fp16/bf16), slots [T] int, caches (N, Hkv, bs, D), cos/sin
    [P, D/2] float32 and positions [T] int, or None (no rotation) -> (q, k) rotated, contiguous;
    the caches written in place. pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    _check(q, k, v, slots, k_cache, v_cache, cos, sin, positions)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, Hkv, D), dtype=q.dtype, device=q.device)
    if T:
        rotate = cos is not None
        # Without rotation the table and position pointers are placeholders the kernel never reads.
        cos_t, sin_t, pos_t = (cos, sin, positions) if rotate else (q_out, q_out, slots)
        _rotary_store_kernel[(T, 2)](
            q, k, v, cos_t, sin_t, pos_t, slots, q_out, k_out, k_cache, v_cache,
            Hq, Hkv, D // 2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_t.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            BLOCK_SIZE=k_cache.shape[2], BLOCK_HALF=triton.next_power_of_2(D // 2),
            BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv), ROTATE=rotate, PDL=pdl,
            num_warps=4, **launch_options(pdl),
        )
    return q_out, k_out


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> rotated [T, H, D] in x's dtype, computed in float32."""
    c = cos[positions].unsqueeze(1)  # (T, 1, D/2)
    s = sin[positions].unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)  # (T, H, D/2) each
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                        positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if cos is not None and sin is not None and positions is not None:
        q, k = rotate_ref(q, cos, sin, positions), rotate_ref(k, cos, sin, positions)
    block_size = k_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size  # (T,), (T,)
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v
    return q.contiguous(), k.contiguous()
