"""Where each parameter of a rank's model comes from in a full (unsharded) HF checkpoint.

A parameter is the concatenation, along dim 0, of one or more `Source` slices (QKV and
gate/up are fused); a vocabulary shard past the real vocabulary is zero-padded. Readers
return exactly the requested slice, so a rank never materialises another rank's weights.
Every checkpoint tensor must be used by some parameter: one that is not means the model
config does not describe the checkpoint (a bias it does not declare, say), and loading stops.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class Source:
    name: str  # tensor name in the HF checkpoint
    rows: tuple[int, int] | None = None  # [start, stop) along dim 0; None = all
    cols: tuple[int, int] | None = None  # [start, stop) along dim 1; None = all
    pad_rows: bool = False  # rows past the tensor's end are zeros (the padded vocabulary shard)


class CheckpointReader(Protocol):
    def names(self) -> set[str]: ...

    def read(self, source: Source, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor: ...


def _clip(span: tuple[int, int] | None, size: int) -> slice:
    if span is None:
        return slice(0, size)
    return slice(min(span[0], size), min(span[1], size))


class SafetensorsReader:
    """Reads slices from a HF directory's *.safetensors files (with or without an index)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{directory} holds no *.safetensors files; a HF model directory needs its weights")
        self._handles = {f: safe_open(str(directory / f), framework="pt") for f in files}
        self._file_of = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, source: Source, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        view = self._handles[self._file_of[source.name]].get_slice(source.name)
        shape = view.get_shape()
        rows = _clip(source.rows, shape[0])
        tensor = view[rows] if len(shape) == 1 else view[rows, _clip(source.cols, shape[1])]
        return tensor.to(device=device, dtype=dtype)


class RandomReader:
    """A virtual checkpoint of random tensors, the same on every rank for a given seed.

    Each full tensor is drawn from a generator seeded by (seed, name), then sliced, so any
    tp size sees the same model. Norm weights are 1 + noise, others N(0, std).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.02) -> None:
        self._shapes = shapes
        self._seed = seed
        self._std = std

    def names(self) -> set[str]:
        return set(self._shapes)

    def full(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self._seed}:{name}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        shape = self._shapes[name]
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * self._std
        if "norm" in name and len(shape) == 1 and name.endswith("weight"):
            t = t * 5 + 1.0  # norm scales near 1, with enough spread to matter
        return t.to(dtype)

    def read(self, source: Source, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        t = self.full(source.name, dtype, device)
        rows = _clip(source.rows, t.shape[0])
        return t[rows] if t.dim() == 1 else t[rows, _clip(source.cols, t.shape[1])]


# Tensors some checkpoints carry that no model parameter needs: precomputed RoPE frequencies,
# and a copy of the embedding stored as the LM head of a tied model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "lm_head.weight")


def load_parameters(model: torch.nn.Module, sources: dict[str, list[Source]], reader: CheckpointReader) -> None:
    """Fill every parameter of `model` named in `sources` from `reader`."""
    params = dict(model.named_parameters())
    missing_params = sorted(set(params) - set(sources))
    if missing_params:
        raise AssertionError(f"parameters without a checkpoint source: {missing_params}")
    available = reader.names()
    used = {s.name for parts in sources.values() for s in parts}
    unused = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"checkpoint tensors {unused[:6]}{' ...' if len(unused) > 6 else ''} are not used by this "
                         "model: its config.json does not describe this checkpoint (e.g. biases it does not "
                         "declare); fix the config or report the architecture as unsupported")
    for pname, parts in sources.items():
        absent = [s.name for s in parts if s.name not in available]
        if absent:
            raise ValueError(f"checkpoint is missing tensor(s) {absent}; is it a complete checkpoint of this model?")
        param = params[pname]
        pieces = [reader.read(s, param.dtype, param.device) for s in parts]
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if value.shape != param.shape:
            padded = all(s.pad_rows for s in parts)
            if not padded or value.shape[1:] != param.shape[1:] or value.shape[0] > param.shape[0]:
                raise ValueError(f"{pname}: checkpoint slice has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.data.zero_()  # vocabulary padding rows stay zero
        param.data[: value.shape[0]].copy_(value)
