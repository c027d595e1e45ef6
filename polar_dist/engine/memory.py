"""How many KV-cache blocks a rank gets.

First that applies:
1. `engine.kv_cache_blocks` > 0: exactly that many;
2. CUDA: what is left of `engine.gpu_memory_utilization` x the GPU's memory after everything
   already on it (weights, the CUDA context, other processes) and the activation peak of a
   profiled worst step (a prefill chunk of max_num_batched_tokens tokens, its logits and the
   sampler over max_batch_size rows), less the gathered K/V of a chunk at the longest context;
3. CPU: `engine.kv_cache_memory_gb` GiB if > 0, else room for max_batch_size sequences of
   max_seq_len tokens.
Every rank computes its own number and all take the smallest, so the ranks' caches match.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch import nn

from polar_dist.config import EngineConfig
from polar_dist.engine.kv_cache import allocate_kv_caches, blocks_needed
from polar_dist.engine.sampling import SampleRow, Sampler, SamplingParams
from polar_dist.errors import UserError
from polar_dist.models.attention import AttentionBatch
from polar_dist.model_spec import ModelSpec
from polar_dist.parallel.plan import ShardPlan

GiB = 1 << 30


@dataclass(frozen=True)
class KVSizing:
    num_blocks: int
    setting: str  # the config field that decided it, named in messages
    detail: str  # how the number came about, for the log


def kv_bytes_per_block(spec: ModelSpec, plan: ShardPlan, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block of this rank's KV heads."""
    return 2 * spec.num_layers * plan.num_kv_heads_local * block_size * spec.head_dim * dtype.itemsize


@torch.inference_mode()
def profile_peak_bytes(model: nn.Module, spec: ModelSpec, plan: ShardPlan, e: EngineConfig, max_seq_len: int,
                       dtype: torch.dtype, device: torch.device) -> int:
    """Bytes a worst step adds on the GPU above what is allocated now, not counting the KV cache:
    one prefill chunk of max_num_batched_tokens tokens (in a scratch cache), the logits of
    max_batch_size rows and the sampler over them. Runs the model's collectives: every rank calls it."""
    tokens = min(e.max_num_batched_tokens, max_seq_len - 1)
    rows = min(e.max_batch_size, tokens)
    n_blocks = blocks_needed(tokens, e.block_size)
    caches = allocate_kv_caches(spec.num_layers, n_blocks, plan.num_kv_heads_local, e.block_size, spec.head_dim,
                                dtype, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    batch = AttentionBatch(
        is_decode=False,
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(n_blocks, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.arange(tokens, dtype=torch.int64, device=device),
        head_table=torch.arange(plan.num_kv_heads_local, dtype=torch.int32, device=device)[None],
        num_rows=1, query_lens=(tokens,), seq_lens_host=(tokens,))
    ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    hidden = model(ids, torch.arange(tokens, device=device), batch, caches)  # (tokens, d)
    logits = model.logits(hidden[:rows])  # (rows, V)
    params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=5)
    Sampler(spec.vocab_size, device, use_kernel=True).sample(logits, [SampleRow(params, i, 0) for i in range(rows)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del caches, hidden, logits
    torch.cuda.empty_cache()
    # A chunk at the end of the longest context gathers (and, for GQA, expands) its K and V.
    context_kv = 2 * max_seq_len * plan.num_heads_local * spec.head_dim * dtype.itemsize
    return peak + context_kv


def size_kv_cache(e: EngineConfig, spec: ModelSpec, plan: ShardPlan, max_seq_len: int, dtype: torch.dtype,
                  device: torch.device, model: nn.Module) -> KVSizing:
    """This rank's choice (the caller takes the smallest over the ranks)."""
    per_block = kv_bytes_per_block(spec, plan, e.block_size, dtype)
    if e.kv_cache_blocks:
        return KVSizing(e.kv_cache_blocks, "engine.kv_cache_blocks", f"engine.kv_cache_blocks = {e.kv_cache_blocks}")
    if device.type == "cuda":
        # Memory a dead runtime of this process left in the caching allocator (or in unreachable
        # cycles) is free for this one: without this, a second runtime in one process (tests,
        # benchmarks) counts its predecessor's KV cache as in use and gets no cache at all.
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        peak = profile_peak_bytes(model, spec, plan, e, max_seq_len, dtype, device)
        budget = e.gpu_memory_utilization * total - used - peak
        detail = (f"engine.gpu_memory_utilization = {e.gpu_memory_utilization} of {total / GiB:.1f} GiB, "
                  f"{used / GiB:.2f} GiB in use after loading, a profiled step peak of {peak / GiB:.2f} GiB")
        num_blocks = int(max(budget, 0) // per_block)
        if num_blocks * e.block_size < max_seq_len:
            raise UserError(
                f"the KV cache left after the weights and activations ({max(budget, 0) / GiB:.2f} GiB: {detail}) "
                f"holds {num_blocks * e.block_size} tokens, less than one sequence of engine.max_seq_len = "
                f"{max_seq_len}; raise engine.gpu_memory_utilization, lower engine.max_seq_len or "
                f"engine.max_num_batched_tokens, or use more tensor-parallel ranks")
        return KVSizing(num_blocks, "engine.gpu_memory_utilization", detail)
    if e.kv_cache_memory_gb:
        num_blocks = int(e.kv_cache_memory_gb * GiB // per_block)
        if num_blocks * e.block_size < max_seq_len:
            raise UserError(
                f"engine.kv_cache_memory_gb = {e.kv_cache_memory_gb} holds {num_blocks * e.block_size} tokens "
                f"({per_block} bytes per {e.block_size}-token block), less than one sequence of engine.max_seq_len "
                f"= {max_seq_len}; raise engine.kv_cache_memory_gb or lower engine.max_seq_len")
        return KVSizing(num_blocks, "engine.kv_cache_memory_gb", f"engine.kv_cache_memory_gb = {e.kv_cache_memory_gb}")
    num_blocks = e.max_batch_size * blocks_needed(max_seq_len, e.block_size)
    return KVSizing(num_blocks, "engine.kv_cache_memory_gb",
                    f"engine.max_batch_size = {e.max_batch_size} sequences of engine.max_seq_len = {max_seq_len}")
