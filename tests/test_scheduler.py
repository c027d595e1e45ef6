"""The scheduler alone, driven by a pretend model: admission (free blocks, max_batch_size,
max_prefill_tokens, first come first served), preemption of the newest sequence and its
recompute from prompt + generated ids, block accounting, and finish reasons.

The pretend model stands in for the forward pass without weights: it keeps a pretend KV cache
(slot -> token id) that each step writes through the plan's block tables, reads every
sequence's context back through them, and returns logits whose arg-max is a function of that
context. A block held by two sequences, a stale block table or a wrong position changes the
tokens, so "the same tokens as with a roomy cache" means preemption and recompute lost nothing.

Blocks of 4 tokens keep the scenarios short (the runtime asks for >= 16 for its kernels; the
scheduler takes any size).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from polar_dist.engine.kv_cache import BlockAllocator, blocks_needed
from polar_dist.engine.step import Step, StepKind
from polar_dist.engine.sampler import SamplingParams
from polar_dist.engine.scheduler import Scheduler, Sequence

BLOCK = 4
VOCAB = 64
EOS = 2
GREEDY = SamplingParams(max_new_tokens=8)


def make_scheduler(num_blocks: int = 64, *, max_batch_size: int = 8, max_seq_len: int = 64,
                   max_prefill_tokens: int = 8192) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), BLOCK, max_batch_size, max_seq_len, eos_token_ids=(EOS, 3),
                     vocab_size=VOCAB, max_prefill_tokens=max_prefill_tokens)


def never_eos(context: list[int]) -> int:
    """A next token in [4, VOCAB) that depends on every token of the context and its length."""
    return 4 + (sum((i + 1) * t for i, t in enumerate(context)) + len(context)) % (VOCAB - 4)


class PretendModel:
    def __init__(self, next_token: Callable[[list[int]], int] = never_eos) -> None:
        self.next_token = next_token
        self.cache: dict[int, int] = {}  # slot -> token id written there

    def __call__(self, plan: Step) -> torch.Tensor:
        """(B, VOCAB) logits: one-hot on the next token of each sequence's context as read from the cache."""
        for slot, token in zip(plan.cache_slots(BLOCK), plan.token_ids):
            self.cache[slot] = token
        tokens = []
        for table, seq_len in zip(plan.block_tables, plan.seq_lens):
            context = [self.cache[table[p // BLOCK] * BLOCK + p % BLOCK] for p in range(seq_len)]
            tokens.append(self.next_token(context))
        return torch.nn.functional.one_hot(torch.tensor(tokens, dtype=torch.long), VOCAB).float()


def check_plan(plan: Step, seqs: list[Sequence]) -> None:
    """The plan feeds each sequence its own tokens at its own positions, through its own blocks."""
    assert plan.block_tables == [s.blocks for s in seqs]
    slots = plan.cache_slots(BLOCK)
    assert len(set(slots)) == len(slots), "two new tokens write the same cache slot"
    if plan.kind is StepKind.PREFILL:
        assert plan.token_ids == [t for s in seqs for t in s.all_ids]
        assert plan.positions == [p for s in seqs for p in range(len(s.all_ids))]
    else:
        assert plan.token_ids == [s.all_ids[-1] for s in seqs]
        assert plan.positions == [len(s.all_ids) - 1 for s in seqs]
    for table, seq_len in zip(plan.block_tables, plan.seq_lens):
        assert len(table) >= blocks_needed(seq_len, BLOCK)


def check_blocks(s: Scheduler) -> None:
    """Every block is either free or held by exactly one running sequence."""
    held = [b for seq in s.running for b in seq.blocks]
    free = s.allocator._free  # the free list, read only for this check
    assert len(held) == len(set(held)), f"a block is held twice: {sorted(held)}"
    assert not set(held) & set(free), "a block is both free and held"
    assert len(held) + len(free) == s.allocator.num_blocks, "a block leaked"
    assert all(not seq.blocks for seq in s.waiting), "a waiting sequence holds blocks"


def step(s: Scheduler, model: PretendModel) -> tuple[Step, list[Sequence], list[Sequence]]:
    """One checked step: (plan, the sequences it ran, those that finished)."""
    plan, seqs = s.next_step()
    check_plan(plan, seqs)
    check_blocks(s)
    finished = s.accept(seqs, model(plan))
    check_blocks(s)
    return plan, seqs, finished


def run(s: Scheduler, model: PretendModel, max_steps: int = 2000) -> list[tuple[Step, list[Sequence]]]:
    steps = []
    while s.has_work():
        assert len(steps) < max_steps, "the scheduler makes no progress"
        plan, seqs, _ = step(s, model)
        steps.append((plan, seqs))
    assert s.allocator.num_free == s.allocator.num_blocks
    assert sorted(s.allocator.allocate(s.allocator.num_blocks)) == list(range(s.allocator.num_blocks))
    return steps


def ids(seqs: list[Sequence]) -> list[int]:
    return [s.request_id for s in seqs]


def prompt(n: int, start: int = 10) -> list[int]:
    return [start + i % 40 for i in range(n)]  # ids in [10, 56): no EOS, inside VOCAB


# Admission


def test_admission_stops_at_max_batch_size() -> None:
    s = make_scheduler(max_batch_size=2)
    for n in (2, 5, 1):
        s.add(prompt(3), SamplingParams(max_new_tokens=n))
    model = PretendModel()
    plan, seqs, _ = step(s, model)
    assert plan.kind is StepKind.PREFILL and ids(seqs) == [0, 1] and ids(s.waiting) == [2]
    plan, seqs, finished = step(s, model)  # the batch is full: decode, nothing admitted
    assert plan.kind is StepKind.DECODE and ids(seqs) == [0, 1] and ids(finished) == [0]
    plan, seqs, _ = step(s, model)  # 0 finished: room for 2
    assert plan.kind is StepKind.PREFILL and ids(seqs) == [2]


def test_admission_stops_at_max_prefill_tokens() -> None:
    s = make_scheduler(max_prefill_tokens=20)
    for n in (8, 8, 8, 30):
        s.add(prompt(n), GREEDY)
    model = PretendModel()
    plan, seqs, _ = step(s, model)
    assert ids(seqs) == [0, 1] and len(plan.token_ids) == 16  # a third prompt would make 24 > 20
    plan, seqs, _ = step(s, model)
    assert plan.kind is StepKind.PREFILL and ids(seqs) == [2]  # 8 + 30 > 20
    plan, seqs, _ = step(s, model)  # a prompt over the limit still runs, alone
    assert plan.kind is StepKind.PREFILL and ids(seqs) == [3] and len(plan.token_ids) == 30
    run(s, model)


@pytest.mark.parametrize("num_blocks, admitted", [(6, [0]), (7, [0, 1])])
def test_admission_keeps_a_free_block_per_running_sequence(num_blocks: int, admitted: list[int]) -> None:
    # 9-token prompts need 3 blocks each. The second is admitted only if, after it, one block per
    # running sequence is still free for their next decode step: 3 + 3 + 1 > 6, but <= 7.
    s = make_scheduler(num_blocks)
    for _ in range(3):
        s.add(prompt(9), SamplingParams(max_new_tokens=2))
    model = PretendModel()
    plan, seqs, _ = step(s, model)
    assert ids(seqs) == admitted
    plan, seqs, _ = step(s, model)
    assert plan.kind is StepKind.DECODE and ids(seqs) == admitted  # the rest still waits
    run(s, model)


def test_admission_is_first_come_first_served() -> None:
    s = make_scheduler(8)
    s.add(prompt(17), SamplingParams(max_new_tokens=3))  # 5 blocks
    s.add(prompt(17), GREEDY)  # 5 more: waits for the first to finish
    s.add(prompt(1), GREEDY)  # would fit now, but does not jump the queue
    model = PretendModel()
    plan, seqs, _ = step(s, model)
    assert ids(seqs) == [0] and ids(s.waiting) == [1, 2]
    first_prefill: list[int] = []
    for plan, seqs in [(plan, seqs), *run(s, model)]:
        if plan.kind is StepKind.PREFILL:
            first_prefill += [i for i in ids(seqs) if i not in first_prefill]
    assert first_prefill == [0, 1, 2]


# Preemption


def test_preemption_takes_the_newest_and_resumes_it_with_its_tokens() -> None:
    # 5 blocks: a 3-token prompt and two 1-token prompts all fit at first; as they grow, the
    # newest sequence (2) gives its blocks up first, then the next newest (1).
    s = make_scheduler(5)
    a, b, c = (s.add(prompt(n), SamplingParams(max_new_tokens=12)) for n in (3, 1, 1))
    model = PretendModel()
    preempted: list[tuple[int, list[int]]] = []  # (request id, all_ids at preemption)
    resumed: list[int] = []
    while s.has_work():
        before = list(s.running)
        plan, seqs = s.next_step()
        check_plan(plan, seqs)
        check_blocks(s)
        if plan.kind is StepKind.DECODE:
            gone = [q for q in before if q not in s.running]
            assert gone == before[len(before) - len(gone):], "only the newest sequences are preempted"
            for q in gone:
                assert q.blocks == [] and q.num_cached == 0 and q in s.waiting
                preempted.append((q.request_id, q.all_ids))
            assert ids(s.waiting)[:len(gone)] == ids(gone), "the preempted go first in the queue, oldest first"
        else:
            for q in seqs:
                if q.output_ids:  # a resumed sequence: its prefill recomputes prompt + generated ids
                    assert q.all_ids == next(all_ids for i, all_ids in reversed(preempted) if i == q.request_id)
                    resumed.append(q.request_id)
        s.accept(seqs, model(plan))
        check_blocks(s)
    assert [i for i, _ in preempted][:2] == [2, 1]
    assert sorted(resumed) == sorted(i for i, _ in preempted)
    roomy = make_scheduler(64)
    expected = [roomy.add(q.prompt_ids, q.params) for q in (a, b, c)]
    run(roomy, PretendModel())
    assert [q.output_ids for q in (a, b, c)] == [q.output_ids for q in expected]
    assert all(q.finish_reason == "length" and len(q.output_ids) == 12 for q in (a, b, c))


@pytest.mark.parametrize("num_blocks", [9, 12, 16])  # 9 * 4 tokens hold the longest sequence (34)
def test_tight_cache_gives_the_roomy_cache_tokens_and_leaks_no_block(num_blocks: int) -> None:
    lengths = [(5, 20), (17, 6), (1, 30), (9, 9), (30, 4), (3, 25), (12, 12)]  # (prompt, new tokens)

    def workload(s: Scheduler) -> list[Sequence]:
        return [s.add(prompt(n, start=10 + i), SamplingParams(max_new_tokens=m)) for i, (n, m) in enumerate(lengths)]

    tight = make_scheduler(num_blocks, max_batch_size=4)
    seqs = workload(tight)
    steps = run(tight, PretendModel())  # checks every step's blocks, and that all are free at the end
    recomputed = sum(1 for plan, ran in steps if plan.kind is StepKind.PREFILL for q in ran if q.output_ids)
    assert recomputed > 0, "the scenario should preempt"
    roomy = make_scheduler(256, max_batch_size=4)
    expected = workload(roomy)
    run(roomy, PretendModel())
    assert [q.output_ids for q in seqs] == [q.output_ids for q in expected]
    assert [len(q.output_ids) for q in seqs] == [m for _, m in lengths]


# Finish reasons


def eos_as_fifth_token(prompt_len: int, eos: int = EOS) -> Callable[[list[int]], int]:
    return lambda context: eos if len(context) == prompt_len + 4 else never_eos(context)


@pytest.mark.parametrize("eos", [EOS, 3])  # either of the model's EOS ids
def test_eos_stops_unless_ignored(eos: int) -> None:
    s = make_scheduler()
    stops = s.add(prompt(6), SamplingParams(max_new_tokens=10))
    ignores = s.add(prompt(6), SamplingParams(max_new_tokens=10, ignore_eos=True))
    run(s, PretendModel(eos_as_fifth_token(6, eos)))
    assert stops.finish_reason == "stop" and len(stops.output_ids) == 5 and stops.output_ids[-1] == eos
    assert ignores.finish_reason == "length" and len(ignores.output_ids) == 10 and ignores.output_ids[4] == eos


def test_length_at_max_new_tokens() -> None:
    s = make_scheduler()
    seqs = [s.add(prompt(5), SamplingParams(max_new_tokens=n)) for n in (1, 4, 9)]
    run(s, PretendModel())
    assert [(len(q.output_ids), q.finish_reason) for q in seqs] == [(1, "length"), (4, "length"), (9, "length")]


def test_length_at_max_seq_len() -> None:
    s = make_scheduler(max_seq_len=10)
    seq = s.add(prompt(4), SamplingParams(max_new_tokens=100))
    run(s, PretendModel())
    assert len(seq.all_ids) == 10 and seq.finish_reason == "length"


def test_length_at_cache_capacity() -> None:
    # 3 blocks of 4 tokens hold 12 tokens, fewer than max_seq_len: a sequence stops there.
    s = make_scheduler(3, max_seq_len=64)
    assert s.max_seq_len == 12
    seqs = [s.add(prompt(5), SamplingParams(max_new_tokens=100)), s.add(prompt(2), SamplingParams(max_new_tokens=100))]
    run(s, PretendModel())
    assert [(len(q.all_ids), q.finish_reason) for q in seqs] == [(12, "length"), (12, "length")]
    with pytest.raises(ValueError, match="raise engine.kv_cache_blocks"):
        s.add(prompt(12), GREEDY)


def test_bad_prompts_are_rejected_with_the_way_out() -> None:
    s = make_scheduler(max_seq_len=10)
    with pytest.raises(ValueError, match="the prompt is empty"):
        s.add([], GREEDY)
    with pytest.raises(ValueError, match=f"prompt token id {VOCAB} is outside the vocabulary"):
        s.add([5, VOCAB], GREEDY)
    with pytest.raises(ValueError, match="has 10 tokens but the maximum sequence length is 10 .*engine.max_seq_len"):
        s.add(prompt(10), GREEDY)
    assert not s.has_work()
