"""Weight tables: one declaration gives the split, the full shapes and the loading; a
parameter may be a transformed copy (W^T) or come from a second file (router weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polar_dist.errors import UserError
from polar_dist.model_spec import spec_from_hf_config
from polar_dist.models import llama, opt
from polar_dist.models.checkpoint import RandomReader, TensorDictReader
from polar_dist.models.weights import Dim, Origin, Transform, Weight, HFTensor, full_shapes, load_weights, weight
from polar_dist.parallel.plan import make_shard_plan
from polar_dist.sparsity.policy import dense_policy

SPEC = spec_from_hf_config(dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=24,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8))


class Tiny(nn.Module):
    def __init__(self, n_local: int) -> None:
        super().__init__()
        self.fc2 = nn.Parameter(torch.empty(SPEC.hidden_size, n_local), requires_grad=False)  # (d, N_local)
        self.fc2_t = nn.Parameter(torch.empty(n_local, SPEC.hidden_size), requires_grad=False)  # (N_local, d)
        self.router = nn.Parameter(torch.empty(SPEC.num_kv_heads, SPEC.hidden_size), requires_grad=False)


TABLE = [
    weight("fc2", "mlp.down.weight", Dim.HIDDEN, Dim.MLP),
    Weight("fc2_t", (HFTensor("mlp.down.weight", (Dim.HIDDEN, Dim.MLP)),), transform=Transform.TRANSPOSE),
    Weight("router", (HFTensor("layers.0.head.weight", (Dim.HIDDEN, Dim.HIDDEN)),), origin=Origin.ROUTERS),
]


@pytest.mark.parametrize("rank", [0, 1])
def test_derived_and_second_file_parameters(rank: int) -> None:
    plan = make_shard_plan(SPEC, rank, 2)
    down = torch.randn(SPEC.hidden_size, SPEC.intermediate_size)
    router = torch.randn(SPEC.num_kv_heads, SPEC.hidden_size)
    model = Tiny(plan.intermediate_size_local)
    load_weights(model, TABLE, SPEC, plan, {Origin.CHECKPOINT: TensorDictReader({"mlp.down.weight": down}),
                                            Origin.ROUTERS: TensorDictReader({"layers.0.head.weight": router})})
    cols = down[:, plan.mlp_start:plan.mlp_end]
    assert torch.equal(model.fc2, cols) and torch.equal(model.fc2_t, cols.t())
    assert torch.equal(model.router, router)


def test_unused_and_missing_tensors_are_user_errors() -> None:
    plan = make_shard_plan(SPEC, 0, 1)
    down = torch.randn(SPEC.hidden_size, SPEC.intermediate_size)
    routers = TensorDictReader({"layers.0.head.weight": torch.randn(2, 32)})
    with pytest.raises(UserError, match=r"checkpoint tensors \['mlp.down.bias'\] are not used"):
        load_weights(Tiny(24), TABLE, SPEC, plan, {Origin.CHECKPOINT: TensorDictReader({"mlp.down.weight": down,
                                                                                  "mlp.down.bias": down[0]}),
                                                   Origin.ROUTERS: routers})
    with pytest.raises(UserError, match=r"routers is missing tensor\(s\) \['layers.0.head.weight'\]"):
        load_weights(Tiny(24), TABLE, SPEC, plan, {Origin.CHECKPOINT: TensorDictReader({"mlp.down.weight": down}),
                                                   Origin.ROUTERS: TensorDictReader({})})


@pytest.mark.parametrize("family", [llama, opt])
def test_full_shapes_cover_every_hf_tensor_once(family) -> None:  # noqa: ANN001
    spec = SPEC if family is llama else spec_from_hf_config(dict(
        model_type="opt", vocab_size=101, hidden_size=32, ffn_dim=24, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64))
    table = family.weight_table(spec, dense_policy(spec))
    assert len({w.param for w in table}) == len(table)
    shapes = full_shapes(table, spec)
    names = [t.name for w in table for t in w.parts]
    assert sorted(set(names)) == sorted(shapes) and len(names) == len(shapes)
    # random draws are per tensor name, so any tp reads the same model
    reader = RandomReader(shapes, seed=3)
    name = next(n for n in shapes if n.endswith("norm.weight"))
    assert (reader.full(name, torch.float32, "cpu") - 1).abs().mean() < 0.5  # norm scales near 1
