"""CUDA graphs for decode steps: one captured graph per batch-size bucket.

An eager decode step of a 32-layer model launches ~1500 kernels, and at small batch the
host spends longer launching them than the GPU spends running them. A graph replays the
whole step with one launch. Shapes must be static, so a step of B sequences runs in the
smallest bucket >= B: block tables are padded to the longest sequence the engine allows,
and padding rows attend to one token of a scratch block that no sequence owns. Everything
the kernels read (ids, positions, lengths, slots, the work plan, block tables, head table)
lives in buffers the graph captured.

A step's inputs reach the device in one copy: the host fills a pinned int32 buffer laid out
as the bucket's graph reads it (ids, positions, lengths, slots, row count, work plan), with
the block tables' used columns packed after it, copies that prefix, and one device copy
spreads the tables' columns into the captured (rows, max_blocks) table; columns past the
step's width are never read (the plan bounds every row by its length), so they may hold
older steps' blocks.
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


class _Inputs:
    """Offsets (int32 words) of a bucket of n rows' inputs in the staging buffer: ids,
    positions, seq_lens and slots (n each), the row count, the work plan; packed block
    tables follow at `header`."""

    def __init__(self, n: int, plan_words: int) -> None:
        self.n = n
        self.num_rows = 4 * n
        self.plan = 4 * n + 1
        self.header = self.plan + plan_words

    def field(self, buf: torch.Tensor | np.ndarray, i: int) -> torch.Tensor | np.ndarray:
        """Field i (0 ids, 1 positions, 2 seq_lens, 3 slots) of the bucket's rows in `buf`."""
        return buf[i * self.n:(i + 1) * self.n]


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
        self.head_table = head_table
        self.max_blocks = max_blocks
        # Per bucket, its inputs' layout: the work plan is its item count, `capacity` item rows and
        # one row per sequence (every layer reads it).
        self.planner = planner
        self._inputs = {b: _Inputs(b, 1 + planner.capacity(b) + SEQ_FIELDS * b) for b in self.buckets}
        words = max(lay.header + b * max_blocks for b, lay in self._inputs.items())
        self.staging = torch.zeros(words, dtype=torch.int32, device=dev)
        cuda = dev.type == "cuda"  # (the CPU tests replay the same buffers eagerly)
        self._host = torch.zeros(words, dtype=torch.int32, pin_memory=cuda)
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of the pinned buffer has finished
        self.block_tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def _batch(self, n: int) -> AttentionBatch:
        lay, cap = self._inputs[n], self.planner.capacity(n)
        seq_lens, slots = lay.field(self.staging, 2), lay.field(self.staging, 3)
        # partials for any plan of this capacity
        plan = plan_views(self.staging[lay.plan:lay.header], cap, n, num_parts=cap)
        return AttentionBatch(is_decode=True, seq_lens=seq_lens, block_tables=self.block_tables[:n],
                              slot_mapping=slots, head_table=self.head_table[:n],
                              num_rows=self.staging[lay.num_rows], query_lens=(), seq_lens_host=(), plan=plan)

    def _forward(self, n: int) -> torch.Tensor:
        lay = self._inputs[n]
        ids, positions = lay.field(self.staging, 0), lay.field(self.staging, 1)  # (n,) int32 each
        hidden = self.model(ids, positions, self._batch(n), self.kv_caches)  # (n, d)
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
    def run(self, step: Step, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the decode step into the captured buffers and replay; (B, V) float32 logits.
        ids: (B,) input tokens already on the device (a chained step), in place of step.token_ids."""
        b, n = step.batch_size, self.bucket(step.batch_size)
        assert n is not None, "batch larger than the largest captured bucket"
        lay, host, bs, scratch = self._inputs[n], self._host_np, self.block_size, self.scratch_block
        width = -(-int(step.seq_lens.max()) // bs)  # the columns any row reads (the engine's tables are wider)
        assert width <= self.max_blocks, f"a sequence of {width} blocks is past max_seq_len's {self.max_blocks}"
        if self._copied is not None:
            self._copied.synchronize()  # the pinned buffer is free again
        # Padding rows: one token at position 0 of the scratch block.
        for i, (values, pad) in enumerate(((step.token_ids, 0), (step.positions, 0), (step.seq_lens, 1),
                                           (step.slot_mapping, scratch * bs))):
            field = lay.field(host, i)
            field[:b], field[b:] = values, pad
        host[lay.num_rows] = b
        plan = self.planner.plan(lay.field(host, 2), capacity=self.planner.capacity(n)).flat()
        host[lay.plan:lay.plan + plan.shape[0]] = plan
        tables = host[lay.header:lay.header + n * width].reshape(n, width)  # the used columns only
        tables[:b], tables[b:] = step.block_tables[:, :width], scratch
        end = lay.header + n * width
        self.staging[:end].copy_(self._host[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.block_tables[:n, :width].copy_(self.staging[lay.header:end].view(n, width))
        if ids is not None:
            lay.field(self.staging, 0)[:b].copy_(ids)
        if n not in self._graphs:
            self._graphs[n] = self._capture(n)
        graph, logits = self._graphs[n]
        graph.replay()
        return logits[:b].clone()
