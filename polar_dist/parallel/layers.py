"""Tensor-parallel layers. Each holds only this rank's shard and is given its TPComm.

With W = [W_0; W_1; ...] split by output rows (column-parallel) the rank computes
y_r = x W_r^T + b_r, a slice of the output, with no communication. With W = [W_0, W_1, ...]
split by input columns (row-parallel) the rank computes x_r W_r^T, and the sum over ranks,
one all-reduce, is y; the bias is added once, after the reduce. A column-parallel layer
followed by a row-parallel one (QKV -> attention -> out-proj, up -> act -> down) therefore
needs exactly one all-reduce.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from polar_dist.parallel.comm import TPComm

# (x, weight, bias) -> x @ weight^T + bias: F.linear, or the kernels' KernelOps.linear (the BLAS
# library measured faster per shape on the GPU)
Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y_local = x @ weight_local^T + bias_local; weight_local: [out_features_local, in_features]."""

    def __init__(self, in_features: int, out_features_local: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str, linear: Linear = nn.functional.linear) -> None:
        super().__init__()
        self.weight = _empty(out_features_local, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features_local, dtype=dtype, device=device) if bias else None
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


def first_rank_bias(bias: torch.Tensor | None, comm: TPComm) -> torch.Tensor | None:
    """The bias for this rank's partial sum of a row-parallel product: rank 0's alone carries it
    (added in the GEMM's epilogue), so the all-reduce adds it once."""
    return bias if comm.rank == 0 else None


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ weight_local^T) + bias; weight_local: [out_features, in_features_local].
    The bias joins rank 0's partial sum in the GEMM's epilogue, so it is added once without a
    kernel of its own."""

    def __init__(self, in_features_local: int, out_features: int, *, bias: bool, comm: TPComm,
                 dtype: torch.dtype, device: torch.device | str, linear: Linear = nn.functional.linear) -> None:
        super().__init__()
        self.comm = comm
        self.weight = _empty(out_features, in_features_local, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.linear(x, self.weight, first_rank_bias(self.bias, self.comm)))


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + vocab_size_local) of the embedding; other ids give 0,
    and the all-reduce assembles every token's row from the rank that owns it."""

    def __init__(self, vocab_size_local: int, vocab_start: int, dim: int, *, comm: TPComm,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_start = vocab_start
        self.weight = _empty(vocab_size_local, dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)  # (T, d)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """logits = all_gather(x @ weight_local^T)[..., :vocab_size], computed in float32.

    `weight` may be the embedding's (tied); rows past vocab_size are padding and are dropped.
    """

    def __init__(self, weight: nn.Parameter, vocab_size: int, *, comm: TPComm,
                 linear: Linear = nn.functional.linear) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.weight = weight
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits_local = self.linear(x, self.weight, None).float()  # (B, V_local)
        return self.comm.all_gather_last_dim(logits_local)[..., : self.vocab_size]  # (B, V)
