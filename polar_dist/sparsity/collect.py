"""Router training rows from dense prefill: (router input, labels) per layer, bounded in memory.

Every rank runs the same prefill steps over batches of token segments (the model's own
collectives need all of them). Forward hooks on the model's taps see, per layer:
- `layers.{i}.attn.router_input` (T, d): the router input x, the same on every rank;
- `layers.{i}.attn.head_output` (T, Hq_local, D): per-head attention output. Each rank takes its
  heads' L2 norms; an all-gather gives (T, Hq) (ranks hold contiguous query heads in rank
  order, also when KV heads are replicated), and `labels.head_labels` turns them into the top
  k_label KV groups per token;
- `layers.{i}.mlp.fc1_output` (T, N_local), OPT only: neuron labels fc1 > 0 of this rank's
  neurons, all-gathered into (T, N) (padded to equal widths: the MLP split may be uneven).
Rank 0 stores each layer's rows, [head labels | neuron labels], in a train and a held-out
`SampleBuffer`; their capacities come from one byte budget, so memory does not grow with the
text. The other ranks store nothing.

    samples = collect(rt, train_segments, heldout_segments, k_label=2, budget_bytes=1 << 30)
    x, y = samples[3].train.tensors()   # rank 0; None on the other ranks
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from tqdm import tqdm

from polar_dist.engine.sampling import SamplingParams
from polar_dist.errors import UserError
from polar_dist.model_spec import Family, ModelSpec
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.plan import make_shard_plan
from polar_dist.runtime import LocalSteps, Runtime
from polar_dist.sparsity.buffer import SampleBuffer
from polar_dist.sparsity.labels import head_labels
from polar_dist.sparsity.policy import DENSE_LAYERS


class Split(Enum):
    TRAIN = "train"
    HELDOUT = "heldout"


@dataclass(frozen=True)
class LabelLayout:
    """The label columns of one layer's rows: [num_groups head groups | num_neurons MLP neurons]."""

    num_groups: int  # 0: the layer has no head router (dense layers)
    num_neurons: int  # 0: no neuron router (non-ReLU models)

    @property
    def num_labels(self) -> int:
        return self.num_groups + self.num_neurons

    @property
    def heads(self) -> slice:
        return slice(0, self.num_groups)

    @property
    def neurons(self) -> slice:
        return slice(self.num_groups, self.num_labels)


def label_layouts(spec: ModelSpec) -> dict[int, LabelLayout]:
    """{layer: layout} for the layers with at least one router; the others are not collected."""
    num_neurons = spec.intermediate_size if spec.family is Family.OPT else 0
    layouts = {i: LabelLayout(0 if i in DENSE_LAYERS else spec.num_kv_heads, num_neurons)
               for i in range(spec.num_layers)}
    return {i: layout for i, layout in layouts.items() if layout.num_labels}


@dataclass
class LayerSamples:
    layout: LabelLayout
    train: SampleBuffer
    heldout: SampleBuffer

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.heldout.nbytes


def make_buffers(spec: ModelSpec, budget_bytes: int, heldout_share: float, seed: int) -> dict[int, LayerSamples]:
    """One train and one held-out buffer per collected layer; together at most `budget_bytes`,
    `heldout_share` of it for the held-out rows, split evenly over the layers."""
    layouts = label_layouts(spec)
    row_bytes = max(SampleBuffer.bytes_per_row(spec.hidden_size, lay.num_labels) for lay in layouts.values())
    per_layer = budget_bytes // len(layouts)
    heldout_bytes = int(per_layer * heldout_share)
    for what, nbytes in (("training", per_layer - heldout_bytes), ("held-out", heldout_bytes)):
        if nbytes < row_bytes:
            raise UserError(f"a router sample budget of {budget_bytes} bytes over {len(layouts)} layers leaves "
                            f"{nbytes} bytes per layer for {what} rows, less than one row ({row_bytes} bytes); "
                            "raise the buffer budget")
    return {i: LayerSamples(lay,
                            SampleBuffer((per_layer - heldout_bytes) // row_bytes, spec.hidden_size, lay.num_labels,
                                         seed=seed + 2 * i),
                            SampleBuffer(heldout_bytes // row_bytes, spec.hidden_size, lay.num_labels,
                                         seed=seed + 2 * i + 1))
            for i, lay in layouts.items()}


class _Hooks:
    """Forward hooks on the taps: labels per layer, gathered over the ranks, then stored."""

    def __init__(self, spec: ModelSpec, comm: TPComm, k_label: int,
                 buffers: dict[int, LayerSamples] | None) -> None:
        self.spec, self.comm, self.k_label, self.buffers = spec, comm, k_label, buffers
        self.layouts = label_layouts(spec)
        self.split = Split.TRAIN
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        # Neuron columns of the padded all-gather that are real: rank r's range starts at r * width.
        plans = [make_shard_plan(spec, r, comm.size) for r in range(comm.size)]
        self._neuron_width = max(p.intermediate_size_local for p in plans)
        self._neuron_columns = torch.cat([torch.arange(p.intermediate_size_local) + r * self._neuron_width
                                          for r, p in enumerate(plans)])  # (N,)

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for i, layout in self.layouts.items():
            taps = [("x", f"layers.{i}.attn.router_input", self._router_input)]
            if layout.num_groups:
                taps.append(("heads", f"layers.{i}.attn.head_output", self._head_labels))
            if layout.num_neurons:
                taps.append(("neurons", f"layers.{i}.mlp.fc1_output", self._neuron_labels))
            for part, name, fn in taps:
                handles.append(model.get_submodule(name).register_forward_hook(self._hook(i, part, fn)))
        return handles

    def _hook(self, layer: int, part: str, fn):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._parts.setdefault(layer, {})[part] = fn(output)
            self._flush_if_complete(layer)
        return hook

    @staticmethod
    def _router_input(x: torch.Tensor) -> torch.Tensor:
        return x  # (T, d), identical on every rank

    def _head_labels(self, o: torch.Tensor) -> torch.Tensor:
        norms = self.comm.all_gather_last_dim(o.float().norm(dim=-1))  # (T, Hq_local) -> (T, Hq)
        return head_labels(norms, self.spec.group_size, self.k_label)  # (T, G) bool

    def _neuron_labels(self, fc1: torch.Tensor) -> torch.Tensor:
        fired = (fc1 > 0).to(torch.uint8)  # (T, N_local)
        fired = nn.functional.pad(fired, (0, self._neuron_width - fired.shape[1]))  # (T, width)
        gathered = self.comm.all_gather_last_dim(fired)  # (T, tp * width)
        return gathered[:, self._neuron_columns.to(gathered.device)].bool()  # (T, N)

    def _flush_if_complete(self, layer: int) -> None:
        layout, parts = self.layouts[layer], self._parts[layer]
        needed = {"x"} | ({"heads"} if layout.num_groups else set()) | ({"neurons"} if layout.num_neurons else set())
        if set(parts) != needed:
            return
        del self._parts[layer]
        if self.buffers is None:
            return
        labels = torch.cat([parts[p] for p in ("heads", "neurons") if p in parts], dim=1)  # (T, G + N)
        samples = self.buffers[layer]
        (samples.train if self.split is Split.TRAIN else samples.heldout).add(parts["x"], labels)


def collect(
    rt: Runtime,
    train_segments: Sequence[Sequence[int]],
    heldout_segments: Sequence[Sequence[int]],
    *,
    k_label: int,
    budget_bytes: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, LayerSamples] | None:
    """Dense prefill over all segments (every rank calls this with the same segments); returns
    {layer: samples} on rank 0, None on the others."""
    spec = rt.spec
    if not 1 <= k_label <= spec.num_kv_heads:
        raise UserError(f"head label k = {k_label} must be in [1, {spec.num_kv_heads}] (the KV groups)")
    num_train, num_heldout = (sum(map(len, s)) for s in (train_segments, heldout_segments))
    buffers = None
    if rt.ctx.is_driver:
        buffers = make_buffers(spec, budget_bytes, num_heldout / max(num_train + num_heldout, 1), seed)
    hooks = _Hooks(spec, rt.ctx.tp_comm, k_label, buffers)
    handles = hooks.attach(rt.runner.model)
    try:
        for split, segments in ((Split.TRAIN, train_segments), (Split.HELDOUT, heldout_segments)):
            hooks.split = split
            with tqdm(total=sum(map(len, segments)), desc=f"collect {split.value}", unit="tok", file=sys.stderr,
                      disable=not (progress and rt.ctx.is_driver)) as bar:
                for tokens in _prefill(rt, segments):
                    bar.update(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return buffers


def _prefill(rt: Runtime, segments: Sequence[Sequence[int]]):  # noqa: ANN202 - yields tokens per step
    """Run every segment through dense prefill steps (chunked under engine.max_num_batched_tokens),
    max_batch_size segments at a time; nothing is decoded (one token each, then they finish)."""
    e = rt.cfg.engine
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for first in range(0, len(segments), e.max_batch_size):
        steps = LocalSteps(rt)  # a fresh cache per wave
        for seg in segments[first:first + e.max_batch_size]:
            steps.scheduler.add(list(seg), params, seed=0)
        while (step := steps.next()) is not None:
            rt.runner.logits(step)
            steps.feed(step, [0] * len(step.sample_ids))
            yield len(step.token_ids)
