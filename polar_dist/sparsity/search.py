"""Choosing k: neuron k per (layer, batch size) and head k per layer.

Neurons (the paper's Algorithm 2): at run time a batch computes the top-k neurons of its
summed relu(router scores), and must cover the union of the neurons its tokens really fire.
`search_neuron_k` measures, on held-out tokens shuffled into batches, the mean union recall at
every k at once (one sort per batch) and returns the smallest k on the search grid that meets
the target. The paper re-runs the router for each k step; here the whole recall curve costs one
sort, so `step` only coarsens the grid (fewer distinct kernel shapes), it does not save time.

Heads (ours): the paper uses one density for every layer but layer 0. `allocate_head_k`
instead spends a mean-density budget where routing is hard, from each layer's measured
recall at every k (`head_recall`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from enum import Enum

import torch

from polar_dist.errors import UserError
from polar_dist.sparsity.selection import density_to_k

# Elements of the (batches, N) sort done at once; bounds memory at ~8 bytes each plus temporaries.
_SEARCH_CHUNK_ELEMENTS = 1 << 24


def _union_recall_curve(scores: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Mean over batches of union recall at k = 1..N: (N,) float64, entry k - 1 is recall at k."""
    num_tokens, num_neurons = scores.shape
    num_batches = num_tokens // batch_size  # the last partial batch is dropped
    order = torch.randperm(num_tokens, generator=generator)[: num_batches * batch_size].to(scores.device)
    curve = torch.zeros(num_neurons, dtype=torch.float64, device=scores.device)
    batches_per_chunk = max(1, _SEARCH_CHUNK_ELEMENTS // (batch_size * num_neurons))
    for rows in order.split(batches_per_chunk * batch_size):
        b = rows.shape[0] // batch_size
        s = scores[rows].float().relu().view(b, batch_size, num_neurons).sum(dim=1)  # (b, N) aggregate
        truth = labels[rows].view(b, batch_size, num_neurons).any(dim=1)  # (b, N) union of fired neurons
        ranked = torch.argsort(s, dim=1, descending=True, stable=True)  # (b, N) neuron ids, best first
        hits = truth.gather(1, ranked).cumsum(dim=1)  # (b, N): true neurons among the top k = 1..N
        num_true = truth.sum(dim=1, keepdim=True)  # (b, 1)
        recall = torch.where(num_true > 0, hits / num_true.clamp(min=1), 1.0)  # (b, N)
        curve += recall.sum(dim=0, dtype=torch.float64)
    return curve / num_batches


def search_neuron_k(
    scores: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    target_recall: float = 0.99,
    step: int = 1,
    round_to: int = 1,
    generator: torch.Generator | None = None,
) -> int:
    """The smallest k in {step, 2 step, ...} whose mean union recall reaches `target_recall`,
    rounded up to a multiple of `round_to` (e.g. the gather-GEMM tile), at most N.

    scores (T, N) router scores and labels (T, N) bool true activations of held-out tokens;
    tokens are shuffled (by `generator`) into T // batch_size batches of `batch_size`.
    """
    if scores.dim() != 2 or labels.shape != scores.shape or labels.dtype != torch.bool:
        raise ValueError(f"search_neuron_k: scores (T, N) and bool labels of the same shape expected, got "
                         f"{tuple(scores.shape)}, {labels.dtype} {tuple(labels.shape)}")
    num_tokens, num_neurons = scores.shape
    if not 1 <= batch_size <= num_tokens:
        raise UserError(f"neuron k search at batch size {batch_size} needs at least that many held-out tokens, "
                        f"has {num_tokens}; calibrate on more text or drop that batch size")
    if not 0.0 < target_recall <= 1.0 or step < 1 or round_to < 1:
        raise ValueError(f"search_neuron_k: target_recall = {target_recall} must be in (0, 1], step = {step} "
                         f"and round_to = {round_to} >= 1")
    curve = _union_recall_curve(scores, labels, batch_size, generator)  # (N,)
    candidates = torch.arange(step, num_neurons + step, step, device=curve.device).clamp(max=num_neurons)  # (C,)
    # Recall at k = N is 1 (every neuron is computed), so the last candidate always qualifies.
    meets = curve[candidates - 1] >= target_recall  # (C,)
    meets[-1] = True
    k = int(candidates[meets.int().argmax()])  # the first candidate that qualifies
    return min(num_neurons, math.ceil(k / round_to) * round_to)


def search_neuron_k_table(
    scores: torch.Tensor,
    labels: torch.Tensor,
    buckets: Sequence[int],
    target_recall: float = 0.99,
    step: int = 1,
    round_to: int = 1,
    seed: int = 0,
) -> dict[int, int]:
    """{batch size: k} for each batch-size bucket, non-decreasing in the batch size.

    The union of a larger batch is never smaller in expectation, so a smaller k at a larger
    bucket can only be sampling noise: each k is raised to at least the previous bucket's.
    Each bucket shuffles with its own generator seeded by `seed`.
    """
    table: dict[int, int] = {}
    floor = 1
    for batch_size in sorted(set(buckets)):
        generator = torch.Generator().manual_seed(seed)
        k = search_neuron_k(scores, labels, batch_size, target_recall, step, round_to, generator)
        floor = max(floor, k)
        table[batch_size] = floor
    return table


def head_recall(scores: torch.Tensor, true_group_scores: torch.Tensor, k_label: int, k_pred: int) -> float:
    """Mean over tokens of the fraction of the true top-`k_label` groups (by `true_group_scores`,
    e.g. `labels.group_scores`) found in the router's top-`k_pred` (by `scores`); both (T, G)."""
    if scores.dim() != 2 or scores.shape != true_group_scores.shape:
        raise ValueError(f"head_recall: scores and true_group_scores must both be (T, G), got "
                         f"{tuple(scores.shape)}, {tuple(true_group_scores.shape)}")
    num_groups = scores.shape[1]
    if not (1 <= k_label <= num_groups and 1 <= k_pred <= num_groups):
        raise ValueError(f"head_recall: k_label = {k_label} and k_pred = {k_pred} must be in [1, {num_groups}]")
    truth = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (T, G)
    truth.scatter_(1, torch.topk(true_group_scores, k_label, dim=1).indices, True)
    found = truth.gather(1, torch.topk(scores, k_pred, dim=1).indices)  # (T, k_pred)
    return (found.sum(dim=1).float() / k_label).mean().item()


class Objective(Enum):
    MAX_MIN = "max_min"  # raise the worst layer's recall first
    SUM = "sum"  # the largest total recall (optimal for concave recall curves)


def uniform_k(num_groups: int, density: float, *, num_layers: int,
              dense_layers: Collection[int] = (0,)) -> list[int]:
    """The paper's allocation: k = density_to_k(density, G) in every layer, G in `dense_layers`."""
    k = density_to_k(density, num_groups)
    return [num_groups if layer in dense_layers else k for layer in range(num_layers)]


def allocate_head_k(
    per_layer_recall_curves: Sequence[Sequence[float]],
    budget: float,
    *,
    objective: Objective = Objective.MAX_MIN,
    dense_layers: Collection[int] = (0,),
    count_dense_layers: bool = False,
    min_k: int = 1,
) -> list[int]:
    """Head k per layer: the greedy allocation of a mean-density budget.

    per_layer_recall_curves[l][k - 1] is layer l's recall at k = 1..G (all layers have the same
    G; the curve should end at 1.0). Every sparse layer starts at `min_k`; then, one group at a
    time while mean(k / G) over the counted layers stays <= budget, the greedy gives a group to
    - MAX_MIN (default): the layer with the lowest recall now (ties: the larger next gain, then
      the lower layer). A badly routed layer corrupts the residual stream of every later layer,
      so the worst layer, not the average, bounds quality; a layer whose curve is flat for a
      few steps keeps receiving groups until it rises.
    - SUM: the layer whose next group adds the most recall.
    Layers in `dense_layers` (layer 0, as the paper: it scores highest in layer importance) get
    k = G. By default they do not count against the budget, so `budget` means the same as the
    paper's "attention density": the mean density of the sparse layers. With
    count_dense_layers=True the budget is the mean over all layers, dense ones included.
    """
    if not per_layer_recall_curves:
        raise ValueError("allocate_head_k: no layers")
    num_groups = len(per_layer_recall_curves[0])
    if any(len(curve) != num_groups for curve in per_layer_recall_curves):
        raise ValueError("allocate_head_k: every layer's recall curve must have one entry per k = 1..G")
    if not 1 <= min_k <= num_groups:
        raise ValueError(f"allocate_head_k: min_k = {min_k} must be in [1, {num_groups}]")
    if not 0.0 < budget <= 1.0:
        raise UserError(f"head density budget = {budget} must be in (0, 1]")
    num_layers = len(per_layer_recall_curves)
    sparse = [layer for layer in range(num_layers) if layer not in dense_layers]
    k = [num_groups if layer in dense_layers else min_k for layer in range(num_layers)]
    counted = range(num_layers) if count_dense_layers else sparse
    # Total groups allowed over the counted layers; the epsilon absorbs float error in budget * n.
    allowed = math.floor(budget * num_groups * len(counted) + 1e-9)
    used = sum(k[layer] for layer in counted)
    if used > allowed:
        raise UserError(f"head density budget = {budget} is below the minimum this allocation needs "
                        f"({used / (num_groups * max(len(counted), 1)):.3f}: min_k {min_k} per sparse layer"
                        f"{', dense layers counted' if count_dense_layers else ''}); raise the budget")

    def recall(layer: int, groups: int) -> float:
        return float(per_layer_recall_curves[layer][groups - 1])

    while used < allowed:
        growable = [layer for layer in sparse if k[layer] < num_groups]
        if not growable:
            break
        gain = {layer: recall(layer, k[layer] + 1) - recall(layer, k[layer]) for layer in growable}
        if objective is Objective.MAX_MIN:
            chosen = min(growable, key=lambda layer: (recall(layer, k[layer]), -gain[layer], layer))
        else:
            chosen = min(growable, key=lambda layer: (-gain[layer], layer))
        k[chosen] += 1
        used += 1
    return k


def allocate_head_densities(
    per_layer_recall_curves: Sequence[Sequence[float]],
    budget: float,
    *,
    objective: Objective = Objective.MAX_MIN,
    dense_layers: Collection[int] = (0,),
    count_dense_layers: bool = False,
    min_k: int = 1,
) -> list[float]:
    """`allocate_head_k` as densities k / G (density_to_k maps each back to exactly its k)."""
    ks = allocate_head_k(per_layer_recall_curves, budget, objective=objective, dense_layers=dense_layers,
                         count_dense_layers=count_dense_layers, min_k=min_k)
    num_groups = len(per_layer_recall_curves[0])
    return [k / num_groups for k in ks]
