"""ModelRunner: runs one Step on this rank's shard and returns next-token logits."""

from __future__ import annotations

import torch
from torch import nn

from polar_dist.engine.cuda_graphs import DecodeGraphs
from polar_dist.engine.kv_cache import allocate_kv_caches, blocks_needed
from polar_dist.engine.step import StepKind, Step
from polar_dist.models.attention import AttentionBatch
from polar_dist.model_spec import ModelSpec
from polar_dist.parallel.plan import ShardPlan


class ModelRunner:
    """`num_blocks` KV blocks are for sequences (the scheduler's allocator hands them out); one
    more, the scratch block, takes the writes of CUDA-graph padding rows."""

    def __init__(self, model: nn.Module, spec: ModelSpec, plan: ShardPlan, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(spec.num_layers, num_blocks + 1, plan.num_kv_heads_local, block_size,
                                            spec.head_dim, dtype, device)
        # (max_batch_size, Hkv_local) int32: every sequence reads every local KV group (density 1.0);
        # decode steps use its first B rows, eager or captured.
        self.head_table = torch.arange(plan.num_kv_heads_local, dtype=torch.int32, device=device).expand(
            max_batch_size, -1).contiguous()
        self.graphs = DecodeGraphs(
            model, self.kv_caches, self.head_table, max_blocks=blocks_needed(max_seq_len, block_size),
            block_size=block_size, scratch_block=num_blocks, device=device) \
            if cuda_graphs and device.type == "cuda" else None

    @torch.inference_mode()
    def execute(self, step: Step) -> torch.Tensor:
        """Run the step's tokens through the model; returns (B, vocab) float32 logits of each
        sequence's last new token."""
        assert step.kind is not StepKind.STOP
        if step.kind is StepKind.DECODE and self.graphs is not None and self.graphs.bucket(step.batch_size):
            return self.graphs.run(step)
        dev = self.device
        max_blocks = max(len(t) for t in step.block_tables)
        tables = [t + [0] * (max_blocks - len(t)) for t in step.block_tables]
        block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)  # (B, max_blocks)
        positions = torch.tensor(step.positions, dtype=torch.int64, device=dev)  # (T,)
        is_decode = step.kind is StepKind.DECODE
        batch = AttentionBatch(
            is_decode=is_decode,
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32, device=dev),
            block_tables=block_tables,
            slot_mapping=torch.tensor(step.cache_slots(self.block_size), dtype=torch.int64, device=dev),
            head_table=self.head_table[:step.batch_size] if is_decode else None,
            num_rows=step.batch_size,
            query_lens=tuple(step.query_lens),
            seq_lens_host=tuple(step.seq_lens),
        )
        ids = torch.tensor(step.token_ids, dtype=torch.int64, device=dev)  # (T,)
        hidden = self.model(ids, positions, batch, self.kv_caches)  # (T, d)
        last = torch.tensor(step.query_lens, device=dev).cumsum(0) - 1  # (B,) index of each last token
        return self.model.logits(hidden[last])  # (B, V)
