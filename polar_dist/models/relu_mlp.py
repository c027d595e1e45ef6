"""The ReLU MLP of OPT-family models, dense or with batch-union neuron sparsity in decode.

Dense: y = fc2(relu(fc1(x))), fc1 column-parallel (this rank's neurons), fc2 row-parallel.
Sparse (`NeuronSparseMLP`), decode steps only: the layer's neuron router scores this rank's
neurons for every sequence, the batch's summed relu scores pick the top-k (one index vector for
the whole batch: the union a batch needs), and only those neurons count:
y = relu(x W1[idx]^T + b1[idx]) W2^T[idx] (B, d), then the all-reduce and the bias. `ops.sparse_mlp`
computes it with the gather-GEMM pair or with dense cuBLAS on masked weights, whichever the
device measured faster for the step's shape (kernels/mlp_dispatch.py): the same function
either way. W2 is stored transposed (N_local, d) so each selected neuron's row is contiguous;
the dense path reads the same tensor, so fc2 is held once.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from polar_dist.models.attention import AttentionBatch
from polar_dist.models.build import BuildContext
from polar_dist.models.tap import Tap
from polar_dist.parallel.layers import ColumnParallelLinear, RowParallelLinear
from polar_dist.sparsity.routers import NeuronRouter
from polar_dist.sparsity.selection import density_to_k, union_topk_neurons


class ReluMLP(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        d, n_local = ctx.spec.hidden_size, ctx.plan.intermediate_size_local
        self.fc1 = ColumnParallelLinear(d, n_local, bias=True, dtype=ctx.dtype, device=ctx.device)
        self.fc2 = RowParallelLinear(n_local, d, bias=True, comm=ctx.comm, dtype=ctx.dtype, device=ctx.device)
        self.fc1_output = Tap()  # (T, N_local) before the ReLU: neuron labels are > 0

    def forward(self, x: torch.Tensor, batch: AttentionBatch, router_input: torch.Tensor) -> torch.Tensor:
        """x: (T, d) the MLP input; router_input: the layer's attention input (unused when dense)."""
        return self.fc2(torch.relu(self.fc1_output(self.fc1(x))))


class NeuronSparseMLP(nn.Module):
    def __init__(self, ctx: BuildContext, router: NeuronRouter, k_by_bucket: dict[int, int],
                 dense_above: float) -> None:
        """k_by_bucket: {batch bucket: neurons of the whole model}; this rank computes the same
        fraction of its own neurons. A bucket whose k passes `dense_above` of the neurons runs dense."""
        super().__init__()
        spec, plan = ctx.spec, ctx.plan
        d, n_local = spec.hidden_size, plan.intermediate_size_local
        self.ops, self.comm = ctx.ops, ctx.comm
        self.fc1 = ColumnParallelLinear(d, n_local, bias=True, dtype=ctx.dtype, device=ctx.device)
        self.fc2_t = nn.Parameter(torch.empty(n_local, d, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.fc2_bias = nn.Parameter(torch.empty(d, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.router = router
        self.fc1_output = Tap()  # (T, N_local) before the ReLU, on the dense path
        self.buckets = sorted(k_by_bucket)
        # k_local per bucket (any count: the kernels mask their last tile); None where the policy
        # runs the bucket dense (exact: every neuron, no router)
        self.k_local: list[int | None] = []
        for b in self.buckets:
            k = density_to_k(k_by_bucket[b] / spec.intermediate_size, n_local)
            self.k_local.append(None if k > dense_above * n_local else k)

    def k_for(self, rows: int) -> int | None:
        """Neurons this rank computes for a step of `rows` rows (a graph's bucket size), or None
        for dense: past the largest calibrated bucket the union is denser still."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.k_local[i] if i < len(self.buckets) else None

    def forward(self, x: torch.Tensor, batch: AttentionBatch, router_input: torch.Tensor) -> torch.Tensor:
        """x: (T, d) the MLP input; router_input: (T, d) the layer's attention input (as in the
        paper: the router can then run beside attention)."""
        k = self.k_for(x.shape[0]) if batch.is_decode else None
        if k is None:
            y = nn.functional.linear(torch.relu(self.fc1_output(self.fc1(x))), self.fc2_t.t())  # (T, d): h @ W2^T
        else:
            idx = union_topk_neurons(self.router(router_input), k, batch.num_rows)  # (k,) int32, ascending
            y = self.ops.sparse_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2_t, idx)  # (B, d); bias below
        return self.comm.all_reduce(y) + self.fc2_bias

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}, k_local={self.k_local}"
