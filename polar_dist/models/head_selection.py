"""Which KV groups each sequence's decode attention reads, per layer.

The attention layer asks its `HeadSelection` for a head table (B, k) int32 of local KV groups
(-1 = none) for the step's decode rows (a decode step's rows, or the single-token rows of a
mixed prefill + decode step) before the selective kernel runs, and may let it mask the output
after. The
choice is made per layer, on the device, from that layer's router input, so a captured decode
graph recomputes it at every replay. Chosen once at load:
- `AllGroups`: every local group (the dense model; layer 0 and prefill rows always read all);
- `RoutedGroups`: the layer's head router scores every group of the model from the replicated
  residual stream; `global` scope takes each sequence's top-k over all groups and this rank
  reads those it holds (no communication: every rank computes the same choice), `local` scope
  takes top-k of this rank's own groups (the paper's scheme); its scores come out of the
  layer's QKV GEMM (`ScoredQKV`: the router reads the same input, so its rows are appended to
  the QKV weight and cost ~nothing, where its own small GEMM cost ~6 us a layer);
- `OracleGroups`: for accuracy studies only: reads every group, then keeps each sequence's
  top-k groups by their true output norm (the label the routers were trained on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from kernels.dispatch import KernelOps
from polar_dist.models.attention import AttentionBatch
from polar_dist.models.build import BuildContext
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.layers import ColumnParallelLinear
from polar_dist.sparsity.artifact import RoutingScope
from polar_dist.sparsity.policy import HeadRouting
from polar_dist.sparsity.routers import HeadRouter
from polar_dist.sparsity.selection import topk_groups


class HeadSelection(nn.Module, ABC):
    @abstractmethod
    def table(self, x: torch.Tensor, dense_table: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, d) router input of the decode tokens; dense_table: (B, Hkv_local) every local
        group; scores: (B, G) x @ router weight^T where the caller computed it (ScoredQKV).
        Returns (B, k) int32 local groups to read, -1 = none."""

    def fusable_router(self) -> HeadRouter | None:
        """The router whose scores ScoredQKV may compute with the QKV projection, if any."""
        return None

    def mask_output(self, o: torch.Tensor) -> torch.Tensor:
        """o: (B, Hq_local, D) attention output; heads of unselected groups are already 0."""
        return o

    def decode_table(self, x: torch.Tensor, batch: AttentionBatch,
                     scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """The table of the step's decode rows: every row of a decode step, the first
        num_decode_rows of a mixed step (prefill rows read every group); None without decode rows.
        x: (T, d) router input of the step's tokens; scores: (T, G) its router scores, if computed."""
        if batch.is_decode:
            return self.table(x, batch.head_table, scores)
        n = batch.num_decode_rows
        if not n:
            return None
        assert batch.head_table is not None, "a mixed step needs the dense head table for its decode rows"
        return self.table(x[:n], batch.head_table[:n], None if scores is None else scores[:n])

    def mask_decode_output(self, o: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """o: (T, Hq_local, D): mask_output over the step's decode rows (see decode_table)."""
        if batch.is_decode:
            return self.mask_output(o)
        n = batch.num_decode_rows
        return torch.cat([self.mask_output(o[:n]), o[n:]]) if n else o


class AllGroups(HeadSelection):
    def table(self, x: torch.Tensor, dense_table: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        return dense_table

    def mask_decode_output(self, o: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        return o


class RoutedGroups(HeadSelection):
    """Top-k and table in one kernel (kernels/route_heads.py) from the router's scores (the QKV
    GEMM's extra columns, or a GEMM of its own): a few microseconds per layer instead of a
    chain of tiny ops. Ties go to the lower group index."""

    def __init__(self, router: HeadRouter, k: int, scope: RoutingScope, group_start: int,
                 num_groups_local: int, ops: KernelOps, min_batch: int = 1) -> None:
        """k: groups per sequence (of all G for `global`, of this rank's for `local`); a step of
        fewer than `min_batch` rows (a graph bucket's size when replayed) reads every group."""
        super().__init__()
        self.min_batch = min_batch
        self.ops = ops
        self.router = router
        self.k = k
        self.scope = scope
        self.group_start = group_start
        self.num_groups_local = num_groups_local

    def table(self, x: torch.Tensor, dense_table: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] < self.min_batch:  # static per graph bucket: captured as dense
            return dense_table
        local = self.scope is RoutingScope.LOCAL
        if scores is not None:
            return self.ops.select_groups(scores, self.router.bias, self.k, self.group_start, self.num_groups_local,
                                          local_scope=local)
        return self.ops.route_heads(x, self.router.weight, self.router.bias, self.k, self.group_start,
                                    self.num_groups_local, local_scope=local)

    def fusable_router(self) -> HeadRouter:
        return self.router

    def extra_repr(self) -> str:
        return f"k={self.k}, scope={self.scope.value}, min_batch={self.min_batch}"


class ScoredQKV:
    """q, k, v and the head router's scores from one GEMM. The router reads the attention's
    input, so its (G, d) rows are appended to this rank's QKV weight (every rank appends all G:
    the router is replicated): 32 more columns on Llama-2-7B's 12,288, where a GEMM of its own
    ran split-K plus a reduce. The two parameters become views of the joint weight when the
    model is built, so loading either writes into it. The router's bias is added by the
    selection (in float32); where the QKV has a bias, the joint bias is 0 on the router's rows."""

    def __init__(self, qkv: ColumnParallelLinear, heads: HeadSelection) -> None:
        self.qkv = qkv
        self.n = qkv.weight.shape[0]  # this rank's q, k, v columns
        router = heads.fusable_router()
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if router is None:
            return
        n = self.n
        joint = torch.cat([qkv.weight.detach(), router.weight.detach()])  # (n + G, d)
        qkv.weight = nn.Parameter(joint[:n], requires_grad=False)
        router.weight = nn.Parameter(joint[n:], requires_grad=False)
        if qkv.bias is not None:
            self.bias = torch.cat([qkv.bias.detach(), torch.zeros_like(router.bias)])  # (n + G,)
            qkv.bias = nn.Parameter(self.bias[:n], requires_grad=False)
        self.weight = joint

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (T, d) -> ((T, n) q, k, v columns; (T, G) router scores without bias, or None
        without a router). Both are column slices of one output (rows strided by n + G)."""
        if self.weight is None:
            return self.qkv(x), None
        out = self.qkv.linear(x, self.weight, self.bias)  # (T, n + G)
        return out[:, :self.n], out[:, self.n:]


class OracleGroups(HeadSelection):
    """Top-k groups by output L2 norm (group score = max over its heads), over all groups of the
    model: each rank's group scores are all-gathered (ranks hold contiguous, distinct groups)."""

    def __init__(self, k: int, group_size: int, comm: TPComm) -> None:
        super().__init__()
        self.k = k
        self.group_size = group_size
        self.comm = comm

    def table(self, x: torch.Tensor, dense_table: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        return dense_table

    def mask_output(self, o: torch.Tensor) -> torch.Tensor:
        B, H_local, _ = o.shape
        norms = o.float().norm(dim=-1)  # (B, Hq_local)
        scores_local = norms.view(B, H_local // self.group_size, self.group_size).amax(-1)  # (B, G_local)
        scores = self.comm.all_gather_last_dim(scores_local)  # (B, G)
        start = self.comm.rank * scores_local.shape[1]
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, topk_groups(scores, self.k), True)
        keep_local = keep[:, start:start + scores_local.shape[1]].repeat_interleave(self.group_size, dim=1)
        return o * keep_local.unsqueeze(-1).to(o.dtype)  # (B, Hq_local, D)


def make_head_selection(ctx: BuildContext, layer: int) -> HeadSelection:
    """Layer `layer`'s selection under the run's policy (routers are filled in by the loader)."""
    policy, spec, plan = ctx.policy, ctx.spec, ctx.plan
    if not policy.head_routed(layer):
        return AllGroups()
    k = policy.head_k[layer]
    if policy.routing is HeadRouting.ORACLE:
        return OracleGroups(k, spec.group_size, ctx.comm)
    groups_local = plan.num_kv_heads_local
    if policy.scope is RoutingScope.LOCAL:
        k = policy.head_k_local(layer, groups_local)
    router = HeadRouter(spec.hidden_size, spec.num_kv_heads, dtype=ctx.dtype, device=ctx.device)
    return RoutedGroups(router, k, policy.scope, plan.kv_head_start, groups_local, ctx.ops, policy.head_min_batch)
