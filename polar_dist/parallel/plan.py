"""ShardPlan: which slice of every sharded dimension belongs to one rank.

Attention is split by heads. Query heads are divided evenly (tp must divide num_heads).
KV heads are divided evenly when tp divides num_kv_heads; when tp is a multiple of
num_kv_heads each rank holds the one KV head its query heads read, replicated on
tp / num_kv_heads ranks. MLP columns are split into near-equal contiguous ranges
(tp need not divide the intermediate size). The vocabulary is padded to a multiple of tp.
"""

from __future__ import annotations

from dataclasses import dataclass

from polar_dist.model_spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    rank: int
    tp: int
    num_heads_local: int
    num_kv_heads_local: int
    q_head_start: int  # first query head of this rank (global index)
    kv_head_start: int  # first KV head of this rank (global index)
    mlp_start: int  # this rank's range of intermediate (MLP) columns
    mlp_end: int
    vocab_start: int  # this rank's range of (padded) vocabulary rows
    vocab_size_local: int

    @property
    def intermediate_size_local(self) -> int:
        return self.mlp_end - self.mlp_start


def make_shard_plan(spec: ModelSpec, rank: int, tp: int) -> ShardPlan:
    spec.check_tp(tp)
    num_heads_local = spec.num_heads // tp
    q_head_start = rank * num_heads_local
    if spec.num_kv_heads % tp == 0:
        num_kv_heads_local = spec.num_kv_heads // tp
        kv_head_start = rank * num_kv_heads_local
    else:  # tp is a multiple of num_kv_heads: replicate the KV head this rank's queries use
        num_kv_heads_local = 1
        kv_head_start = q_head_start // spec.group_size
    base, extra = divmod(spec.intermediate_size, tp)
    mlp_start = rank * base + min(rank, extra)
    mlp_end = mlp_start + base + (1 if rank < extra else 0)
    vocab_size_local = -(-spec.vocab_size // tp)
    return ShardPlan(
        rank=rank,
        tp=tp,
        num_heads_local=num_heads_local,
        num_kv_heads_local=num_kv_heads_local,
        q_head_start=q_head_start,
        kv_head_start=kv_head_start,
        mlp_start=mlp_start,
        mlp_end=mlp_end,
        vocab_start=rank * vocab_size_local,
        vocab_size_local=vocab_size_local,
    )
