"""OPT decoder: pre-LayerNorm, learned positions (offset 2), ReLU MLP, biases everywhere.

The ReLU MLP is what makes batch-union neuron sparsity possible (fc1 -> relu -> fc2).
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
from polar_dist.models.relu_mlp import NeuronSparseMLP, ReluMLP
from polar_dist.models.tap import Tap
from polar_dist.models.weights import Dim, HFTensor, Transform, Weight, router_weights, weight
from polar_dist.sparsity.policy import SparsityPolicy
from polar_dist.sparsity.routers import NeuronRouter
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm's parameters (OPT's eps 1e-5) through the kernel ops, with the residual
    add fused in `add_forward`."""

    EPS = 1e-5

    def __init__(self, dim: int, ops: KernelOps, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.EPS)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        return self.ops.add_layer_norm(x, residual, self.weight, self.bias, self.EPS)


class OPTAttention(nn.Module):
    def __init__(self, ctx: BuildContext, layer: int) -> None:
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        self.ops = ctx.ops
        self.router_input = Tap()  # (T, d): what the head and neuron routers read
        self.head_output = Tap()  # (T, H_local, D): per-head attention output, before the out-projection
        self.heads = make_head_selection(ctx, layer)
        self.head_dim = spec.head_dim
        self.num_heads_local = plan.num_heads_local
        self.qkv = ColumnParallelLinear(spec.hidden_size, 3 * plan.num_heads_local * spec.head_dim, bias=True,
                                        dtype=ctx.dtype, device=ctx.device, linear=ctx.ops.linear)
        self.project = ScoredQKV(self.qkv, self.heads)  # one GEMM: q, k, v and the head router's scores
        self.out_proj = RowParallelLinear(plan.num_heads_local * spec.head_dim, spec.hidden_size, bias=True,
                                          comm=ctx.comm, dtype=ctx.dtype, device=ctx.device, linear=ctx.ops.linear)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, D, H = x.shape[0], self.head_dim, self.num_heads_local
        x = self.router_input(x)
        qkv, scores = self.project(x)  # (T, 3 H_local D), (T, G) or None
        head_table = self.heads.decode_table(x, batch, scores)  # (rows, k) for the decode rows; None if none
        q, k, v = qkv.view(T, 3, H, D).unbind(1)  # (T, H_local, D) each
        q, _ = self.ops.rotary_store_kv(q, k, v, batch.slot_mapping, kv_cache[0], kv_cache[1])  # q contiguous
        o = paged_attention(self.ops, q, kv_cache[0], kv_cache[1], batch, D**-0.5, head_table, k, v)
        o = self.heads.mask_decode_output(o, batch)
        return self.out_proj(self.head_output(o).reshape(T, H * D))


class OPTBlock(nn.Module):
    def __init__(self, ctx: BuildContext, layer: int) -> None:
        super().__init__()
        d, dtype, device, policy = ctx.spec.hidden_size, ctx.dtype, ctx.device, ctx.policy
        self.attn_norm = LayerNorm(d, ctx.ops, dtype, device)
        self.attn = OPTAttention(ctx, layer)
        self.mlp_norm = LayerNorm(d, ctx.ops, dtype, device)
        self.mlp: ReluMLP | NeuronSparseMLP
        if policy.neuron_k is None:
            self.mlp = ReluMLP(ctx)
        else:
            router = NeuronRouter(d, ctx.plan.intermediate_size_local, dtype=dtype, device=device)
            self.mlp = NeuronSparseMLP(ctx, router, policy.neuron_k[layer], policy.mlp_dense_above)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sublayer's output (the token embeddings for layer 0); residual: the
        residual stream before adding h (the position embeddings for layer 0). Returns (MLP
        output, residual)."""
        a, residual = self.attn_norm.add_forward(h, residual)  # a: the attention input, which both routers read
        m, residual = self.mlp_norm.add_forward(self.attn(a, batch, kv_cache), residual)
        return self.mlp(m, batch, a), residual


class OPTModel(nn.Module):
    def __init__(self, ctx: BuildContext, max_positions: int) -> None:
        super().__init__()
        spec, plan, dtype, device = ctx.spec, ctx.plan, ctx.dtype, ctx.device
        d = spec.hidden_size
        self.embed = VocabParallelEmbedding(plan.vocab_size_local, plan.vocab_start, d, comm=ctx.comm, dtype=dtype,
                                            device=device)
        self.positions = nn.Embedding(spec.max_position_embeddings + POSITION_OFFSET, d, dtype=dtype, device=device)
        self.positions.requires_grad_(False)
        self.layers = nn.ModuleList(OPTBlock(ctx, i) for i in range(spec.num_layers))
        self.norm = LayerNorm(d, ctx.ops, dtype, device)
        head_weight = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty_like(self.embed.weight), requires_grad=False)
        self.lm_head = ParallelLMHead(head_weight, spec.vocab_size, comm=ctx.comm, linear=ctx.ops.linear)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        h, residual = self.embed(ids), self.positions(positions + POSITION_OFFSET)  # (T, d) each
        for layer, kv in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, batch, kv)
        return self.norm.add_forward(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def weight_table(spec: ModelSpec, policy: SparsityPolicy) -> list[Weight]:
    """Our parameters from a Hugging Face OPT checkpoint (biases everywhere; the out-proj and
    fc2 biases are added once, after the all-reduce, so every rank holds all of them), and the
    routers from a router artifact where the policy uses them. With neuron sparsity fc2 is
    held transposed (its rows gathered by gather_fc2), once."""
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
            weight(f"{ours}.mlp.fc1.weight", f"{hf}.fc1.weight", MLP, H),
            weight(f"{ours}.mlp.fc1.bias", f"{hf}.fc1.bias", MLP),
        ]
        if policy.neuron_k is None:
            table += [weight(f"{ours}.mlp.fc2.weight", f"{hf}.fc2.weight", H, MLP),
                      weight(f"{ours}.mlp.fc2.bias", f"{hf}.fc2.bias", H)]
        else:
            table += [Weight(f"{ours}.mlp.fc2_t", (HFTensor(f"{hf}.fc2.weight", (H, MLP)),), transform=Transform.TRANSPOSE),
                      weight(f"{ours}.mlp.fc2_bias", f"{hf}.fc2.bias", H)]
        table += router_weights(i, policy, spec)
    return table
