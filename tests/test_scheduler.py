"""The scheduler alone, driven by a pretend model: admission (free blocks, max_batch_size, the
token budget, first come first served), chunked prefill beside running decodes, preemption of
the newest sequence and its recompute from prompt + generated ids, abort, block accounting,
finish reasons, and the worker's view (BatchMirror) of every step.

The pretend model stands in for the forward pass without weights: it keeps a pretend KV cache
(slot -> token id) that each step writes through the step's cache slots, reads every sampled
sequence's context back through its block table, and returns the next token as a function of
that context. A block held by two sequences, a stale block table or a wrong position changes
the tokens, so "the same tokens as with a roomy cache" means preemption and recompute lost
nothing. Every step goes through encode -> BatchMirror.apply, as on a worker.

Blocks of 4 tokens keep the scenarios short (the runtime asks for >= 16 for its kernels; the
scheduler takes any size).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
from polar_dist.engine.sampling import SampleOutput, SamplingParams
from polar_dist.engine.scheduler import Scheduler, Sequence, Status
from polar_dist.engine.step import BatchMirror, Step, encode

BLOCK = 4
VOCAB = 64
EOS = 2
GREEDY = SamplingParams(max_new_tokens=8)


def make_scheduler(num_blocks: int = 64, *, max_batch_size: int = 8, max_seq_len: int = 64,
                   budget: int = 8192) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), BLOCK, max_batch_size, max_seq_len, eos_token_ids=(EOS, 3),
                     vocab_size=VOCAB, max_num_batched_tokens=budget)


def never_eos(context: list[int]) -> int:
    """A next token in [4, VOCAB) that depends on every token of the context and its length."""
    return 4 + (sum((i + 1) * t for i, t in enumerate(context)) + len(context)) % (VOCAB - 4)


class PretendModel:
    def __init__(self, next_token: Callable[[list[int]], int] = never_eos) -> None:
        self.next_token = next_token
        self.cache: dict[int, int] = {}  # slot -> token id written there

    def __call__(self, step: Step) -> list[int]:
        """The next token of each sampled row's context, as read back from the cache."""
        for slot, token in zip(step.slot_mapping.tolist(), step.token_ids.tolist()):
            self.cache[slot] = token
        ends = np.cumsum(step.query_lens)
        tokens = []
        for idx in step.logit_indices[:len(step.sample_ids)].tolist():
            row = int(np.searchsorted(ends, idx, side="right"))
            table, seq_len = step.block_tables[row], int(step.seq_lens[row])
            tokens.append(self.next_token([self.cache[int(table[p // BLOCK]) * BLOCK + p % BLOCK]
                                           for p in range(seq_len)]))
        return tokens


class Driver:
    """Scheduler + a worker's mirror + the pretend model; checks every step."""

    def __init__(self, s: Scheduler, model: PretendModel | None = None) -> None:
        self.s = s
        self.model = model or PretendModel()
        self.mirror = BatchMirror(s.max_batch_size, blocks_needed(s.max_seq_len, BLOCK) + 1, BLOCK)
        self.steps: list[tuple[Step, list[Sequence]]] = []

    def step(self) -> tuple[Step, list[Sequence]]:
        delta = self.s.schedule()
        assert delta is not None, "nothing to run"
        step = self.mirror.apply(encode(delta))
        check_step(self.s, step)
        check_blocks(self.s)
        tokens = self.model(step)
        self.s.accept(step, SampleOutput(tokens, [None] * len(tokens), []))
        check_blocks(self.s)
        ran = [self.s_seq(i) for i in step.sample_ids]
        self.steps.append((step, ran))
        return step, ran

    def s_seq(self, seq_id: int) -> Sequence:
        return self.seqs[seq_id]

    def add(self, n: int, params: SamplingParams = GREEDY, start: int = 10) -> Sequence:
        seq = self.s.add(prompt(n, start), params, seed=0)
        self.seqs[seq.request_id] = seq
        return seq

    seqs: dict[int, Sequence]

    def run(self, max_steps: int = 3000) -> None:
        while self.s.has_work():
            assert len(self.steps) < max_steps, "the scheduler makes no progress"
            self.step()
        assert self.s.allocator.num_free == self.s.allocator.num_blocks, "a block leaked"
        assert sorted(self.s.allocator.allocate(self.s.allocator.num_blocks)) == list(range(self.s.allocator.num_blocks))


def driver(s: Scheduler, model: PretendModel | None = None) -> Driver:
    d = Driver(s, model)
    d.seqs = {}
    return d


def check_step(s: Scheduler, step: Step) -> None:
    """The step stays within the budget, writes distinct cache slots, and feeds each sampled
    sequence its own tokens at its own positions: the mirror agrees with the scheduler."""
    assert step.num_tokens <= s.max_num_batched_tokens
    slots = step.slot_mapping.tolist()
    assert len(set(slots)) == len(slots), "two new tokens write the same cache slot"
    ends = np.cumsum(step.query_lens)
    for seq_id, idx in zip(step.sample_ids, step.logit_indices.tolist()):
        row = int(np.searchsorted(ends, idx, side="right"))
        n, first = int(step.query_lens[row]), int(step.seq_lens[row] - step.query_lens[row])
        seq = s.requests[seq_id]
        assert first + n == seq.num_computed == seq.num_tokens, "a sampled row computes everything known"
        assert step.token_ids[ends[row] - n:ends[row]].tolist() == seq.all_ids[first:first + n]
        assert step.positions[ends[row] - n:ends[row]].tolist() == list(range(first, first + n))
        assert step.block_tables[row][:blocks_needed(first + n, BLOCK)].tolist() == seq.blocks[:blocks_needed(
            first + n, BLOCK)]


def check_blocks(s: Scheduler) -> None:
    """Every block is either free or held by exactly one running sequence."""
    held = [b for seq in s.running for b in seq.blocks]
    free = s.allocator._free  # the free list, read only for this check
    assert len(held) == len(set(held)), f"a block is held twice: {sorted(held)}"
    assert not set(held) & set(free), "a block is both free and held"
    assert len(held) + len(free) == s.allocator.num_blocks, "a block leaked"
    assert all(not seq.blocks for seq in s.waiting), "a waiting sequence holds blocks"


def ids(seqs: list[Sequence]) -> list[int]:
    return [s.request_id for s in seqs]


def prompt(n: int, start: int = 10) -> list[int]:
    return [start + i % 40 for i in range(n)]  # ids in [10, 56): no EOS, inside VOCAB



# Admission


def test_admission_stops_at_max_batch_size() -> None:
    d = driver(make_scheduler(max_batch_size=2))
    for n in (2, 5, 1):
        d.add(3, SamplingParams(max_new_tokens=n))
    step, ran = d.step()
    assert step.num_decode == 0 and ids(ran) == [0, 1] and ids(d.s.waiting) == [2]
    step, ran = d.step()  # the batch is full: decode, nothing admitted
    assert step.is_decode and ids(ran) == [0, 1] and 0 not in d.s.requests
    step, ran = d.step()  # 0 finished: 2 is admitted beside 1's decode
    assert step.num_decode == 1 and ids(ran) == [1, 2]
    d.run()


def test_a_long_prompt_is_chunked_while_others_decode() -> None:
    d = driver(make_scheduler(budget=8))
    short = d.add(3, SamplingParams(max_new_tokens=12))
    d.step()
    long = d.add(30, SamplingParams(max_new_tokens=2))
    chunks = []
    while long.output_ids == []:
        step, ran = d.step()
        assert step.num_tokens <= 8
        assert short in ran, "the running sequence decodes every step"
        chunks.append(step.num_tokens - step.num_decode)
    assert chunks == [7, 7, 7, 7, 2]  # 30 prompt tokens in chunks of the budget less one decode
    d.run()
    assert len(short.output_ids) == 12 and len(long.output_ids) == 2


def test_chunked_prefill_gives_the_unchunked_tokens() -> None:
    lengths = [(5, 20), (17, 6), (1, 30), (29, 9), (30, 4)]

    def tokens(budget: int) -> list[list[int]]:
        d = driver(make_scheduler(budget=budget, max_batch_size=4))
        seqs = [d.add(n, SamplingParams(max_new_tokens=m), start=10 + i) for i, (n, m) in enumerate(lengths)]
        d.run()
        return [q.output_ids for q in seqs]

    assert tokens(5) == tokens(8192)


@pytest.mark.parametrize("num_blocks, admitted", [(6, [0]), (7, [0, 1])])
def test_admission_keeps_a_free_block_per_running_sequence(num_blocks: int, admitted: list[int]) -> None:
    # 9-token prompts need 3 blocks each. The second is admitted only if, after it, one block per
    # running sequence is still free for their next decode step: 3 + 3 + 1 > 6, but <= 7.
    d = driver(make_scheduler(num_blocks))
    for _ in range(3):
        d.add(9, SamplingParams(max_new_tokens=2))
    step, ran = d.step()
    assert ids(ran) == admitted
    step, ran = d.step()
    assert step.is_decode and ids(ran) == admitted  # the rest still waits
    d.run()


def test_admission_is_first_come_first_served() -> None:
    d = driver(make_scheduler(8))
    d.add(17, SamplingParams(max_new_tokens=3))  # 5 blocks
    d.add(17)  # 5 more: waits for the first to finish
    d.add(1)  # would fit now, but does not jump the queue
    step, ran = d.step()
    assert ids(ran) == [0] and ids(d.s.waiting) == [1, 2]
    d.run()
    first_sampled: list[int] = []
    for _, ran in d.steps:
        first_sampled += [i for i in ids(ran) if i not in first_sampled]
    assert first_sampled == [0, 1, 2]


# Preemption


def test_preemption_takes_the_newest_and_resumes_it_with_its_tokens() -> None:
    # 5 blocks: a 3-token prompt and two 1-token prompts all fit at first; as they grow, the
    # newest sequence (2) gives its blocks up first, then the next newest (1).
    d = driver(make_scheduler(5))
    a, b, c = (d.add(n, SamplingParams(max_new_tokens=12)) for n in (3, 1, 1))
    preempted: list[int] = []
    while d.s.has_work():
        before = list(d.s.running)
        d.step()
        gone = [q for q in before if q.status is Status.WAITING]
        assert gone == before[len(before) - len(gone):], "only the newest sequences are preempted"
        for q in gone:
            assert q.blocks == [] and q.num_computed == 0
            preempted.append(q.request_id)
    assert preempted[:2] == [2, 1]
    roomy = driver(make_scheduler(64))
    expected = [roomy.add(n, SamplingParams(max_new_tokens=12)) for n in (3, 1, 1)]
    roomy.run()
    assert [q.output_ids for q in (a, b, c)] == [q.output_ids for q in expected]
    assert all(q.finish_reason == "length" and len(q.output_ids) == 12 for q in (a, b, c))
    d.run()


@pytest.mark.parametrize("num_blocks, budget", [(9, 8192), (12, 6), (14, 8192), (9, 5)])
def test_tight_cache_gives_the_roomy_cache_tokens_and_leaks_no_block(num_blocks: int, budget: int) -> None:
    lengths = [(5, 20), (17, 6), (1, 30), (9, 9), (30, 4), (3, 25), (12, 12)]  # (prompt, new tokens)

    def workload(d: Driver) -> list[Sequence]:
        return [d.add(n, SamplingParams(max_new_tokens=m), start=10 + i) for i, (n, m) in enumerate(lengths)]

    tight = driver(make_scheduler(num_blocks, max_batch_size=4, budget=budget))
    seqs = workload(tight)
    preempted: list[int] = []
    preempt = tight.s._preempt
    tight.s._preempt = lambda seq: (preempted.append(seq.request_id), preempt(seq))[1]  # type: ignore[method-assign]
    tight.run()  # checks every step's blocks, and that all are free at the end
    assert preempted, "the scenario should preempt"
    roomy = driver(make_scheduler(256, max_batch_size=4))
    expected = workload(roomy)
    roomy.run()
    assert [q.output_ids for q in seqs] == [q.output_ids for q in expected]
    assert [len(q.output_ids) for q in seqs] == [m for _, m in lengths]


# Abort


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    d = driver(make_scheduler(16, max_batch_size=2, budget=6))
    a, b, c = d.add(20, SamplingParams(max_new_tokens=30)), d.add(3), d.add(3)
    d.step()  # a's first chunk
    assert a.status is Status.RUNNING and a.blocks
    assert d.s.abort(a.request_id) is a and a.finish_reason == "abort" and not a.blocks
    assert d.s.abort(c.request_id) is c and c not in d.s.waiting
    assert d.s.abort(c.request_id) is None  # already finished
    d.run()  # the mirror forgets a; b runs alone; every block is free at the end
    assert b.finish_reason == "length" and a.request_id not in d.mirror.order


# Finish reasons


def eos_as_fifth_token(prompt_len: int, eos: int = EOS) -> Callable[[list[int]], int]:
    return lambda context: eos if len(context) == prompt_len + 4 else never_eos(context)


@pytest.mark.parametrize("eos", [EOS, 3])  # either of the model's EOS ids
def test_eos_stops_unless_ignored(eos: int) -> None:
    d = driver(make_scheduler(), PretendModel(eos_as_fifth_token(6, eos)))
    stops = d.add(6, SamplingParams(max_new_tokens=10))
    ignores = d.add(6, SamplingParams(max_new_tokens=10, ignore_eos=True))
    d.run()
    assert stops.finish_reason == "stop" and len(stops.output_ids) == 5 and stops.output_ids[-1] == eos
    assert ignores.finish_reason == "length" and len(ignores.output_ids) == 10 and ignores.output_ids[4] == eos


def test_length_at_max_new_tokens() -> None:
    d = driver(make_scheduler())
    seqs = [d.add(5, SamplingParams(max_new_tokens=n)) for n in (1, 4, 9)]
    d.run()
    assert [(len(q.output_ids), q.finish_reason) for q in seqs] == [(1, "length"), (4, "length"), (9, "length")]


def test_length_at_max_seq_len(caplog: pytest.LogCaptureFixture) -> None:
    d = driver(make_scheduler(max_seq_len=10))
    seq = d.add(4, SamplingParams(max_new_tokens=100))
    d.run()
    assert len(seq.all_ids) == 10 and seq.finish_reason == "length"
    assert "engine.max_seq_len = 10" in caplog.text


def test_length_at_cache_capacity(caplog: pytest.LogCaptureFixture) -> None:
    # 3 blocks of 4 tokens hold 12 tokens, fewer than max_seq_len: a sequence stops there.
    d = driver(make_scheduler(3, max_seq_len=64))
    assert d.s.max_seq_len == 12
    seqs = [d.add(5, SamplingParams(max_new_tokens=100)), d.add(2, SamplingParams(max_new_tokens=100))]
    d.run()
    assert [(len(q.all_ids), q.finish_reason) for q in seqs] == [(12, "length"), (12, "length")]
    assert "raise engine.kv_cache_blocks" in caplog.text
    with pytest.raises(ValueError, match="raise engine.kv_cache_blocks"):
        d.add(12)


def test_a_row_without_finite_logits_finishes_with_error() -> None:
    d = driver(make_scheduler())
    bad, good = d.add(5), d.add(6)
    delta = d.s.schedule()
    step = d.mirror.apply(encode(delta))
    d.model(step)  # writes the pretend cache; the sampler's answer is replaced
    d.s.accept(step, SampleOutput([-1, 7], [None, None], []))
    assert bad.finish_reason == "error" and not bad.blocks and good.output_ids == [7]
    d.run()


def test_bad_prompts_are_rejected_with_the_way_out() -> None:
    s = make_scheduler(max_seq_len=10)
    with pytest.raises(ValueError, match="the prompt is empty"):
        s.add([], GREEDY, 0)
    with pytest.raises(ValueError, match=f"prompt token id {VOCAB} is outside the vocabulary"):
        s.add([5, VOCAB], GREEDY, 0)
    with pytest.raises(ValueError, match="has 10 tokens but the maximum sequence length is 10 .*engine.max_seq_len"):
        s.add(prompt(10), GREEDY, 0)
    with pytest.raises(ValueError, match="max_num_batched_tokens = 4 must be >= engine.max_batch_size"):
        make_scheduler(max_batch_size=8, budget=4)
    assert not s.has_work()


# Chained decode steps (the engine's overlap)

@pytest.mark.parametrize("num_blocks", [40, 7])  # roomy; tight: requests wait for blocks while others decode
def test_chained_steps_give_the_tokens_of_steps_that_wait(num_blocks: int) -> None:
    """chain_decode schedules the next decode before this step's tokens are accepted; its inputs
    are this step's samples (filled in here as the runner does on the device). Through an EOS, a
    length finish, admissions, waits for blocks and a cache boundary, the tokens are the waiting
    scheduler's, and no block leaks."""
    specs = [(6, SamplingParams(max_new_tokens=10)), (3, SamplingParams(max_new_tokens=12, ignore_eos=True)),
             (9, SamplingParams(max_new_tokens=3, ignore_eos=True)), (5, SamplingParams(max_new_tokens=20,
                                                                                         ignore_eos=True))]

    def run(overlap: bool) -> tuple[list[list[int]], list[str | None], int]:
        s = make_scheduler(num_blocks=num_blocks, max_batch_size=3)
        model = PretendModel(eos_as_fifth_token(6))
        mirror = BatchMirror(s.max_batch_size, blocks_needed(s.max_seq_len, BLOCK) + 1, BLOCK)
        seqs = [s.add(prompt(n, start=10 + n), p, seed=0) for n, p in specs]
        chained, inflight = 0, None
        while s.has_work() or inflight is not None:
            if inflight is None:
                delta = s.schedule()
                assert delta is not None
                step = mirror.apply(encode(delta))
                check_step(s, step)
                inflight = (step, model(step))
            (step, tokens), inflight = inflight, None
            nxt_delta = s.chain_decode(step) if overlap else None
            if nxt_delta is not None:
                nxt = mirror.apply(encode(nxt_delta))
                assert nxt.chained and nxt.is_decode
                nxt.token_ids[:] = [tokens[r] for r in s.chained_rows(step, nxt)]  # the device's copy
                inflight = (nxt, model(nxt))
                chained += 1
            s.accept(step, SampleOutput(tokens, [None] * len(tokens), []))
            check_blocks(s)
        assert s.allocator.num_free == s.allocator.num_blocks, "a block leaked"
        return [q.output_ids for q in seqs], [q.finish_reason for q in seqs], chained

    waited = run(overlap=False)
    overlapped = run(overlap=True)
    assert waited[2] == 0 and overlapped[2] > 5
    assert overlapped[:2] == waited[:2]
    assert waited[1] == ["stop", "length", "length", "length"] and len(waited[0][0]) == 5


def test_chain_decode_refuses_what_it_cannot_know() -> None:
    s = make_scheduler(max_batch_size=2)
    d = driver(s)
    d.add(4, SamplingParams(max_new_tokens=8, ignore_eos=True))
    step, _ = d.step()  # the prefill: not a decode step
    assert s.chain_decode(step) is None
    step, _ = d.step()
    assert s.chain_decode(step) is not None  # the same sequence, one token further
    s2 = make_scheduler(max_batch_size=2)
    d2 = driver(s2)
    d2.add(4, SamplingParams(max_new_tokens=8, ignore_eos=True))
    d2.step()
    step, _ = d2.step()
    d2.add(3)  # a request that can be admitted now: the next step is its prefill
    assert s2.chain_decode(step) is None
    s4 = make_scheduler(num_blocks=6, max_batch_size=2)
    d4 = driver(s4)
    d4.add(12, SamplingParams(max_new_tokens=8, ignore_eos=True))  # 3 blocks, then a 4th for its decodes
    d4.step()
    step, _ = d4.step()
    d4.add(12)  # 3 blocks + 1 spare for the running one > the 2 free: schedule() would not admit it either
    assert s4.chain_decode(step) is not None
    s3 = make_scheduler()
    d3 = driver(s3)
    d3.add(4, SamplingParams(max_new_tokens=8, repetition_penalty=1.2))
    d3.step()
    step, _ = d3.step()
    assert s3.chain_decode(step) is None  # penalties read the token history on the host
