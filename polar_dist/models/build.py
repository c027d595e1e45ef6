"""BuildContext: what every layer of one rank's model is built from, passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.dispatch import KernelOps
from polar_dist.model_spec import ModelSpec
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.plan import ShardPlan
from polar_dist.sparsity.policy import SparsityPolicy


@dataclass(frozen=True)
class BuildContext:
    spec: ModelSpec  # the whole model's shape
    plan: ShardPlan  # which heads, columns and vocabulary rows this rank holds
    comm: TPComm  # this rank's tensor-parallel group
    ops: KernelOps  # the kernels, bound to the backend chosen for this model
    dtype: torch.dtype
    device: torch.device
    policy: SparsityPolicy  # what each layer's decode computes (dense_policy(spec) for the dense model)
