"""Rank 0's scheduler: admits requests while their KV blocks fit, batches prefill and decode
steps, samples, and preempts (frees and later recomputes) the newest sequence when the cache
runs out. Nothing is lost: a preempted sequence resumes from its prompt plus what it generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
from polar_dist.engine.sampler import SamplingParams, make_generator, sample
from polar_dist.engine.step import Step, StepKind
from polar_dist.errors import UserError


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_seq_len: int,
                 eos_token_ids: tuple[int, ...], vocab_size: int, max_prefill_tokens: int = 8192) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        # A sequence never outgrows the cache: alone it can always be given every block, so
        # preempting the newer sequences always makes room for the oldest one.
        self.max_seq_len = min(max_seq_len, allocator.num_blocks * block_size)
        self._limited_by_cache = self.max_seq_len < max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._next_id = 0

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise UserError("the prompt is empty; give at least one token")
        outside = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise UserError(f"prompt token id {outside[0]} is outside the vocabulary [0, {self.vocab_size}); "
                             "use ids the model's tokenizer produces")
        if len(prompt_ids) >= self.max_seq_len:
            fix = ("raise engine.kv_cache_blocks (the KV cache holds only this many tokens)" if self._limited_by_cache
                   else "shorten the prompt or raise engine.max_seq_len")
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the maximum sequence length is {self.max_seq_len} "
                f"(prompt + at least one new token); {fix}"
            )
        seq = Sequence(self._next_id, list(prompt_ids), params, make_generator(params))
        self._next_id += 1
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_step(self) -> tuple[Step, list[Sequence]]:
        """Prefill newly admitted sequences if any fit, else decode every running sequence."""
        admitted: list[Sequence] = []
        prefill_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            need = blocks_needed(len(seq.all_ids), self.block_size)
            # Keep one free block per running sequence, so admitting this one does not force the
            # next decode step to preempt it again (a prefill recomputed over and over).
            if need + len(self.running) + len(admitted) > self.allocator.num_free:
                break
            if admitted and prefill_tokens + len(seq.all_ids) > self.max_prefill_tokens:
                break  # bounds the activations of one prefill step
            prefill_tokens += len(seq.all_ids)
            seq.blocks = self.allocator.allocate(need)
            admitted.append(self.waiting.popleft())
        if admitted:
            self.running.extend(admitted)
            return self._prefill_step(admitted), admitted
        self._reserve_decode_slots()
        return self._decode_step(self.running), list(self.running)

    def _prefill_step(self, seqs: list[Sequence]) -> Step:
        token_ids, positions, query_lens = [], [], []
        for s in seqs:
            ids = s.all_ids
            token_ids += ids
            positions += range(len(ids))
            query_lens.append(len(ids))
            s.num_cached = len(ids)
        return Step(kind=StepKind.PREFILL, token_ids=token_ids, positions=positions, query_lens=query_lens,
                        seq_lens=list(query_lens), block_tables=[list(s.blocks) for s in seqs])

    def _reserve_decode_slots(self) -> None:
        """Give every running sequence room for one more token, preempting the newest if needed."""
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below while making room for an older sequence
            while blocks_needed(seq.num_cached + 1, self.block_size) > len(seq.blocks):
                if self.allocator.num_free:
                    seq.blocks += self.allocator.allocate(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_cached = [], 0
        self.waiting.appendleft(seq)

    def _decode_step(self, seqs: list[Sequence]) -> Step:
        positions = [s.num_cached for s in seqs]
        for s in seqs:
            s.num_cached += 1
        return Step(kind=StepKind.DECODE, token_ids=[s.all_ids[-1] for s in seqs], positions=positions,
                        query_lens=[1] * len(seqs), seq_lens=[p + 1 for p in positions],
                        block_tables=[list(s.blocks) for s in seqs])

    def accept(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Sample one token for each sequence of the step; returns those that finished."""
        return [seq for seq, row in zip(seqs, logits) if self.append(seq, sample(row, seq.params, seq.generator))]

    def append(self, seq: Sequence, token: int) -> bool:
        """Give a running sequence its next token (sampled, or the text's own token when
        teacher-forcing); a sequence that finishes leaves the batch. Returns whether it finished."""
        seq.output_ids.append(token)
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_new_tokens or len(seq.all_ids) >= self.max_seq_len:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return False
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        return True


def run_to_completion(scheduler: Scheduler, execute: Callable[[Step], torch.Tensor]) -> None:
    while scheduler.has_work():
        step, seqs = scheduler.next_step()
        scheduler.accept(seqs, execute(step))
