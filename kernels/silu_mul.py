"""SwiGLU's activation in one pass: silu(gate) * up from the fused gate/up projection.

    out = silu_mul(gate_up)   # [T, 2I] -> [T, I], gate = gate_up[:, :I], up = gate_up[:, I:]

Computed in float32 and rounded once. Eager torch is two kernels (silu, then the product) and
a round trip of the [T, I] intermediate; at decode both are launch-bound, so one launch per
layer is what this saves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_then_release

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_xt, stride_ot, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """gate_up [T, 2I] (fp16/bf16, contiguous rows) -> silu(gate) * up [T, I]. pdl: launch with
    programmatic dependent launch (kernels/pdl.py)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with a contiguous last dim, got {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")
    if gate_up.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"dtype {gate_up.dtype} is not supported by the kernel; use fp16/bf16 or silu_mul_ref")
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        _silu_mul_kernel[(T, triton.cdiv(I, _BLOCK))](gate_up, out, I, gate_up.stride(0), out.stride(0),
                                                      BLOCK=_BLOCK, PDL=pdl, num_warps=4,
                                                      **launch_options(pdl))
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
    return torch.nn.functional.silu(gate) * up
