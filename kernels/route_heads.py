"""Head routing for one decode step of one layer: router scores, per-sequence top-k, head table.

    table = route_heads(x, weight, bias, k, group_start, num_groups_local, local_scope=False)
    table = select_groups(scores, bias, k, group_start, num_groups_local, local_scope=False)

scores = x @ weight^T (a GEMM in the model dtype: cuBLAS, or columns of the layer's QKV GEMM,
whose input the router shares: polar_dist/models/head_selection.py) + bias (added in float32
by the selection) gives every KV group of the model a logit per sequence; each sequence keeps
its top-k groups (ties to the lower index); the result is this rank's head table for the
selective attention kernel:
- global scope: (B, G_local) int32, entry j = j if the sequence kept group group_start + j,
  else -1 (k counts groups of the whole model);
- local scope: (B, k) int32, the top-k of this rank's own groups only, ascending local ids.
In eager PyTorch the selection is ~8 kernels (cast, top-k, sort, compare, any, where) of a few
microseconds each, per layer: at batch 32 on an H100, 31 routed layers cost 1.1 ms, 6% of a
Llama-2-7B decode step. `_select_groups_kernel` does it in one launch, one program per
sequence: the top-k is a rank count over a (G, G) comparison, so no sort and no
data-dependent shape (CUDA-graph safe). The GEMM stays in cuBLAS: a fused version that read
the (G, d) weight from every program was bound by one SM's load rate (19 us a layer for G 32,
d 4096), where the whole GPU serves cuBLAS; as its own GEMM cuBLAS runs it split-K plus a
reduce (6.5 us a layer on an H200), as 32 more columns of the QKV GEMM it costs ~0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_then_release

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_MAX_GROUPS = 256  # the (G_PAD, G_PAD) rank tile must stay in registers


@triton.jit
def _select_groups_kernel(
    scores_ptr, bias_ptr, out_ptr,
    G, k, group_start, num_local,
    stride_s, stride_out,
    G_PAD: tl.constexpr, L_PAD: tl.constexpr, LOCAL_SCOPE: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, G_PAD)
    g_mask = groups < G
    scores = tl.load(scores_ptr + row * stride_s + groups, mask=g_mask, other=0.0).to(tl.float32)  # [G_PAD]
    scores += tl.load(bias_ptr + groups, mask=g_mask, other=0.0).to(tl.float32)
    # The candidates: every group (global scope) or this rank's (local scope); others can't win.
    if LOCAL_SCOPE:
        candidate = g_mask & (groups >= group_start) & (groups < group_start + num_local)
    else:
        candidate = g_mask
    scores = tl.where(candidate, scores, float("-inf"))
    # rank[g] = candidates ahead of g: higher score, or equal score and lower index
    s_row, s_col = scores[:, None], scores[None, :]
    ahead = (s_col > s_row) | ((s_col == s_row) & (groups[None, :] < groups[:, None]))
    ahead = ahead & candidate[None, :]
    rank = tl.sum(ahead.to(tl.int32), axis=1)  # [G_PAD]
    kept = candidate & (rank < k)  # [G_PAD]
    # This rank's view: local slot j is global group group_start + j.
    local = tl.arange(0, L_PAD)
    l_mask = local < num_local
    hit = (groups[None, :] == (group_start + local)[:, None]) & kept[None, :]  # [L_PAD, G_PAD]
    kept_local = tl.max(hit.to(tl.int32), axis=1) > 0  # [L_PAD]
    if LOCAL_SCOPE:
        # ascending local ids: the position of j is the number of kept local groups before it
        pos = tl.cumsum(kept_local.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * stride_out + pos, local, mask=l_mask & kept_local)
    else:
        tl.store(out_ptr + row * stride_out + local, tl.where(kept_local, local, -1), mask=l_mask)


def _check_groups(G: int, k: int, group_start: int, num_groups_local: int, local_scope: bool) -> None:
    if not (0 <= group_start and 1 <= num_groups_local and group_start + num_groups_local <= G):
        raise ValueError(f"local groups [{group_start}, {group_start + num_groups_local}) must lie in [0, {G})")
    if not 1 <= k <= (num_groups_local if local_scope else G):
        raise ValueError(f"k = {k} must be in [1, {num_groups_local if local_scope else G}]")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"x [B, d], weight [G, d], bias [G] expected, got {tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")


def _check_scores(scores: torch.Tensor, bias: torch.Tensor, kernel: bool) -> None:
    if scores.dim() != 2 or bias.shape != (scores.shape[1],):
        raise ValueError(f"scores [B, G] and bias [G] expected, got {tuple(scores.shape)}, {tuple(bias.shape)}")
    if kernel:
        if scores.dtype not in _KERNEL_DTYPES or bias.dtype != scores.dtype:
            raise ValueError(f"the kernel takes fp16/bf16 scores and bias of one dtype, got {scores.dtype}, "
                             f"{bias.dtype}; use select_groups_ref")
        if scores.shape[1] > _MAX_GROUPS:
            raise ValueError(f"{scores.shape[1]} groups exceed the kernel's {_MAX_GROUPS}; use select_groups_ref")
        if scores.stride(-1) != 1 or not bias.is_contiguous():
            raise ValueError("scores need a contiguous last dim, bias must be contiguous")


def route_heads(
    x: torch.Tensor,  # [B, d] router input of the decode tokens
    weight: torch.Tensor,  # [G, d]
    bias: torch.Tensor,  # [G]
    k: int,
    group_start: int,
    num_groups_local: int,
    local_scope: bool = False,
    pdl: bool = False,  # the selection's launch: with programmatic dependent launch (kernels/pdl.py)
) -> torch.Tensor:  # [B, G_local] (global scope) or [B, k] (local scope) int32
    """Router GEMM (cuBLAS) + the Triton selection (see the module docstring)."""
    _check(x, weight, bias)
    return select_groups(torch.nn.functional.linear(x, weight), bias, k, group_start, num_groups_local, local_scope,
                         pdl)


def select_groups(
    scores: torch.Tensor,  # [B, G] x @ weight^T, model dtype, any row stride
    bias: torch.Tensor,  # [G]
    k: int,
    group_start: int,
    num_groups_local: int,
    local_scope: bool = False,
    pdl: bool = False,  # launch with programmatic dependent launch (kernels/pdl.py)
) -> torch.Tensor:  # [B, G_local] (global scope) or [B, k] (local scope) int32
    """Per-sequence top-k of scores + bias and this rank's head table, in one launch."""
    _check_scores(scores, bias, kernel=True)
    B, G = scores.shape
    _check_groups(G, k, group_start, num_groups_local, local_scope)
    width = k if local_scope else num_groups_local
    out = torch.empty(B, width, dtype=torch.int32, device=scores.device)
    if B == 0:
        return out
    _select_groups_kernel[(B,)](
        scores, bias, out,
        G, k, group_start, num_groups_local,
        scores.stride(0), out.stride(0),
        G_PAD=max(16, triton.next_power_of_2(G)), L_PAD=max(16, triton.next_power_of_2(num_groups_local)),
        LOCAL_SCOPE=local_scope, PDL=pdl, num_warps=4, **launch_options(pdl),
    )
    return out


def route_heads_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, group_start: int,
                    num_groups_local: int, local_scope: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference: the same GEMM in x's dtype, then select_groups_ref."""
    _check(x, weight, bias)
    return select_groups_ref(torch.nn.functional.linear(x, weight), bias, k, group_start, num_groups_local,
                             local_scope)


def select_groups_ref(scores: torch.Tensor, bias: torch.Tensor, k: int, group_start: int, num_groups_local: int,
                      local_scope: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference: the same float32 sums, the same tie rule (lower index first), the
    selection by a stable sort."""
    _check_scores(scores, bias, kernel=False)
    _check_groups(scores.shape[1], k, group_start, num_groups_local, local_scope)
    scores = scores.float() + bias.float()  # (B, G)
    G = scores.shape[1]
    local = torch.arange(num_groups_local, device=scores.device)
    if local_scope:
        scores = scores[:, group_start:group_start + num_groups_local]  # (B, G_local)
    # a stable descending sort keeps ties in index order, so the first k are the kept ones
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    if local_scope:
        return torch.sort(order, dim=1).values.to(torch.int32)  # (B, k) ascending local ids
    kept = torch.zeros(scores.shape[0], G, dtype=torch.bool, device=scores.device).scatter_(1, order, True)
    return torch.where(kept[:, group_start:group_start + num_groups_local], local, -1).to(torch.int32)
