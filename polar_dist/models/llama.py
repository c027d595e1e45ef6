"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, SwiGLU, GQA.

Written for one device; `ctx.plan` (which heads/columns this rank holds) and `ctx.comm` (its
tensor-parallel group) make the same code a shard. At tp=1 `comm` is `SingleRank` and
torch.distributed is never touched. `weight_table` says where each parameter comes from.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.dispatch import KernelOps
from polar_dist.model_spec import ModelSpec
from polar_dist.models.attention import AttentionBatch, paged_attention
from polar_dist.models.build import BuildContext
from polar_dist.models.checkpoint import Init
from polar_dist.models.head_selection import ScoredQKV, make_head_selection
from polar_dist.models.rope import Rotary
from polar_dist.models.tap import Tap
from polar_dist.models.weights import Dim, HFTensor, Weight, router_weights, weight
from polar_dist.sparsity.policy import SparsityPolicy
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelOps, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, ctx: BuildContext, rotary: Rotary, layer: int) -> None:
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        self.ops = ctx.ops
        self.router_input = Tap()  # (T, d): what the head router reads
        self.head_output = Tap()  # (T, Hq_local, D): per-head attention output, before the out-projection
        self.heads = make_head_selection(ctx, layer)
        self.head_dim = spec.head_dim
        self.num_heads_local = plan.num_heads_local
        self.num_kv_heads_local = plan.num_kv_heads_local
        self.rotary = rotary
        qkv_local = (plan.num_heads_local + 2 * plan.num_kv_heads_local) * spec.head_dim
        self.qkv = ColumnParallelLinear(spec.hidden_size, qkv_local, bias=spec.qkv_bias, dtype=ctx.dtype,
                                        device=ctx.device, linear=ctx.ops.linear)
        self.project = ScoredQKV(self.qkv, self.heads)  # one GEMM: q, k, v and the head router's scores
        self.o_proj = RowParallelLinear(plan.num_heads_local * spec.head_dim, spec.hidden_size, bias=spec.o_bias,
                                        comm=ctx.comm, dtype=ctx.dtype, device=ctx.device, linear=ctx.ops.linear)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        q_size, kv_size = self.num_heads_local * D, self.num_kv_heads_local * D
        x = self.router_input(x)
        qkv, scores = self.project(x)  # (T, q_size + 2 kv_size), (T, G) or None
        head_table = self.heads.decode_table(x, batch, scores)  # (rows, k) for the decode rows; None if none
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        v = v.view(T, self.num_kv_heads_local, D)  # (T, Hkv_local, D)
        # (T, Hq_local, D), (T, Hkv_local, D) rotated; k, v also in the cache
        q, k = self.rotary.rotate_and_store(q.view(T, self.num_heads_local, D), k.view(T, self.num_kv_heads_local, D),
                                            v, positions, batch.slot_mapping, kv_cache)
        o = paged_attention(self.ops, q, kv_cache[0], kv_cache[1], batch, D**-0.5, head_table, k, v)  # (T, Hq_local, D)
        o = self.heads.mask_decode_output(o, batch)
        return self.o_proj(self.head_output(o).reshape(T, q_size))


class SwiGLU(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        self.gate_up = ColumnParallelLinear(spec.hidden_size, 2 * plan.intermediate_size_local, bias=spec.mlp_bias,
                                            dtype=ctx.dtype, device=ctx.device, linear=ctx.ops.linear)
        self.down = RowParallelLinear(plan.intermediate_size_local, spec.hidden_size, bias=spec.mlp_bias,
                                      comm=ctx.comm, dtype=ctx.dtype, device=ctx.device, linear=ctx.ops.linear)
        self.ops = ctx.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.ops.silu_mul(self.gate_up(x)))  # (T, 2 I_local) -> (T, I_local) -> (T, d)


class LlamaBlock(nn.Module):
    def __init__(self, ctx: BuildContext, rotary: Rotary, layer: int) -> None:
        super().__init__()
        d, eps = ctx.spec.hidden_size, ctx.spec.norm_eps
        self.input_norm = RMSNorm(d, eps, ctx.ops, ctx.dtype, ctx.device)
        self.attn = LlamaAttention(ctx, rotary, layer)
        self.post_attn_norm = RMSNorm(d, eps, ctx.ops, ctx.dtype, ctx.device)
        self.mlp = SwiGLU(ctx)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sublayer's output (the embedding for layer 0); residual: the running
        residual stream before adding h (None for layer 0). Returns (MLP output, residual)."""
        if residual is None:
            x, residual = self.input_norm(h), h
        else:
            x, residual = self.input_norm.add_forward(h, residual)
        x, residual = self.post_attn_norm.add_forward(self.attn(x, positions, batch, kv_cache), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, ctx: BuildContext, max_positions: int) -> None:
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        self.rotary = Rotary(spec.rope, spec.head_dim, max_positions, ctx.ops, ctx.device)
        self.embed = VocabParallelEmbedding(plan.vocab_size_local, plan.vocab_start, spec.hidden_size, comm=ctx.comm,
                                            dtype=ctx.dtype, device=ctx.device)
        self.layers = nn.ModuleList(LlamaBlock(ctx, self.rotary, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps, ctx.ops, ctx.dtype, ctx.device)
        head_weight = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty_like(self.embed.weight), requires_grad=False)
        self.lm_head = ParallelLMHead(head_weight, spec.vocab_size, comm=ctx.comm, linear=ctx.ops.linear)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        h, residual = self.embed(ids), None  # (T, d)
        for layer, kv in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, batch, kv)
        return self.norm.add_forward(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (B, V) float32


def weight_table(spec: ModelSpec, policy: SparsityPolicy) -> list[Weight]:
    """Our parameters from a Hugging Face Llama-family checkpoint (and head routers from a
    router artifact where the policy routes). Biases exist where the config declares them
    (Qwen2: q/k/v; attention_bias: q/k/v/o; mlp_bias: gate/up/down); the o/down biases are
    added once, after the all-reduce, so every rank holds all of them."""
    H, Q, KV, MLP, V = Dim.HIDDEN, Dim.Q, Dim.KV, Dim.MLP, Dim.VOCAB
    table = [weight("embed.weight", "model.embed_tokens.weight", V, H),
             weight("norm.weight", "model.norm.weight", H, init=Init.NEAR_ONE)]
    if not spec.tie_word_embeddings:
        table.append(weight("lm_head.weight", "lm_head.weight", V, H))
    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        table += [
            weight(f"{ours}.input_norm.weight", f"{hf}.input_layernorm.weight", H, init=Init.NEAR_ONE),
            weight(f"{ours}.post_attn_norm.weight", f"{hf}.post_attention_layernorm.weight", H, init=Init.NEAR_ONE),
            Weight(f"{ours}.attn.qkv.weight", (HFTensor(f"{attn}.q_proj.weight", (Q, H)),
                                               HFTensor(f"{attn}.k_proj.weight", (KV, H)),
                                               HFTensor(f"{attn}.v_proj.weight", (KV, H)))),
            weight(f"{ours}.attn.o_proj.weight", f"{attn}.o_proj.weight", H, Q),
            Weight(f"{ours}.mlp.gate_up.weight", (HFTensor(f"{mlp}.gate_proj.weight", (MLP, H)),
                                                  HFTensor(f"{mlp}.up_proj.weight", (MLP, H)))),
            weight(f"{ours}.mlp.down.weight", f"{mlp}.down_proj.weight", H, MLP),
        ]
        if spec.qkv_bias:
            table.append(Weight(f"{ours}.attn.qkv.bias", (HFTensor(f"{attn}.q_proj.bias", (Q,)),
                                                          HFTensor(f"{attn}.k_proj.bias", (KV,)),
                                                          HFTensor(f"{attn}.v_proj.bias", (KV,)))))
        if spec.o_bias:
            table.append(weight(f"{ours}.attn.o_proj.bias", f"{attn}.o_proj.bias", H))
        if spec.mlp_bias:
            table += [Weight(f"{ours}.mlp.gate_up.bias", (HFTensor(f"{mlp}.gate_proj.bias", (MLP,)),
                                                          HFTensor(f"{mlp}.up_proj.bias", (MLP,)))),
                      weight(f"{ours}.mlp.down.bias", f"{mlp}.down_proj.bias", H)]
        table += router_weights(i, policy, spec)
    return table
