"""ModelRunner: runs one Step on this rank's shard; on rank 0 it also samples the step's tokens
on the device and returns them (with logprobs when asked), never the logits.

A chained step (Step.chained) takes its input tokens from the previous step's samples, still
on the device: the driver passes them in, and with tensor parallelism they are broadcast from
it to the replica's other ranks, in stream order before the forward."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels.attention_plan import StepPlanner
from polar_dist import envs
from polar_dist.engine.cuda_graphs import DecodeGraphs
from polar_dist.engine.kv_cache import allocate_kv_caches, blocks_needed
from polar_dist.engine.sampling import PromptRows, SampleOutput, SampleRow, Sampler
from polar_dist.engine.step import Step
from polar_dist.models.attention import AttentionBatch
from polar_dist.model_spec import ModelSpec
from polar_dist.parallel.comm import SingleRank, TPComm
from polar_dist.parallel.plan import ShardPlan


class ModelRunner:
    """`num_blocks` KV blocks are for sequences (the scheduler's allocator hands them out); one
    more, the scratch block, takes the writes of CUDA-graph padding rows."""

    def __init__(self, model: nn.Module, spec: ModelSpec, plan: ShardPlan, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, max_batch_size: int, max_seq_len: int,
                 cuda_graphs: bool, sampler: Sampler | None = None, attention_groups: int | None = None,
                 comm: TPComm | None = None) -> None:
        """attention_groups: KV groups per sequence most layers read on this rank (sets how finely
        decode attention is cut into work items; default every local group). comm: the
        replica's tensor-parallel group (a chained step's tokens come from its first rank)."""
        self.model = model
        self.device = device
        self.comm = comm or SingleRank()
        self._chained_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)  # (max_batch_size,)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = blocks_needed(max_seq_len, block_size)
        self.num_kv_heads_local = plan.num_kv_heads_local
        self.kv_caches = allocate_kv_caches(spec.num_layers, num_blocks + 1, plan.num_kv_heads_local, block_size,
                                            spec.head_dim, dtype, device)
        self.sampler = sampler or Sampler(spec.vocab_size, device, use_kernel=device.type == "cuda",
                                          graph_rows=max_batch_size)
        # (max_batch_size, Hkv_local) int32: every sequence reads every local KV group (density 1.0);
        # decode rows use its first B rows, eager or captured.
        self.head_table = torch.arange(plan.num_kv_heads_local, dtype=torch.int32, device=device).expand(
            max_batch_size, -1).contiguous()
        self.planner = StepPlanner.for_device(
            attention_groups or plan.num_kv_heads_local, device, spec.head_dim,
            group_size=plan.num_heads_local // plan.num_kv_heads_local, longest_first=envs.PLAN_LONGEST_FIRST.get())
        self.graphs = DecodeGraphs(
            model, self.kv_caches, self.head_table, self.planner, max_blocks=self.max_blocks_per_seq,
            block_size=block_size, scratch_block=num_blocks, device=device) \
            if cuda_graphs and device.type == "cuda" else None

    @torch.inference_mode()
    def logits(self, step: Step, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step's tokens through the model: (L, V) float32 logits of `step.logit_indices`
        (the sampled rows' last tokens, then the prompt-logprob positions). ids: a chained step's
        (B,) int64 input tokens on the device (the driver's; None on the other ranks)."""
        if step.chained:
            ids = self._take_chained_ids(step.batch_size, ids)
        elif ids is not None:
            raise ValueError("input ids on the device are for chained steps only")
        if self._graphed(step):
            return self.graphs.run(step, ids)
        dev, T, B = self.device, step.num_tokens, step.batch_size
        # One host-to-device copy for every int64 array of the step.
        packed = np.concatenate([step.token_ids, step.positions, step.slot_mapping, step.seq_lens,
                                 step.logit_indices, step.block_tables.reshape(-1).astype(np.int64)])
        flat = torch.from_numpy(packed).to(dev, non_blocking=True)
        positions, slots = flat[T:2 * T], flat[2 * T:3 * T]
        ids = flat[:T] if ids is None else ids
        seq_lens = flat[3 * T:3 * T + B].to(torch.int32)
        off = 3 * T + B
        logit_idx = flat[off:off + len(step.logit_indices)]
        block_tables = flat[off + len(step.logit_indices):].view(B, -1).to(torch.int32)  # (B, max_blocks)
        n_decode = B if step.is_decode else step.num_decode  # rows read by the decode kernel
        plan = self.planner.plan(step.seq_lens[:n_decode]).to(dev) if n_decode else None
        batch = AttentionBatch(
            is_decode=step.is_decode,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slots,
            head_table=self.head_table[:B],
            num_rows=B,
            query_lens=tuple(step.query_lens.tolist()),
            seq_lens_host=tuple(step.seq_lens.tolist()),
            num_decode_rows=0 if step.is_decode else step.num_decode,
            plan=plan,
        )
        hidden = self.model(ids, positions, batch, self.kv_caches)  # (T, d)
        return self.model.logits(hidden[logit_idx])  # (L, V)

    def _take_chained_ids(self, batch: int, ids: torch.Tensor | None) -> torch.Tensor:
        """(batch,) int64: the driver's `ids`, on every rank of the replica."""
        buf = self._chained_ids[:batch]
        if self.comm.rank == 0:
            if ids is None or ids.shape != (batch,):
                raise ValueError(f"a chained step of {batch} rows needs its {batch} input ids from the previous "
                                 f"step's samples, got {None if ids is None else tuple(ids.shape)}")
            buf.copy_(ids).clamp_(min=0)  # a failed sample (-1) feeds token 0: its row is dropped
        return self.comm.broadcast_from_first(buf)

    def _graphed(self, step: Step) -> bool:
        return step.is_decode and not step.prompt_spans and self.graphs is not None \
            and self.graphs.bucket(step.batch_size) is not None

    def forward_rows(self, step: Step) -> int:
        """Rows the model runs for `step`: its CUDA-graph bucket when replayed, else its batch."""
        if self._graphed(step):
            assert self.graphs is not None
            return self.graphs.bucket(step.batch_size) or step.batch_size
        return step.batch_size

    def execute(self, step: Step, rows: list[SampleRow] | None = None,
                prompt: PromptRows | None = None) -> SampleOutput | None:
        """Run the step; with `rows` (rank 0) sample its tokens on the device and return them. The
        other ranks pass None: they take part in the forward's collectives (and a chained step's
        broadcast of its input tokens) and return None."""
        logits = self.logits(step)
        if rows is None:
            return None
        return self.sampler.sample(logits, rows, prompt)
