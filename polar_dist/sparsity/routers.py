"""Routers: small predictors that read a layer's attention input and score heads or neurons.

Both read x, the normed hidden state that enters attention (the same tensor on every rank),
and return float32 scores; selection (top-k) lives in `polar_dist.sparsity.selection`.

* `HeadRouter`: one linear layer d -> G with bias, one score per KV group (G = num_kv_heads;
  for multi-head attention every head is its own group, so G = num_heads). Replicated on
  every rank, so every rank computes the same per-sequence choice without communication.
* `NeuronRouter` (ReLU MLPs): d -> rank -> N_local, both without bias and with no activation
  in between (the paper's low-rank linear predictor). fc1 is replicated; fc2 holds the rows
  of this rank's MLP neurons, so a rank scores only the neurons it computes.

State-dict names (`weight`, `bias`; `fc1.weight`, `fc2.weight`) are the names inside a router
artifact after the `layers.{i}.head.` / `layers.{i}.neuron.` prefix (see `artifact.py`).

Parameters do not require grad: at inference a router is a constant. `train_router` trains
a float32 copy and writes the best weights back.

    router = HeadRouter(hidden_size=576, num_groups=3, dtype=torch.bfloat16, device="cuda")
    scores = router(x)  # (T, 3) float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEURON_ROUTER_RANK = 1024  # bottleneck width of the paper's MLP router (DejaVu / PowerInfer design)


class HeadRouter(nn.Module):
    """scores = x @ weight.T + bias: one logit per KV group, per token."""

    def __init__(
        self,
        hidden_size: int,
        num_groups: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_groups < 1:
            raise ValueError(f"HeadRouter needs hidden_size >= 1 and num_groups >= 1, got {hidden_size}, {num_groups}")
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        linear = nn.Linear(hidden_size, num_groups, bias=True, dtype=dtype, device=device)  # default init
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=requires_grad)  # (G, d)
        self.bias = nn.Parameter(linear.bias.detach(), requires_grad=requires_grad)  # (G,)

    @classmethod
    def from_weights(
        cls, weight: torch.Tensor, bias: torch.Tensor, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> HeadRouter:
        """A router holding copies of `weight` (G, d) and `bias` (G,), e.g. from an artifact."""
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"head router weight (G, d) and bias (G,) expected, got {tuple(weight.shape)}, "
                             f"{tuple(bias.shape)}")
        router = cls(weight.shape[1], weight.shape[0], dtype=dtype or weight.dtype, device=device)
        router.load_state_dict({"weight": weight, "bias": bias})
        return router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> scores (T, G) float32."""
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()


class NeuronRouter(nn.Module):
    """scores = (x @ fc1.weight.T) @ fc2.weight.T: one logit per local MLP neuron, per token."""

    def __init__(
        self,
        hidden_size: int,
        num_neurons_local: int,
        rank: int = NEURON_ROUTER_RANK,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        if min(hidden_size, num_neurons_local, rank) < 1:
            raise ValueError(f"NeuronRouter needs positive sizes, got hidden_size {hidden_size}, "
                             f"num_neurons_local {num_neurons_local}, rank {rank}")
        self.hidden_size = hidden_size
        self.num_neurons_local = num_neurons_local
        self.rank = rank
        self.fc1 = nn.Linear(hidden_size, rank, bias=False, dtype=dtype, device=device)  # replicated
        self.fc2 = nn.Linear(rank, num_neurons_local, bias=False, dtype=dtype, device=device)  # this rank's rows
        self.requires_grad_(requires_grad)

    @classmethod
    def from_weights(
        cls, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, *, neuron_start: int = 0,
        neuron_end: int | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> NeuronRouter:
        """A router for neurons [neuron_start, neuron_end) of full weights fc1 (R, d), fc2 (N, R).

        With the defaults it holds all N neurons (one rank); a rank of a tensor-parallel group
        passes its MLP column range (`ShardPlan.mlp_start`, `mlp_end`).
        """
        if fc1_weight.dim() != 2 or fc2_weight.dim() != 2 or fc2_weight.shape[1] != fc1_weight.shape[0]:
            raise ValueError(f"neuron router fc1 (R, d) and fc2 (N, R) expected, got {tuple(fc1_weight.shape)}, "
                             f"{tuple(fc2_weight.shape)}")
        num_neurons = fc2_weight.shape[0]
        neuron_end = num_neurons if neuron_end is None else neuron_end
        if not 0 <= neuron_start < neuron_end <= num_neurons:
            raise ValueError(f"neuron range [{neuron_start}, {neuron_end}) is not inside [0, {num_neurons})")
        rank, hidden_size = fc1_weight.shape
        router = cls(hidden_size, neuron_end - neuron_start, rank, dtype=dtype or fc1_weight.dtype, device=device)
        router.load_state_dict({"fc1.weight": fc1_weight, "fc2.weight": fc2_weight[neuron_start:neuron_end]})
        return router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> scores (T, N_local) float32."""
        return self.fc2(self.fc1(x.to(self.fc1.weight.dtype))).float()
