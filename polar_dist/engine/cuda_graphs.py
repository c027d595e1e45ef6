"""CUDA graphs for decode steps: one captured graph per batch-size bucket.

An eager decode step of a 32-layer model launches ~1500 kernels, and at small batch the
host spends longer launching them than the GPU spends running them. A graph replays the
whole step with one launch. Shapes must be static, so a step of B sequences runs in the
smallest bucket >= B: block tables are padded to the longest sequence the engine allows,
and padding rows attend to one token of a scratch block that no sequence owns. Everything
the kernels read (ids, positions, lengths, block tables, slots, head table) lives in
buffers the graph captured; a step only copies its step into them and replays.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels.attention_plan import SEQ_FIELDS, StepPlanner, plan_views
from polar_dist.engine.step import Step
from polar_dist.models.attention import AttentionBatch


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, then multiples of 8, then max_batch_size: padding wastes fewer than 8 rows past 8."""
    buckets = [b for b in (1, 2, 4) if b < max_batch_size] + list(range(8, max_batch_size, 8))
    return buckets + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 head_table: torch.Tensor, planner: StepPlanner, *, max_blocks: int, block_size: int,
                 scratch_block: int, device: torch.device) -> None:
        """head_table: (max_batch_size, k_max) int32 KV groups each row reads; the graphs read it in place.
        planner: cuts each step's attention into work items (a static capacity per bucket)."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(head_table.shape[0])
        n, dev = self.buckets[-1], device
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.int64, device=dev)
        self.head_table = head_table
        self.num_rows = torch.zeros((), dtype=torch.int32, device=dev)
        # The attention work plan: per bucket, its item count, `capacity` item rows, one row per sequence,
        # at the start of one int32 buffer (one copy per step); every layer reads it.
        self.planner = planner
        self.plan_buffer = torch.zeros(1 + planner.capacity(n) + SEQ_FIELDS * n, dtype=torch.int32, device=dev)
        self.max_blocks = max_blocks
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def _batch(self, n: int) -> AttentionBatch:
        cap = self.planner.capacity(n)
        plan = plan_views(self.plan_buffer, cap, n, num_parts=cap)  # partials for any plan of this capacity
        return AttentionBatch(is_decode=True, seq_lens=self.seq_lens[:n], block_tables=self.block_tables[:n],
                              slot_mapping=self.slots[:n], head_table=self.head_table[:n], num_rows=self.num_rows,
                              query_lens=(), seq_lens_host=(), plan=plan)

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.ids[:n], self.positions[:n], self._batch(n), self.kv_caches)  # (n, d)
        return self.model.logits(hidden)  # (n, V)

    def _capture(self, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream first: Triton compiles and cuBLAS picks its kernels outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(n)
        return graph, logits

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor:
        """Copy the decode step into the captured buffers and replay; (B, V) float32 logits."""
        b, n = step.batch_size, self.bucket(step.batch_size)
        assert n is not None, "batch larger than the largest captured bucket"
        bs, scratch = self.block_size, self.scratch_block
        # Padding rows: one token at position 0 of the scratch block.
        tables = np.full((n, self.max_blocks), scratch, dtype=np.int32)
        tables[:b, :step.block_tables.shape[1]] = step.block_tables
        rows = np.zeros((4, n), dtype=np.int64)  # ids, positions, seq_lens, slots
        rows[0, :b], rows[1, :b], rows[2, :b], rows[3, :b] = step.token_ids, step.positions, step.seq_lens, \
            step.slot_mapping
        rows[2, b:], rows[3, b:] = 1, scratch * bs
        host = torch.from_numpy(rows).to(self.ids.device, non_blocking=True)
        self.ids[:n].copy_(host[0])
        self.positions[:n].copy_(host[1])
        self.seq_lens[:n].copy_(host[2])
        self.slots[:n].copy_(host[3])
        self.block_tables[:n].copy_(torch.from_numpy(tables), non_blocking=True)
        plan = self.planner.plan(rows[2, :n], capacity=self.planner.capacity(n)).flat()
        self.plan_buffer[:plan.shape[0]].copy_(torch.from_numpy(plan), non_blocking=True)
        self.num_rows.fill_(b)
        if n not in self._graphs:
            self._graphs[n] = self._capture(n)
        graph, logits = self._graphs[n]
        graph.replay()
        return logits[:b].clone()
