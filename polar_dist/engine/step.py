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
     (row, index, block) triples..., (id, tokens) prefill rows..., token ids...]
A steady decode step at batch B is about B + 10 integers: the input tokens and a block now and then.
kind CHAINED_STEP is a decode step sent before the previous step's tokens reached the host
(engine.overlap_steps): its token ids are placeholders, and every rank takes the previous step's
samples from the driver's device instead (polar_dist/engine/runner.py).
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
    CHAINED_STEP = 4  # a decode step whose input tokens are the previous step's samples (see Step.chained)


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
    # (row, index, block): block table entry `index` of the sequence at that row of the running
    # order (after this step's removals) is `block`
    new_blocks: list[tuple[int, int, int]] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)  # (seq id, new tokens) in row order
    token_ids: list[int] = field(default_factory=list)  # decode rows' inputs (running order), then prefill tokens
    # decode only, sent before the previous step's tokens reached the host: its token ids are
    # placeholders, the inputs come from the previous step's samples on the device
    chained: bool = False


def encode(delta: StepDelta) -> np.ndarray:
    new_flat: list[int] = []
    for s in delta.new:
        new_flat += [s.seq_id, s.prefill_len, FLAG_PROMPT_LOGPROBS if s.prompt_logprobs else 0, len(s.blocks), *s.blocks]
    blocks = [x for triple in delta.new_blocks for x in triple] if delta.new_blocks else []
    prefill = [x for pair in delta.prefill for x in pair] if delta.prefill else []
    total = HEADER + len(delta.removed) + len(new_flat) + len(blocks) + len(prefill) + len(delta.token_ids)
    kind = MsgKind.CHAINED_STEP if delta.chained else MsgKind.STEP
    header = [kind.value, total, len(delta.removed), len(delta.new), len(new_flat), len(delta.new_blocks),
              len(delta.prefill), len(delta.token_ids)]
    # One conversion of one list: the token ids dominate, and numpy converts a list in one pass.
    return np.array(header + delta.removed + new_flat + blocks + prefill + delta.token_ids, dtype=np.int64)


def control_message(kind: MsgKind) -> np.ndarray:
    return np.array([kind, HEADER, 0, 0, 0, 0, 0, 0], dtype=np.int64)


@dataclass(slots=True)
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
    sample_ids: list[int]  # (R,) sequence of each sampled row (shared between decode steps: do not mutate)
    prompt_spans: list[tuple[int, int, int]]  # (seq id, first position, count): prompt-logprob rows after the R
    # token_ids are placeholders: the inputs are the previous step's samples, on the device (the
    # driver passes them in; ModelRunner broadcasts them to the other ranks)
    chained: bool = False

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
    """The running sequences, row by row in the running order (oldest first): each one's id, block
    table, cached length and prefill length. Rank 0 and every worker hold one; `apply` turns a
    STEP message into that step's `Step`. Rows are kept compact (a removal shifts the rows after
    it up), so a steady decode step reads the first B rows as slices, without gathers."""

    def __init__(self, max_batch_size: int, max_blocks_per_seq: int, block_size: int) -> None:
        self.block_size = block_size
        self.ids = np.zeros(max_batch_size, dtype=np.int64)
        self.table = np.zeros((max_batch_size, max_blocks_per_seq), dtype=np.int32)
        self.computed = np.zeros(max_batch_size, dtype=np.int64)
        self.prefill_len = np.zeros(max_batch_size, dtype=np.int64)
        self.prompt_logprobs = np.zeros(max_batch_size, dtype=bool)
        self.n = 0  # running sequences: rows [0, n)
        self.n_prefilling = 0  # rows whose prefill is not done
        self._ids_list: list[int] | None = None  # ids[:n] as a list, until the rows change
        self._row_of: dict[int, int] | None = None  # id -> row, until the rows change
        self._ones = np.ones(max_batch_size, dtype=np.int64)
        self._arange = np.arange(max_batch_size, dtype=np.int64)
        self._row_base = self._arange * max_blocks_per_seq  # flat index of each row's first table entry

    def __len__(self) -> int:
        return self.n

    @property
    def order(self) -> list[int]:
        """Running sequence ids, oldest first."""
        if self._ids_list is None:
            self._ids_list = self.ids[:self.n].tolist()
        return self._ids_list

    def _row(self, seq_id: int) -> int:
        if self._row_of is None:
            self._row_of = {s: r for r, s in enumerate(self.order)}
        return self._row_of[seq_id]

    def _remove(self, seq_ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids[:self.n], seq_ids)
        k = int(keep.sum())
        assert self.n - k == len(seq_ids), "removed a sequence that is not running"
        for a in (self.ids, self.table, self.computed, self.prefill_len, self.prompt_logprobs):
            a[:k] = a[:self.n][keep]
        self.n = k
        self.n_prefilling = int(np.count_nonzero(self.computed[:k] < self.prefill_len[:k]))

    def _add(self, rec: list[int], n_new: int) -> None:
        i = 0
        for _ in range(n_new):
            seq_id, prefill_len, flags, nb = rec[i:i + 4]
            r = self.n
            self.ids[r] = seq_id
            self.table[r, :nb] = rec[i + 4:i + 4 + nb]
            self.computed[r] = 0
            self.prefill_len[r] = prefill_len
            self.prompt_logprobs[r] = bool(flags & FLAG_PROMPT_LOGPROBS)
            self.n += 1
            self.n_prefilling += prefill_len > 0
            i += 4 + nb

    def _set_blocks(self, triples: np.ndarray) -> None:
        assert triples[-1, 0] < self.n, "a block for a row that is not running"  # rows ascend
        self.table.reshape(-1)[self._row_base[triples[:, 0]] + triples[:, 1]] = triples[:, 2]

    def apply(self, msg: np.ndarray) -> Step:
        kind, total, n_removed, n_new, new_len, n_blocks, n_prefill, n_tokens = msg[:HEADER].tolist()
        assert kind in (MsgKind.STEP, MsgKind.CHAINED_STEP) and total == len(msg), "not a whole STEP message"
        off = HEADER
        if n_removed or n_new:
            self._ids_list = self._row_of = None
            if n_removed:
                self._remove(msg[off:off + n_removed])
            off += n_removed
            if n_new:
                self._add(msg[off:off + new_len].tolist(), n_new)
            off += new_len
        if n_blocks:
            self._set_blocks(msg[off:off + 3 * n_blocks].reshape(-1, 3))
        off += 3 * n_blocks
        prefill = msg[off:off + 2 * n_prefill].reshape(-1, 2)
        off += 2 * n_prefill
        token_ids = msg[off:off + n_tokens]
        bs, n = self.block_size, self.n
        if not n_prefill:  # decode only (the steady state): one token per row, at its cached length
            assert self.n_prefilling == 0 and n == n_tokens, "the message's tokens do not match its rows"
            positions = self.computed[:n].copy()  # (B,)
            self.computed[:n] += 1
            seq_lens = positions + 1
            width = -(-int(seq_lens.max()) // bs) if n else 0
            col, offset = np.divmod(positions, bs)
            slots = self.table.reshape(-1)[self._row_base[:n] + col] * bs + offset  # block * bs stays far below 2**31
            return Step(token_ids=token_ids, positions=positions, query_lens=self._ones[:n], seq_lens=seq_lens,
                        block_tables=self.table[:n, :width].copy(), slot_mapping=slots,
                        num_decode=n, logit_indices=self._arange[:n], sample_ids=self.order, prompt_spans=[],
                        chained=kind == MsgKind.CHAINED_STEP)
        assert kind == MsgKind.STEP, "a chained step decodes only"
        return self._mixed(prefill, token_ids)

    def _mixed(self, prefill: np.ndarray, token_ids: np.ndarray) -> Step:
        """A step with prefill chunks: the decoding rows in order, then the chunks in message order."""
        bs, n, n_tokens = self.block_size, self.n, len(token_ids)
        decode_rows = np.flatnonzero(self.computed[:n] >= self.prefill_len[:n])
        nd = len(decode_rows)
        prefill_ids = prefill[:, 0].tolist()
        prefill_rows = np.array([self._row(s) for s in prefill_ids], dtype=np.int64)
        rows = np.concatenate([decode_rows, prefill_rows])  # (B,)
        query_lens = np.concatenate([self._ones[:nd], prefill[:, 1]])  # (B,)
        starts = self.computed[rows]  # (B,)
        seq_lens = starts + query_lens
        ends = np.cumsum(query_lens)  # (B,) one past each row's last token
        assert ends[-1] == n_tokens, "the message's tokens do not match its rows"
        token_row = np.repeat(rows, query_lens)  # (T,)
        positions = np.arange(n_tokens, dtype=np.int64) - np.repeat(ends - query_lens - starts, query_lens)  # (T,)
        slot_mapping = self.table[token_row, positions // bs].astype(np.int64) * bs + positions % bs  # (T,)
        width = -(-int(seq_lens.max()) // bs)
        block_tables = self.table[rows, :width]  # (B, width)

        # Sampled: every decode row, and each prefill row whose chunk ends its prefill.
        pre_end = self.prefill_len[prefill_rows]
        done = seq_lens[nd:] == pre_end
        sample_ids = self.ids[decode_rows].tolist() + [s for s, d in zip(prefill_ids, done.tolist()) if d]
        logit_indices = [self._arange[:nd], ends[nd:][done] - 1]
        prompt_spans: list[tuple[int, int, int]] = []
        for j, (seq_id, row) in enumerate(zip(prefill_ids, prefill_rows.tolist())):
            if self.prompt_logprobs[row]:
                r = nd + j
                first = int(starts[r])
                count = int(min(seq_lens[r], pre_end[j] - 1) - first)  # position p predicts token p + 1
                if count > 0:
                    prompt_spans.append((seq_id, first, count))
                    row_start = int(ends[r] - query_lens[r])
                    logit_indices.append(np.arange(row_start, row_start + count, dtype=np.int64))
        self.computed[rows] = seq_lens
        self.n_prefilling = int(np.count_nonzero(self.computed[:n] < self.prefill_len[:n]))
        return Step(token_ids=token_ids, positions=positions, query_lens=query_lens, seq_lens=seq_lens,
                    block_tables=block_tables, slot_mapping=slot_mapping, num_decode=nd,
                    logit_indices=np.concatenate(logit_indices), sample_ids=sample_ids, prompt_spans=prompt_spans)
