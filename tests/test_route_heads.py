"""Fused head routing (kernels/route_heads.py): the Triton kernel (interpreter on CPU) gives
exactly the reference's tables. Tables are integers, so the check is equality; the scores it
ranks are float32 sums in both, and inputs are drawn so that no two groups are within rounding
of each other (a near-tie could legitimately rank either way), plus an exact-tie case where the
lower index must win."""

from __future__ import annotations

import pytest
import torch

from kernels.route_heads import route_heads, route_heads_ref, select_groups, select_groups_ref
from polar_dist.sparsity.selection import head_table_global, head_table_local, topk_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B: int, d: int, G: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=gen).to(dtype)
    w = torch.randn(G, d, generator=gen).to(dtype) * 0.1
    # well-separated biases keep scores apart by more than rounding
    b = (torch.randperm(G, generator=gen).float() * 10.0).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, d, G, k, start, local", [
    (5, 200, 6, 3, 2, 2),  # d not a multiple of the 128 tile; 3 ranks' middle shard
    (3, 128, 32, 16, 8, 8),  # MHA-like, tp 4
    (4, 96, 3, 1, 0, 3),  # SmolLM2-like groups at tp 1
    (2, 64, 8, 5, 7, 1),  # one group per rank (replicated KV heads)
])
def test_kernel_equals_reference(dtype, B, d, G, k, start, local) -> None:  # noqa: ANN001
    x, w, b = _case(B, d, G, dtype, seed=B * 100 + G)
    for local_scope, kk in ((False, k), (True, min(k, local))):
        ref = route_heads_ref(x, w, b, kk, start, local, local_scope)
        out = route_heads(x, w, b, kk, start, local, local_scope)
        assert torch.equal(out.cpu(), ref.cpu()), (local_scope, out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_as_extra_columns_of_a_wider_gemm(dtype: torch.dtype) -> None:
    # the model's path: the router's rows appended to the QKV weight, scores a strided view
    x, w, b = _case(5, 128, 8, dtype, seed=7)
    qkv = torch.randn(40, 128).to(DEVICE, dtype)
    scores = torch.nn.functional.linear(x, torch.cat([qkv, w]))[:, 40:]  # (B, 8), row stride 48
    assert scores.stride() == (48, 1)
    for local_scope, k in ((False, 3), (True, 2)):
        table = select_groups(scores, b, k, 2, 4, local_scope)
        assert torch.equal(table.cpu(), select_groups_ref(scores, b, k, 2, 4, local_scope).cpu())
        assert torch.equal(table.cpu(), route_heads_ref(x, w, b, k, 2, 4, local_scope).cpu())


def test_reference_agrees_with_the_selection_functions() -> None:
    x, w, b = _case(6, 64, 6, torch.float32, seed=1)
    scores = x.float() @ w.float().t() + b.float()
    for start, local in ((0, 2), (2, 2), (4, 2)):
        assert torch.equal(route_heads_ref(x, w, b, 3, start, local),
                           head_table_global(topk_groups(scores, 3), start, local))
        assert torch.equal(route_heads_ref(x, w, b, 1, start, local, local_scope=True),
                           head_table_local(scores[:, start:start + local], 1))


def test_ties_go_to_the_lower_index() -> None:
    x = torch.zeros(1, 64, dtype=torch.float16, device=DEVICE)
    w = torch.zeros(4, 64, dtype=torch.float16, device=DEVICE)
    b = torch.tensor([1.0, 2.0, 2.0, 2.0], dtype=torch.float16, device=DEVICE)
    assert route_heads(x, w, b, 2, 0, 4).tolist() == [[-1, 1, 2, -1]]
    assert route_heads_ref(x, w, b, 2, 0, 4).tolist() == [[-1, 1, 2, -1]]
    assert route_heads(x, w, b, 1, 2, 2, local_scope=True).tolist() == [[0]]


def test_bad_arguments_name_the_problem() -> None:
    x, w, b = _case(2, 64, 4, torch.float16, seed=0)
    with pytest.raises(ValueError, match=r"local groups \[3, 5\) must lie in \[0, 4\)"):
        route_heads(x, w, b, 1, 3, 2)
    with pytest.raises(ValueError, match="k = 3 must be in"):
        route_heads(x, w, b, 3, 0, 2, local_scope=True)
    with pytest.raises(ValueError, match="fp16/bf16"):
        route_heads(x.float(), w.float(), b.float(), 1, 0, 4)
