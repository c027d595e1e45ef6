"""Rank 0's scheduler: continuous batching with chunked prefill under a per-step token budget.

Each step, in this order:
1. every running sequence that is decoding gets its next token's KV slot; when the cache runs
   out the newest running sequence is preempted (its blocks freed; it waits at the head of the
   queue and later recomputes prompt + generated ids, so nothing is lost);
2. every decoding sequence runs one token (decodes are never skipped: a long prompt delays a
   stream by at most one chunk, the step it shares);
3. the rest of `max_num_batched_tokens` goes to sequences part-way through their prefill,
   oldest first, then to waiting requests in arrival order (first come, first served: one that
   does not fit blocks the ones behind it), each taking a chunk of at most what is left.
A request is admitted when its prompt's blocks fit with one spare block per running sequence
(so admitting it does not force the next decode to preempt it again). The step goes out as a
`StepDelta` (polar_dist/engine/step.py); `accept` takes the sampled tokens back.

`chain_decode` schedules the next decode step while the previous one still runs, before its
tokens are known (the engine then keeps the device busy while the host waits): the same
sequences, each one token further, their input tokens taken from the previous step's samples
on the device. It is made only where it is the step `schedule` would make after those tokens
came back, or that step with rows whose sequence then finished (their tokens are dropped);
otherwise it returns None and the engine waits and schedules as usual.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
from polar_dist.engine.sampling import SampleOutput, SampleRow, SamplingParams, TokenLogprobs
from polar_dist.engine.step import NewSeq, Step, StepDelta
from polar_dist.errors import UserError
from polar_dist.log import get_logger

log = get_logger(__name__)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    blocks_sent: int = 0  # how many of `blocks` the workers know
    num_computed: int = 0  # tokens whose K/V are in the cache (or are in the step being run)
    prefill_len: int = 0  # tokens to prefill since the latest admission
    finish_reason: str | None = None
    error: str | None = None  # why, with finish reason "error"
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # entry p: prompt token p + 1
    num_reported: int = 0  # output tokens already handed out by the engine

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        return self.num_computed >= self.prefill_len

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def sample_row(self, ahead: int = 0) -> SampleRow:
        """ahead: tokens sampled but not accepted yet (a chained step's row: 1)."""
        return SampleRow(self.params, self.seed, len(self.output_ids) + ahead, self.prompt_ids, self.output_ids)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_seq_len: int,
                 eos_token_ids: tuple[int, ...], vocab_size: int, max_num_batched_tokens: int = 2048,
                 cache_setting: str = "engine.kv_cache_blocks") -> None:
        """cache_setting: the config field that sizes the KV cache, named in messages."""
        if max_num_batched_tokens < max_batch_size:
            raise UserError(f"engine.max_num_batched_tokens = {max_num_batched_tokens} must be >= "
                            f"engine.max_batch_size ({max_batch_size}): every running sequence decodes each step")
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        # A sequence never outgrows the cache: alone it can always be given every block, so
        # preempting the newer sequences always makes room for the oldest one.
        self.max_seq_len = min(max_seq_len, allocator.num_blocks * block_size)
        self._limited_by_cache = self.max_seq_len < max_seq_len
        self.cache_setting = cache_setting
        self.max_num_batched_tokens = max_num_batched_tokens
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[int, Sequence] = {}  # every unfinished request
        self._removed: list[int] = []  # ids the workers must forget at the next step
        self.num_preemptions = 0  # sequences sent back to wait (their KV recomputed later), ever
        self._next_id = 0

    def validate(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty; give at least one token")
        outside = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise UserError(f"prompt token id {outside[0]} is outside the vocabulary [0, {self.vocab_size}); "
                            "use ids the model's tokenizer produces")
        if len(prompt_ids) >= self.max_seq_len:
            fix = (f"raise {self.cache_setting} (the KV cache holds only this many tokens)" if self._limited_by_cache
                   else "shorten the prompt or raise engine.max_seq_len")
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the maximum sequence length is {self.max_seq_len} "
                f"(prompt + at least one new token); {fix}"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> Sequence:
        self.validate(prompt_ids)
        seq = Sequence(self._next_id, list(prompt_ids), params, seed)
        self._next_id += 1
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: int) -> Sequence | None:
        """Finish the request with "abort" and free its blocks; None if it is not unfinished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, "abort")
        return seq

    def schedule(self) -> StepDelta | None:
        """This step's work as a delta for the workers; None when nothing runs (then nothing is sent)."""
        self._reserve_decode_slots()
        delta = StepDelta()
        budget = self.max_num_batched_tokens
        prefilling = []
        for row, s in enumerate(self.running):  # one pass: the hot loop of a large decode batch
            if s.num_computed < s.prefill_len:
                prefilling.append(s)
                continue
            delta.token_ids.append(s.output_ids[-1])  # a decoding sequence has sampled at least once
            self._decode_one(row, s, delta)
        budget -= len(delta.token_ids)
        for s in prefilling:  # part-way through their prefill, oldest first
            if budget <= 0:
                break
            budget -= self._chunk(s, budget, delta)
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self._admissible(seq):
                break
            need = blocks_needed(seq.num_tokens, self.block_size)
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            seq.blocks_sent = need
            seq.status = Status.RUNNING
            seq.num_computed = 0
            seq.prefill_len = seq.num_tokens
            self.running.append(seq)
            delta.new.append(NewSeq(seq.request_id, seq.prefill_len, list(seq.blocks), seq.wants_prompt_logprobs))
            budget -= self._chunk(seq, budget, delta)
        delta.removed, self._removed = self._removed, []
        if not delta.token_ids:
            self._removed = delta.removed  # nothing runs: keep the news for the next step
            assert not delta.new and not delta.new_blocks
            return None
        return delta

    def chain_decode(self, prev: Step) -> StepDelta | None:
        """The decode step after `prev`, scheduled before prev's tokens are accepted (see the
        module docstring); None unless prev decoded only, every sequence still running was one of
        its rows (the runner gathers their samples), the first waiting request could not be
        admitted now (batch full, or its blocks do not fit), each has a slot without preempting,
        none reaches max_seq_len (prev's token would end it), none needs its token history on the
        host (penalties) and not every one of them ends at prev by max_new_tokens (the whole step
        would be wasted)."""
        if not prev.is_decode or prev.prompt_spans or not self.running:
            return None
        if self.waiting and len(self.running) < self.max_batch_size and self._admissible(self.waiting[0]):
            return None  # admit it: a step with its prefill, scheduled once prev's tokens are in
        in_prev = set(prev.sample_ids)
        bs = self.block_size
        short = 0
        last = 0  # sequences whose token from prev is their last: their row here is wasted
        for s in self.running:
            if s.request_id not in in_prev or s.params.has_penalties or s.num_computed + 1 > self.max_seq_len:
                return None
            short += s.num_computed >= len(s.blocks) * bs
            last += len(s.output_ids) + 1 >= s.params.max_new_tokens
        if short > self.allocator.num_free or last == len(self.running):
            return None
        delta = StepDelta(chained=True)
        for row, s in enumerate(self.running):
            if s.num_computed >= len(s.blocks) * bs:
                s.blocks += self.allocator.allocate(1)
            self._decode_one(row, s, delta)
        delta.token_ids = [0] * len(self.running)  # placeholders: the runner takes prev's samples
        delta.removed, self._removed = self._removed, []
        return delta

    def chained_rows(self, prev: Step, step: Step) -> list[int]:
        """For each row of the chained `step`, the row of `prev` whose sample is its input."""
        rows = {seq_id: r for r, seq_id in enumerate(prev.sample_ids)}
        return [rows[seq_id] for seq_id in step.sample_ids]

    def _decode_one(self, row: int, s: Sequence, delta: StepDelta) -> None:
        """s (at `row` of the running order) computes one more token; its blocks the workers do
        not know yet go into the delta."""
        s.num_computed += 1
        if len(s.blocks) > s.blocks_sent:
            delta.new_blocks += [(row, i, s.blocks[i]) for i in range(s.blocks_sent, len(s.blocks))]
            s.blocks_sent = len(s.blocks)

    def _admissible(self, seq: Sequence) -> bool:
        """Its prompt's blocks fit with one spare block per running sequence."""
        return blocks_needed(seq.num_tokens, self.block_size) + len(self.running) <= self.allocator.num_free

    def _chunk(self, seq: Sequence, budget: int, delta: StepDelta) -> int:
        n = min(seq.prefill_len - seq.num_computed, budget)
        ids = seq.all_ids
        delta.prefill.append((seq.request_id, n))
        delta.token_ids += ids[seq.num_computed:seq.num_computed + n]
        seq.num_computed += n
        return n

    def _reserve_decode_slots(self) -> None:
        """Give every decoding sequence room for one more token, preempting the newest if needed."""
        bs = self.block_size
        for seq in list(self.running):
            if seq.num_computed < len(seq.blocks) * bs or seq.num_computed < seq.prefill_len:
                continue  # room for its next token, or prefilling (its blocks came at admission)
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older sequence
            while blocks_needed(seq.num_computed + 1, bs) > len(seq.blocks):
                if self.allocator.num_free:
                    seq.blocks += self.allocator.allocate(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.blocks_sent, seq.num_computed, seq.prefill_len = [], 0, 0, 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self._removed.append(seq.request_id)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._removed.append(seq.request_id)
        self.allocator.free(seq.blocks)
        seq.blocks, seq.blocks_sent = [], 0
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]

    def sample_rows(self, step: Step) -> list[SampleRow]:
        ahead = int(step.chained)  # the previous step's token is not accepted yet
        return [self.requests[i].sample_row(ahead) for i in step.sample_ids]

    def prompt_targets(self, step: Step) -> list[int]:
        """The prompt token each prompt-logprob row predicts (position p predicts token p + 1)."""
        targets: list[int] = []
        for seq_id, first, count in step.prompt_spans:
            targets += self.requests[seq_id].prompt_ids[first + 1:first + 1 + count]
        return targets

    def accept(self, step: Step, out: SampleOutput, errors: dict[int, str] | None = None) -> list[Sequence]:
        """Append each sampled row's token; returns the sequences that got a token or finished.
        `errors`: {request id: why} for requests whose part of the step failed: they finish with
        "error" alone."""
        stepped = []
        for seq_id, why in (errors or {}).items():
            seq = self.requests[seq_id]
            seq.error = why
            self._finish(seq, "error")
            stepped.append(seq)
        off = 0
        for seq_id, first, count in step.prompt_spans:
            seq = self.requests.get(seq_id)
            if seq is None:  # failed above
                off += count
                continue
            for p, lp in zip(range(first, first + count), out.prompt_logprobs[off:off + count]):
                if p == len(seq.prompt_logprobs):  # a recompute after preemption repeats known positions
                    seq.prompt_logprobs.append(lp)
            off += count
        for seq_id, token, lp in zip(step.sample_ids, out.token_ids, out.logprobs):
            seq = self.requests.get(seq_id)
            if seq is None:  # failed above
                continue
            stepped.append(seq)
            if token < 0:
                log.error("request %d: the model's logits hold NaN or no finite value; finishing it with 'error'",
                          seq.request_id)
                seq.error = "the model's logits for its next token hold NaN or no finite value (a damaged " \
                            "weight, or an overflow in the model's dtype)"
                self._finish(seq, "error")
                continue
            seq.output_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            if (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output_ids) >= seq.params.max_new_tokens:
                self._finish(seq, "length")
            elif seq.num_tokens >= self.max_seq_len:
                if self._limited_by_cache:
                    log.warning("request %d stopped at %d tokens, all the KV cache holds (%d blocks of %d); raise "
                                "%s for longer sequences", seq.request_id, seq.num_tokens, self.allocator.num_blocks,
                                self.block_size, self.cache_setting)
                else:
                    log.warning("request %d stopped at engine.max_seq_len = %d tokens", seq.request_id,
                                self.max_seq_len)
                self._finish(seq, "length")
        return stepped
