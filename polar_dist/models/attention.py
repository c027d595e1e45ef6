"""Attention over the paged KV cache, for this rank's heads.

Tokens of a step are packed: T tokens from B sequences, no padding. Every step first writes
the new K/V of all local heads into the cache (slot_mapping), then:
- prefill (any number of new tokens per sequence): per sequence, dense causal SDPA of its new
  queries over its whole cached context;
- decode (one token per sequence): `KernelOps.select_attention` over the (sequence, KV group)
  pairs in `head_table` - every group when dense; unselected heads give zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.dispatch import KernelOps


@dataclass(frozen=True, kw_only=True)
class AttentionBatch:
    """What attention needs to know about one step; shared by all layers.

    seq_lens are context lengths after this step's tokens are appended.
    """

    is_decode: bool
    seq_lens: torch.Tensor  # (B,) int32, on the device
    block_tables: torch.Tensor  # (B, max_blocks) int32
    slot_mapping: torch.Tensor  # (T,) int64: cache slot (block * block_size + offset) of each new token
    head_table: torch.Tensor | None  # (B, Hkv_local) int32: every local KV group (dense decode); layers with
    # a head router replace it with their own (B, k) table, -1 = none
    num_rows: int | torch.Tensor  # sequences in the step; a 0-d device tensor in CUDA graphs, whose
    # batch holds padding rows past it (a batch-union selection must not count them)
    query_lens: tuple[int, ...]  # host copy: new tokens per sequence (prefill loop bounds)
    seq_lens_host: tuple[int, ...]  # host copy of seq_lens (prefill loop bounds)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # caches: (num_blocks, Hkv_local, block_size, D); k, v: (T, Hkv_local, D)
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size  # (T,), (T,)
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def paged_attention(ops: KernelOps, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, head_table: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq_local, D) -> (T, Hq_local, D). head_table: (B, k) local KV groups each decode
    sequence reads (-1 = none); None reads every group."""
    if batch.is_decode:
        table = batch.head_table if head_table is None else head_table
        return ops.select_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, table, scale)
    return _prefill_attention(q, k_cache, v_cache, batch, scale)


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                       scale: float) -> torch.Tensor:
    num_heads_local, num_kv_heads_local, block_size = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for i, (n_new, ctx) in enumerate(zip(batch.query_lens, batch.seq_lens_host)):
        n_blocks = -(-ctx // block_size)
        blocks = batch.block_tables[i, :n_blocks]
        # (n_blocks, Hkv, bs, D) -> (Hkv, n_blocks * bs, D) -> first ctx positions
        k = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads_local, -1, k_cache.shape[3])[:, :ctx]
        v = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads_local, -1, v_cache.shape[3])[:, :ctx]
        if num_kv_heads_local != num_heads_local:
            group = num_heads_local // num_kv_heads_local
            k = k.repeat_interleave(group, dim=0)  # (Hq, ctx, D)
            v = v.repeat_interleave(group, dim=0)
        qi = q[start:start + n_new].transpose(0, 1)  # (Hq, n_new, D)
        if n_new == ctx:
            mask = None
            causal = True
        else:  # queries sit at positions ctx - n_new .. ctx - 1 of an already cached context
            pos_q = torch.arange(ctx - n_new, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= pos_q  # (n_new, ctx)
            causal = False
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        out[start:start + n_new] = o.transpose(0, 1)  # (n_new, Hq, D)
        start += n_new
    return out
