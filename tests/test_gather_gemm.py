"""Gather-GEMM MLP pair: Triton kernels (interpreter on CPU) vs an fp32 reference, by the rule
of support/tolerance.py with one ulp of slack (each kernel rounds its output once).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernels import arrivals
from kernels.gather_gemm import (GemmConfig, gather_fc1, gather_fc1_ref, gather_fc2, gather_fc2_ref,
                                 gpu_config, stream_plan, tile_candidates, tile_config)
from support.tolerance import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fp32(*ts):
    return [t.float() if t is not None and t.is_floating_point() else t for t in ts]


def _make(m, d, n, k, dtype, bias, gen, device=DEVICE):
    x = torch.randn(m, d, generator=gen).to(dtype)
    w1 = (torch.randn(n, d, generator=gen) / d**0.5).to(dtype)  # nn.Linear scale keeps h O(1)
    w2t = (torch.randn(n, d, generator=gen) / k**0.5).to(dtype)
    b1 = torch.randn(n, generator=gen).to(dtype) if bias else None
    b2 = torch.randn(d, generator=gen).to(dtype) if bias else None
    idx = torch.randperm(n, generator=gen)[:k].int()
    return [None if t is None else t.to(device) for t in (x, w1, w2t, b1, b2, idx)]


def _check_pair(x, w1, w2t, b1, b2, idx, activation="relu", config1=None, config2=None):
    h = gather_fc1(x, w1, idx, b1, activation, config=config1)
    assert_close_to_reference(h, gather_fc1_ref(*_fp32(x, w1, idx, b1), activation),
                              gather_fc1_ref(x, w1, idx, b1, activation), what="fc1")
    if activation == "relu":
        assert (h >= 0).all()
    y = gather_fc2(h, w2t, idx, b2, config=config2)
    assert_close_to_reference(y, gather_fc2_ref(*_fp32(h, w2t, idx, b2)), gather_fc2_ref(h, w2t, idx, b2),
                              what="fc2")
    return h, y


# M: one row, below one 16-row tile, a whole tile, one past it, inside each larger tile of
# gather_gemm._M_TILES (32, 64, 128, 256 rows) and the largest; k: selections that are not a
# multiple of 16 (the last weight tile and the fc2 K tail are masked), one that is.
M_K = [(1, 80), (5, 77), (16, 83), (17, 80), (48, 65), (65, 93), (130, 77), (256, 85)]


@pytest.mark.parametrize("m,k", M_K)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_matches_reference(m, k, dtype):
    gen = torch.Generator().manual_seed(m * 7 + k)
    # d = 200 is not a multiple of the K tile: fc1's K tail runs; N = 300 > k.
    x, w1, w2t, b1, b2, idx = _make(m, 200, 300, k, dtype, True, gen)
    _check_pair(x, w1, w2t, b1, b2, idx)


@pytest.mark.parametrize("m,k", [(5, 77), (130, 83)])
@pytest.mark.parametrize("bias,activation", [(True, "relu"), (False, "identity")])
def test_pair_split_k(m, k, bias, activation):
    """Split 3 of BLOCK_K 32: slices of d 96/96/8 (the last all tail), of k 32/32/13 or 32/32/19."""
    gen = torch.Generator().manual_seed(m + k + bias)
    x, w1, w2t, b1, b2, idx = _make(m, 200, 300, k, torch.bfloat16, bias, gen)
    config = GemmConfig(min(256, max(16, 1 << (m - 1).bit_length())), 64, 32, split_k=3)
    _check_pair(x, w1, w2t, b1, b2, idx, activation, config, config)


# Stream-K: (M, d, k, BLOCK_K, programs per SM); the interpreter counts 4 SMs. Cases cut one tile
# between up to 8 programs (d 512 at BLOCK_K 16: 32 steps, 4 per program), cut tiles unevenly
# across program boundaries (9 steps over 2 programs), leave whole tiles between cut ones, run a
# K tail in the tile's last piece (d 200, k 77), and span M tiles (M 300).
STREAM_CASES = [(5, 512, 40, 16, 2), (20, 96, 160, 32, 2), (1, 200, 77, 32, 1), (48, 200, 300, 16, 3),
                (300, 64, 50, 16, 1)]


@pytest.mark.parametrize("m,d,k,block_k,stream", STREAM_CASES)
@pytest.mark.parametrize("bias,activation", [(True, "relu"), (False, "identity")])
def test_pair_stream_k(m, d, k, block_k, stream, bias, activation):
    gen = torch.Generator().manual_seed(m + d + k + bias)
    x, w1, w2t, b1, b2, idx = _make(m, d, 320, k, torch.bfloat16, bias, gen)
    config = GemmConfig(min(256, max(16, 1 << (m - 1).bit_length())), 64, block_k, stream=stream)
    _check_pair(x, w1, w2t, b1, b2, idx, activation, config, config)
    # every launch leaves its arrival counters at 0 for the next one
    assert not arrivals.counters(x.device, 64).any()


def test_stream_plan_covers_every_step_once():
    """Programs take [p * per, (p + 1) * per) of the steps: all steps, none twice, none empty,
    and at least 4 steps each unless the whole launch has fewer."""
    for m, n_out, k_loop, block_k, stream, sms in [(32, 12288, 4096, 128, 2, 132), (1, 819, 4096, 128, 1, 132),
                                                   (64, 4096, 1000, 128, 2, 132), (300, 64, 64, 16, 1, 4)]:
        config = GemmConfig(min(256, max(16, 1 << (m - 1).bit_length())), 64, block_k, stream=stream)
        programs, per, total, tiles = stream_plan(m, n_out, k_loop, config, sms)
        assert total == tiles * (k_loop // block_k)
        assert programs <= stream * sms and (per >= 4 or programs == 1)
        assert (programs - 1) * per < total <= programs * per  # the last program has work


def test_more_rows_than_one_tile():
    """M = 300 > 256: a second M tile (which reads the weights again)."""
    gen = torch.Generator().manual_seed(300)
    x, w1, w2t, b1, b2, idx = _make(300, 64, 96, 40, torch.float16, True, gen)
    _check_pair(x, w1, w2t, b1, b2, idx)


def test_h_row_stride_and_a_contiguous_h():
    """gather_fc1 returns h with rows padded to 16 elements (a view when k is not a multiple of
    16); gather_fc2 takes that view and also any h whose rows are contiguous."""
    gen = torch.Generator().manual_seed(5)
    x, w1, w2t, b1, b2, idx = _make(3, 64, 96, 21, torch.float16, True, gen)
    h = gather_fc1(x, w1, idx, b1)
    assert h.shape == (3, 21) and h.stride() == (32, 1)
    torch.testing.assert_close(gather_fc2(h.contiguous(), w2t, idx, b2), gather_fc2(h, w2t, idx, b2),
                               rtol=0, atol=0)


def test_all_neurons_equals_dense():
    gen = torch.Generator().manual_seed(3)
    x, w1, w2t, b1, b2, _ = _make(8, 64, 96, 96, torch.float16, True, gen)
    idx = torch.arange(96, dtype=torch.int32, device=DEVICE)
    y = gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)
    dense32 = torch.relu(x.float() @ w1.float().T + b1.float()) @ w2t.float() + b2.float()
    dense16 = torch.relu(x @ w1.T + b1) @ w2t + b2
    assert_close_to_reference(y, dense32, dense16)


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    x, w1, w2t, b1, b2, idx = _make(4, 64, 96, 32, torch.float16, True, gen)
    with pytest.raises(ValueError, match="float32 is not supported"):
        gather_fc1(x.float(), w1.float(), idx, b1.float())
    with pytest.raises(ValueError, match="x has d=64 but w1"):
        gather_fc1(x, w1[:, :32].contiguous(), idx, b1)
    with pytest.raises(ValueError, match="selects 97 neurons but the weight has 96"):
        gather_fc1(x, w1, torch.arange(97, dtype=torch.int32, device=DEVICE), b1)
    with pytest.raises(ValueError, match="idx must be a 1-D int32"):
        gather_fc1(x, w1, idx.long(), b1)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        gather_fc1(x, w1, idx, b1, "gelu")
    h = gather_fc1(x, w1, idx, b1)
    with pytest.raises(ValueError, match="h has 16 columns but idx has 32"):
        gather_fc2(h[:, :16].contiguous(), w2t, idx, b2)
    with pytest.raises(ValueError, match="bias must be"):
        gather_fc2(h, w2t, idx, b1)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        gather_fc2(h, w2t.T.contiguous().T, idx, b2)
    with pytest.raises(ValueError, match="activation rows must be contiguous"):
        gather_fc2(h.T.contiguous().T, w2t, idx, b2)


# GPU: the same checks at OPT-6.7B's shape (d 4096, N 16384), selections of 10% and 50% that
# are not multiples of 16; bf16 at every M of M_K, fp16 at two.
GPU_CASES = [(m, k, torch.bfloat16) for (m, _), k in zip(M_K, [1637, 8191] * 4)] + \
    [(1, 1637, torch.float16), (130, 8191, torch.float16), (300, 1637, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,dtype", GPU_CASES)
def test_gpu_opt_shapes(m, k, dtype):
    gen = torch.Generator().manual_seed(m + k)
    _check_pair(*_make(m, 4096, 16384, k, dtype, True, gen))


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("m", [1, 130])
def test_gpu_forced_split_k(split_k, m):
    gen = torch.Generator().manual_seed(split_k * 10 + m)
    x, w1, w2t, b1, b2, idx = _make(m, 9216, 8192, 1013, torch.float16, True, gen)
    config1 = replace(tile_config(m, fc1=True), split_k=split_k)
    config2 = replace(tile_config(m, fc1=False), split_k=split_k)
    _check_pair(x, w1, w2t, b1, b2, idx, config1=config1, config2=config2)


@pytest.mark.gpu
@pytest.mark.parametrize("stream", [1, 2])
@pytest.mark.parametrize("m,k", [(1, 1637), (64, 8191), (130, 12000)])
def test_gpu_stream_k(stream, m, k):
    """Stream-K at OPT-6.7B's shape, eager and in a CUDA graph replayed three times (the arrival
    counters return to 0 after every launch, so every replay merges the same way)."""
    gen = torch.Generator().manual_seed(stream * 100 + m)
    x, w1, w2t, b1, b2, idx = _make(m, 4096, 16384, k, torch.bfloat16, True, gen)
    config1 = replace(tile_config(m, fc1=True), stream=stream)
    config2 = replace(tile_config(m, fc1=False), stream=stream)
    _, eager = _check_pair(x, w1, w2t, b1, b2, idx, config1=config1, config2=config2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gather_fc2(gather_fc1(x, w1, idx, b1, config=config1), w2t, idx, b2, config=config2)
    for _ in range(3):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("work", ["grid", "split2", "stream1"])
@pytest.mark.parametrize("m", [200, 256])
def test_gpu_every_tile_candidate(work, m):
    """Every tile the dispatch may time at M 129-256 (the table's and the alternates), with the
    last M tile part empty (200: rows past M masked) and full (256), against the reference."""
    gen = torch.Generator().manual_seed(m)
    x, w1, w2t, b1, b2, idx = _make(m, 4096, 16384, 4915, torch.bfloat16, True, gen)
    for config1, config2 in zip(tile_candidates(m, fc1=True), tile_candidates(m, fc1=False)):
        if work != "grid":
            config1, config2 = ((replace(c, split_k=2) if work == "split2" else replace(c, stream=1))
                                for c in (config1, config2))
        _check_pair(x, w1, w2t, b1, b2, idx, config1=config1, config2=config2)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """The pair never syncs with the host: it captures, and a replay gives the eager result."""
    gen = torch.Generator().manual_seed(12)
    x, w1, w2t, b1, b2, idx = _make(8, 4096, 16384, 1029, torch.float16, True, gen)
    eager = gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def test_tile_table_covers_m_and_fits_shared_memory():
    """Every M up to 256 gets one tile of >= M rows (weights read once), a power of two >= 16
    (tl.dot's smallest N); fc1's stages fit the 227 KiB a block may use on sm_90."""
    for m in range(1, 257):
        for fc1 in (True, False):
            c = tile_config(m, fc1)
            assert m <= c.block_m <= max(16, 2 * m) and c.block_m & (c.block_m - 1) == 0
            assert c.block_n % 64 == 0  # the wgmma M dimension: 64 rows per warpgroup
    for m in range(1, 257):
        for c in tile_candidates(m, fc1=True):
            assert (c.block_m + c.block_n) * c.block_k * 2 * c.num_stages <= 227 * 1024


def test_tile_candidates():
    """The dispatch times the table's tile first, then the alternates of M's range, all with the
    table's BLOCK_M (the weights still cross HBM once)."""
    for m in (1, 16, 64, 100, 128, 129, 200, 256, 300):
        for fc1 in (True, False):
            cands = tile_candidates(m, fc1)
            assert cands[0] == tile_config(m, fc1)
            assert {c.block_m for c in cands} == {cands[0].block_m}
            assert len(set(cands)) == len(cands) == (2 if m > 128 else 1)  # past 256: tiles of 256 rows


def test_split_model_opt66b():
    """The split cost model (132 SMs): a grid short of the SMs splits, a full one does not, and
    no split is shorter than 2 K tiles."""
    m, d, n = 64, 9216, 36864  # OPT-66B
    k = n // 10
    fc1 = gpu_config(m, k, d, 132, fc1=True)  # 58 tiles of 64 neurons
    fc2 = gpu_config(m, d, k, 132, fc1=False)  # 144 tiles of 64 columns
    assert fc1.split_k >= 2 and 58 * fc1.split_k >= 132
    assert fc2.split_k == 1
    assert gpu_config(256, n, d, 132, fc1=True).split_k == 1  # density 1: 576 tiles
    for kk in (17, 100, 1000):
        c = gpu_config(1, d, kk, 132, fc1=False)
        assert c.split_k == 1 or kk // c.split_k >= 2 * c.block_k


@pytest.mark.gpu
@pytest.mark.parametrize("work", ["grid", "split3", "stream2"])
@pytest.mark.parametrize("m,k", [(1, 1637), (64, 8191), (130, 12000)])
def test_gpu_pdl_changes_no_bit(work, m, k):
    """The pair launched with programmatic dependent launch (fc2 asks L2 for its first weight rows
    before waiting for fc1) gives the same bits as without, eager and in a replayed CUDA graph."""
    from kernels.mlp_dispatch import MlpPath, MlpPlan, gather_mlp
    from kernels.pdl import supported

    if not supported(torch.device(DEVICE)):
        pytest.skip("PDL needs compute capability >= 9 and a Triton that launches with it")
    gen = torch.Generator().manual_seed(m + k)
    x, w1, w2t, b1, _, idx = _make(m, 4096, 16384, k, torch.bfloat16, True, gen)
    configs = []
    for fc1 in (True, False):
        t = tile_config(m, fc1=fc1)
        configs.append(t if work == "grid" else replace(t, split_k=3) if work == "split3" else replace(t, stream=2))
    plan = MlpPlan(MlpPath.GATHER, *configs)
    plain = gather_mlp(x, w1, b1, w2t, idx, plan)
    assert torch.equal(gather_mlp(x, w1, b1, w2t, idx, plan, pdl=True), plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gather_mlp(x, w1, b1, w2t, idx, plan, pdl=True)
    for _ in range(3):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, plain)
