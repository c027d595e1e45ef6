"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, SwiGLU, GQA.

Written for one device; `plan` (which heads/columns this rank holds) and `comm` (its tensor-
parallel group) make the same code a shard. At tp=1 `comm` is `SingleRank` and
torch.distributed is never touched.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import dispatch as kernel_ops
from polar_dist.models.attention import AttentionBatch, paged_attention, write_kv
from polar_dist.models.checkpoint import Source
from polar_dist.models.rope import Rotary
from polar_dist.models.spec import ModelSpec
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from polar_dist.parallel.plan import ShardPlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return kernel_ops.add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, rotary: Rotary, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.num_heads_local = plan.num_heads_local
        self.num_kv_heads_local = plan.num_kv_heads_local
        self.rotary = rotary
        qkv_local = (plan.num_heads_local + 2 * plan.num_kv_heads_local) * spec.head_dim
        self.qkv = ColumnParallelLinear(spec.hidden_size, qkv_local, bias=spec.qkv_bias, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(plan.num_heads_local * spec.head_dim, spec.hidden_size, bias=spec.o_bias,
                                        comm=comm, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        q_size, kv_size = self.num_heads_local * D, self.num_kv_heads_local * D
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = self.rotary(q.view(T, self.num_heads_local, D), positions)  # (T, Hq_local, D)
        k = self.rotary(k.view(T, self.num_kv_heads_local, D), positions)  # (T, Hkv_local, D)
        v = v.view(T, self.num_kv_heads_local, D)  # (T, Hkv_local, D)
        write_kv(kv_cache[0], kv_cache[1], k, v, batch.slot_mapping)
        o = paged_attention(q, kv_cache[0], kv_cache[1], batch, scale=D**-0.5)  # (T, Hq_local, D)
        return self.o_proj(o.reshape(T, q_size))


class SwiGLU(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.gate_up = ColumnParallelLinear(spec.hidden_size, 2 * plan.intermediate_size_local, bias=spec.mlp_bias,
                                            dtype=dtype, device=device)
        self.down = RowParallelLinear(plan.intermediate_size_local, spec.hidden_size, bias=spec.mlp_bias, comm=comm,
                                      dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (T, I_local) each
        return self.down(nn.functional.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, rotary: Rotary, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.input_norm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype, device)
        self.attn = LlamaAttention(spec, plan, comm, rotary, dtype, device)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype, device)
        self.mlp = SwiGLU(spec, plan, comm, dtype, device)

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
    def __init__(self, spec: ModelSpec, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                 device: torch.device | str, max_positions: int) -> None:
        super().__init__()
        self.spec, self.plan = spec, plan
        self.rotary = Rotary(spec.rope, spec.head_dim, max_positions, device)
        self.embed = VocabParallelEmbedding(plan.vocab_size_local, plan.vocab_start, spec.hidden_size, comm=comm,
                                            dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaBlock(spec, plan, comm, self.rotary, dtype, device) for _ in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype, device)
        head_weight = self.embed.weight if spec.tie_word_embeddings else nn.Parameter(
            torch.empty_like(self.embed.weight), requires_grad=False)
        self.lm_head = ParallelLMHead(head_weight, spec.vocab_size, comm=comm)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        h, residual = self.embed(ids), None  # (T, d)
        for layer, kv in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, batch, kv)
        return self.norm.add_forward(h, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (B, V) float32

    def checkpoint_sources(self) -> dict[str, list[Source]]:
        spec, plan, D = self.spec, self.plan, self.spec.head_dim
        q_rows = (plan.q_head_start * D, (plan.q_head_start + plan.num_heads_local) * D)
        kv_rows = (plan.kv_head_start * D, (plan.kv_head_start + plan.num_kv_heads_local) * D)
        mlp_rows, mlp_cols = (plan.mlp_start, plan.mlp_end), (plan.mlp_start, plan.mlp_end)
        vocab_rows = (plan.vocab_start, plan.vocab_start + plan.vocab_size_local)
        out = {"embed.weight": [Source("model.embed_tokens.weight", rows=vocab_rows, pad_rows=True)],
               "norm.weight": [Source("model.norm.weight")]}
        if not spec.tie_word_embeddings:
            out["lm_head.weight"] = [Source("lm_head.weight", rows=vocab_rows, pad_rows=True)]
        for i in range(spec.num_layers):
            hf, ours = f"model.layers.{i}", f"layers.{i}"
            out[f"{ours}.input_norm.weight"] = [Source(f"{hf}.input_layernorm.weight")]
            out[f"{ours}.post_attn_norm.weight"] = [Source(f"{hf}.post_attention_layernorm.weight")]
            for kind in ("weight", "bias") if spec.qkv_bias else ("weight",):
                out[f"{ours}.attn.qkv.{kind}"] = [
                    Source(f"{hf}.self_attn.q_proj.{kind}", rows=q_rows),
                    Source(f"{hf}.self_attn.k_proj.{kind}", rows=kv_rows),
                    Source(f"{hf}.self_attn.v_proj.{kind}", rows=kv_rows),
                ]
            out[f"{ours}.attn.o_proj.weight"] = [Source(f"{hf}.self_attn.o_proj.weight", cols=q_rows)]
            if spec.o_bias:  # added once, after the all-reduce: every rank holds all of it
                out[f"{ours}.attn.o_proj.bias"] = [Source(f"{hf}.self_attn.o_proj.bias")]
            for kind in ("weight", "bias") if spec.mlp_bias else ("weight",):
                out[f"{ours}.mlp.gate_up.{kind}"] = [Source(f"{hf}.mlp.gate_proj.{kind}", rows=mlp_rows),
                                                      Source(f"{hf}.mlp.up_proj.{kind}", rows=mlp_rows)]
            out[f"{ours}.mlp.down.weight"] = [Source(f"{hf}.mlp.down_proj.weight", cols=mlp_cols)]
            if spec.mlp_bias:
                out[f"{ours}.mlp.down.bias"] = [Source(f"{hf}.mlp.down_proj.bias")]
        return out

    @staticmethod
    def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Full HF tensor shapes, for random initialisation."""
        d, D, I = spec.hidden_size, spec.head_dim, spec.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, d),
                                              "model.norm.weight": (d,)}
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, d)
        for i in range(spec.num_layers):
            hf = f"model.layers.{i}"
            shapes[f"{hf}.input_layernorm.weight"] = (d,)
            shapes[f"{hf}.post_attention_layernorm.weight"] = (d,)
            for name, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads), ("v", spec.num_kv_heads)):
                shapes[f"{hf}.self_attn.{name}_proj.weight"] = (heads * D, d)
                if spec.qkv_bias:
                    shapes[f"{hf}.self_attn.{name}_proj.bias"] = (heads * D,)
            shapes[f"{hf}.self_attn.o_proj.weight"] = (d, spec.num_heads * D)
            shapes[f"{hf}.mlp.gate_proj.weight"] = (I, d)
            shapes[f"{hf}.mlp.up_proj.weight"] = (I, d)
            shapes[f"{hf}.mlp.down_proj.weight"] = (d, I)
            if spec.o_bias:
                shapes[f"{hf}.self_attn.o_proj.bias"] = (d,)
            if spec.mlp_bias:
                shapes[f"{hf}.mlp.gate_proj.bias"] = (I,)
                shapes[f"{hf}.mlp.up_proj.bias"] = (I,)
                shapes[f"{hf}.mlp.down_proj.bias"] = (d,)
        return shapes
