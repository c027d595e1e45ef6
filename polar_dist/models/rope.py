"""Rotary position embedding (default, linear and llama3 frequency scaling)."""

from __future__ import annotations

import math

import torch

from kernels.dispatch import KernelOps
from polar_dist.model_spec import RopeKind, RopeSpec


def inv_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies after the spec's scaling."""
    # float32 throughout, as the reference implementation computes it, so angles agree bit for bit.
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind is RopeKind.LINEAR:
        inv_freq = inv_freq / rope.factor
    elif rope.kind is RopeKind.LLAMA3:
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        low_freq_wavelen = rope.original_max_position / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
        inv_freq = scaled
    return inv_freq


class Rotary(torch.nn.Module):
    """Applies RoPE in the half-split layout used by Hugging Face Llama checkpoints."""

    def __init__(self, rope: RopeSpec, head_dim: int, max_positions: int, ops: KernelOps,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops = ops
        inv_freq = inv_frequencies(rope, head_dim).to(device)
        angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (P, D/2)
        self.register_buffer("sin", angles.sin(), persistent=False)  # (P, D/2)

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         slots: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (T, Hq, D), k, v: (T, Hkv, D), positions, slots: (T,) -> q, k rotated (computed in
        float32, rounded once); rotated k and v written to the paged cache at `slots`."""
        return self.ops.rotary_store_kv(q, k, v, slots, kv_cache[0], kv_cache[1], self.cos, self.sin, positions)
