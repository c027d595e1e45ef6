"""Turning router scores into the index tables the sparse kernels read.

Every function here has static output shapes that depend only on Python ints and input
shapes, never on tensor values: no `.item()`, no `nonzero`, no boolean-mask indexing. So
they never wait for the GPU and can be captured in a CUDA graph.

Heads (per sequence, batch-invariant):
* `global` scope (ours, see DESIGN.md section 4): every rank runs the replicated head router,
  takes `topk_groups` over all G groups, then `head_table_global` keeps the groups it holds.
  Every (sequence, local group) slot is present; unselected ones are -1, which the kernel
  skips. The union of the ranks' tables is exactly the single-rank selection.
* `local` scope (the paper's TP scheme): `head_table_local` takes top-k of this rank's own
  groups.

Neurons (per batch, ReLU MLPs): `union_topk_neurons` ranks this rank's neurons by summed
relu(score) over the real rows of the batch and keeps k of them, sorted.

`density_to_k` is the one rounding rule from a density to a count, used for heads and neurons.
"""

from __future__ import annotations

import math

import torch

from polar_dist.errors import UserError

# Keeps float error from rounding an exact half down: 0.15 * 10 = 1.4999999999999998.
_DENSITY_EPS = 1e-9


def density_to_k(density: float, n: int) -> int:
    """k = density * n rounded to the nearest integer (halves up), at least 1 and at most n.

    Nearest, not up: with few groups a density names a count (SmolLM2 has 3 KV groups, and
    0.67 means 2 of them, not all 3, which rounding up would give); the minimum of 1 keeps a
    tiny density from selecting nothing. density_to_k(k / n, n) == k for every 1 <= k <= n,
    and a density written to two decimals (k / n rounded) maps back to k for n <= 50.
    """
    if n < 1:
        raise ValueError(f"density_to_k: n = {n} must be >= 1")
    if not 0.0 < density <= 1.0:
        raise UserError(f"density = {density} must be in (0, 1]; 1.0 is dense")
    return min(n, max(1, math.floor(density * n + 0.5 + _DENSITY_EPS)))


def _check_k(k: int, n: int, what: str) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"{what}: k = {k} must be in [1, {n}]")


def topk_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sequence top-k groups: scores (B, G) -> (B, k) int64 global group ids, ascending.

    Sorted so the table is canonical (the same set always gives the same row) and groups are
    visited in KV-cache address order.
    """
    if scores.dim() != 2:
        raise ValueError(f"topk_groups: scores must be (B, G), got shape {tuple(scores.shape)}")
    _check_k(k, scores.shape[1], "topk_groups")
    selected = torch.topk(scores, k, dim=1, sorted=False).indices  # (B, k)
    return torch.sort(selected, dim=1).values


def head_table_global(selected: torch.Tensor, group_start: int, num_groups_local: int) -> torch.Tensor:
    """This rank's head table for the `global` scope.

    selected (B, k) global group ids from `topk_groups` -> table (B, num_groups_local) int32:
    table[b, j] = j when sequence b selected global group group_start + j, else -1. The rank
    holds groups [group_start, group_start + num_groups_local); with replicated KV heads
    (tp > num_kv_heads) that is one group, `ShardPlan.kv_head_start`, with num_groups_local 1.
    """
    if selected.dim() != 2:
        raise ValueError(f"head_table_global: selected must be (B, k), got shape {tuple(selected.shape)}")
    if group_start < 0 or num_groups_local < 1:
        raise ValueError(f"head_table_global: group_start = {group_start} must be >= 0 and "
                         f"num_groups_local = {num_groups_local} >= 1")
    local_ids = torch.arange(num_groups_local, device=selected.device, dtype=torch.int32)  # (G_local,)
    global_ids = local_ids.to(selected.dtype) + group_start  # (G_local,)
    hit = (selected.unsqueeze(2) == global_ids).any(dim=1)  # (B, k, G_local) -> (B, G_local)
    return torch.where(hit, local_ids, -1)  # (B, G_local) int32


def head_table_local(scores_local: torch.Tensor, k_local: int) -> torch.Tensor:
    """The paper's `local` scope: scores_local (B, G_local) -> (B, k_local) int32 local group ids,
    top-k of this rank's own groups, ascending."""
    return topk_groups(scores_local, k_local).to(torch.int32)


def union_topk_neurons(scores: torch.Tensor, k: int, num_rows: int | torch.Tensor) -> torch.Tensor:
    """Batch-union top-k neurons: scores (B, N_local) -> (k,) int32 local neuron ids, ascending.

    Neurons are ranked by sum over the first `num_rows` rows of relu(score) (the paper's
    aggregate). Rows past `num_rows` are CUDA-graph padding: they are masked out with a
    comparison against arange, not sliced off, so a 0-d device tensor works without a host
    sync; `where` rather than multiply-by-mask so garbage (even NaN) in padding cannot leak in.
    The result is sorted so that the gather-GEMMs read W1/W2 rows in address order.
    """
    if scores.dim() != 2:
        raise ValueError(f"union_topk_neurons: scores must be (B, N_local), got shape {tuple(scores.shape)}")
    _check_k(k, scores.shape[1], "union_topk_neurons")
    real = torch.arange(scores.shape[0], device=scores.device) < num_rows  # (B,) bool
    positive = torch.where(real.unsqueeze(1), scores.float().relu(), 0.0)  # (B, N_local)
    selected = torch.topk(positive.sum(dim=0), k, sorted=False).indices  # (k,)
    return torch.sort(selected).values.to(torch.int32)
