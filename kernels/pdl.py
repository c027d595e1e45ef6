"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A decode step is a chain of small kernels (per layer: norm, QKV GEMM, head selection, rotary,
attention, out-projection, norm, gate/up GEMM, SiLU x up, down GEMM), each a node of the step's
CUDA graph. Without PDL a kernel's programs are scheduled only once the kernel before it has
finished and its writes are flushed. Launched with
PDL, a kernel may be scheduled as soon as the kernel before it allows it
(griddepcontrol.launch_dependents, or its end), and each of its programs waits
(griddepcontrol.wait) until that kernel has finished and its writes are visible.

Every program of a PDL kernel waits first, before any store and before any load of what the
kernel just before it may write, and only then lets its own successor launch. So nothing is
written early, and a kernel's end still implies its predecessor's end: the order of the step is
exactly that of launches without PDL, through kernels launched without it (cuBLAS) too. What it
removes is the launch and scheduling latency between a kernel and the one after it: 0.7-1.4% of a
Llama-2-7B decode step on an H200 (benchmarks/KERNELS_NOTES.md, runs 34-35). The one kernel that
loads before its wait is the sparse MLP's fc2: idx and its first weight rows (an L2 prefetch),
which fc1 does not write (kernels/gather_gemm_kernels.py).

    pdl = kernels.pdl.supported(device)  # the runtime passes it on through KernelOps
    _kernel[grid](..., PDL=pdl, **launch_options(pdl))  # and `wait_then_release(PDL)` first in the kernel
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4 on NVIDIA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: supported() says no, the branch below never compiles
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """Whether kernels launched on `device` can use PDL: a CUDA GPU of compute capability >= 9
    and a Triton that launches with it (never under the interpreter, which has no inline PTX)."""
    if device.type != "cuda" or gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return has_option and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords: the PDL launch attribute, only when asked (the interpreter's
    launcher does not know the option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """First in a PDL kernel's programs: wait for the previous kernel, then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
