"""Paged KV cache: fixed-size blocks, a block table per sequence, per-sequence lengths.

Per layer, K and V are (num_blocks, Hkv_local, block_size, D): one (block, kv head) tile is
contiguous, so attention that reads only selected heads does contiguous loads.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Hands out physical block ids; rank 0 owns it (the scheduler), other ranks follow plans."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache has {len(self._free)} free blocks, {n} requested")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def allocate_kv_caches(num_layers: int, num_blocks: int, num_kv_heads_local: int, block_size: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, num_kv_heads_local, block_size, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
