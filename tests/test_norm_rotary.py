"""RMSNorm and LayerNorm (with fused residual add), SwiGLU's silu * up and the rotary + KV-store kernel against float32
references, by the rule of support/tolerance.py with one ulp of slack (each kernel rounds its
output once); what the store writes is checked bit for bit against what the kernel returned.
"""

from __future__ import annotations

import pytest
import torch

from kernels.norms import (add_layer_norm, add_layer_norm_ref, add_rms_norm, add_rms_norm_ref, layer_norm,
                           layer_norm_ref, rms_norm, rms_norm_ref)
from kernels.rotary import rotary_store_kv, rotary_store_kv_ref
from kernels.silu_mul import silu_mul, silu_mul_ref
from support.tolerance import assert_close_to_reference, ulp

DTYPES = [torch.float16, torch.bfloat16]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 64), (5, 576), (3, 1000)])
def test_rms_norm(dtype: torch.dtype, rows: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(device(), dtype)
    res = torch.randn(rows, dim, generator=gen).to(device(), dtype)
    w = (1 + 0.2 * torch.randn(dim, generator=gen)).to(device(), dtype)
    assert_close_to_reference(rms_norm(x, w, 1e-5), rms_norm_ref(x.float(), w.float(), 1e-5),
                              rms_norm_ref(x, w, 1e-5))
    out, h = add_rms_norm(x, res, w, 1e-5)
    same_out, same_h = add_rms_norm_ref(x, res, w, 1e-5)
    # The sum is rounded once, like x + res: bit-exact on a GPU; the interpreter truncates its
    # float32 -> 16-bit casts instead of rounding (env.md section 2), so there one ulp is allowed.
    torch.testing.assert_close(h, same_h, rtol=0, atol=0.0 if h.is_cuda else ulp(dtype, same_h))
    ref_out, _ = add_rms_norm_ref(h.float(), torch.zeros_like(h, dtype=torch.float32), w.float(), 1e-5)
    assert_close_to_reference(out, ref_out, same_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 64), (5, 768), (3, 1000)])
def test_layer_norm(dtype: torch.dtype, rows: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(rows * dim + 1)
    # rows far from zero mean: the variance must come from the centred values
    x = (torch.randn(rows, dim, generator=gen) * 3 + 20).to(device(), dtype)
    res = torch.randn(rows, dim, generator=gen).to(device(), dtype)
    w = (1 + 0.2 * torch.randn(dim, generator=gen)).to(device(), dtype)
    b = (0.5 * torch.randn(dim, generator=gen)).to(device(), dtype)
    assert_close_to_reference(layer_norm(x, w, b, 1e-5), layer_norm_ref(x.float(), w.float(), b.float(), 1e-5),
                              layer_norm_ref(x, w, b, 1e-5))
    out, h = add_layer_norm(x, res, w, b, 1e-5)
    same_out, same_h = add_layer_norm_ref(x, res, w, b, 1e-5)
    # the sum rounds once, like x + res (the interpreter truncates: one ulp there, as above)
    torch.testing.assert_close(h, same_h, rtol=0, atol=0.0 if h.is_cuda else ulp(dtype, same_h))
    assert_close_to_reference(out, layer_norm_ref(h.float(), w.float(), b.float(), 1e-5), same_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inner", [(1, 64), (5, 1000), (3, 2816)])
def test_silu_mul(dtype: torch.dtype, rows: int, inner: int) -> None:
    gen = torch.Generator().manual_seed(rows * inner)
    gate_up = (torch.randn(rows, 2 * inner, generator=gen) * 3).to(device(), dtype)
    assert_close_to_reference(silu_mul(gate_up), silu_mul_ref(gate_up.float()), silu_mul_ref(gate_up))


def _tables(head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(float(positions)), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    return angles.cos().to(device()), angles.sin().to(device())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 1, 1, 64), (7, 6, 2, 64), (4, 9, 3, 128),
                                                               (3, 4, 4, 80)])
def test_rotary_store_kv(dtype: torch.dtype, rotate: bool, tokens: int, heads: int, kv_heads: int,
                         head_dim: int) -> None:
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    # q, k, v sliced out of a fused QKV row, as the model passes them: strided views
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device(), dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                  kv_heads * head_dim], dim=-1))
    blocks, block_size = 5, 4
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].to(device())  # distinct, any block
    k_cache = torch.randn(blocks, kv_heads, block_size, head_dim, generator=gen).to(device(), dtype)
    v_cache = torch.randn(blocks, kv_heads, block_size, head_dim, generator=gen).to(device(), dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    cos, sin = _tables(head_dim, 50)
    pos = torch.randint(0, 50, (tokens,), generator=gen).to(device())
    rot = (cos, sin, pos) if rotate else (None, None, None)
    q_out, k_out = rotary_store_kv(q, k, v, slots, k_cache, v_cache, *rot)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    ref_rot = (cos, sin, pos) if rotate else (None, None, None)
    ref_caches = [torch.zeros(blocks, kv_heads, block_size, head_dim, device=device()) for _ in range(2)]
    ref_q, ref_k = rotary_store_kv_ref(q.float(), k.float(), v.float(), slots, *ref_caches, *ref_rot)
    same_caches = [torch.zeros_like(k_cache) for _ in range(2)]
    same_q, same_k = rotary_store_kv_ref(q, k, v, slots, *same_caches, *ref_rot)
    assert_close_to_reference([q_out, k_out], [ref_q, ref_k], [same_q, same_k], dtype=dtype)
    # The cache holds exactly the returned k and the given v at each slot, and nothing else moved.
    expect_k, expect_v = before_k.clone(), before_v.clone()
    rows, offsets = slots // block_size, slots % block_size
    expect_k[rows, :, offsets] = k_out
    expect_v[rows, :, offsets] = v
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


def test_bad_inputs_name_the_problem() -> None:
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="not supported by the kernel"):
        rms_norm(x.float(), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="bias must be"):
        layer_norm(x, torch.ones(64, dtype=torch.float16), torch.ones(63, dtype=torch.float16), 1e-5)
    q = torch.randn(2, 1, 64, dtype=torch.float16)
    cache = torch.zeros(3, 1, 4, 64, dtype=torch.float16)
    slots = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"gate_up must be \[T, 2I\]"):
        silu_mul(torch.randn(2, 63, dtype=torch.float16))
    with pytest.raises(ValueError, match="head dim 63 must be even"):
        odd = torch.randn(2, 1, 63, dtype=torch.float16)
        rotary_store_kv(odd, odd, odd, slots, cache[..., :63], cache[..., :63])
    with pytest.raises(ValueError, match="k_cache must be"):
        rotary_store_kv(q, q, q, slots, cache.float(), cache.float())
    with pytest.raises(ValueError, match="cos, sin and positions, or none"):
        rotary_store_kv(q, q, q, slots, cache, cache, torch.ones(4, 32), torch.ones(4, 32))
