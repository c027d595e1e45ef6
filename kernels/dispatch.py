"""The one dispatch point the runtime calls for the Polar Sparsity kernels.

Each op runs its Triton kernel when the tensors are fp16/bf16 on CUDA and its pure-PyTorch
`_ref` otherwise (the kernels are written for 16-bit data; float32 runs, e.g. reference runs
on a GPU, take the torch path); `POLAR_KERNEL_BACKEND` (polar_dist.envs.KERNEL_BACKEND:
auto | triton | torch) overrides the choice. The op modules are imported only when first called, so importing
`kernels` never imports triton (the op modules import it at the top, for @triton.jit, and
also hold the references).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from polar_dist import envs


def _use_triton(t: torch.Tensor) -> bool:
    backend = envs.KERNEL_BACKEND.get()
    if backend == "auto":
        return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)
    if backend == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("POLAR_KERNEL_BACKEND=triton with CPU tensors needs the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before the process starts, or use POLAR_KERNEL_BACKEND=auto")
    return backend == "triton"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"kernels.{name}")


def select_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    head_table: torch.Tensor,  # [B, k_max] int32, -1 = none
    scale: float,
    out: torch.Tensor | None = None,  # [B, Hq, D]
) -> torch.Tensor:  # [B, Hq, D]; heads of unselected KV groups are exactly 0
    """Head-selective paged decode attention; see kernels/select_attention.py."""
    mod = _module("select_attention")
    fn = mod.select_attention if _use_triton(q) else mod.select_attention_ref
    return fn(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out)


def gather_fc1(
    x: torch.Tensor,  # [M, d]
    w1: torch.Tensor,  # [N, d]
    idx: torch.Tensor,  # [k] int32
    b1: torch.Tensor | None,  # [N]
    activation: str = "relu",
) -> torch.Tensor:  # [M, k]
    """h = act(x @ w1[idx].T + b1[idx]); see kernels/gather_gemm.py."""
    mod = _module("gather_gemm")
    fn = mod.gather_fc1 if _use_triton(x) else mod.gather_fc1_ref
    return fn(x, w1, idx, b1, activation)


def gather_fc2(
    h: torch.Tensor,  # [M, k]
    w2t: torch.Tensor,  # [N, d]
    idx: torch.Tensor,  # [k] int32
    b2: torch.Tensor | None,  # [d]
) -> torch.Tensor:  # [M, d]
    """y = h @ w2t[idx] + b2; see kernels/gather_gemm.py."""
    mod = _module("gather_gemm")
    fn = mod.gather_fc2 if _use_triton(h) else mod.gather_fc2_ref
    return fn(h, w2t, idx, b2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [T, d] -> [T, d]
    """weight * x / rms(x); see kernels/rms_norm.py."""
    mod = _module("rms_norm")
    return (mod.rms_norm if _use_triton(x) else mod.rms_norm_ref)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # [T, d] x 2 -> ([T, d], [T, d])
    """(rms_norm(x + residual), x + residual); see kernels/rms_norm.py."""
    mod = _module("rms_norm")
    return (mod.add_rms_norm if _use_triton(x) else mod.add_rms_norm_ref)(x, residual, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [T, H, D]
    """Rotary position embedding, half-split layout; see kernels/rotary.py."""
    mod = _module("rotary")
    return (mod.rotary if _use_triton(x) else mod.rotary_ref)(x, cos, sin, positions)
