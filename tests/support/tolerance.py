"""The one tolerance rule of the numeric tests (CONVENTIONS lesson 9, flash-attention's rule):

    max|out - ref| <= 2 * max|torch_same_dtype - ref| + eps,   eps = ulps * finfo(dtype).eps * max|ref|

`ref` is the precise reference (float32 for a kernel, float64 for a model's logits),
`torch_same_dtype` the same reference computed in the output's dtype: ours may be at most twice
as far from `ref` as PyTorch itself is in that dtype.

Why eps: where the same-dtype reference happens to be exact (its error is 0), ours still rounds
its output independently of it, and the Triton interpreter's float32 -> bfloat16 cast truncates
where the GPU rounds to nearest (env.md section 2), so an output can be one unit in the last
place (ulp) away with nothing wrong. eps is therefore a few ulps of the output dtype at the
reference's magnitude: 1 for a kernel that rounds its output once (the default); more only
where a test says why.

Tensors or lists of tensors (e.g. per-sequence logits of different lengths) are accepted
alike; a list is reduced over all its elements, pairing lists element by element.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]

# Whole-model logits on CUDA (tests/test_gpu.py, test_multi_gpu.py): there the decode runs
# through the Triton kernels, which round each layer's outputs where transformers' eager path
# rounds differently, and the differences add up over the layers. Those checks were written with
# 4 ulps and keep them until they are measured on a GPU; on CPU the logits checks pass with 1.
CUDA_MODEL_ULPS = 4


def _as_list(x: Tensors) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def max_abs_diff(a: Tensors, b: Tensors) -> float:
    """max|a - b| over every element (and every pair of a list), in float64."""
    a, b = _as_list(a), _as_list(b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} tensors compared with {len(b)}")
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def ulp(dtype: torch.dtype, ref: Tensors) -> float:
    """One unit in the last place of `dtype` at the magnitude of `ref`: finfo(dtype).eps * max|ref|."""
    return torch.finfo(dtype).eps * max(r.abs().max().item() for r in _as_list(ref))


def tolerance(ref: Tensors, ref_same_dtype: Tensors, dtype: torch.dtype, *, ulps: float = 1) -> float:
    """2 * max|ref_same_dtype - ref| + ulps * ulp(dtype, ref): the largest max|out - ref| allowed."""
    return 2 * max_abs_diff(ref_same_dtype, ref) + ulps * ulp(dtype, ref)


def assert_close_to_reference(out: Tensors, ref: Tensors, ref_same_dtype: Tensors, *,
                              dtype: torch.dtype | None = None, ulps: float = 1, what: str = "") -> None:
    """Assert max|out - ref| <= tolerance(ref, ref_same_dtype, dtype, ulps=ulps).

    dtype: the dtype `out` was computed in; taken from `out` when it is one tensor, and needed
    when `out` is a list or was converted to float64 for the comparison.
    what: names the case in the failure message.
    """
    if dtype is None:
        if not isinstance(out, torch.Tensor) or out.dtype == torch.float64:
            raise ValueError("pass dtype= (the dtype out was computed in) for a list or a float64 out")
        dtype = out.dtype
    err = max_abs_diff(out, ref)
    torch_err = max_abs_diff(ref_same_dtype, ref)
    eps = ulps * ulp(dtype, ref)
    assert err <= 2 * torch_err + eps, (
        f"{what + ': ' if what else ''}max|out - ref| = {err:.3e} > 2 * {torch_err:.3e} (torch in {dtype}) "
        f"+ {eps:.3e} ({ulps} ulp)")
