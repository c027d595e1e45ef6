"""Head-selective paged decode attention: Triton kernel (interpreter on CPU) vs an fp32 reference,
by the rule of support/tolerance.py with one ulp of slack (the output is rounded once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import arrivals
from kernels.attention_builds import AttentionConfig, padded_head_dim, resident_per_sm, tile_split, tile_width
from kernels.attention_plan import IDLE_SHARE, KEPT_ROOM, StepPlanner, _wave_cost, plan_attention, plan_capacity
from kernels.select_attention import _launch, select_attention, select_attention_ref
from support.tolerance import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make_case(batch, hq, hkv, d, block_size, max_blocks, k_max, dtype, seq_lens, gen, device=DEVICE):
    """Random paged cache with shuffled physical blocks and random duplicate-free head selections."""
    num_blocks = batch * max_blocks + 5  # spare blocks that no sequence uses
    k_cache = torch.randn(num_blocks, hkv, block_size, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, hkv, block_size, d, generator=gen).to(dtype)
    q = torch.randn(batch, hq, d, generator=gen).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    # Entries past each length are arbitrary: poison them with -1 so a read would fault or show.
    used = (seq_lens_t[:, None] + block_size - 1) // block_size
    block_tables = torch.where(torch.arange(max_blocks)[None, :] < used, block_tables, -1).int()
    head_table = torch.stack([torch.randperm(hkv, generator=gen)[:k_max] for _ in range(batch)]).int()
    if batch > 1 and k_max > 1:
        head_table[1, k_max - 1] = -1
    head_table[0, :] = torch.where(torch.arange(k_max) == 0, head_table[0, :], -1)  # one group only
    tensors = (q, k_cache, v_cache, block_tables, seq_lens_t, head_table)
    return tuple(t.to(device) for t in tensors)


def _plan(case, chunk_tokens=None, capacity=None, block_n=64, longest_first=False):
    """The work plan of `case` (seq_lens at index 4, head table at 5), cut into chunks of about
    `chunk_tokens` tokens (None: the planner's rule for 4 SMs)."""
    return plan_attention(case[4].tolist(), groups=case[5].shape[1], num_sms=4, block_n=block_n,
                          chunk_tokens=chunk_tokens, capacity=capacity,
                          longest_first=longest_first).to(case[0].device)


def _check_close(out, case, scale):
    fp32_case = tuple(t.float() if t.is_floating_point() else t for t in case)
    assert_close_to_reference(out, select_attention_ref(*fp32_case, scale), select_attention_ref(*case, scale))


def _unselected_mask(head_table, hq, hkv):
    group = hq // hkv
    selected = torch.zeros(head_table.shape[0], hkv, dtype=torch.bool, device=head_table.device)
    for b in range(head_table.shape[0]):
        for g in head_table[b].tolist():
            if g >= 0:
                selected[b, g] = True
    return ~selected.repeat_interleave(group, dim=1)  # (B, Hq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
# MHA; GQA with G = 4; G = 3 (heads padded to 4 in the merge); G = 8 (the merge in passes of 4 parts)
@pytest.mark.parametrize("hq,hkv,k_max", [(4, 4, 3), (8, 2, 2), (6, 2, 2), (16, 2, 1)])
@pytest.mark.parametrize("chunk", [None, 16])  # whole sequences (direct writes); cut into 16-token chunks (merge)
def test_matches_reference(dtype, d, hq, hkv, k_max, chunk):
    gen = torch.Generator().manual_seed(d * 100 + hq * 10 + (chunk or 0) + (dtype == torch.bfloat16))
    # Lengths: 1, mid-block and non-power-of-two (37), exactly full (max_blocks * block_size).
    case = _make_case(3, hq, hkv, d, 16, 6, k_max, dtype, [1, 37, 96], gen)
    out = torch.full_like(case[0], float("nan"))  # poison: every selected element must be written
    _launch(*case, 0.3, out, _plan(case, chunk, block_n=16), AttentionConfig(block_n=16, num_stages=1))
    unselected = _unselected_mask(case[5], hq, hkv)
    assert not out.isnan().any(), "an output element was not written"
    assert (out[unselected] == 0).all(), "unselected heads must be exactly 0"
    _check_close(out, case, 0.3)


# Head dims between powers of two (OPT-2.7B's 80; 72, 96, 160, 192; 24 and 200 at the ends): the
# kernel runs a main and a tail tile (80 = 64 + 32) or one tile as wide as the next power of two
# (24, 200) and must read and write only the real columns. q and out are row-strided views with
# NaN in the 8 columns past the head dim, and the caches end in NaN right after the last physical
# block, which a sequence uses: a pad column read shows up as NaN in the output, a pad column
# written as a changed NaN.
@pytest.mark.parametrize("d", [24, 72, 80, 96, 160, 192, 200])
@pytest.mark.parametrize("hq,hkv,k_max", [(4, 4, 3), (8, 2, 2)])
@pytest.mark.parametrize("chunk", [None, 16])  # whole sequences; cut (partials and the merge)
def test_head_dims_between_powers_of_two(d, hq, hkv, k_max, chunk):
    gen = torch.Generator().manual_seed(d * 10 + hq + (chunk or 0))
    case = list(_make_case(3, hq, hkv, d, 16, 6, k_max, torch.bfloat16, [1, 37, 96], gen))
    last = case[1].shape[0] - 1  # the last physical block: sequence 2's first page from now on
    case[3] = torch.where(case[3] == last, case[3][2, 0], case[3])
    case[3][2, 0] = last

    def nan_tail(t: torch.Tensor) -> torch.Tensor:  # t's values, then NaN past its end
        flat = torch.full((t.numel() + 256,), float("nan"), dtype=t.dtype, device=t.device)
        flat[:t.numel()] = t.reshape(-1)
        return flat[:t.numel()].view(t.shape)

    def nan_cols(t: torch.Tensor) -> torch.Tensor:  # a view of t's values with NaN past each row
        wide = torch.full((*t.shape[:-1], d + 8), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., :d] = t
        return wide[..., :d]

    case[0], case[1], case[2] = nan_cols(case[0]), nan_tail(case[1]), nan_tail(case[2])
    out = nan_cols(torch.zeros_like(case[0]))
    _launch(*case, d**-0.5, out, _plan(case, chunk, block_n=16), AttentionConfig(block_n=16, num_stages=1))
    assert not out.isnan().any(), "a pad column or a read past the cache reached the output"
    assert out.as_strided((3, hq, 8), (hq * (d + 8), d + 8, 1), d).isnan().all(), "a pad column was written"
    assert (out[_unselected_mask(case[5], hq, hkv)] == 0).all()
    plain = tuple(t.contiguous() for t in case)
    _check_close(out.contiguous(), plain, d**-0.5)


def test_no_group_selected_is_all_zero():
    """k_max = 0 launches nothing: out (given or allocated) must still read exactly 0."""
    gen = torch.Generator().manual_seed(5)
    case = list(_make_case(3, 8, 2, 64, 16, 6, 1, torch.float16, [1, 37, 96], gen))
    case[5] = case[5][:, :0].contiguous()  # (B, 0) head table
    out = select_attention(*case, 0.3, out=torch.full_like(case[0], float("nan")))
    assert (out == 0).all() and (select_attention(*case, 0.3) == 0).all()


@pytest.mark.parametrize("block_size", [16, 32])
def test_batch_one_and_block_sizes(block_size):
    gen = torch.Generator().manual_seed(block_size)
    case = _make_case(1, 4, 2, 64, block_size, 4, 2, torch.float16, [block_size * 3 - 5], gen)
    out = torch.full_like(case[0], 1e4)  # poison with a large value
    out = select_attention(*case, 0.125, out=out)
    assert (out.abs() < 1e3).all(), "an output element kept its poison value"
    _check_close(out, case, 0.125)


@pytest.mark.parametrize("resident,longest_first", [(2, False), (None, False), (None, True)])
def test_many_lengths_cut_into_chunks_with_a_padded_plan(resident, longest_first):
    """Lengths around tile and chunk edges, some sequences cut into up to 19 chunks (more than
    the merge loads at once), in a plan with empty rows past its items (a graph's capacity),
    its items in sequence order or longest pieces first. The last chunk of each cut (sequence,
    slot) merges, and leaves its arrival counter at 0."""
    gen = torch.Generator().manual_seed(7)
    lens = [1, 15, 16, 17, 100, 255, 300]
    case = _make_case(len(lens), 2, 2, 64, 16, 20, 2, torch.float16, lens, gen)
    plan = _plan(case, chunk_tokens=16, capacity=60, block_n=16, longest_first=longest_first)
    assert plan.num_parts > 16 and int((plan.items < 0).sum()) > 0
    for _ in range(2):  # a second launch merges the same way
        out = _launch(*case, 0.2, None, plan, AttentionConfig(block_n=16, num_stages=1, resident_per_sm=resident))
        _check_close(out, case, 0.2)
        assert not arrivals.counters(out.device, len(lens) * 2).any()
    _check_close(select_attention(*case, 0.2), case, 0.2)  # the plan built from seq_lens


def test_a_plan_of_the_wrong_batch_is_refused():
    gen = torch.Generator().manual_seed(8)
    case = _make_case(3, 4, 2, 64, 16, 6, 2, torch.float16, [1, 37, 96], gen)
    other = _make_case(2, 4, 2, 64, 16, 6, 2, torch.float16, [1, 37], gen)
    with pytest.raises(ValueError, match="plan.seqs must be"):
        select_attention(*case, 0.3, plan=_plan(other))


def _covered(plan, lens):
    """token -> how many items of `plan` read it, per sequence."""
    seen = [np.zeros(n, dtype=int) for n in lens]
    for seq, start, end, _ in plan.spans(lens):
        seen[seq][start:end] += 1
    return seen


@pytest.mark.parametrize("lens", [
    [4096] + [300] * 63,  # one long among many short
    list(range(1, 2000, 7)),  # 286 lengths from 1 up
    [131072] * 2,  # two sequences at Llama-3.1's longest context
    [1] * 256,  # a graph bucket of padding rows
])
@pytest.mark.parametrize("groups", [1, 8, 32])
@pytest.mark.parametrize("longest_first", [False, True])
def test_planner_covers_every_token_once_in_bounded_chunks(lens, groups, longest_first):
    sms = 132
    plan = plan_attention(lens, groups=groups, num_sms=sms, longest_first=longest_first)
    assert plan.items.shape == (plan_capacity(len(lens), groups, sms),)  # the static buffer size
    assert plan.num_items <= plan.items.shape[0] and (plan.items[plan.num_items:] == -1).all()
    assert all((c == 1).all() for c in _covered(plan, lens)), "a token is read twice or never"
    real = plan.spans(lens)
    sizes = real[:, 2] - real[:, 1]
    assert (sizes >= 1).all() and sizes.max() <= max(64 * -(-plan.chunk_tokens * 3 // 2 // 64), 64)
    # Partials: a cut sequence's items own consecutive parts from seqs[b, 2]; whole ones write directly.
    for b, (_, _, first, n) in enumerate(plan.seqs):
        mine = real[real[:, 0] == b]
        if len(mine) == 1:
            assert n == 0 and mine[0, 3] == -1
        else:
            assert n == len(mine) and sorted(mine[:, 3]) == list(range(first, first + n))
    assert plan.num_parts == int(plan.seqs[:, 3].sum())


def test_planner_longest_pieces_first():
    """longest_first: the same cut (items, sizes, partials) in another order, each sequence's
    items together and the sequences by their mean piece, longest first (ties: by index)."""
    lens = np.random.default_rng(3).integers(1, 9000, 200)
    by_index = plan_attention(lens, groups=8, num_sms=132, longest_first=False)
    longest = plan_attention(lens, groups=8, num_sms=132)  # the default
    assert (by_index.num_items, by_index.num_parts, by_index.chunk_tokens) == \
        (longest.num_items, longest.num_parts, longest.chunk_tokens)
    assert np.array_equal(by_index.seqs[:, 1:], longest.seqs[:, 1:])
    assert sorted(map(tuple, by_index.spans(lens))) == sorted(map(tuple, longest.spans(lens)))
    items = longest.items[:longest.num_items]
    seq_order = items[np.r_[True, items[1:] != items[:-1]]]  # each sequence once: its items are together
    assert sorted(seq_order) == list(range(len(lens)))
    counts = np.bincount(items, minlength=len(lens))
    keys = [(-lens[b] / counts[b], b) for b in seq_order]  # a sequence's mean piece, longest first
    assert keys == sorted(keys)
    assert (longest.seqs[seq_order, 0] == np.flatnonzero(np.r_[True, items[1:] != items[:-1]])).all()
    planner = StepPlanner(8, 132, room=0)  # the runtime's planner: longest first by default
    assert np.array_equal(planner.plan(lens, plan_capacity(200, 8, 132)).flat(), longest.flat())


def test_planner_cuts_by_total_work_not_by_table_width():
    """One 4,096-token sequence among 63 of 300: the long one is cut into pieces of about the
    step's chunk (which the step's total tokens set), the short ones stay whole."""
    lens = [4096] + [300] * 63
    plan = plan_attention(lens, groups=16, num_sms=132)
    assert (plan.items == 0).sum() >= 4096 // plan.chunk_tokens and plan.seqs[1:, 3].max() == 0
    assert plan.seqs[0, 1] <= 1.5 * plan.chunk_tokens
    big = plan_attention([4096] * 256, groups=32, num_sms=132)  # 32 programs per SM unsplit
    assert big.num_parts == 0


def test_tile_split_covers_the_head_dim_in_power_of_two_tiles():
    """Main and tail tiles: powers of two, the main >= 16 and a tail >= 32 (16-wide tails take 2-3x
    the registers), together covering d and never wider than the padded tile; a split only where it
    saves columns."""
    for d in range(1, 257):
        main, tail = tile_split(d)
        pad = padded_head_dim(d)
        assert main >= 16 and main & (main - 1) == 0 and (tail == 0 or (tail >= 32 and tail & (tail - 1) == 0)), d
        assert d <= main + tail <= pad and tile_width(d) == main + tail, d
        assert tail == 0 or (main < d and main + tail < pad), d
    assert tile_split(80) == tile_split(96) == (64, 32) and tile_split(112) == (128, 0)


def test_resident_programs_follow_the_build():
    """The plan's slots per SM: the head dim's tile width (80 and 96 take 64 + 32 columns, 160 128 +
    32) and the group's padded rows (<= 16 query heads one build; 32 and 64 hold more registers)."""
    assert resident_per_sm(128) == resident_per_sm(128, 16) == resident_per_sm(96, 8) == resident_per_sm(80) == 4
    assert resident_per_sm(80, 32) == 2 and resident_per_sm(160) == resident_per_sm(192, 16) == 3
    assert resident_per_sm(64, 4) == 6 and resident_per_sm(256) == 3
    assert resident_per_sm(128, 17) == resident_per_sm(128, 32) == 3 and resident_per_sm(128, 64) == 2
    assert resident_per_sm(16) == 5 and resident_per_sm(32, 2) == 9  # every tile width the kernel builds
    assert resident_per_sm(128, 128) == 1  # past the table: one program per SM, never more than fit
    assert StepPlanner.for_device(8, torch.device("cpu"), 128, group_size=32).resident == 3


def test_plan_slots_fit_the_compiled_builds():
    """The slot table against ptxas (sm_90a, no GPU: Triton's wheel ships it): at the head dims and
    group widths of the runtime's models, the plan never counts more programs per SM than the
    default build's registers and shared memory fit (benchmarks/attention_ptx.py --check)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no cuobjdump to read the builds' registers")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "attention_ptx.py"), "--check", "--head-dims",
                          "64", "80", "96", "128", "--groups", "1", "8", "32"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("per SM (plan:") == 12


def test_planner_fills_whole_waves_of_resident_programs():
    """The cut's program count against the GPU's resident slots (4 per SM at head dim 128, 132
    SMs: 528): a whole wave or just under it, never a small last wave of equal programs (run 47:
    1.29 waves took 1.23x the time of 2 waves)."""
    slots = resident_per_sm(128) * 132
    assert slots == 528
    gqa = plan_attention([4096] * 32, groups=4, num_sms=132)  # 128 (sequence, group) pairs
    assert gqa.num_items * 4 == 512  # 4 pieces each: 0.97 of a wave
    llama3 = plan_attention([6144] * 64, groups=4, num_sms=132)  # 256 pairs: 2 pieces each, 0.97 of a wave
    assert llama3.num_items * 4 == 512
    small = plan_attention([4096] * 8, groups=4, num_sms=132)  # 32 pairs: 16 pieces each
    assert slots // 2 < small.num_items * 4 <= slots
    dense = plan_attention([2048] * 32, groups=32, num_sms=132)  # 1024 pairs: already 1.94 waves uncut
    assert dense.num_parts == 0 and dense.num_items == 32


def test_planner_cuts_finer_where_a_step_is_under_one_wave():
    """A step whose programs fill under one wave at 256-token chunks is cut into 128-token chunks
    where those still fit in one wave (run 80's grid: 0.82-0.95x at B 1-64), and keeps 256 where
    they would spill into a second (128-token cuts that spilled were 1.04-1.19x); steps of more
    than a wave's work are cut as before."""
    slots = resident_per_sm(128) * 132
    b1 = plan_attention([4096], groups=2, num_sms=132)  # 32 x 2 programs at 128 tokens
    assert (b1.chunk_tokens, b1.num_items) == (128, 32)
    one_long = plan_attention([4096] + [300] * 7, groups=2, num_sms=132)
    assert one_long.chunk_tokens == 128 and one_long.num_items == 32 + 7 * 2
    spill = plan_attention([4096] * 8, groups=4, num_sms=132)  # 128-token chunks: 1024 programs > 528
    assert (spill.chunk_tokens, spill.num_items) == (256, 128)
    for lens, groups in (([4096] * 8, 2), ([4096] + [300] * 7, 8), ([1000] * 40, 4), ([4096], 32)):
        plan = plan_attention(lens, groups=groups, num_sms=132)
        assert plan.num_items * groups <= slots, (lens[:2], groups)
        assert all((c == 1).all() for c in _covered(plan, lens))
    big = plan_attention([4096] * 32, groups=8, num_sms=132)  # 2 waves' worth at 256: the wave rule's cut
    assert big.chunk_tokens > 256


def test_cut_realizes_the_rules_piece_count():
    """Pieces are whole tiles; rounding their size up alone made far fewer items than the rule's
    count past a tile multiple (4,097 tokens in 16 pieces: 13 of 320), so the programs the rule
    fitted to the GPU's slots were not the ones that ran. Now a tile smaller is taken where that
    is nearer: within one item of the rule's count per sequence, never past floor(len / chunk) + 1."""
    assert plan_attention([4097], groups=1, num_sms=132, chunk_tokens=256).num_items == 17  # 16 x 256 + 1
    assert plan_attention([4096], groups=1, num_sms=132, chunk_tokens=256).num_items == 16
    assert plan_attention([4096], groups=1, num_sms=132, chunk_tokens=256, room=KEPT_ROOM).num_items == 16
    rng = np.random.default_rng(3)
    for _ in range(200):
        lens = rng.integers(1, int(rng.choice([600, 5000, 40000])), int(rng.integers(1, 65)))
        chunk = int(rng.choice([128, 256, 384, 1000]))
        plan = plan_attention(lens, groups=1, num_sms=132, chunk_tokens=chunk, room=int(rng.choice([0, KEPT_ROOM])))
        counts = np.bincount(plan.items[:plan.num_items], minlength=len(lens))
        pieces = np.maximum(np.floor(lens / chunk + 0.5), 1)
        assert (np.abs(counts - pieces) <= 1).all() and (counts <= lens // chunk + 1).all()
        assert all((c == 1).all() for c in _covered(plan, lens))


def test_wave_cost_prices_a_small_last_wave_as_a_fuller_one():
    assert _wave_cost(396, 396) < _wave_cost(768, 396) < _wave_cost(512, 396)
    assert _wave_cost(396 + 100, 396) == pytest.approx((1 + 0.25 + 0.75 * IDLE_SHARE) / (496 / 396), rel=1e-2)
    # with unequal lengths a 1% overflow is packed into the wave before; equal programs pay for it
    assert _wave_cost(798, 396, slack=0.02) < _wave_cost(798, 396)
    # pieces of varying sizes: the slots that drew long ones end last, more so with fewer per slot
    assert _wave_cost(792, 396, cv=0.5) > _wave_cost(792, 396)
    assert _wave_cost(792, 396, cv=0.5) > _wave_cost(1980, 396, cv=0.5)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seed", range(4))
def test_planner_wave_rule_stays_within_the_static_capacity(head_dim, seed):
    """Any lengths, any width: the wave rule's cut fits plan_capacity's buffers (what a graph
    bucket allocates) and covers every token once."""
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 257))
    groups = int(rng.choice([1, 2, 4, 8, 16, 32]))
    lens = rng.integers(1, int(rng.choice([300, 4096, 40000])), batch).tolist()
    planner = StepPlanner(groups, 132, resident_per_sm(head_dim))
    plan = planner.plan(lens, planner.capacity(batch))
    assert plan.num_items <= planner.capacity(batch)
    assert all((c == 1).all() for c in _covered(plan, lens))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_step_planner_reuses_its_cut_across_decode_steps(head_dim, monkeypatch):
    """Decode steps grow every sequence by a token: the planner keeps a batch's chunk size while
    its tokens move < 1% (choosing it is most of the plan's host time), and every step's plan
    still covers each token once within the bucket's static capacity."""
    from kernels import attention_plan

    chosen = []
    real = attention_plan._wave_chunk
    monkeypatch.setattr(attention_plan, "_wave_chunk", lambda *a: chosen.append(1) or real(*a))
    rng = np.random.default_rng(7)
    lens = rng.integers(100, 3000, 48)
    planner = StepPlanner(4, 132, resident_per_sm(head_dim))
    cap = planner.capacity(48)
    for step in range(120):
        step_lens = (lens + step).tolist()
        plan = planner.plan(step_lens, cap)
        assert plan.items.shape == (cap,)
        assert all((c == 1).all() for c in _covered(plan, step_lens))
    assert 1 <= len(chosen) <= 9  # 120 steps add 5,760 tokens to ~74,000 (+8%): a new choice every ~1%


def _fits(plan, lens) -> bool:
    """plan covers every token of lens once, with no empty item."""
    spans = plan.spans(lens)
    return all((c == 1).all() for c in _covered(plan, lens)) and bool((spans[:, 2] > spans[:, 1]).all())


@pytest.mark.parametrize("longest_first", [False, True])
def test_step_planner_keeps_its_plan_while_every_sequence_fits(longest_first):
    """Between cuts the planner returns the same plan while it covers every length: each step
    (sequences growing by a token; now and then one replaced by a short new one, or one jumping
    past its pieces) covers each token once with no empty item, and a plan that would still do
    so is kept unless the chunk size is chosen again (tokens moved > 1%)."""
    rng = np.random.default_rng(11)
    lens = rng.integers(100, 3000, 48)
    planner = StepPlanner(4, 132, longest_first=longest_first)
    cap = planner.capacity(48)
    previous, kept = None, 0
    for step in range(200):
        lens = lens + 1
        if step % 37 == 36:  # a finished sequence's row taken by a new one: a row the last plan cut
            lens[rng.choice(np.flatnonzero(previous.seqs[:, 3]))] = int(rng.integers(1, 50))
        if step % 53 == 52:
            lens[rng.integers(48)] += 700  # a long jump (a prefill's tokens)
        chosen = planner._chunks.get((48, False))
        plan = planner.plan(lens, cap)
        assert _fits(plan, lens)
        if previous is not None and _fits(previous, lens):
            assert plan is previous or planner._chunks[(48, False)] != chosen
        kept += plan is previous
        previous = plan
    assert kept >= 140  # 148 of 199 steps here keep the plan


def test_step_planner_cuts_leave_room_to_grow():
    """A cut sequence's pieces hold KEPT_ROOM tokens past its length wherever that costs none of
    the rule's pieces (also where fewer items than pieces cover it); where it would, the cut is
    nearer the rule's piece count. So under decode growth alone the planner of a large batch cuts
    afresh only when it chooses the chunk again (tokens moved > 1%), and never leaves an item
    empty."""
    rng = np.random.default_rng(5)
    given_up = 0
    for _ in range(100):
        lens = rng.integers(1, int(rng.choice([300, 4096, 40000])), int(rng.integers(1, 257)))
        plan = plan_attention(lens, groups=int(rng.choice([1, 4, 8, 32])), num_sms=132, room=KEPT_ROOM)
        assert _fits(plan, lens)
        size, parts = plan.seqs[:, 1].astype(np.int64), plan.seqs[:, 3].astype(np.int64)
        pieces = np.maximum(np.floor(lens / plan.chunk_tokens + 0.5), 1).astype(np.int64)  # the rule's
        # the most items (<= pieces) of any whole-tile size that hold the room, by brute force
        tiles = np.arange(64, int(lens.max()) + KEPT_ROOM + 64, 64)[None, :]  # (1, T)
        items = -(-lens[:, None] // tiles)  # (B, T)
        roomy = np.where((items * tiles >= lens[:, None] + KEPT_ROOM) & (items <= pieces[:, None]), items, 0).max(1)
        cut, held = parts > 1, parts * size - lens >= KEPT_ROOM
        assert held[cut & (roomy == pieces)].all()  # the room costs no piece: it is held
        assert (np.abs(parts - pieces) < pieces - roomy)[cut & ~held].all()  # given up only for a nearer count
        given_up += int((cut & ~held).sum())
    assert given_up > 0  # the lengths above include cuts where holding the room would cost pieces
    lens = rng.integers(100, 8193, 256)
    planner = StepPlanner(4, 132)
    cap = planner.capacity(256)
    previous, fresh = planner.plan(lens, cap), 0
    for step in range(1, 301):
        chosen = planner._chunks[(256, False)]
        plan = planner.plan(lens + step, cap)
        assert _fits(plan, lens + step)
        if plan is not previous:
            fresh += 1
            assert planner._chunks[(256, False)] is not chosen  # only a new chunk cuts afresh
        previous = plan
    assert 2 <= fresh <= 12  # 300 steps add 76,800 tokens to ~1.06M (+7%): a new chunk every ~1%


def test_a_kept_plan_reads_the_steps_own_lengths():
    """The kernel with a plan made for shorter lengths that it still covers (a decode step later):
    whole sequences read their whole new length, a cut one's last piece its new tokens."""
    gen = torch.Generator().manual_seed(12)
    first = [40, 62, 900, 9]
    later = [41, 66, 903, 9]  # +0.7% tokens; 62 -> 66 crosses a 64-token tile; 900 is cut into 4 pieces of 256
    case = _make_case(4, 4, 2, 64, 16, 60, 2, torch.float16, later, gen)
    planner = StepPlanner(2, 4)
    plan = planner.plan(first, planner.capacity(4))
    assert plan.seqs[2, 3] > 1 and planner.plan(later, planner.capacity(4)) is plan
    out = _launch(*case, 0.2, None, plan.to(case[0].device), AttentionConfig(block_n=16, num_stages=1))
    _check_close(out, case, 0.2)


def test_planner_host_time_at_batch_256():
    """Planning runs once per step on the host; at batch 256 it must cost well under 50 us
    (a budget checked with a wide margin here; the benchmark reports the measured time)."""
    lens = np.random.default_rng(0).integers(100, 8192, 256)
    plan_attention(lens, groups=8, num_sms=132)
    t0 = time.perf_counter()
    for _ in range(50):
        plan_attention(lens, groups=8, num_sms=132)
    assert (time.perf_counter() - t0) / 50 < 1e-3


def _bad_case():
    gen = torch.Generator().manual_seed(1)
    return list(_make_case(2, 4, 2, 64, 16, 2, 1, torch.float16, [5, 20], gen))


def test_rejects_head_dim_past_the_kernels():
    case = _bad_case()
    case[0] = torch.zeros(2, 4, 320, dtype=torch.float16, device=DEVICE)
    case[1] = case[2] = torch.zeros(4, 2, 16, 320, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 320 is not supported by the kernel"):
        select_attention(*case, 0.1)


def test_sliced_tables_read_through_their_row_stride():
    # A mixed step's decode rows pass the first n rows and the first `width` columns of the
    # step's block table (a strided view): the same output as a contiguous copy, and as the
    # reference.
    gen = torch.Generator().manual_seed(21)
    case = list(_make_case(4, 4, 2, 64, 16, 6, 2, torch.bfloat16, [17, 40, 5, 33], gen))
    wide = torch.full((5, 9), -1, dtype=torch.int32, device=DEVICE)  # one more row, three more columns
    wide[:4, :6] = case[3]
    case[3] = wide[:4, :6]
    assert not case[3].is_contiguous()
    out = select_attention(*case, 0.125)
    contiguous = list(case)
    contiguous[3] = case[3].contiguous()
    assert torch.equal(out, select_attention(*contiguous, 0.125))
    _check_close(out, tuple(contiguous), 0.125)


def test_rejects_bad_dtypes_and_shapes():
    case = _bad_case()
    with pytest.raises(ValueError, match="float32 is not supported"):
        select_attention(*[t.float() if t.is_floating_point() else t for t in case], 0.1)
    bad = list(case)
    bad[3] = case[3].long()
    with pytest.raises(ValueError, match="block_tables must be int32"):
        select_attention(*bad, 0.1)
    bad = list(case)
    bad[2] = case[2][:, :1]
    with pytest.raises(ValueError, match="v_cache"):
        select_attention(*bad, 0.1)
    bad = list(case)
    bad[5] = case[5][:1]
    with pytest.raises(ValueError, match="head_table must be int32 with 2 dims and batch 2"):
        select_attention(*bad, 0.1)
    with pytest.raises(ValueError, match="out must be"):
        select_attention(*case, 0.1, out=torch.empty(2, 4, 64, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 32, 128), (32, 8, 128), (16, 16, 64), (32, 8, 80), (16, 16, 96),
                                      (8, 8, 256)])
def test_gpu_realistic(dtype, hq, hkv, d):
    gen = torch.Generator().manual_seed(hq + hkv + d)
    lens = torch.randint(1, 1024, (16,), generator=gen).tolist() + [1024]
    k_max = max(1, hkv * 3 // 10)
    case = _make_case(len(lens), hq, hkv, d, 16, 64, k_max, dtype, lens, gen)
    out = torch.full_like(case[0], float("nan"))
    select_attention(*case, d**-0.5, out=out)  # the planner's rule
    assert not out.isnan().any()
    assert (out[_unselected_mask(case[5], hq, hkv)] == 0).all()
    _check_close(out, case, d**-0.5)
    for chunk in (64, 200, 4096):  # cut fine, cut coarse, whole
        _check_close(_launch(*case, d**-0.5, None, _plan(case, chunk, capacity=200)), case, d**-0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [  # (block_n, num_warps, num_stages, maxnreg): every config the v4 sweep times
    (64, 4, 3, None), (64, 4, 2, None), (64, 8, 3, None), (128, 8, 3, None),
    (64, 4, 3, 168), (64, 4, 3, 128), (32, 4, 3, 128), (32, 4, 3, None), (64, 4, 3, None, None),
])
def test_gpu_block_configs(cfg):
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 1024, (16,), generator=gen).tolist() + [1024]
    case = _make_case(len(lens), 32, 32, 128, 16, 64, 10, torch.float16, lens, gen)
    for chunk in (4096, 300):  # whole sequences; cut
        out = torch.full_like(case[0], float("nan"))
        _launch(*case, 128**-0.5, out, _plan(case, chunk, block_n=cfg[0]), config=AttentionConfig(*cfg))
        assert not out.isnan().any()
        assert (out[_unselected_mask(case[5], 32, 32)] == 0).all()
        _check_close(out, case, 128**-0.5)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """With a static-capacity plan the op never syncs with the host: it captures, and replays
    of new plans copied into the captured buffers give each plan's eager result; without a
    plan, capture is refused with a message saying what to pass."""
    gen = torch.Generator().manual_seed(11)
    case = _make_case(4, 32, 8, 128, 16, 64, 3, torch.float16, [1, 300, 777, 1024], gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    capacity = plan_capacity(4, 3, sms)
    plans = [plan_attention(case[4].tolist(), groups=3, num_sms=sms, capacity=capacity, chunk_tokens=c)
             for c in (None, 128)]
    flat = torch.from_numpy(plans[0].flat()).cuda()
    from kernels.attention_plan import plan_views
    captured = plan_views(flat, capacity, 4, capacity)  # partials sized for any plan of this capacity
    out = torch.empty_like(case[0])
    select_attention(*case, 0.1, out=out, plan=captured)  # once eagerly first, as DecodeGraphs does
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select_attention(*case, 0.1, out=out, plan=captured)
    for host in plans:
        eager = select_attention(*case, 0.1, plan=host.to("cuda"))
        flat.copy_(torch.from_numpy(host.flat()))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert plans[1].num_parts > 0  # the second plan cut sequences: the merge ran in the graph
    assert not arrivals.counters(out.device, 4 * 3).any()  # and left its arrival counters at 0
    with pytest.raises(ValueError, match="needs a plan"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            select_attention(*case, 0.1, out=out)


