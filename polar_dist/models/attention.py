"""Attention over the paged KV cache, for this rank's heads.

Tokens of a step are packed: T tokens from B sequences, no padding. Every step first writes
the new K/V of all local heads into the cache (slot_mapping; `KernelOps.rotary_store_kv`), then:
- prefill or mixed (any number of new tokens per sequence): single-token (decode) rows first,
  through the decode kernel in one launch, over the groups of their head table (as in a decode
  step); then per sequence, dense causal SDPA of its new queries over its whole cached context;
- decode (one token per sequence): `KernelOps.select_attention` over the (sequence, KV group)
  pairs in `head_table` - every group when dense; unselected heads give zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels.attention_plan import AttentionPlan
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
    num_decode_rows: int = 0  # in a prefill (mixed) step: rows [0, n) are single-token decode rows, read
    # through the decode kernel (head_table's first n rows: every local group, unless a router's table is given)
    plan: AttentionPlan | None = None  # the decode rows' work plan (kernels/attention_plan.py), built on the
    # host once per step; None: the kernel builds one from seq_lens (a device sync)


def paged_attention(ops: KernelOps, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, head_table: torch.Tensor | None = None,
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq_local, D) -> (T, Hq_local, D). head_table: (rows, k) local KV groups each decode
    row reads (-1 = none): every row of a decode step, the first num_decode_rows of a mixed step;
    None reads every group. k, v: (T, Hkv_local, D) this step's new
    keys and values (already in the cache); a prefill row with no cached prefix reads them directly."""
    if batch.is_decode:
        table = batch.head_table if head_table is None else head_table
        return ops.select_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, table, scale,
                                    plan=batch.plan)
    out = torch.empty_like(q)
    n = batch.num_decode_rows
    if n:  # single-token rows of a mixed step: the decode kernel, one launch for all of them
        if head_table is None:
            assert batch.head_table is not None, "a mixed step needs the dense head table for its decode rows"
            head_table = batch.head_table[:n]
        width = -(-max(batch.seq_lens_host[:n]) // k_cache.shape[2])
        ops.select_attention(q[:n], k_cache, v_cache, batch.block_tables[:n, :width], batch.seq_lens[:n],
                             head_table, scale, out=out[:n], plan=batch.plan)
    _prefill_attention(q, k_cache, v_cache, batch, scale, out, k, v)
    return out


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch,
                       scale: float, out: torch.Tensor, k_new: torch.Tensor | None,
                       v_new: torch.Tensor | None) -> None:
    """Rows num_decode_rows.. : per row, 4-D (1, H, T, D) SDPA of its new queries over its whole
    context, so the fused backends run (flash on CUDA; on CPU the fused kernel is ~6x the
    3-D path at 5k tokens). GQA: CPU takes enable_gqa; CUDA expands K/V to the query heads,
    which every fused backend accepts."""
    num_heads_local, num_kv_heads_local, block_size, D = q.shape[1], k_cache.shape[1], k_cache.shape[2], q.shape[2]
    group = num_heads_local // num_kv_heads_local
    n = batch.num_decode_rows
    start = sum(batch.query_lens[:n])
    for i in range(n, len(batch.query_lens)):
        n_new, ctx = batch.query_lens[i], batch.seq_lens_host[i]
        if n_new == ctx and k_new is not None and v_new is not None:
            k = k_new[start:start + n_new].transpose(0, 1)  # (Hkv, ctx, D)
            v = v_new[start:start + n_new].transpose(0, 1)
        else:
            blocks = batch.block_tables[i, :-(-ctx // block_size)]
            # (n_blocks, Hkv, bs, D) -> (Hkv, n_blocks * bs, D) -> first ctx positions
            k = k_cache[blocks].transpose(0, 1).reshape(num_kv_heads_local, -1, D)[:, :ctx]
            v = v_cache[blocks].transpose(0, 1).reshape(num_kv_heads_local, -1, D)[:, :ctx]
        qi = q[start:start + n_new].transpose(0, 1).unsqueeze(0)  # (1, Hq, n_new, D)
        k, v = k.unsqueeze(0), v.unsqueeze(0)  # (1, Hkv, ctx, D)
        cuda = q.device.type == "cuda"
        if group > 1 and cuda:
            k = k[:, :, None].expand(1, num_kv_heads_local, group, ctx, D).reshape(1, num_heads_local, ctx, D)
            v = v[:, :, None].expand(1, num_kv_heads_local, group, ctx, D).reshape(1, num_heads_local, ctx, D)
        gqa = group > 1 and not cuda
        if n_new == ctx:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        elif cuda:  # queries at the end of the context: bottom-right aligned causal mask, which flash runs
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=causal_lower_right(n_new, ctx), scale=scale)
        else:
            pos_q = torch.arange(ctx - n_new, ctx, device=q.device).unsqueeze(1)
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= pos_q  # (n_new, ctx)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:start + n_new] = o[0].transpose(0, 1)  # (n_new, Hq, D)
        start += n_new
