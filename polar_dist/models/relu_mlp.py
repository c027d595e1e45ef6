"""The ReLU MLP of OPT-family models, dense or with batch-union neuron sparsity in decode.

Dense: y = fc2(relu(fc1(x))), fc1 column-parallel (this rank's neurons), fc2 row-parallel.
Sparse (`NeuronSparseMLP`), decode steps only: the layer's neuron router scores this rank's
neurons for every sequence, the batch's summed relu scores pick the top-k (one index vector for
the whole batch: the union a batch needs), and only those neurons count:
y = relu(x W1[idx]^T + b1[idx]) W2^T[idx] (B, d), then the all-reduce and the bias. `ops.sparse_mlp`
computes it with the gather-GEMM pair or with dense cuBLAS on masked weights, whichever the
device measured faster for the step's shape (kernels/mlp_dispatch.py): the same function
either way. Whether sparsity pays at all is measured too: per row count (a CUDA graph's bucket)
the router, the union and the sparse MLP are timed against the dense MLP once, on the device,
before the bucket's capture; where dense wins (a large batch's union is nearly every neuron,
and the router costs more than the rows it saves) the layer runs dense at that row count.
W2 is stored transposed (N_local, d) so each selected neuron's row is contiguous;
the dense path reads the same tensor, so fc2 is held once.
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from kernels.graph_timer import time_graphs_ms
from polar_dist.models.attention import AttentionBatch
from polar_dist.models.build import BuildContext
from polar_dist.models.tap import Tap
from polar_dist.parallel.layers import ColumnParallelLinear, RowParallelLinear, first_rank_bias
from polar_dist.sparsity.routers import NeuronRouter
from polar_dist.sparsity.selection import density_to_k, union_topk_neurons

log = logging.getLogger(__name__)


class ReluMLP(nn.Module):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        d, n_local = ctx.spec.hidden_size, ctx.plan.intermediate_size_local
        self.fc1 = ColumnParallelLinear(d, n_local, bias=True, dtype=ctx.dtype, device=ctx.device,
                                        linear=ctx.ops.linear)
        self.fc2 = RowParallelLinear(n_local, d, bias=True, comm=ctx.comm, dtype=ctx.dtype, device=ctx.device,
                                     linear=ctx.ops.linear)
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
        self.fc1 = ColumnParallelLinear(d, n_local, bias=True, dtype=ctx.dtype, device=ctx.device,
                                        linear=ctx.ops.linear)
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
        self.sparse_pays: dict[int, bool] = {}  # rows -> measured: sparse beat dense (the same on every rank)

    def k_for(self, rows: int) -> int | None:
        """Neurons this rank computes for a step of `rows` rows (a graph's bucket size), or None
        for dense: past the largest calibrated bucket the union is denser still."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.k_local[i] if i < len(self.buckets) else None

    def forward(self, x: torch.Tensor, batch: AttentionBatch, router_input: torch.Tensor) -> torch.Tensor:
        """x: (T, d) the MLP input; router_input: (T, d) the layer's attention input (as in the
        paper: the router can then run beside attention)."""
        k = self.k_for(x.shape[0]) if batch.is_decode else None
        if k is not None and self._pays(x, router_input, batch.num_rows, k):
            return self.comm.all_reduce(self._sparse(x, router_input, batch.num_rows, k)) + self.fc2_bias  # (B, d)
        return self.comm.all_reduce(self._dense(x, first_rank_bias(self.fc2_bias, self.comm)))  # (T, d)

    def _dense(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(T, d) relu(x W1^T + b1) W2^T (+ bias, in the GEMM's epilogue)."""
        return nn.functional.linear(torch.relu(self.fc1_output(self.fc1(x))), self.fc2_t.t(), bias)

    def _sparse(self, x: torch.Tensor, router_input: torch.Tensor, num_rows: int | torch.Tensor, k: int) -> torch.Tensor:
        idx = union_topk_neurons(self.router(router_input), k, num_rows)  # (k,) int32, ascending
        return self.ops.sparse_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2_t, idx)  # (B, d)

    def _pays(self, x: torch.Tensor, router_input: torch.Tensor, num_rows: int | torch.Tensor, k: int) -> bool:
        """Sparse at this row count if its router + union + MLP measured faster than the dense MLP
        (once per row count, outside any capture: DecodeGraphs runs each bucket eagerly before
        capturing it). The ranks' times are summed, so every rank makes the same choice. Where
        nothing can be timed (the CPU; a capture without warm-up) sparse is assumed."""
        rows = x.shape[0]
        pays = self.sparse_pays.get(rows)
        if pays is not None:
            return pays
        if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return True
        times = time_graphs_ms([lambda: self._sparse(x, router_input, num_rows, k), lambda: self._dense(x)], x.device)
        sparse_ms, dense_ms = self.comm.all_reduce(torch.tensor(times, device=x.device)).tolist()
        pays = self.sparse_pays[rows] = sparse_ms < dense_ms
        log.info("neuron-sparse MLP at %d rows, k = %d of %d: sparse %.4f ms, dense %.4f ms (summed over ranks): %s",
                 rows, k, self.fc1.weight.shape[0], sparse_ms, dense_ms, "sparse" if pays else "dense")
        return pays

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}, k_local={self.k_local}"
