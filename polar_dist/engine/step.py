"""Step: everything a rank needs to run one forward step, built by rank 0's scheduler
and broadcast to the other ranks (plain Python lists: cheap to pickle, device-independent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StepKind(Enum):
    PREFILL = "prefill"  # any number of new tokens per sequence
    DECODE = "decode"  # exactly one new token per sequence
    STOP = "stop"  # workers leave their loop


@dataclass(frozen=True, kw_only=True)
class Step:
    kind: StepKind
    token_ids: list[int] = field(default_factory=list)  # (T,) packed new tokens
    positions: list[int] = field(default_factory=list)  # (T,)
    query_lens: list[int] = field(default_factory=list)  # (B,) new tokens per sequence
    seq_lens: list[int] = field(default_factory=list)  # (B,) context length after this step
    block_tables: list[list[int]] = field(default_factory=list)  # (B, ragged) physical blocks

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    def cache_slots(self, block_size: int) -> list[int]:
        """(T,) cache slot of each new token: its sequence's block for that position, and the offset in it."""
        slots: list[int] = []
        start = 0
        for table, n in zip(self.block_tables, self.query_lens):
            slots.extend(table[p // block_size] * block_size + p % block_size for p in self.positions[start:start + n])
            start += n
        return slots


STOP = Step(kind=StepKind.STOP)
