"""Training labels: group scores, top-k head labels, neuron activity."""

from __future__ import annotations

import pytest
import torch

from polar_dist.sparsity.labels import group_scores, head_labels, neuron_labels


def test_group_scores_is_max_over_group_heads() -> None:
    # 6 heads in 3 groups of 2: heads (0, 1) -> group 0, (2, 3) -> group 1, (4, 5) -> group 2
    norms = torch.tensor([[1.0, 5.0, 2.0, 2.5, 0.125, 0.25],
                          [9.0, 0.0, 3.0, 1.0, 4.0, 8.0]])
    assert group_scores(norms, 2).tolist() == [[5.0, 2.5, 0.25], [9.0, 3.0, 8.0]]
    assert torch.equal(group_scores(norms, 1), norms)  # multi-head attention: a group is a head


def test_head_labels_top_k_groups_per_token() -> None:
    norms = torch.tensor([[1.0, 5.0, 2.0, 2.5, 0.125, 0.25],
                          [9.0, 0.0, 3.0, 1.0, 4.0, 8.0]])
    labels = head_labels(norms, group_size=2, k=2)
    assert labels.dtype == torch.bool and labels.shape == (2, 3)
    assert labels.tolist() == [[True, True, False], [True, False, True]]
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(100, 12, generator=g)
    labels = head_labels(norms, group_size=3, k=3)
    assert (labels.sum(dim=1) == 3).all()
    scores = group_scores(norms, 3)
    # every labelled group scores at least as high as every unlabelled one of its token
    assert (scores.masked_fill(~labels, float("inf")).amin(1) >= scores.masked_fill(labels, -1.0).amax(1)).all()


def test_head_labels_rejects_bad_grouping() -> None:
    with pytest.raises(ValueError, match="group_size"):
        group_scores(torch.zeros(2, 6), 4)
    with pytest.raises(ValueError, match="k = 4"):
        head_labels(torch.zeros(2, 6), 2, 4)


def test_neuron_labels_strictly_positive() -> None:
    preact = torch.tensor([[0.5, 0.0, -1.0], [-0.0, 2.0, 1e-8]])
    assert neuron_labels(preact).tolist() == [[True, False, False], [False, True, True]]
