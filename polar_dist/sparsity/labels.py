"""Router training labels from dense forward passes.

* Heads: a head matters to a token in proportion to the L2 norm of its attention output
  (before the out-projection). A KV group is scored by the max over its query heads (the
  authors' oracle): a group is worth reading if any one of its heads is. The label of a group
  is "in its token's top-k groups by that score".
* Neurons (ReLU MLPs): a neuron is active when its fc1 pre-activation is > 0, i.e. when its
  ReLU output is nonzero.

Head h belongs to group h // group_size, the layout of Hugging Face GQA checkpoints.
"""

from __future__ import annotations

import torch


def group_scores(head_norms: torch.Tensor, group_size: int) -> torch.Tensor:
    """head_norms (T, H) per-head output L2 norms -> (T, G) max over each group's heads, G = H / group_size."""
    if head_norms.dim() != 2:
        raise ValueError(f"group_scores: head_norms must be (T, H), got shape {tuple(head_norms.shape)}")
    num_tokens, num_heads = head_norms.shape
    if group_size < 1 or num_heads % group_size:
        raise ValueError(f"group_scores: group_size = {group_size} must divide the number of heads ({num_heads})")
    grouped = head_norms.view(num_tokens, num_heads // group_size, group_size)  # (T, G, group_size)
    return grouped.amax(dim=2)  # (T, G)


def head_labels(head_norms: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """(T, G) bool: True where the group is among its token's top-k groups by `group_scores`.

    Exactly k labels per token (ties broken by torch.topk).
    """
    scores = group_scores(head_norms, group_size)  # (T, G)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"head_labels: k = {k} must be in [1, {scores.shape[1]}] (the number of groups)")
    top = torch.topk(scores, k, dim=1, sorted=False).indices  # (T, k)
    labels = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (T, G)
    return labels.scatter_(1, top, True)


def neuron_labels(fc1_preact: torch.Tensor) -> torch.Tensor:
    """fc1_preact (T, N) = x @ W1.T + b1 before the ReLU -> (T, N) bool, True where the neuron fires."""
    if fc1_preact.dim() != 2:
        raise ValueError(f"neuron_labels: fc1_preact must be (T, N), got shape {tuple(fc1_preact.shape)}")
    return fc1_preact > 0
