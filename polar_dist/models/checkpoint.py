"""Checkpoint readers: a safetensors directory, or a random virtual checkpoint.

A reader returns exactly the requested `TensorSlice`, so a rank never materialises another
rank's weights. Which slices a rank asks for is decided by its family's weight table
(`polar_dist.models.weights`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from enum import Enum
from typing import Protocol

import torch

from polar_dist.errors import UserError


class Init(Enum):
    """How a random checkpoint draws a tensor."""

    NORMAL = "normal"  # N(0, std)
    NEAR_ONE = "near_one"  # norm scales: 1 + noise


@dataclass(frozen=True)
class TensorSlice:
    name: str  # tensor name in the file
    axis: int | None = None  # the split axis; None = the whole tensor
    span: tuple[int, int] | None = None  # [start, stop) along `axis`
    pad: bool = False  # positions past the tensor's end are zeros (the padded vocabulary shard)


class CheckpointReader(Protocol):
    def names(self) -> set[str]: ...

    def read(self, piece: TensorSlice, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor: ...


def _index(piece: TensorSlice, shape: tuple[int, ...] | list[int]) -> tuple[slice, ...]:
    """Index tuple for `piece` over a tensor of `shape` (spans clipped at the end: padding)."""
    index = [slice(None)] * len(shape)
    if piece.axis is not None and piece.span is not None:
        size = shape[piece.axis]
        index[piece.axis] = slice(min(piece.span[0], size), min(piece.span[1], size))
    return tuple(index)


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
                raise UserError(f"{directory} holds no *.safetensors files; a HF model directory needs its weights")
        self._handles = {f: safe_open(str(directory / f), framework="pt") for f in files}
        self._file_of = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, piece: TensorSlice, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        view = self._handles[self._file_of[piece.name]].get_slice(piece.name)
        return view[_index(piece, view.get_shape())].to(device=device, dtype=dtype)


class RandomReader:
    """A virtual checkpoint of random tensors, the same on every rank for a given seed.

    Each full tensor is drawn from a generator seeded by (seed, name), then sliced, so any
    tp size sees the same model. NEAR_ONE tensors (norm scales) are 1 + noise, others N(0, std).
    """

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], Init]], seed: int, std: float = 0.02) -> None:
        self._shapes = shapes
        self._seed = seed
        self._std = std

    def names(self) -> set[str]:
        return set(self._shapes)

    def full(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self._seed}:{name}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        shape, init = self._shapes[name]
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * self._std
        if init is Init.NEAR_ONE:
            t = t * 5 + 1.0  # norm scales near 1, with enough spread to matter
        return t.to(dtype)

    def read(self, piece: TensorSlice, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        t = self.full(piece.name, dtype, device)
        return t[_index(piece, t.shape)]


class TensorDictReader:
    """Tensors already in memory (a router artifact's weights, checked when it was loaded)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> set[str]:
        return set(self._tensors)

    def read(self, piece: TensorSlice, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        t = self._tensors[piece.name]
        return t[_index(piece, t.shape)].to(device=device, dtype=dtype)
