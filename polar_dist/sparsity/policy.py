"""SparsityPolicy: what the decode step computes, per layer, decided once at load.

Built from the run config's `sparsity` section and, when routers are used, the router
artifact's metadata. The models read it to choose each layer's head selection and MLP:
- head_k[l]: KV groups per sequence in layer l, counted over all G groups of the model (G
  means dense). Layer 0 is always dense (it scores highest in layer importance), prefill too.
  `uniform` gives every other layer k = density_to_k(head_density, G); `per_layer` spends the
  same mean density where the artifact's measured recall curves say it helps most.
- neuron_k[l]: for ReLU models with `sparsity.mlp`, {batch bucket: neurons of all N}: a decode
  step of B sequences uses the smallest bucket >= B (its k was searched for that many rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from polar_dist.config import SparsityConfig
from polar_dist.errors import UserError
from polar_dist.model_spec import Family, ModelSpec
from polar_dist.sparsity.artifact import ArtifactMeta, ModelIdentity, RoutingScope
from polar_dist.sparsity.search import allocate_head_k, uniform_k
from polar_dist.sparsity.selection import density_to_k

DENSE_LAYERS = (0,)


class HeadRouting(Enum):
    DENSE = "dense"
    ROUTER = "router"  # the layer's learned head router
    ORACLE = "oracle"  # true top-k by output norm (accuracy studies; reads every head first)


@dataclass(frozen=True, kw_only=True)
class SparsityPolicy:
    routing: HeadRouting
    scope: RoutingScope
    head_k: tuple[int, ...]  # per layer, groups per sequence out of all G
    num_groups: int  # G: KV groups (heads for MHA models)
    neuron_k: tuple[dict[int, int], ...] | None  # per layer, {batch bucket: neurons out of all N}; None: dense MLP
    mlp_dense_above: float  # a layer whose k exceeds this fraction of its neurons runs dense
    head_min_batch: int = 1  # decode steps of fewer rows read every head

    def head_routed(self, layer: int) -> bool:
        return self.routing is not HeadRouting.DENSE and self.head_k[layer] < self.num_groups

    def head_k_local(self, layer: int, num_groups_local: int) -> int:
        """Groups per sequence among this rank's own (the `local` scope)."""
        return density_to_k(self.head_k[layer] / self.num_groups, num_groups_local)

    def groups_read(self, rows_in_forward: int, num_groups_local: int, tp: int) -> int:
        """KV group-layers, over every rank, that one decode row reads in a decode forward of
        `rows_in_forward` rows (a CUDA-graph bucket's size when replayed): the rules of
        models/head_selection.py. Dense: num_layers x num_groups."""
        total = 0
        for layer, k in enumerate(self.head_k):
            if (not self.head_routed(layer) or self.routing is HeadRouting.ORACLE
                    or rows_in_forward < self.head_min_batch):
                total += self.num_groups  # the oracle reads every group, then masks
            elif self.scope is RoutingScope.LOCAL:
                total += tp * self.head_k_local(layer, num_groups_local)
            else:
                total += k
        return total

    def typical_groups_local(self, num_groups_local: int) -> int:
        """KV groups per sequence that the median layer reads on one rank (how finely decode
        attention is cut into work items: kernels/attention_plan.py)."""
        reads = sorted(self.head_k_local(layer, num_groups_local) if self.head_routed(layer)
                       and self.routing is HeadRouting.ROUTER else num_groups_local
                       for layer in range(len(self.head_k)))
        return reads[len(reads) // 2] if reads else num_groups_local

    @property
    def is_dense(self) -> bool:
        return self.neuron_k is None and not any(self.head_routed(i) for i in range(len(self.head_k)))


def dense_policy(spec: ModelSpec) -> SparsityPolicy:
    return SparsityPolicy(routing=HeadRouting.DENSE, scope=RoutingScope.GLOBAL,
                          head_k=(spec.num_kv_heads,) * spec.num_layers, num_groups=spec.num_kv_heads,
                          neuron_k=None, mlp_dense_above=1.0)


def model_identity(spec: ModelSpec) -> ModelIdentity:
    return ModelIdentity(model_type=spec.model_type, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                         num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                         intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size)


def make_policy(cfg: SparsityConfig, spec: ModelSpec, meta: ArtifactMeta | None, tp: int,
                max_batch_size: int) -> SparsityPolicy:
    """The policy of a run (`meta`: the router artifact's metadata; None for none or random
    routers); raises UserError naming the setting when the config asks for something the model,
    the artifact or the tensor-parallel layout cannot give."""
    G, L = spec.num_kv_heads, spec.num_layers
    random_routers = cfg.routers == "random"
    scope = RoutingScope(cfg.head_scope)
    if cfg.head_density >= 1.0:
        routing, head_k = HeadRouting.DENSE, (G,) * L
    else:
        routing = HeadRouting(cfg.routing)
        if routing is HeadRouting.ROUTER and meta is None and not random_routers:
            raise UserError(f"sparsity.head_density = {cfg.head_density} needs head routers: set sparsity.routers to "
                            "a router artifact directory (made by launch/calibrate.py), or sparsity.routing = oracle "
                            "for an accuracy study")
        if cfg.head_allocation == "uniform":
            head_k = tuple(uniform_k(G, cfg.head_density, num_layers=L, dense_layers=DENSE_LAYERS))
        else:
            curves = _recall_curves(meta, G, L)
            head_k = tuple(allocate_head_k(curves, cfg.head_density, dense_layers=DENSE_LAYERS))
        if scope is RoutingScope.LOCAL:
            groups_local = G // tp if G % tp == 0 else 1
            if groups_local < 2:
                raise UserError(f"sparsity.head_scope = local needs >= 2 KV groups per rank, but this model has {G} "
                                f"KV groups over tp = {tp} ({groups_local} per rank): a per-rank choice would be all "
                                "or nothing; use sparsity.head_scope = global (or a smaller tp)")
        if routing is HeadRouting.ORACLE and tp > 1 and G % tp:
            raise UserError(f"sparsity.routing = oracle needs distinct KV groups per rank (tp = {tp} replicates the "
                            f"{G} KV groups); run the oracle study at tp dividing {G}")
    neuron_k = None
    if cfg.mlp:
        if spec.family is not Family.OPT:
            raise UserError(f"sparsity.mlp = true needs a ReLU MLP (the OPT family); {spec.model_type} has a gated "
                            "SwiGLU MLP whose neurons are not sparse; set sparsity.mlp = false")
        if random_routers:
            k = density_to_k(cfg.mlp_density, spec.intermediate_size)
            neuron_k = tuple({max_batch_size: k} for _ in range(L))
        elif meta is None or meta.neuron_k is None:
            raise UserError("sparsity.mlp = true needs neuron routers: set sparsity.routers to an artifact calibrated "
                            "with neuron routers (launch/calibrate.py on this OPT model)")
        else:
            table = meta.neuron_k
            neuron_k = tuple(dict(zip(table.buckets, row)) for row in table.k)
    return SparsityPolicy(routing=routing, scope=scope, head_k=head_k, num_groups=G, neuron_k=neuron_k,
                          mlp_dense_above=cfg.mlp_dense_above, head_min_batch=cfg.head_min_batch)


def _recall_curves(meta: ArtifactMeta | None, G: int, L: int) -> list[list[float]]:
    if meta is None:
        raise UserError("sparsity.head_allocation = per_layer needs the recall curves of a router artifact: set "
                        "sparsity.routers, or use sparsity.head_allocation = uniform")
    curves = []
    for layer, metrics in enumerate(meta.layer_metrics):
        if metrics.head_recall_at_k is None:
            if layer in DENSE_LAYERS:
                curves.append([1.0] * G)  # never routed: any curve will do
                continue
            raise UserError(f"the router artifact has no head recall curve for layer {layer}, which "
                            "sparsity.head_allocation = per_layer needs; recalibrate with launch/calibrate.py or use "
                            "sparsity.head_allocation = uniform")
        curves.append(list(metrics.head_recall_at_k))
    return curves
