"""RMSNorm and LayerNorm, optionally fused with the residual add that precedes them.

    out = rms_norm(x, weight, eps)                              # weight * (x / rms(x))
    out, h = add_rms_norm(x, residual, weight, eps)             # h = x + residual; out = rms_norm(h)
    out = layer_norm(x, weight, bias, eps)                      # weight * (x - mean) / std + bias
    out, h = add_layer_norm(x, residual, weight, bias, eps)     # h = x + residual; out = layer_norm(h)

In a decode step every layer runs two norms and two residual adds on a few rows; in eager
PyTorch each is one to eight kernels whose launch and tail latency cost more than the bytes
they move (torch's LayerNorm takes ~8 us for 64 rows of 4096 on an H200, for 1 MB). One
program per row does the whole thing in one pass. Rounding follows the reference model code:
the sum is rounded to the model dtype, as an eager `x + residual`; RMSNorm (Llama) rounds the
normalised row to the model dtype before the weight multiply and the product once; LayerNorm
(torch.nn.LayerNorm) computes mean, variance, scale and shift in float32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_then_release

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, h_ptr,
    D, eps,
    stride_x, stride_res, stride_out, stride_h,
    ADD_RESIDUAL: tl.constexpr, LAYER_NORM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # round the sum to the model dtype, as an eager `x + residual` does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if LAYER_NORM:
        centred = tl.where(mask, xf - tl.sum(xf, axis=0) / D, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = centred * rstd * w + b
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, d] with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (x.shape[1],) or p.dtype != x.dtype or not p.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{x.shape[1]}] {x.dtype} tensor, got {tuple(p.shape)} "
                             f"{p.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"dtype {x.dtype} is not supported by the kernel; use fp16/bf16 or the _ref functions")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
            eps: float, layer_norm: bool, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(x, weight, bias, residual)
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    if x.shape[0]:
        res, h_arg = (residual, h) if residual is not None else (x, out)  # dummies when not adding
        _norm_kernel[(x.shape[0],)](
            x, res, weight, weight if bias is None else bias, out, h_arg,
            x.shape[1], eps,
            x.stride(0), res.stride(0), out.stride(0), h_arg.stride(0),
            ADD_RESIDUAL=residual is not None, LAYER_NORM=layer_norm, BLOCK_D=triton.next_power_of_2(x.shape[1]),
            PDL=pdl, num_warps=4 if x.shape[1] <= 4096 else 8, **launch_options(pdl),
        )
    return out, h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    """x: [T, d] -> [T, d]. pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    return _launch(x, None, weight, None, eps, layer_norm=False, pdl=pdl)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, d] -> (rms_norm(x + residual), x + residual)."""
    out, h = _launch(x, residual, weight, None, eps, layer_norm=False, pdl=pdl)
    assert h is not None
    return out, h


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               pdl: bool = False) -> torch.Tensor:
    """x: [T, d] -> [T, d]."""
    return _launch(x, None, weight, bias, eps, layer_norm=True, pdl=pdl)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, d] -> (layer_norm(x + residual), x + residual)."""
    out, h = _launch(x, residual, weight, bias, eps, layer_norm=True, pdl=pdl)
    assert h is not None
    return out, h


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, rounded once (what torch.nn.LayerNorm does in fp16/bf16 on CUDA)."""
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return layer_norm_ref(h, weight, bias, eps), h
