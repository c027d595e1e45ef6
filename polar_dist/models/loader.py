"""Build this rank's shard of a model from a run config: HF directory, GGUF file, or random.

    source = resolve_source(cfg.model)                      # where the shape and weights come from
    ctx = BuildContext(source.spec, plan, comm, ops, dtype, device)
    model = build_model(source, ctx, max_positions)         # this rank's shard, weights loaded
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from polar_dist.config import ModelConfig
from polar_dist.errors import UserError
from polar_dist.model_spec import Family, ModelSpec, spec_from_hf_config
from polar_dist.models import llama, opt
from polar_dist.models.build import BuildContext
from polar_dist.models.checkpoint import CheckpointReader, RandomReader, SafetensorsReader
from polar_dist.models.gguf_cache import cached_hf_dir, locate_embedded
from polar_dist.models.weights import Origin, Weight, full_shapes, load_weights
from polar_dist.sparsity.policy import SparsityPolicy

# Per family: the compute code (built from a BuildContext and the longest position) and its weight table.
FAMILIES: dict[Family, tuple[Callable[[BuildContext, int], nn.Module],
                            Callable[[ModelSpec, SparsityPolicy], list[Weight]]]] = {
    Family.LLAMA: (llama.LlamaModel, llama.weight_table),
    Family.OPT: (opt.OPTModel, opt.weight_table),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    hf_config: dict[str, Any]
    directory: Path | None  # HF directory with config.json (and weights unless random)
    random_seed: int | None  # set when weights are random


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Find the model's config (and weights) without loading any weights."""
    directory: Path | None = None
    if cfg.path:
        directory = _hf_directory(cfg.path)
    if cfg.architecture:
        hf_config = dict(cfg.architecture)
    elif directory is not None:
        hf_config = json.loads((directory / "config.json").read_text())
    else:
        raise UserError("model.init = random needs model.architecture or a model.path with config.json")
    try:
        spec = spec_from_hf_config(hf_config)
    except KeyError as e:
        raise UserError(f"model config is missing the field {e.args[0]!r}; see configs/*.yaml for complete "
                        "examples") from e
    return ModelSource(spec, hf_config, directory, cfg.seed if cfg.init == "random" else None)


def _hf_directory(path: str) -> Path:
    if path.startswith("embedded:"):
        return cached_hf_dir(locate_embedded(path))
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model.path = {path!r} does not exist; give a Hugging Face directory, a .gguf file "
                        "or embedded:smollm2-135m")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"model.path = {path!r} is a file but not a .gguf; give a .gguf file or a HF directory")
        return cached_hf_dir(p)
    if not (p / "config.json").is_file():
        raise UserError(f"model.path = {path!r} has no config.json; it must be a Hugging Face model directory")
    return p


def build_model(source: ModelSource, ctx: BuildContext, max_positions: int,
                routers: CheckpointReader | None = None) -> nn.Module:
    """routers: the router artifact's weights, when ctx.policy routes (None: random routers)."""
    model_cls, table_of = FAMILIES[source.spec.family]
    model = model_cls(ctx, max_positions)
    table = table_of(source.spec, ctx.policy)
    reader: CheckpointReader
    if source.random_seed is not None:
        reader = RandomReader(full_shapes(table, source.spec), source.random_seed)
    else:
        assert source.directory is not None
        reader = SafetensorsReader(source.directory)
    readers = {Origin.CHECKPOINT: reader}
    if any(w.origin is Origin.ROUTERS for w in table):
        readers[Origin.ROUTERS] = routers or RandomReader(full_shapes(table, source.spec, Origin.ROUTERS),
                                                          source.random_seed or 0)
    load_weights(model, table, source.spec, ctx.plan, readers)
    return model.eval()
