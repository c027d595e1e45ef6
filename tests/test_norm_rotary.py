"""RMSNorm (with fused residual add) and rotary kernels against float32 references, by the
rule of support/tolerance.py with one ulp of slack (each kernel rounds its output once).
"""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rotary import rotary, rotary_ref
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
@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 1, 64), (7, 3, 64), (4, 9, 128)])
def test_rotary_on_strided_view(dtype: torch.dtype, tokens: int, heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(tokens * heads)
    # q sliced out of a fused QKV row, as the model passes it: a strided view
    qkv = torch.randn(tokens, (heads + 2) * head_dim, generator=gen).to(device(), dtype)
    x = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    angles = torch.outer(torch.arange(50.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = angles.cos().to(device()), angles.sin().to(device())
    pos = torch.randint(0, 50, (tokens,), generator=gen).to(device())
    out = rotary(x, cos, sin, pos)
    assert out.is_contiguous()
    assert_close_to_reference(out, rotary_ref(x.float(), cos, sin, pos), rotary_ref(x, cos, sin, pos))


def test_bad_inputs_name_the_problem() -> None:
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(32, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="not supported by the kernel"):
        rms_norm(x.float(), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="head dim 96"):
        rotary(torch.randn(2, 1, 96, dtype=torch.float16), torch.ones(4, 48), torch.ones(4, 48),
               torch.zeros(2, dtype=torch.int64))
