"""Build this rank's shard of a model from a run config: HF directory, GGUF file, or random.

    source = resolve_source(cfg.model)          # where weights and config come from
    spec = source.spec                           # the model's shape
    model = build_model(source, spec, plan, comm, dtype, device, max_positions)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polar_dist.config import ModelConfig
from polar_dist.models.checkpoint import CheckpointReader, RandomReader, SafetensorsReader, load_parameters
from polar_dist.models.gguf_cache import cached_hf_dir, locate_embedded
from polar_dist.models.llama import LlamaModel
from polar_dist.models.opt import OPTModel
from polar_dist.models.spec import Family, ModelSpec, spec_from_hf_config
from polar_dist.parallel.comm import TPComm
from polar_dist.parallel.plan import ShardPlan

MODEL_CLASSES: dict[Family, type[LlamaModel] | type[OPTModel]] = {Family.LLAMA: LlamaModel, Family.OPT: OPTModel}

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
        raise ValueError("model.init = random needs model.architecture or a model.path with config.json")
    try:
        spec = spec_from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"model config is missing the field {e.args[0]!r}; see configs/*.yaml for complete examples") from e
    return ModelSource(spec, hf_config, directory, cfg.seed if cfg.init == "random" else None)


def _hf_directory(path: str) -> Path:
    if path.startswith("embedded:"):
        return cached_hf_dir(locate_embedded(path))
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model.path = {path!r} does not exist; give a Hugging Face directory, a .gguf file "
                         "or embedded:smollm2-135m")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model.path = {path!r} is a file but not a .gguf; give a .gguf file or a HF directory")
        return cached_hf_dir(p)
    if not (p / "config.json").is_file():
        raise ValueError(f"model.path = {path!r} has no config.json; it must be a Hugging Face model directory")
    return p


def build_model(source: ModelSource, plan: ShardPlan, comm: TPComm, dtype: torch.dtype,
                device: torch.device, max_positions: int) -> nn.Module:
    cls = MODEL_CLASSES[source.spec.family]
    model = cls(source.spec, plan, comm, dtype, device, max_positions)
    reader: CheckpointReader
    if source.random_seed is not None:
        reader = RandomReader(cls.checkpoint_shapes(source.spec), source.random_seed)
    else:
        assert source.directory is not None
        reader = SafetensorsReader(source.directory)
    with torch.no_grad():
        load_parameters(model, model.checkpoint_sources(), reader)
    return model.eval()
