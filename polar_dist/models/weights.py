"""Weight tables: where every parameter of a rank's model comes from.

Each model family declares one table (`weight_table(spec)` beside its compute code): per
parameter, the Hugging Face tensors it is made of, each with its shape in named dimensions.
Everything else follows from that one declaration:
- the split: a rank takes its range of every *sharded* dimension (query heads, KV heads, MLP
  columns, vocabulary); a tensor holds at most one sharded dimension, and that axis is the split;
- the full checkpoint shapes (what random initialisation draws);
- the loading: slices read, concatenated along dim 0 (fused QKV, gate/up), optionally
  transformed (a transposed copy, e.g. W2^T for the gathered fc2), and copied in.
A parameter may come from a second file (`Origin.ROUTERS`: the router artifact), read
through its own reader. Every checkpoint tensor must be used by some parameter: one that is not
means the model config does not describe the checkpoint (a bias it does not declare, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from polar_dist.errors import UserError
from polar_dist.model_spec import ModelSpec
from polar_dist.models.checkpoint import CheckpointReader, Init, TensorSlice
from polar_dist.parallel.plan import ShardPlan
from polar_dist.sparsity.policy import HeadRouting, SparsityPolicy
from polar_dist.sparsity.routers import NEURON_ROUTER_RANK


class Dim(Enum):
    HIDDEN = "hidden"  # hidden_size; never split
    Q = "q"  # num_heads * head_dim, split by query heads
    KV = "kv"  # num_kv_heads * head_dim, split by KV heads (or the one replicated KV head)
    MLP = "mlp"  # intermediate_size, split into near-equal contiguous ranges
    VOCAB = "vocab"  # vocab_size, split into equal ranges; the last is zero-padded
    POSITIONS = "positions"  # OPT's learned position table (max positions + 2); never split
    GROUPS = "groups"  # KV groups (num_kv_heads): a head router's outputs; replicated
    ROUTER_RANK = "router_rank"  # a neuron router's bottleneck; replicated


SHARDED_DIMS = frozenset({Dim.Q, Dim.KV, Dim.MLP, Dim.VOCAB})


class Transform(Enum):
    NONE = "none"
    TRANSPOSE = "transpose"  # a 2-D parameter stored transposed (e.g. W2^T rows for gather_fc2)


class Origin(Enum):
    CHECKPOINT = "checkpoint"  # the model's weights
    ROUTERS = "routers"  # a router artifact's weights


@dataclass(frozen=True)
class HFTensor:
    name: str  # tensor name in the file
    shape: tuple[Dim, ...]
    init: Init = Init.NORMAL


@dataclass(frozen=True)
class Weight:
    param: str  # our parameter name, e.g. "layers.0.attn.qkv.weight"
    parts: tuple[HFTensor, ...]  # concatenated along dim 0
    transform: Transform = Transform.NONE
    origin: Origin = Origin.CHECKPOINT


def weight(param: str, name: str, *shape: Dim, init: Init = Init.NORMAL) -> Weight:
    """A parameter made of one tensor."""
    return Weight(param, (HFTensor(name, shape, init),))


def full_size(dim: Dim, spec: ModelSpec) -> int:
    return {
        Dim.HIDDEN: spec.hidden_size,
        Dim.Q: spec.num_heads * spec.head_dim,
        Dim.KV: spec.num_kv_heads * spec.head_dim,
        Dim.MLP: spec.intermediate_size,
        Dim.VOCAB: spec.vocab_size,
        Dim.POSITIONS: spec.max_position_embeddings + 2,
        Dim.GROUPS: spec.num_kv_heads,
        Dim.ROUTER_RANK: NEURON_ROUTER_RANK,
    }[dim]


def local_range(dim: Dim, spec: ModelSpec, plan: ShardPlan) -> tuple[int, int]:
    """[start, stop) of this rank's part of a sharded dimension (stop may pass the end: padding)."""
    D = spec.head_dim
    if dim is Dim.Q:
        return plan.q_head_start * D, (plan.q_head_start + plan.num_heads_local) * D
    if dim is Dim.KV:
        return plan.kv_head_start * D, (plan.kv_head_start + plan.num_kv_heads_local) * D
    if dim is Dim.MLP:
        return plan.mlp_start, plan.mlp_end
    if dim is Dim.VOCAB:
        return plan.vocab_start, plan.vocab_start + plan.vocab_size_local
    raise AssertionError(f"{dim} is not sharded")


def tensor_slice(tensor: HFTensor, spec: ModelSpec, plan: ShardPlan) -> TensorSlice:
    sharded = [axis for axis, dim in enumerate(tensor.shape) if dim in SHARDED_DIMS]
    assert len(sharded) <= 1, f"{tensor.name} has more than one sharded dimension"
    if not sharded:
        return TensorSlice(tensor.name)
    axis = sharded[0]
    dim = tensor.shape[axis]
    return TensorSlice(tensor.name, axis=axis, span=local_range(dim, spec, plan), pad=dim is Dim.VOCAB)


def router_weights(layer: int, policy: SparsityPolicy, spec: ModelSpec) -> list[Weight]:
    """Layer `layer`'s router parameters (attn.heads.router, mlp.router) from a router artifact."""
    H, G, R, MLP, src, ours = Dim.HIDDEN, Dim.GROUPS, Dim.ROUTER_RANK, Dim.MLP, f"layers.{layer}", f"layers.{layer}"
    table = []
    if policy.routing is HeadRouting.ROUTER and policy.head_routed(layer):
        table += [Weight(f"{ours}.attn.heads.router.weight", (HFTensor(f"{src}.head.weight", (G, H)),),
                         origin=Origin.ROUTERS),
                  Weight(f"{ours}.attn.heads.router.bias", (HFTensor(f"{src}.head.bias", (G,)),), origin=Origin.ROUTERS)]
    if policy.neuron_k is not None:
        table += [Weight(f"{ours}.mlp.router.fc1.weight", (HFTensor(f"{src}.neuron.fc1.weight", (R, H)),),
                         origin=Origin.ROUTERS),
                  Weight(f"{ours}.mlp.router.fc2.weight", (HFTensor(f"{src}.neuron.fc2.weight", (MLP, R)),),
                         origin=Origin.ROUTERS)]
    return table


def full_shapes(table: list[Weight], spec: ModelSpec,
                origin: Origin = Origin.CHECKPOINT) -> dict[str, tuple[tuple[int, ...], Init]]:
    """Every file tensor the table reads from `origin`, with its full shape and how to draw it."""
    return {t.name: (tuple(full_size(d, spec) for d in t.shape), t.init)
            for w in table if w.origin is origin for t in w.parts}


# Tensors some checkpoints carry that no parameter needs: precomputed RoPE frequencies, and a
# copy of the embedding stored as the LM head of a tied model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "lm_head.weight")


def load_weights(model: nn.Module, table: list[Weight], spec: ModelSpec, plan: ShardPlan,
                 readers: dict[Origin, CheckpointReader]) -> None:
    """Fill every parameter of `model` from the readers, as `table` says."""
    params = dict(model.named_parameters())
    declared = {w.param for w in table}
    assert declared >= set(params), f"parameters without a table entry: {sorted(set(params) - declared)}"
    assert declared <= set(params), f"table entries without a parameter: {sorted(declared - set(params))}"
    for origin, reader in readers.items():
        if origin is Origin.ROUTERS:
            continue  # an artifact holds a router per layer; layers the run's policy leaves dense skip theirs
        used = {t.name for w in table if w.origin is origin for t in w.parts}
        unused = sorted(n for n in reader.names() - used if not n.endswith(_IGNORED_SUFFIXES))
        if unused:
            raise UserError(f"{origin.value} tensors {unused[:6]}{' ...' if len(unused) > 6 else ''} are not used by "
                            "this model: its config.json does not describe these weights (e.g. biases it does not "
                            "declare); fix the config or report the architecture as unsupported")
    with torch.no_grad():
        for w in table:
            reader = readers.get(w.origin)
            assert reader is not None, f"{w.param} comes from {w.origin.value}, but no reader for it was given"
            absent = [t.name for t in w.parts if t.name not in reader.names()]
            if absent:
                raise UserError(f"{w.origin.value} is missing tensor(s) {absent}; is it a complete checkpoint of "
                                "this model?")
            param = params[w.param]
            slices = [tensor_slice(t, spec, plan) for t in w.parts]
            pieces = [reader.read(s, param.dtype, param.device) for s in slices]
            value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            if w.transform is Transform.TRANSPOSE:
                value = value.t()
            _copy_into(param, value, padded=all(s.pad for s in slices), name=w.param)


def _copy_into(param: nn.Parameter, value: torch.Tensor, *, padded: bool, name: str) -> None:
    if value.shape != param.shape:
        if not padded or value.shape[1:] != param.shape[1:] or value.shape[0] > param.shape[0]:
            raise UserError(f"{name}: the checkpoint slice has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(param.shape)}; does config.json match these weights?")
        param.data.zero_()  # vocabulary padding rows stay zero
    param.data[: value.shape[0]].copy_(value)
