"""What crosses from rank 0 to the other ranks each step, and the Step every rank runs.

Rank 0's scheduler decides a step as a `StepDelta`: the changes since the last step (sequences
gone, sequences new with their blocks, blocks added) and this step's work (which sequences
prefill how many tokens; every other running sequence decodes one) with the input token ids.
`encode` packs it into one int64 array; every rank, rank 0 included, feeds that array to its
`BatchMirror`, which keeps each running sequence's block table and cached length and turns the
delta into a `Step` (positions, cache slots, block tables, which rows are sampled). Rank 0 runs
the same code on the same bytes, so the ranks cannot disagree about a step.

Message layout (int64):
    [kind, total_len, n_removed, n_new, new_len, n_new_blocks, n_prefill, n_tokens,
     removed ids..., new records (id, prefill_len, flags, n_blocks, blocks...)...,
     (id, block) pairs..., (id, tokens) prefill rows..., token ids...]
A steady decode step at batch B is about B + 10 integers: the input tokens and a block now and then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

HEADER = 8
FLAG_PROMPT_LOGPROBS = 1


class MsgKind(IntEnum):
    STEP = 1
    IDLE = 2  # a heartbeat: rank 0 is alive and has no work
    STOP = 3  # workers leave their loop


@dataclass(frozen=True)
class NewSeq:
    seq_id: int
    prefill_len: int  # tokens to prefill (prompt, or prompt + output when resumed after preemption)
    blocks: list[int]
    prompt_logprobs: bool = False  # rows of its prompt positions get logits too


@dataclass
class StepDelta:
    removed: list[int] = field(default_factory=list)  # finished, aborted or preempted: forget them
    new: list[NewSeq] = field(default_factory=list)  # appended to the running order
    new_blocks: list[tuple[int, int]] = field(default_factory=list)  # (seq id, block) appended to its table
    prefill: list[tuple[int, int]] = field(default_factory=list)  # (seq id, new tokens) in row order
    token_ids: list[int] = field(default_factory=list)  # decode rows' inputs (running order), then prefill tokens


def encode(delta: StepDelta) -> np.ndarray:
    new_flat: list[int] = []
    for s in delta.new:
        new_flat += [s.seq_id, s.prefill_len, FLAG_PROMPT_LOGPROBS if s.prompt_logprobs else 0, len(s.blocks), *s.blocks]
    parts = [delta.removed, new_flat, [x for pair in delta.new_blocks for x in pair],
             [x for pair in delta.prefill for x in pair], delta.token_ids]
    total = HEADER + sum(len(p) for p in parts)
    msg = np.empty(total, dtype=np.int64)
    msg[:HEADER] = (MsgKind.STEP, total, len(delta.removed), len(delta.new), len(new_flat), len(delta.new_blocks),
                    len(delta.prefill), len(delta.token_ids))
    off = HEADER
    for p in parts:
        msg[off:off + len(p)] = p
        off += len(p)
    return msg


def control_message(kind: MsgKind) -> np.ndarray:
    return np.array([kind, HEADER, 0, 0, 0, 0, 0, 0], dtype=np.int64)


@dataclass(frozen=True)
class Step:
    """One forward step, packed: T tokens of B rows. Rows [0, num_decode) decode one token each;
    the rest are prefill chunks. Host arrays; the runner copies them to the device."""

    token_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    query_lens: np.ndarray  # (B,) int64 new tokens per row
    seq_lens: np.ndarray  # (B,) int64 context length after this step
    block_tables: np.ndarray  # (B, max_blocks) int32; entries past a row's blocks are 0
    slot_mapping: np.ndarray  # (T,) int64 cache slot of each new token
    num_decode: int
    logit_indices: np.ndarray  # (L,) int64 tokens whose logits are needed: the sampled rows' last, then prompt positions
    sample_ids: list[int]  # (R,) sequence of each sampled row
    prompt_spans: list[tuple[int, int, int]]  # (seq id, first position, count): prompt-logprob rows after the R

    @classmethod
    def decode(cls, token_ids: list[int], seq_lens: list[int], block_tables: list[list[int]],
               block_size: int) -> Step:
        """A pure decode step built directly (benchmarks, kernel-level tests): row i appends
        token_ids[i] at position seq_lens[i] - 1 of a context held in block_tables[i]."""
        B = len(token_ids)
        width = max(len(t) for t in block_tables)
        tables = np.zeros((B, width), dtype=np.int32)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = t
        lens = np.asarray(seq_lens, dtype=np.int64)
        positions = lens - 1
        slots = tables[np.arange(B), positions // block_size].astype(np.int64) * block_size + positions % block_size
        return cls(token_ids=np.asarray(token_ids, dtype=np.int64), positions=positions,
                   query_lens=np.ones(B, dtype=np.int64), seq_lens=lens, block_tables=tables, slot_mapping=slots,
                   num_decode=B, logit_indices=np.arange(B, dtype=np.int64), sample_ids=list(range(B)),
                   prompt_spans=[])

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """Every row decodes one token: the decode kernels (sparse when configured) and CUDA graphs."""
        return self.num_decode == self.batch_size


class BatchMirror:
    """Each running sequence's block table and cached length, updated from messages. Rank 0 and
    every worker hold one; `apply` turns a STEP message into that step's `Step`."""

    def __init__(self, max_batch_size: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.block_size = block_size
        self.table = np.zeros((max_batch_size, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(max_batch_size, dtype=np.int64)
        self.computed = np.zeros(max_batch_size, dtype=np.int64)
        self.prefill_len = np.zeros(max_batch_size, dtype=np.int64)
        self.prompt_logprobs = np.zeros(max_batch_size, dtype=bool)
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.order: list[int] = []  # running sequence ids, oldest first
        self._order_slots: np.ndarray | None = None  # slots of `order`, rebuilt after a change
        self._order_ids = np.zeros(0, dtype=np.int64)  # `order` as an array
        self._ones = np.ones(max_batch_size, dtype=np.int64)
        self._arange = np.arange(max_batch_size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def apply(self, msg: np.ndarray) -> Step:
        kind, total, n_removed, n_new, new_len, n_blocks, n_prefill, n_tokens = msg[:HEADER].tolist()
        assert kind == MsgKind.STEP and total == len(msg), "not a whole STEP message"
        off = HEADER
        if n_removed or n_new:
            self._order_slots = None
        for seq_id in msg[off:off + n_removed].tolist():
            slot = self.slot_of.pop(seq_id)
            self.free_slots.append(slot)
            self.order.remove(seq_id)
        off += n_removed
        rec, end = msg[off:off + new_len].tolist(), off + new_len
        i = 0
        for _ in range(n_new):
            seq_id, prefill_len, flags, nb = rec[i:i + 4]
            slot = self.free_slots.pop()
            self.slot_of[seq_id] = slot
            self.table[slot, :nb] = rec[i + 4:i + 4 + nb]
            self.num_blocks[slot] = nb
            self.computed[slot] = 0
            self.prefill_len[slot] = prefill_len
            self.prompt_logprobs[slot] = bool(flags & FLAG_PROMPT_LOGPROBS)
            self.order.append(seq_id)
            i += 4 + nb
        off = end
        if n_blocks:
            pairs = msg[off:off + 2 * n_blocks].reshape(-1, 2).tolist()
            for seq_id, block in pairs:
                slot = self.slot_of[seq_id]
                self.table[slot, self.num_blocks[slot]] = block
                self.num_blocks[slot] += 1
        off += 2 * n_blocks
        prefill = msg[off:off + 2 * n_prefill].reshape(-1, 2)
        off += 2 * n_prefill
        token_ids = msg[off:off + n_tokens]

        if self._order_slots is None:
            self._order_ids = np.array(self.order, dtype=np.int64)
            self._order_slots = np.array([self.slot_of[s] for s in self.order], dtype=np.int64)
        decoding = self.computed[self._order_slots] >= self.prefill_len[self._order_slots]
        if decoding.all():
            decode_slots, decode_ids = self._order_slots, self._order_ids
        else:
            decode_slots, decode_ids = self._order_slots[decoding], self._order_ids[decoding]
        nd = len(decode_slots)
        bs = self.block_size
        if not n_prefill:  # decode only (the steady state): one token per row, at its cached length
            assert nd == n_tokens, "the message's tokens do not match its rows"
            positions = self.computed[decode_slots]  # (B,)
            seq_lens = positions + 1
            self.computed[decode_slots] = seq_lens
            width = int((seq_lens.max() + bs - 1) // bs) if nd else 0
            return Step(token_ids=token_ids, positions=positions, query_lens=self._ones[:nd], seq_lens=seq_lens,
                        block_tables=self.table[decode_slots, :width],
                        slot_mapping=self.table[decode_slots, positions // bs].astype(np.int64) * bs + positions % bs,
                        num_decode=nd, logit_indices=self._arange[:nd], sample_ids=decode_ids.tolist(),
                        prompt_spans=[])
        prefill_ids = prefill[:, 0].tolist()
        prefill_slots = np.array([self.slot_of[s] for s in prefill_ids], dtype=np.int64)
        rows = np.concatenate([decode_slots, prefill_slots])  # (B,)
        query_lens = np.concatenate([self._ones[:nd], prefill[:, 1]])  # (B,)
        starts = self.computed[rows]  # (B,)
        seq_lens = starts + query_lens
        ends = np.cumsum(query_lens)  # (B,) one past each row's last token
        assert ends[-1] == n_tokens, "the message's tokens do not match its rows"
        token_row = np.repeat(np.arange(len(rows)), query_lens)  # (T,)
        positions = np.arange(n_tokens, dtype=np.int64) - np.repeat(ends - query_lens - starts, query_lens)  # (T,)
        slot_mapping = self.table[rows[token_row], positions // bs].astype(np.int64) * bs + positions % bs  # (T,)
        width = int((seq_lens.max() + bs - 1) // bs)
        block_tables = self.table[rows, :width]  # (B, width)

        # Sampled: every decode row, and each prefill row whose chunk ends its prefill.
        pre_end = self.prefill_len[prefill_slots]
        done = seq_lens[nd:] == pre_end
        sample_ids = decode_ids.tolist() + [s for s, d in zip(prefill_ids, done.tolist()) if d]
        logit_indices = [self._arange[:nd], ends[nd:][done] - 1]
        prompt_spans: list[tuple[int, int, int]] = []
        for j, (seq_id, slot) in enumerate(zip(prefill_ids, prefill_slots.tolist())):
            if self.prompt_logprobs[slot]:
                r = nd + j
                first = int(starts[r])
                count = int(min(seq_lens[r], pre_end[j] - 1) - first)  # position p predicts token p + 1
                if count > 0:
                    prompt_spans.append((seq_id, first, count))
                    row_start = int(ends[r] - query_lens[r])
                    logit_indices.append(np.arange(row_start, row_start + count, dtype=np.int64))
        self.computed[rows] = seq_lens
        return Step(token_ids=token_ids, positions=positions, query_lens=query_lens, seq_lens=seq_lens,
                    block_tables=block_tables, slot_mapping=slot_mapping, num_decode=nd,
                    logit_indices=np.concatenate(logit_indices), sample_ids=sample_ids, prompt_spans=prompt_spans)
