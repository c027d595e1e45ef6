"""Work plan of one decode step's attention: (sequence, chunk) items cut from the real lengths.

The decode kernel (kernels/select_attention.py) runs one program per (item, head-table slot).
An item is a chunk of one sequence's cached tokens (the item's sequence, and per sequence the
first item and the tokens per item: the kernel derives [start, end) from them); the chunk size comes from
the step's total tokens, so every program reads about the same number of tokens whatever the
mix of lengths (one long sequence among many short ones is cut into many chunks, the short
ones stay whole), and nothing depends on how far a block table is padded. A sequence cut into
n > 1 items writes n partial results that the last of its items to finish merges; a whole
sequence writes its output directly.

The plan is built on the host from the lengths the scheduler already holds (no device sync),
once per step, and every layer of the step reads it. For CUDA graphs it has a static
capacity per batch bucket (`plan_capacity`): items past the real ones are marked empty, and
their programs exit at once.

Rule (measured: benchmarks/KERNELS_NOTES.md, "Work plan" and "Attention programs in whole waves"):
chunks of at least `min_chunk` tokens (a shorter chunk spends more on its partial and the merge
than it gains in parallelism), cut so the step's (item, slot) programs fill whole waves of the
GPU's resident slots: the kernel holds `resident_per_sm` programs per SM at once
(kernels/attention_builds.py), and a last wave that fills few of them runs at a fraction of the
bandwidth, nearly as long as a full one.
The cut is chosen among 1..5 waves' worth of programs by a cost model (`_wave_cost`: the partial
last wave, and how much the pieces' sizes vary; ties: fewer waves). A step with less than one
wave's work even at `min_chunk` is latency-bound rather than bandwidth-bound: it is cut into
chunks down to SUB_WAVE_CHUNK_TOKENS where those still fit in one wave.
`programs_per_sm` forces the older rule, a fixed program count per SM (the A/B scripts compare).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.attention_builds import RESIDENT_PER_SM, resident_per_sm

PROGRAMS_PER_SM = 16  # the most programs per SM a plan aims at: plan_capacity's bound
MIN_CHUNK_TOKENS = 256
# A step whose every program fits in one wave at MIN_CHUNK_TOKENS is latency-bound: each SM holds
# few programs, so few bytes are in flight. There the cut takes chunks down to this size while
# its programs still fit in one wave (run 80's grid, 2-stage build, 4 per SM, in a graph: 15
# such cases at B 1-64, MHA and GQA, 0.82-0.95x, median 0.90x; a cut of 128-token chunks that
# spilled into a second wave was 1.04-1.19x at 5 cases, which this rule never makes).
SUB_WAVE_CHUNK_TOKENS = 128
# Cost model of a cut (runs 47-53, fit by benchmarks/plan_model_fit.py): a last wave that fills a fraction f of the slots takes
# f + (1 - f) * IDLE_SHARE of a whole wave's time (29% full: as long as 62% of a wave); with
# unequal lengths the pieces differ and the step takes at least J + IMBALANCE * cv waves, for J
# programs per slot and cv the coefficient of variation of the pieces' sizes (the slots that
# drew long pieces end last).
IDLE_SHARE = 0.46
IMBALANCE = 1.0
# With unequal lengths the hardware packs a last wave this small into the gaps of the one before
# (run 47: Llama-3.1-8B B 64 over 512-6144 tokens, 2.01 waves the fastest cut; run 48: 1.03 waves
# 3.5% slower than 1.98 at MHA-32 B 32 over 410-4096); equal pieces pay for it in full.
OVERFLOW_SLACK = 0.02
REPLAN_DRIFT = 0.01  # StepPlanner reuses a batch's chunk size while its tokens move less than this
KEPT_ROOM = 64  # tokens of growth StepPlanner's cuts leave each cut sequence, so a plan lasts that many steps
SEQ_FIELDS = 4  # per sequence: first item, tokens per item, first partial, partials (0: not cut)
# Tokens per item of a sequence left whole: its one item reads [0, min(WHOLE_TOKENS, length)),
# i.e. any length, so a plan stays valid for it however it grows (StepPlanner keeps plans).
WHOLE_TOKENS = 1 << 30


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


def _wave_cost(programs: float, slots: int, cv: float = 0.0, slack: float = 0.0, *,
               idle_share: float = IDLE_SHARE, imbalance: float = IMBALANCE) -> float:
    """Modelled time of a cut relative to the bytes it reads: `programs` over `slots` resident
    slots, piece sizes varying by `cv`, a last wave within `slack` of the one before packed into
    it (see the constants above; benchmarks/plan_model_fit.py passes others). Plain floats: five
    candidates a step."""
    waves = programs / slots
    full = math.floor(waves)
    frac = waves - full
    if full >= 1 and frac <= slack:
        busy = waves
    else:
        busy = full + (frac + (1.0 - frac) * idle_share if frac > 0.0 else 0.0)
    return max(busy, waves + imbalance * cv) / waves


def _wave_chunk(flens: np.ndarray, groups: int, slots: int, min_chunk: int, max_programs: int,
                equal_len: int | None) -> tuple[int, np.ndarray | None]:
    """The chunk size whose cut `_wave_cost` rates fastest among 1, 2, ... waves' worth of
    programs (no more than max_programs; ties: fewer waves), and the (B,) pieces per sequence
    of that cut (None where they are all the same). flens: (B,) float64 lengths; equal_len:
    their one length if they are all equal."""
    batch = flens.shape[0]
    work = float(flens.sum()) * groups
    chunks = [max(min_chunk, math.ceil(work / (w * slots))) for w in range(1, max(1, max_programs // slots) + 1)]
    if equal_len is not None:  # equal pieces: scalar arithmetic, no array pass
        costs = [_wave_cost(batch * max(1.0, math.floor(equal_len / c + 0.5)) * groups, slots) for c in chunks]
        return chunks[costs.index(min(costs))], None
    pieces = np.floor(np.multiply.outer([1.0 / c for c in chunks], flens) + 0.5)  # (W, B), rounded as the cut does
    np.maximum(pieces, 1.0, out=pieces)
    counts = pieces.sum(axis=1).tolist()  # (W,) pieces
    squares = (flens * flens / pieces).sum(axis=1).tolist()  # (W,) sum over pieces of size^2
    tokens = work / groups
    costs = []
    for n, sq in zip(counts, squares):  # cv of the piece sizes: E[s^2] / mean^2 - 1
        cv = math.sqrt(max(0.0, sq * n / (tokens * tokens) - 1.0))
        costs.append(_wave_cost(n * groups, slots, cv, OVERFLOW_SLACK))
    best = costs.index(min(costs))
    return chunks[best], pieces[best]


def _piece_sizes(flens: np.ndarray, pieces: np.ndarray, chunk: int, room: int,
                 block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B,) tokens per item (whole tiles) and (B,) items of the cut into `pieces` per sequence,
    each sequence's items holding its length + room where that costs no pieces.

    Pieces are whole tiles, so a length rarely splits into exactly `pieces` of them: rounding
    the size up never makes more items than pieces but can make far fewer (4,097 tokens in 16
    pieces: 13 of 320 tokens, in 32: 22 of 192; 4,096 + 64 of room in 16: 13), and then the cut
    the rule chose (its programs against the GPU's slots) is not the one that runs. So the size
    is a tile smaller where that gives a count nearer `pieces` (4,097 in 16: 17 of 256; 4,096 in
    16: 16 of 256, with no room: StepPlanner cuts again when the sequence outgrows it) and at
    most floor(length / chunk) + 1 items (what plan_capacity allows)."""
    target = (flens + room) / (pieces * block_n)  # (B,) tiles per piece, unrounded
    size = np.ceil(target) * block_n  # (B,)
    counts = np.ceil(flens / size)  # (B,) items, <= pieces
    short = counts * size < flens + room  # (B,) where fewer items than pieces leave less room
    while short.any():  # size those for the room too
        size = np.where(short, np.ceil((flens + room) / (counts * block_n)) * block_n, size)
        counts = np.ceil(flens / size)  # never more than before, so this ends
        short = counts * size < flens + room
    if (counts == pieces).all():  # the usual case where pieces are many tiles long
        return size, counts
    # without the room: the tile sizes either side of length / pieces
    tiles = flens / (pieces * block_n)  # (B,)
    up = np.ceil(tiles) * block_n  # (B,) <= pieces items
    down = np.maximum(np.floor(tiles), 1.0) * block_n  # (B,) >= pieces items
    up_counts, down_counts = np.ceil(flens / up), np.ceil(flens / down)
    take_down = (down_counts - pieces < pieces - up_counts) & (down_counts <= np.floor(flens * (1.0 / chunk)) + 1.0)
    alt, alt_counts = np.where(take_down, down, up), np.where(take_down, down_counts, up_counts)
    nearer = np.abs(alt_counts - pieces) < pieces - counts  # (B,) counts <= pieces
    return np.where(nearer, alt, size), np.where(nearer, alt_counts, counts)


def plan_capacity(batch: int, groups: int, num_sms: int, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Most items `plan_attention` makes for `batch` sequences: each sequence is one item or is
    cut into pieces of >= chunk / 2 tokens, and chunk >= tokens * groups / (programs wanted), so
    the pieces number <= programs wanted / groups + one rounding per sequence."""
    return batch + -(-programs_per_sm * num_sms // max(1, groups))


def plan_attention(seq_lens: Sequence[int] | np.ndarray, *, groups: int, num_sms: int, block_n: int = 64,
                   capacity: int | None = None, chunk_tokens: int | None = None,
                   programs_per_sm: int | None = None, min_chunk: int = MIN_CHUNK_TOKENS,
                   resident: int = RESIDENT_PER_SM[128, 16], longest_first: bool = True,
                   room: int = 0) -> HostPlan:
    """Cut B sequences of `seq_lens` tokens into items for `groups` head-table slots each.

    groups: slots per sequence the step's layers read (the plan holds for any head-table width;
    this only sets how finely work is cut). chunk_tokens: force the target chunk size (tests).
    programs_per_sm: aim at this many programs per SM instead of whole waves of `resident`
    programs per SM (resident_per_sm(head_dim)).
    capacity: rows of `items` (a graph bucket's static size); default: the real items, or
    plan_capacity(...) when the chunk size is the rule's. longest_first (the default): the items
    of the sequences with the longest pieces first (each sequence's items stay together), so the
    GPU, which starts programs in the order of their ids, leaves the shortest for the launch's
    tail (H200 run 69, benchmarks/plan_order_ab.py: 0.94-0.97x at unequal lengths and batch
    64-256, within +-1% elsewhere); else in sequence order. room: tokens a cut sequence's pieces
    hold beyond its length where that costs none of the rule's pieces (sized for length + room,
    so a plan kept while the sequences grow lasts that many steps; the last piece is that much
    shorter; `_piece_sizes`). Host time matters (once per step): a few vector operations, no
    per-sequence Python."""
    lens = np.asarray(seq_lens, dtype=np.int64)  # (B,)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens must be one length per sequence, got shape {lens.shape}")
    batch = lens.shape[0]
    shortest = int(lens.min()) if batch else 0
    if batch and shortest < 1:
        raise ValueError(f"every decode sequence has >= 1 cached token; got a length of {shortest}")
    flens = lens.astype(np.float64)
    width, slots = max(1, groups), resident * num_sms  # head-table slots a sequence; resident programs
    pieces = None
    if chunk_tokens is None and programs_per_sm is not None:
        want = programs_per_sm * num_sms  # (item, slot) programs wanted for the step
        chunk = max(min_chunk, -(-int(lens.sum()) * width // want))
    elif chunk_tokens is None:
        chunk, pieces = _wave_chunk(flens, width, slots, min_chunk, PROGRAMS_PER_SM * num_sms,
                                    shortest if shortest == int(lens.max()) else None) if batch else (min_chunk, None)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    else:
        chunk = chunk_tokens
    # Pieces per sequence, rounded: a sequence a little longer than a chunk stays whole rather
    # than becoming one chunk and a sliver. Then even pieces of whole tiles (_piece_sizes). (Float
    # arithmetic: numpy's integer division is several times slower, and these values are exact in
    # a float64.)
    if pieces is None:
        pieces = np.maximum(np.floor(flens * (1.0 / chunk) + 0.5), 1.0)  # (B,)
    size, counts = _piece_sizes(flens, pieces, chunk, room, block_n)  # (B,) tokens per item, (B,) items
    if (batch and chunk_tokens is None and programs_per_sm is None and SUB_WAVE_CHUNK_TOKENS < chunk == min_chunk
            and float(counts.sum()) * width <= slots):  # under one wave: finer, if that still fits in one
        fine = np.maximum(np.floor(flens * (1.0 / SUB_WAVE_CHUNK_TOKENS) + 0.5), 1.0)
        fine_size, fine_counts = _piece_sizes(flens, fine, SUB_WAVE_CHUNK_TOKENS, room, block_n)
        if float(fine_counts.sum()) * width <= slots:
            chunk, size, counts = SUB_WAVE_CHUNK_TOKENS, fine_size, fine_counts
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if capacity is None:
        capacity = total if chunk_tokens is not None else plan_capacity(batch, groups, num_sms,
                                                                         programs_per_sm or PROGRAMS_PER_SM)
    if total > capacity:
        raise ValueError(f"the plan needs {total} items but its buffers hold {capacity}")
    items = np.empty(capacity, dtype=np.int32)
    items[total:] = -1
    seqs = np.zeros((batch, SEQ_FIELDS), dtype=np.int32)
    seqs[:, 1] = np.where(counts > 1, size, WHOLE_TOKENS)
    if longest_first:  # the sequences in item order: longest pieces first (stable: ties keep their order)
        order = np.argsort(-(flens / counts), kind="stable").astype(np.int32)
        ordered = counts[order]  # (B,) items of each sequence, in item order
        items[:total] = np.repeat(order, ordered)
        seqs[order, 0] = np.cumsum(ordered) - ordered
    elif total == batch:  # nothing cut: one item per sequence (the common case at large batch)
        items[:total] = np.arange(batch)
        seqs[:, 0] = items[:total]
    else:
        items[:total] = np.repeat(np.arange(batch, dtype=np.int32), counts)
        seqs[:, 0] = np.cumsum(counts) - counts
    if total == batch:
        return HostPlan(items, seqs, total, 0, chunk)
    parts = np.where(counts > 1, counts, 0)  # (B,) partials of each sequence
    part_ends = np.cumsum(parts)
    seqs[:, 2] = part_ends - parts
    seqs[:, 3] = parts
    return HostPlan(items, seqs, total, int(part_ends[-1]), chunk)


@dataclass(frozen=True)
class StepPlanner:
    """Plans for one runtime's decode steps: the head-table width its layers mostly read, the
    device's SM count and the programs an SM holds at the model's head dim, fixed when the
    runtime is built.

    Consecutive decode steps of a batch differ by a token per sequence, so the cut's chunk size
    chosen for a batch is reused while its total tokens stay within REPLAN_DRIFT of the step
    that chose it (the choice costs ~15 us of the plan's host time at batch 256). Any chunk the
    rule can choose stays a valid cut within the static capacity at that drift (the rule aims
    at <= 15 of plan_capacity's 16 programs per SM). Within that drift the last plan itself is
    returned while it still covers every length: a whole sequence's item takes any length
    (WHOLE_TOKENS), a cut sequence's last piece grows until it is full; only a sequence that
    outgrows its pieces, or one shorter than them (another sequence in its row), cuts afresh.
    The cuts leave each cut sequence `room` tokens (KEPT_ROOM) of growth where that costs none
    of the rule's pieces, so a plan lasts that many steps: at batch 256 over 100-8192 tokens,
    1,000 consecutive steps cut afresh 21 times with 4 or 8 groups, each time because the chunk
    was chosen again (without room: 435 and 648 times, a cut's last piece then having < 64 x
    pieces tokens to spare), and a kept step takes ~9 us of host time against ~45-60 for a fresh
    cut (development machine). Small batches, whose chunks are a few tiles, give up the room
    more often (batch 8, 2 groups: 89 fresh cuts in 1,000 steps, 19 us a step on average)."""

    groups: int
    num_sms: int
    resident: int = RESIDENT_PER_SM[128, 16]
    longest_first: bool = True  # plan_attention's item order
    room: int = KEPT_ROOM  # plan_attention's room: steps of growth a cut lasts
    _chunks: dict = field(default_factory=dict, compare=False, repr=False)  # (B, equal) -> (tokens, chunk)
    _kept: dict = field(default_factory=dict, compare=False, repr=False)  # (B, equal) -> (plan, lo, hi)

    @classmethod
    def for_device(cls, groups: int, device: torch.device, head_dim: int = 128, group_size: int = 1,
                   longest_first: bool = True) -> StepPlanner:
        """groups: head-table slots a step's layers read; group_size: query heads per KV group."""
        return cls(max(1, groups), num_sms(device), resident_per_sm(head_dim, group_size), longest_first)

    def capacity(self, batch: int) -> int:
        return plan_capacity(batch, self.groups, self.num_sms)

    def plan(self, seq_lens: Sequence[int] | np.ndarray, capacity: int | None = None) -> HostPlan:
        lens = np.asarray(seq_lens, dtype=np.int64)
        if lens.ndim != 1 or not lens.shape[0]:
            return plan_attention(lens, groups=self.groups, num_sms=self.num_sms, capacity=capacity,
                                  resident=self.resident, longest_first=self.longest_first)
        key = (lens.shape[0], int(lens.min()) == int(lens.max()))
        tokens = int(lens.sum())
        cap = self.capacity(lens.shape[0]) if capacity is None else capacity
        last = self._chunks.get(key)
        if last is not None and abs(tokens - last[0]) <= REPLAN_DRIFT * last[0]:
            kept = self._kept.get(key)
            if kept is not None and kept[0].items.shape[0] == cap and (lens > kept[1]).all() and (lens <= kept[2]).all():
                return kept[0]  # every sequence still within its pieces: the same plan
            try:
                return self._keep(key, plan_attention(lens, groups=self.groups, num_sms=self.num_sms, capacity=cap,
                                                      chunk_tokens=last[1], longest_first=self.longest_first,
                                                      room=self.room))
            except ValueError:  # the old chunk no longer fits the buffers: choose afresh
                pass
        plan = plan_attention(lens, groups=self.groups, num_sms=self.num_sms, capacity=cap,
                              resident=self.resident, longest_first=self.longest_first, room=self.room)
        self._chunks[key] = (tokens, plan.chunk_tokens)
        return self._keep(key, plan)

    def _keep(self, key: tuple, plan: HostPlan) -> HostPlan:
        """Remember plan with the lengths it covers: (lo, hi] per sequence, (last piece's start,
        pieces' end] when cut, (0, WHOLE_TOKENS] when whole."""
        size, parts = plan.seqs[:, 1].astype(np.int64), plan.seqs[:, 3].astype(np.int64)
        self._kept[key] = (plan, np.maximum(parts - 1, 0) * size, np.maximum(parts, 1) * size)
        return plan
