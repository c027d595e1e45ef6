"""Gather-GEMM MLP pair: Triton kernels (interpreter on CPU) vs an fp32 reference, by the rule
of support/tolerance.py with one ulp of slack (each kernel rounds its output once).
"""

from __future__ import annotations

import pytest
import torch

from kernels.gather_gemm import GemmConfig, gather_fc1, gather_fc1_ref, gather_fc2, gather_fc2_ref
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 130])  # below one tile, a ragged tile, more than one 128-row tile
@pytest.mark.parametrize("bias,activation", [(True, "relu"), (False, "identity")])
@pytest.mark.parametrize("split_k", [1, 3])  # split 3 of BLOCK_K 32: slices of d 96/96/8, of k 32/32/16
def test_pair_matches_reference(dtype, m, bias, activation, split_k):
    gen = torch.Generator().manual_seed(m * 7 + bias + 100 * split_k)
    # d = 200 is not a multiple of the K tile: the K tail must be masked; k = 80 < N = 300.
    x, w1, w2t, b1, b2, idx = _make(m, 200, 300, 80, dtype, bias, gen)
    config = None if split_k == 1 else GemmConfig(min(128, max(16, 1 << (m - 1).bit_length())), 64, 32, split_k=3)
    h = gather_fc1(x, w1, idx, b1, activation, config=config)
    assert_close_to_reference(h, gather_fc1_ref(*_fp32(x, w1, idx, b1), activation),
                              gather_fc1_ref(x, w1, idx, b1, activation))
    if activation == "relu":
        assert (h >= 0).all()
    y = gather_fc2(h, w2t, idx, b2, config=config)
    assert_close_to_reference(y, gather_fc2_ref(*_fp32(h, w2t, idx, b2)), gather_fc2_ref(h, w2t, idx, b2))


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
    with pytest.raises(ValueError, match="multiple of 16"):
        gather_fc1(x, w1, idx[:20], b1)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 64, 256, 512])
@pytest.mark.parametrize("frac", [0.05, 0.5, 1.0])
def test_gpu_opt_shapes(dtype, m, frac):
    gen = torch.Generator().manual_seed(m)
    d, n = 4096, 16384  # OPT-6.7B
    k = int(n * frac) // 16 * 16
    x, w1, w2t, b1, b2, idx = _make(m, d, n, k, dtype, True, gen)
    h = gather_fc1(x, w1, idx, b1)
    assert_close_to_reference(h, gather_fc1_ref(*_fp32(x, w1, idx, b1)), gather_fc1_ref(x, w1, idx, b1))
    y = gather_fc2(h, w2t, idx, b2)
    assert_close_to_reference(y, gather_fc2_ref(*_fp32(h, w2t, idx, b2)), gather_fc2_ref(h, w2t, idx, b2))


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_forced_split_k(split_k, m):
    gen = torch.Generator().manual_seed(split_k * 10 + m)
    x, w1, w2t, b1, b2, idx = _make(m, 9216, 8192, 1024, torch.float16, True, gen)
    cfg = GemmConfig(64, 64, 128, split_k=split_k)
    h = gather_fc1(x, w1, idx, b1, config=cfg)
    assert_close_to_reference(h, gather_fc1_ref(*_fp32(x, w1, idx, b1)), gather_fc1_ref(x, w1, idx, b1))
    y = gather_fc2(h, w2t, idx, b2, config=cfg)
    assert_close_to_reference(y, gather_fc2_ref(*_fp32(h, w2t, idx, b2)), gather_fc2_ref(h, w2t, idx, b2))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """The pair never syncs with the host: it captures, and a replay gives the eager result."""
    gen = torch.Generator().manual_seed(12)
    x, w1, w2t, b1, b2, idx = _make(8, 4096, 16384, 1024, torch.float16, True, gen)
    eager = gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gather_fc2(gather_fc1(x, w1, idx, b1), w2t, idx, b2)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def test_split_heuristic_opt66b():
    """Split counts the v3 rule gives on an H100 (132 SMs), from run 3's sweep (KERNELS_NOTES.md)."""
    from kernels.gather_gemm import _gpu_config, _split_plan

    m, d, k = 64, 9216, 3680  # OPT-66B, 10% of 36864 neurons
    fc1 = _gpu_config(m, k, d, 132, programs_per_sm=1)
    fc2 = _gpu_config(m, d, k, 132)
    assert _split_plan(fc1, d)[0] == 2  # 58 tiles -> 116 programs (5 splits, 290, were slower)
    assert _split_plan(fc2, k)[0] == 2  # 144 tiles -> 288 programs
    assert _gpu_config(64, 16384, 4096, 132, programs_per_sm=1).split_k == 1  # 256 tiles: no split
