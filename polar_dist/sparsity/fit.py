"""From collected rows to a router artifact: train each layer's routers, measure them on the
held-out rows, choose k, and assemble the weights and metadata `save_artifact` writes.

Per layer (rank 0 only, on one device):
- head router (every layer but the dense ones): `train_router` with the top-k_label labels;
  on held-out rows the recall curve head_recall_at_k for k = 1..G (`search.head_recall`: the
  true top-k_label groups found in the router's top-k). Every token has exactly k_label true
  groups, so precision at k is recall * k_label / k.
- neuron router (OPT): full width (N neurons; a rank loads its rows at run time); held-out
  recall and precision at probability 0.5, and the neuron k per batch bucket
  (`search.search_neuron_k_table` on held-out tokens shuffled into batches).
Then head k per layer for the density asked: `uniform` (the paper) or `per_layer`
(`allocate_head_k` over the measured curves).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from polar_dist.model_spec import ModelSpec
from polar_dist.sparsity.artifact import (
    ArtifactMeta,
    CreationInfo,
    LayerMetrics,
    NeuronKTable,
    RoutingScope,
    TextFile,
    head_weight_names,
    neuron_weight_names,
)
from polar_dist.sparsity.collect import LayerSamples
from polar_dist.sparsity.policy import DENSE_LAYERS, model_identity
from polar_dist.sparsity.routers import HeadRouter, NeuronRouter
from polar_dist.sparsity.search import allocate_head_k, head_recall, search_neuron_k_table, uniform_k
from polar_dist.sparsity.training import RouterSelect, RouterTrainConfig, evaluate_router, train_router

_SCORE_CHUNK_ROWS = 4096  # rows per router forward when scoring held-out rows (bounds memory)


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    head_training: RouterTrainConfig
    neuron_training: RouterTrainConfig
    buckets: tuple[int, ...]  # batch sizes of the neuron k table
    target_recall: float
    neuron_k_step: int
    seed: int


@dataclass
class LayerFit:
    """One layer's trained routers and held-out measurements (None where it has no such router)."""

    head_router: HeadRouter | None = None
    head_recall_at_k: tuple[float, ...] | None = None
    neuron_router: NeuronRouter | None = None
    neuron_recall: float | None = None
    neuron_precision: float | None = None
    neuron_k: tuple[int, ...] | None = None  # per bucket


def fit_layer(samples: LayerSamples, k_label: int, cfg: FitConfig, device: torch.device, layer: int) -> LayerFit:
    """Train and measure one layer's routers; their initial weights are drawn from a generator
    seeded by (cfg.seed, layer), so the result does not depend on what ran before."""
    layout = samples.layout
    x, y = samples.train.tensors()  # (n, d) float32, (n, G + N) bool
    x_held, y_held = samples.heldout.tensors()
    x, y, x_held, y_held = (t.to(device) for t in (x, y, x_held, y_held))
    d = x.shape[1]
    fit = LayerFit()
    if layout.num_groups:
        with _seeded(cfg.seed, layer, 0):
            router = HeadRouter(d, layout.num_groups, dtype=torch.float32).to(device)
        with _one_cpu_thread(device):
            train_router(router, x, y[:, layout.heads], cfg.head_training, RouterSelect.TOPK, k=k_label)
        scores = _scores(router, x_held)  # (T, G)
        truth = y_held[:, layout.heads].float()  # exactly k_label ones per row: their top-k_label
        fit.head_router = router
        fit.head_recall_at_k = tuple(head_recall(scores, truth, k_label, k) for k in range(1, layout.num_groups + 1))
    if layout.num_neurons:
        with _seeded(cfg.seed, layer, 1):
            router = NeuronRouter(d, layout.num_neurons, dtype=torch.float32).to(device)
        labels, labels_held = y[:, layout.neurons], y_held[:, layout.neurons]
        train_router(router, x, labels, cfg.neuron_training, RouterSelect.THRESHOLD)
        held = evaluate_router(router, x_held, labels_held, RouterSelect.THRESHOLD)
        table = search_neuron_k_table(_scores(router, x_held), labels_held, cfg.buckets, cfg.target_recall,
                                      step=cfg.neuron_k_step, seed=cfg.seed)
        fit.neuron_router, fit.neuron_recall, fit.neuron_precision = router, held.recall, held.precision
        fit.neuron_k = tuple(table[b] for b in sorted(table))
    return fit


@contextmanager
def _seeded(seed: int, layer: int, which: int) -> Iterator[None]:
    """CPU module initialisation inside draws from (seed, layer, which); the global RNG is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((seed * 1_000_003 + layer) * 2 + which)  # CPU only
        yield


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """A head-router step is ~1 MFLOP: on the CPU, synchronising threads costs more than they
    save (4x slower with 2 threads than 1 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _scores(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([router(chunk) for chunk in x.split(_SCORE_CHUNK_ROWS)])  # (T, L) float32


def fit_routers(samples: dict[int, LayerSamples], k_label: int, cfg: FitConfig, device: torch.device,
                progress: bool = True) -> dict[int, LayerFit]:
    fits = {}
    for layer in tqdm(sorted(samples), desc="train routers", unit="layer", file=sys.stderr, disable=not progress):
        fits[layer] = fit_layer(samples[layer], k_label, cfg, device, layer)
    return fits


def choose_head_k(spec: ModelSpec, fits: dict[int, LayerFit], density: float, allocation: str) -> list[int]:
    """KV groups per layer for a mean density (`uniform` or `per_layer`), dense layers at G."""
    G = spec.num_kv_heads
    if allocation == "uniform":
        return uniform_k(G, density, num_layers=spec.num_layers, dense_layers=DENSE_LAYERS)
    curves = [list(fits[i].head_recall_at_k) if i in fits and fits[i].head_recall_at_k else [1.0] * G
              for i in range(spec.num_layers)]
    return allocate_head_k(curves, density, dense_layers=DENSE_LAYERS)


def assemble_artifact(
    spec: ModelSpec,
    fits: dict[int, LayerFit],
    *,
    k_label: int,
    head_density: float,
    head_allocation: str,
    routing_scope: RoutingScope,
    buckets: Sequence[int],
    train_texts: Sequence[TextFile],
    heldout_texts: Sequence[TextFile],
    created: CreationInfo,
) -> tuple[dict[str, torch.Tensor], ArtifactMeta]:
    """The weights (float32, CPU, full width) and metadata of a router artifact."""
    head_k = choose_head_k(spec, fits, head_density, head_allocation)
    weights: dict[str, torch.Tensor] = {}
    metrics = []
    for layer in range(spec.num_layers):
        fit = fits.get(layer, LayerFit())
        recall = precision = None
        if fit.head_router is not None:
            weight, bias = head_weight_names(layer)
            weights[weight], weights[bias] = fit.head_router.weight.detach(), fit.head_router.bias.detach()
            recall = fit.head_recall_at_k[head_k[layer] - 1]
            precision = recall * k_label / head_k[layer]
        if fit.neuron_router is not None:
            fc1, fc2 = neuron_weight_names(layer)
            weights[fc1], weights[fc2] = fit.neuron_router.fc1.weight.detach(), fit.neuron_router.fc2.weight.detach()
        metrics.append(LayerMetrics(head_recall=recall, head_precision=precision, neuron_recall=fit.neuron_recall,
                                    neuron_precision=fit.neuron_precision, head_recall_at_k=fit.head_recall_at_k))
    neuron_rows = [fits[i].neuron_k if i in fits else None for i in range(spec.num_layers)]
    neuron_k = None
    if any(row is not None for row in neuron_rows):
        assert all(row is not None for row in neuron_rows), "neuron routers in some layers only"
        neuron_k = NeuronKTable(buckets=tuple(sorted(set(buckets))), k=tuple(neuron_rows))
    meta = ArtifactMeta(model=model_identity(spec), routing_scope=routing_scope, head_density=head_density,
                        head_k=tuple(head_k), head_label_k=k_label, neuron_k=neuron_k, layer_metrics=tuple(metrics),
                        train_texts=tuple(train_texts), heldout_texts=tuple(heldout_texts), created=created)
    return {name: t.float().cpu() for name, t in weights.items()}, meta
