"""OPT decoder: pre-LayerNorm, learned positions (offset 2), ReLU MLP, biases everywhere.

The ReLU MLP is what makes batch-union neuron sparsity possible (fc1 -> relu -> fc2).
"""

from __future__ import annotations

import torch
from torch import nn

from polar_dist.model_spec import ModelSpec
from polar_dist.models.attention import AttentionBatch, paged_attention, write_kv
from polar_dist.models.build import BuildContext
from polar_dist.models.checkpoint import Init
from polar_dist.models.weights import Dim, HFTensor, Weight, weight
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


def _layer_norm(dim: int, dtype: torch.dtype, device: torch.device | str) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
    norm.requires_grad_(False)
    return norm


class OPTAttention(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        self.ops = ctx.ops
        self.head_dim = spec.head_dim
        self.num_heads_local = plan.num_heads_local
        self.qkv = ColumnParallelLinear(spec.hidden_size, 3 * plan.num_heads_local * spec.head_dim, bias=True,
                                        dtype=ctx.dtype, device=ctx.device)
        self.out_proj = RowParallelLinear(plan.num_heads_local * spec.head_dim, spec.hidden_size, bias=True,
                                          comm=ctx.comm, dtype=ctx.dtype, device=ctx.device)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, D, H = x.shape[0], self.head_dim, self.num_heads_local
        q, k, v = self.qkv(x).view(T, 3, H, D).unbind(1)  # (T, H_local, D) each
        write_kv(kv_cache[0], kv_cache[1], k, v, batch.slot_mapping)
        o = paged_attention(self.ops, q.contiguous(), kv_cache[0], kv_cache[1], batch, scale=D**-0.5)
        return self.out_proj(o.reshape(T, H * D))


class OPTBlock(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        d, n_local, dtype, device = ctx.spec.hidden_size, ctx.plan.intermediate_size_local, ctx.dtype, ctx.device
        self.attn_norm = _layer_norm(d, dtype, device)
        self.attn = OPTAttention(ctx)
        self.mlp_norm = _layer_norm(d, dtype, device)
        self.fc1 = ColumnParallelLinear(d, n_local, bias=True, dtype=dtype, device=device)
        self.fc2 = RowParallelLinear(n_local, d, bias=True, comm=ctx.comm, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), batch, kv_cache)
        return h + self.fc2(torch.relu(self.fc1(self.mlp_norm(h))))


class OPTModel(nn.Module):
    def __init__(self, ctx: BuildContext, max_positions: int) -> None:
        super().__init__()
        spec, plan, dtype, device = ctx.spec, ctx.plan, ctx.dtype, ctx.device
        d = spec.hidden_size
        self.embed = VocabParallelEmbedding(plan.vocab_size_local, plan.vocab_start, d, comm=ctx.comm, dtype=dtype,
                                            device=device)
        self.positions = nn.Embedding(spec.max_position_embeddings + POSITION_OFFSET, d, dtype=dtype, device=device)
        self.positions.requires_grad_(False)
        self.layers = nn.ModuleList(OPTBlock(ctx) for _ in range(spec.num_layers))
        self.norm = _layer_norm(d, dtype, device)
        head_weight = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty_like(self.embed.weight), requires_grad=False)
        self.lm_head = ParallelLMHead(head_weight, spec.vocab_size, comm=ctx.comm)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        h = self.embed(ids) + self.positions(positions + POSITION_OFFSET)  # (T, d)
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, positions, batch, kv)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def weight_table(spec: ModelSpec) -> list[Weight]:
    """Our parameters from a Hugging Face OPT checkpoint (biases everywhere; the out-proj and
    fc2 biases are added once, after the all-reduce, so every rank holds all of them)."""
    H, Q, MLP, V, P, p = Dim.HIDDEN, Dim.Q, Dim.MLP, Dim.VOCAB, Dim.POSITIONS, "model.decoder"
    table = [weight("embed.weight", f"{p}.embed_tokens.weight", V, H),
             weight("positions.weight", f"{p}.embed_positions.weight", P, H),
             weight("norm.weight", f"{p}.final_layer_norm.weight", H, init=Init.NEAR_ONE),
             weight("norm.bias", f"{p}.final_layer_norm.bias", H)]
    if not spec.tie_word_embeddings:
        table.append(weight("lm_head.weight", "lm_head.weight", V, H))
    for i in range(spec.num_layers):
        hf, ours = f"{p}.layers.{i}", f"layers.{i}"
        table += [
            weight(f"{ours}.attn_norm.weight", f"{hf}.self_attn_layer_norm.weight", H, init=Init.NEAR_ONE),
            weight(f"{ours}.attn_norm.bias", f"{hf}.self_attn_layer_norm.bias", H),
            weight(f"{ours}.mlp_norm.weight", f"{hf}.final_layer_norm.weight", H, init=Init.NEAR_ONE),
            weight(f"{ours}.mlp_norm.bias", f"{hf}.final_layer_norm.bias", H),
            Weight(f"{ours}.attn.qkv.weight", tuple(HFTensor(f"{hf}.self_attn.{n}_proj.weight", (Q, H)) for n in "qkv")),
            Weight(f"{ours}.attn.qkv.bias", tuple(HFTensor(f"{hf}.self_attn.{n}_proj.bias", (Q,)) for n in "qkv")),
            weight(f"{ours}.attn.out_proj.weight", f"{hf}.self_attn.out_proj.weight", H, Q),
            weight(f"{ours}.attn.out_proj.bias", f"{hf}.self_attn.out_proj.bias", H),
            weight(f"{ours}.fc1.weight", f"{hf}.fc1.weight", MLP, H),
            weight(f"{ours}.fc1.bias", f"{hf}.fc1.bias", MLP),
            weight(f"{ours}.fc2.weight", f"{hf}.fc2.weight", H, MLP),
            weight(f"{ours}.fc2.bias", f"{hf}.fc2.bias", H),
        ]
    return table
