"""Work plan of one decode step's attention: (sequence, chunk) items cut from the real lengths.

The decode kernel (kernels/select_attention.py) runs one program per (item, head-table slot).
An item is a chunk of one sequence's cached tokens (the item's sequence, and per sequence the
first item and the tokens per item: the kernel derives [start, end) from them); the chunk size comes from
the step's total tokens, so every program reads about the same number of tokens whatever the
mix of lengths (one long sequence among many short ones is cut into many chunks, the short
ones stay whole), and nothing depends on how far a block table is padded. A sequence cut into
n > 1 items writes n partial results that a merge kernel combines; a whole sequence writes
its output directly.

The plan is built on the host from the lengths the scheduler already holds (no device sync),
once per step, and every layer of the step reads it. For CUDA graphs it has a static
capacity per batch bucket (`plan_capacity`): items past the real ones are marked empty, and
their programs exit at once.

Rule (measured: benchmarks/KERNELS_NOTES.md, "Work plan"): aim at `programs_per_sm` programs
per SM over the step's (item, slot) pairs, with chunks of at least `min_chunk` tokens (a
shorter chunk spends more on its partial and the merge than it gains in parallelism).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PROGRAMS_PER_SM = 16
MIN_CHUNK_TOKENS = 256
SEQ_FIELDS = 4  # per sequence: first item, tokens per item, first partial, partials (0: not cut)


@dataclass(frozen=True)
class AttentionPlan:
    """A plan on the kernel's device. Item i is piece `i - first_item[s]` of sequence s =
    items[i]: tokens [piece * size, min((piece + 1) * size, seq_len)). `items` may hold empty
    rows (-1) past the real ones (a graph's static capacity); `num_parts` is how many partial
    results the buffers must hold (0: no sequence was cut, no merge runs)."""

    count: torch.Tensor  # (1,) int32: real items (the first rows of `items`)
    items: torch.Tensor  # (capacity,) int32: the item's sequence, -1 = empty
    seqs: torch.Tensor  # (B, 4) int32: first item, tokens per item, first partial, partials
    num_parts: int

    @property
    def capacity(self) -> int:
        return self.items.shape[0]


@dataclass(frozen=True)
class HostPlan:
    """The same plan as numpy arrays, before its copy to the device."""

    items: np.ndarray  # (capacity,) int32
    seqs: np.ndarray  # (B, 4) int32
    num_items: int  # real items; rows past it are empty
    num_parts: int
    chunk_tokens: int  # the target chunk size the cut used

    def flat(self) -> np.ndarray:
        """count, items, then seqs: one int32 array (one host-to-device copy)."""
        return np.concatenate([np.array([self.num_items], dtype=np.int32), self.items, self.seqs.reshape(-1)])

    def to(self, device: torch.device | str, num_parts: int | None = None) -> AttentionPlan:
        flat = torch.from_numpy(self.flat()).to(device, non_blocking=True)
        return plan_views(flat, self.items.shape[0], self.seqs.shape[0],
                          self.num_parts if num_parts is None else num_parts)

    def spans(self, seq_lens: Sequence[int] | np.ndarray) -> np.ndarray:
        """(num_items, 4) int64: sequence, first token, end token, partial index (-1: written
        directly) of each real item, as the kernel reads them."""
        lens = np.asarray(seq_lens, dtype=np.int64)
        seq = self.items[:self.num_items].astype(np.int64)
        first, size, first_part, parts = (self.seqs[seq, j].astype(np.int64) for j in range(SEQ_FIELDS))
        piece = np.arange(self.num_items) - first
        start = piece * size
        return np.stack([seq, start, np.minimum(start + size, lens[seq]),
                         np.where(parts > 0, first_part + piece, -1)], axis=1)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """SMs the plan spreads work over: the GPU's, or 4 on the CPU (the Triton interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def plan_views(flat: torch.Tensor, capacity: int, batch: int, num_parts: int) -> AttentionPlan:
    """An AttentionPlan over a flat int32 buffer laid out as HostPlan.flat()."""
    seqs = flat[1 + capacity:1 + capacity + SEQ_FIELDS * batch].view(batch, SEQ_FIELDS)
    return AttentionPlan(flat[:1], flat[1:1 + capacity], seqs, num_parts)


def plan_capacity(batch: int, groups: int, num_sms: int, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Most items `plan_attention` makes for `batch` sequences: each sequence is one item or is
    cut into pieces of >= chunk / 2 tokens, and chunk >= tokens * groups / (programs wanted), so
    the pieces number <= programs wanted / groups + one rounding per sequence."""
    return batch + -(-programs_per_sm * num_sms // max(1, groups))


def plan_attention(seq_lens: Sequence[int] | np.ndarray, *, groups: int, num_sms: int, block_n: int = 64,
                   capacity: int | None = None, chunk_tokens: int | None = None,
                   programs_per_sm: int = PROGRAMS_PER_SM, min_chunk: int = MIN_CHUNK_TOKENS) -> HostPlan:
    """Cut B sequences of `seq_lens` tokens into items for `groups` head-table slots each.

    groups: slots per sequence the step's layers read (the plan holds for any head-table width;
    this only sets how finely work is cut). chunk_tokens: force the target chunk size (tests).
    capacity: rows of `items` (a graph bucket's static size); default: the real items, or
    plan_capacity(...) when the chunk size is the rule's. Host time matters (once per step):
    a few vector operations, no per-sequence Python."""
    lens = np.asarray(seq_lens, dtype=np.int64)  # (B,)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens must be one length per sequence, got shape {lens.shape}")
    batch = lens.shape[0]
    if batch and int(lens.min()) < 1:
        raise ValueError(f"every decode sequence has >= 1 cached token; got a length of {int(lens.min())}")
    if chunk_tokens is None:
        want = programs_per_sm * num_sms  # (item, slot) programs wanted for the step
        chunk = max(min_chunk, -(-int(lens.sum()) * max(1, groups) // want))
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    else:
        chunk = chunk_tokens
    # Pieces per sequence, rounded: a sequence a little longer than a chunk stays whole rather
    # than becoming one chunk and a sliver. Then even pieces of whole tiles. (Float arithmetic:
    # numpy's integer division is several times slower, and these values are exact in a float64.)
    flens = lens.astype(np.float64)
    pieces = np.maximum(np.floor(flens * (1.0 / chunk) + 0.5), 1.0)  # (B,)
    size = np.ceil(flens / (pieces * block_n)) * block_n  # (B,) tokens per item: whole tiles
    counts = np.ceil(flens / size).astype(np.int64)  # (B,) items, <= the rounded count
    total = int(counts.sum())
    if capacity is None:
        capacity = total if chunk_tokens is not None else plan_capacity(batch, groups, num_sms, programs_per_sm)
    if total > capacity:
        raise ValueError(f"the plan needs {total} items but its buffers hold {capacity}")
    items = np.empty(capacity, dtype=np.int32)
    items[total:] = -1
    seqs = np.zeros((batch, SEQ_FIELDS), dtype=np.int32)
    seqs[:, 1] = size
    if total == batch:  # nothing cut: one item per sequence (the common case at large batch)
        items[:total] = np.arange(batch)
        seqs[:, 0] = items[:total]
        return HostPlan(items, seqs, total, 0, chunk)
    items[:total] = np.repeat(np.arange(batch, dtype=np.int32), counts)
    ends = np.cumsum(counts)
    seqs[:, 0] = ends - counts
    parts = np.where(counts > 1, counts, 0)  # (B,) partials of each sequence
    part_ends = np.cumsum(parts)
    seqs[:, 2] = part_ends - parts
    seqs[:, 3] = parts
    return HostPlan(items, seqs, total, int(part_ends[-1]), chunk)


@dataclass(frozen=True)
class StepPlanner:
    """Plans for one runtime's decode steps: the head-table width its layers mostly read and
    the device's SM count, fixed when the runtime is built."""

    groups: int
    num_sms: int

    @classmethod
    def for_device(cls, groups: int, device: torch.device) -> StepPlanner:
        return cls(max(1, groups), num_sms(device))

    def capacity(self, batch: int) -> int:
        return plan_capacity(batch, self.groups, self.num_sms)

    def plan(self, seq_lens: Sequence[int] | np.ndarray, capacity: int | None = None) -> HostPlan:
        return plan_attention(seq_lens, groups=self.groups, num_sms=self.num_sms, capacity=capacity)
