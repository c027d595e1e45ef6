"""OPT decoder: pre-LayerNorm, learned positions (offset 2), ReLU MLP, biases everywhere.

The ReLU MLP is what makes batch-union neuron sparsity possible (fc1 -> relu -> fc2).
"""

from __future__ import annotations

import torch
from torch import nn

from polar_dist.models.attention import AttentionBatch, paged_attention, write_kv
from polar_dist.models.checkpoint import Source
from polar_dist.models.spec import ModelSpec
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from polar_dist.parallel.plan import ShardPlan

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


def _layer_norm(dim: int, dtype: torch.dtype, device: torch.device | str) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
    norm.requires_grad_(False)
    return norm


class OPTAttention(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.num_heads_local = plan.num_heads_local
        self.qkv = ColumnParallelLinear(spec.hidden_size, 3 * plan.num_heads_local * spec.head_dim, bias=True,
                                        dtype=dtype, device=device)
        self.out_proj = RowParallelLinear(plan.num_heads_local * spec.head_dim, spec.hidden_size, bias=True,
                                          comm=comm, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, D, H = x.shape[0], self.head_dim, self.num_heads_local
        q, k, v = self.qkv(x).view(T, 3, H, D).unbind(1)  # (T, H_local, D) each
        write_kv(kv_cache[0], kv_cache[1], k, v, batch.slot_mapping)
        o = paged_attention(q.contiguous(), kv_cache[0], kv_cache[1], batch, scale=D**-0.5)
        return self.out_proj(o.reshape(T, H * D))


class OPTBlock(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        d = spec.hidden_size
        self.attn_norm = _layer_norm(d, dtype, device)
        self.attn = OPTAttention(spec, plan, comm, dtype, device)
        self.mlp_norm = _layer_norm(d, dtype, device)
        self.fc1 = ColumnParallelLinear(d, plan.intermediate_size_local, bias=True, dtype=dtype, device=device)
        self.fc2 = RowParallelLinear(plan.intermediate_size_local, d, bias=True, comm=comm, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), batch, kv_cache)
        return h + self.fc2(torch.relu(self.fc1(self.mlp_norm(h))))


class OPTModel(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                 device: torch.device | str, max_positions: int) -> None:
        super().__init__()
        self.spec, self.plan = spec, plan
        d = spec.hidden_size
        self.embed = VocabParallelEmbedding(plan.vocab_size_local, plan.vocab_start, d, comm=comm, dtype=dtype,
                                            device=device)
        self.positions = nn.Embedding(spec.max_position_embeddings + POSITION_OFFSET, d, dtype=dtype, device=device)
        self.positions.requires_grad_(False)
        self.layers = nn.ModuleList(OPTBlock(spec, plan, comm, dtype, device) for _ in range(spec.num_layers))
        self.norm = _layer_norm(d, dtype, device)
        head_weight = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty_like(self.embed.weight), requires_grad=False)
        self.lm_head = ParallelLMHead(head_weight, spec.vocab_size, comm=comm)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        h = self.embed(ids) + self.positions(positions + POSITION_OFFSET)  # (T, d)
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, positions, batch, kv)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_sources(self) -> dict[str, list[Source]]:
        spec, plan, D = self.spec, self.plan, self.spec.head_dim
        heads = (plan.q_head_start * D, (plan.q_head_start + plan.num_heads_local) * D)
        mlp = (plan.mlp_start, plan.mlp_end)
        vocab_rows = (plan.vocab_start, plan.vocab_start + plan.vocab_size_local)
        p = "model.decoder"
        out = {"embed.weight": [Source(f"{p}.embed_tokens.weight", rows=vocab_rows, pad_rows=True)],
               "positions.weight": [Source(f"{p}.embed_positions.weight")],
               "norm.weight": [Source(f"{p}.final_layer_norm.weight")],
               "norm.bias": [Source(f"{p}.final_layer_norm.bias")]}
        if not spec.tie_word_embeddings:
            out["lm_head.weight"] = [Source("lm_head.weight", rows=vocab_rows, pad_rows=True)]
        for i in range(spec.num_layers):
            hf, ours = f"{p}.layers.{i}", f"layers.{i}"
            for kind in ("weight", "bias"):
                out[f"{ours}.attn_norm.{kind}"] = [Source(f"{hf}.self_attn_layer_norm.{kind}")]
                out[f"{ours}.mlp_norm.{kind}"] = [Source(f"{hf}.final_layer_norm.{kind}")]
                out[f"{ours}.attn.qkv.{kind}"] = [Source(f"{hf}.self_attn.{n}_proj.{kind}", rows=heads) for n in "qkv"]
                out[f"{ours}.fc1.{kind}"] = [Source(f"{hf}.fc1.{kind}", rows=mlp)]
            out[f"{ours}.attn.out_proj.weight"] = [Source(f"{hf}.self_attn.out_proj.weight", cols=heads)]
            out[f"{ours}.attn.out_proj.bias"] = [Source(f"{hf}.self_attn.out_proj.bias")]
            out[f"{ours}.fc2.weight"] = [Source(f"{hf}.fc2.weight", cols=mlp)]
            out[f"{ours}.fc2.bias"] = [Source(f"{hf}.fc2.bias")]
        return out

    @staticmethod
    def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        d, N, p = spec.hidden_size, spec.intermediate_size, "model.decoder"
        shapes: dict[str, tuple[int, ...]] = {
            f"{p}.embed_tokens.weight": (spec.vocab_size, d),
            f"{p}.embed_positions.weight": (spec.max_position_embeddings + POSITION_OFFSET, d),
            f"{p}.final_layer_norm.weight": (d,), f"{p}.final_layer_norm.bias": (d,),
        }
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, d)
        for i in range(spec.num_layers):
            hf = f"{p}.layers.{i}"
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                shapes[f"{hf}.{norm}.weight"] = (d,)
                shapes[f"{hf}.{norm}.bias"] = (d,)
            for n in ("q", "k", "v", "out"):
                shapes[f"{hf}.self_attn.{n}_proj.weight"] = (d, d)
                shapes[f"{hf}.self_attn.{n}_proj.bias"] = (d,)
            shapes[f"{hf}.fc1.weight"], shapes[f"{hf}.fc1.bias"] = (N, d), (N,)
            shapes[f"{hf}.fc2.weight"], shapes[f"{hf}.fc2.bias"] = (d, N), (d,)
        return shapes
