"""Routers and selection: shapes, values, -1 padding, CUDA-graph padding rows, and the global
scope's per-rank tables reassembling the single-rank choice."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from polar_dist.errors import UserError
from polar_dist.sparsity.routers import HeadRouter, NeuronRouter
from polar_dist.sparsity.selection import (
    density_to_k,
    head_table_global,
    head_table_local,
    topk_groups,
    union_topk_neurons,
)


def _distinct_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Scores with no ties (a random permutation of 0..cols-1 per row), so top-k is unique."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)]).float()


def test_topk_groups_values_sorted_int64() -> None:
    scores = _distinct_scores(5, 8, seed=0)
    selected = topk_groups(scores, 3)
    assert selected.shape == (5, 3) and selected.dtype == torch.int64
    for b in range(5):
        expected = sorted(scores[b].argsort(descending=True)[:3].tolist())
        assert selected[b].tolist() == expected


def test_head_table_global_marks_unselected_minus_one() -> None:
    selected = torch.tensor([[0, 5], [2, 3], [1, 4]])  # B=3, k=2 over G=6
    table = head_table_global(selected, group_start=2, num_groups_local=2)  # this rank holds groups 2, 3
    assert table.dtype == torch.int32
    assert table.tolist() == [[-1, -1], [0, 1], [-1, -1]]
    table = head_table_global(selected, group_start=4, num_groups_local=2)  # groups 4, 5
    assert table.tolist() == [[-1, 1], [-1, -1], [0, -1]]


def _reassemble(tables: list[torch.Tensor], starts: list[int]) -> list[set[int]]:
    batch = tables[0].shape[0]
    chosen: list[set[int]] = [set() for _ in range(batch)]
    for table, start in zip(tables, starts):
        for b in range(batch):
            for j, entry in enumerate(table[b].tolist()):
                assert entry in (j, -1)  # entry j is local group j or nothing
                if entry >= 0:
                    chosen[b].add(start + entry)
    return chosen


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_global_tables_over_ranks_reassemble_single_rank_selection(tp: int) -> None:
    num_groups, k, batch = 6, 4, 16
    selected = topk_groups(_distinct_scores(batch, num_groups, seed=tp), k)  # same on every rank (replicated router)
    single = [set(row) for row in selected.tolist()]
    per_rank = num_groups // tp
    starts = [r * per_rank for r in range(tp)]
    tables = [head_table_global(selected, start, per_rank) for start in starts]
    assert all(t.shape == (batch, per_rank) for t in tables)
    assert _reassemble(tables, starts) == single
    # Every selected (sequence, group) pair is computed by exactly one rank: k per sequence in total.
    assert sum(int((t >= 0).sum()) for t in tables) == batch * k


def test_global_tables_with_replicated_kv_heads() -> None:
    # 3 KV groups on 6 ranks: rank r holds group r // 2 (num_groups_local 1), as ShardPlan does.
    num_groups, tp, batch = 3, 6, 10
    selected = topk_groups(_distinct_scores(batch, num_groups, seed=7), 2)
    starts = [r // (tp // num_groups) for r in range(tp)]
    tables = [head_table_global(selected, start, 1) for start in starts]
    assert _reassemble(tables, starts) == [set(row) for row in selected.tolist()]
    # Both ranks holding a group agree on whether each sequence reads it.
    for r in range(0, tp, 2):
        assert torch.equal(tables[r], tables[r + 1])


def test_head_table_local_topk_of_own_groups() -> None:
    scores_local = _distinct_scores(4, 5, seed=1)
    table = head_table_local(scores_local, 2)
    assert table.shape == (4, 2) and table.dtype == torch.int32
    for b in range(4):
        assert table[b].tolist() == sorted(scores_local[b].argsort(descending=True)[:2].tolist())


def test_union_topk_neurons_value() -> None:
    scores = torch.tensor([[3.0, -9.0, 0.0, 1.0, 0.0],
                           [-9.0, 2.5, 0.1, 1.0, 0.0]])
    # relu sums: [3, 2.5, 0.1, 2, 0]: the top 3 are neurons 0, 1, 3 (neuron 1's -9 must not count against it)
    idx = union_topk_neurons(scores, 3, num_rows=2)
    assert idx.dtype == torch.int32 and idx.tolist() == [0, 1, 3]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_union_topk_neurons_ignores_padding_rows(as_tensor: bool) -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(5, 64, generator=g)
    padded = torch.cat([real, torch.full((3, 64), 1e6)])  # (8, 64): rows 5.. are CUDA-graph padding
    padded[6, 10] = float("nan")
    num_rows = torch.tensor(5) if as_tensor else 5
    got = union_topk_neurons(padded, 12, num_rows)
    expected = torch.sort(real.relu().sum(0).topk(12).indices).values.int()
    assert got.shape == (12,) and torch.equal(got, expected)
    assert got.tolist() == sorted(got.tolist())


class _HostSyncRecorder(TorchDispatchMode):
    """Records the ops that read tensor values on the host or give data-dependent shapes: the
    ones that would wait for the GPU or break a CUDA-graph capture."""

    _FORBIDDEN = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                  "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if name in self._FORBIDDEN or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_host_sync_recorder_catches_item_and_masks() -> None:
    x = torch.randn(6)
    with _HostSyncRecorder() as recorder:
        int(torch.tensor(3))
        x.nonzero()
        x[x > 0]
    assert len(recorder.found) == 3


def test_selection_never_syncs_with_host() -> None:
    scores = _distinct_scores(4, 6, seed=3)
    neuron_scores = torch.randn(8, 32)
    with _HostSyncRecorder() as recorder:
        selected = topk_groups(scores, 3)
        head_table_global(selected, 2, 2)
        head_table_local(scores[:, :3], 2)
        union_topk_neurons(neuron_scores, 8, torch.tensor(5))
    assert recorder.found == []


@pytest.mark.gpu
def test_selection_in_cuda_graph() -> None:
    device = torch.device("cuda")
    scores = torch.randn(8, 6, device=device)
    neuron_scores = torch.randn(8, 256, device=device)
    num_rows = torch.tensor(8, device=device)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        head_table_global(topk_groups(scores, 3), 3, 3)
        union_topk_neurons(neuron_scores, 32, num_rows)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        table = head_table_global(topk_groups(scores, 3), 3, 3)
        idx = union_topk_neurons(neuron_scores, 32, num_rows)
    scores.copy_(torch.randn_like(scores))
    neuron_scores.copy_(torch.randn_like(neuron_scores))
    num_rows.fill_(5)
    graph.replay()
    assert torch.equal(table, head_table_global(topk_groups(scores, 3), 3, 3))
    assert torch.equal(idx, union_topk_neurons(neuron_scores[:5], 32, 5))


def test_density_to_k_rounding_rule() -> None:
    assert density_to_k(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert density_to_k(0.5, 9) == 5  # halves round up
    assert density_to_k(0.15, 10) == 2  # 0.15 * 10 is 1.4999999999999998: still a half
    assert density_to_k(0.67, 3) == 2 and density_to_k(0.34, 3) == 1  # two decimals name a count
    assert density_to_k(0.625, 8) == 5
    assert density_to_k(1e-6, 64) == 1
    assert density_to_k(1.0, 7) == 7
    for n in range(1, 65):
        assert [density_to_k(k / n, n) for k in range(1, n + 1)] == list(range(1, n + 1))
        if n <= 50:
            assert [density_to_k(round(k / n, 2), n) for k in range(1, n + 1)] == list(range(1, n + 1))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="density"):
            density_to_k(bad, 8)


def test_head_router_shapes_and_dtype() -> None:
    router = HeadRouter(16, 3, dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in router.parameters())
    assert set(router.state_dict()) == {"weight", "bias"}
    scores = router(torch.randn(5, 16))
    assert scores.shape == (5, 3) and scores.dtype == torch.float32
    copy = HeadRouter.from_weights(router.weight, router.bias)
    assert torch.equal(copy(torch.ones(2, 16)), router(torch.ones(2, 16)))
    assert HeadRouter(16, 3, requires_grad=True).weight.requires_grad


def test_neuron_router_shards_reassemble_full_scores() -> None:
    torch.manual_seed(0)
    full = NeuronRouter(16, 10, rank=8)
    assert set(full.state_dict()) == {"fc1.weight", "fc2.weight"}
    assert not any(p.requires_grad for p in full.parameters())
    x = torch.randn(4, 16)
    expected = full(x)
    assert expected.shape == (4, 10) and expected.dtype == torch.float32
    ranges = [(0, 4), (4, 7), (7, 10)]  # uneven MLP column ranges, as ShardPlan gives for tp=3
    shards = [NeuronRouter.from_weights(full.fc1.weight, full.fc2.weight, neuron_start=a, neuron_end=b)
              for a, b in ranges]
    assert [s.num_neurons_local for s in shards] == [4, 3, 3]
    torch.testing.assert_close(torch.cat([s(x) for s in shards], dim=1), expected)
