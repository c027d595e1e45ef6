"""The one entry point the runtime calls for its kernels: `KernelOps`, bound to one backend.

The backend is chosen once, when a model is built (`choose_backend`), and every layer that
calls a kernel is handed the same `KernelOps`:
- `Backend.TRITON`: the Triton kernels (fp16/bf16 on CUDA; on CPU only under TRITON_INTERPRET=1,
  which the tests use to run the kernels in the interpreter);
- `Backend.TORCH`: each op's pure-PyTorch `_ref` (any device and dtype; what float32 models
  and CPU runs use).
With `pdl` (chosen by `choose_pdl`), the decode step's small Triton kernels (norms, head
selection, rotary, attention, SiLU x up, the sparse MLP's gather pair) launch with programmatic dependent launch
(kernels/pdl.py): each may be scheduled while the kernel before it is finishing.
The dense linears go through `linear` (with `blas_choice`: cuBLAS or cuBLASLt per shape, measured
on the device at first use; kernels/blas_choice.py). The MLP of a neuron-sparse layer goes
through `sparse_mlp`, which also chooses between the gather-GEMM pair and dense cuBLAS
(kernels/mlp_dispatch.py: measured on the device at first use, fixed before any CUDA-graph
capture).
The op modules are imported only when first called, so importing `kernels` never imports
triton (the op modules import it at the top, for @triton.jit, and also hold the references).
This package imports nothing from polar_dist: the caller passes the choice in.
"""

from __future__ import annotations

import importlib
import os
from enum import Enum
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported for annotations only: the op modules load on first call
    from kernels.attention_plan import AttentionPlan
    from kernels.blas_choice import BlasChoice
    from kernels.mlp_dispatch import MlpDispatch, MlpPlan

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


class Backend(Enum):
    TRITON = "triton"
    TORCH = "torch"


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """`requested` is "auto" (Triton for fp16/bf16 on CUDA, the torch references otherwise),
    "triton" or "torch"."""
    if requested == "auto":
        return Backend.TRITON if device.type == "cuda" and dtype in KERNEL_DTYPES else Backend.TORCH
    backend = Backend(requested)
    if backend is Backend.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton kernel backend on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
                         "before the process starts, or choose the auto backend")
    return backend


def choose_pdl(requested: bool, backend: Backend, device: torch.device) -> bool:
    """Programmatic dependent launch where asked and possible: the Triton backend on a GPU and
    Triton that support it (compute capability >= 9); off otherwise, with no error (it changes no
    result, only the gaps between kernels)."""
    return requested and backend is Backend.TRITON and _module("pdl").supported(device)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"kernels.{name}")


class KernelOps:
    """The kernels of one backend; the models call these and nothing below them."""

    def __init__(self, backend: Backend, pdl: bool = False, blas_choice: bool = False) -> None:
        self.backend = backend
        self._triton = backend is Backend.TRITON
        if pdl and not self._triton:
            raise ValueError("programmatic dependent launch is a launch option of the Triton kernels; the torch "
                             "backend has none (choose it with choose_pdl)")
        self.pdl = pdl
        self._launch = {"pdl": True} if pdl else {}  # extra keywords of the Triton launches that take it
        self._mlp_dispatch: MlpDispatch | None = None  # the measured MLP plans; made on first use
        # the dense linears' BLAS library per shape (kernels/blas_choice.py), with the Triton backend
        self.blas_choice: BlasChoice | None = _module("blas_choice").BlasChoice() if blas_choice and self._triton \
            else None

    def __repr__(self) -> str:
        extras = (", pdl" if self.pdl else "") + (", blas choice" if self.blas_choice else "")
        return f"KernelOps({self.backend.value}{extras})"

    def linear(
        self,
        x: torch.Tensor,  # [..., in_features]
        weight: torch.Tensor,  # [out_features, in_features]
        bias: torch.Tensor | None = None,  # [out_features]
    ) -> torch.Tensor:  # [..., out_features]
        """F.linear; with blas_choice, on a GPU through cuBLAS or cuBLASLt, whichever the device
        measured faster for the shape and row count (kernels/blas_choice.py)."""
        if self.blas_choice is None:
            return torch.nn.functional.linear(x, weight, bias)
        return self.blas_choice.linear(x, weight, bias)

    def _pick(self, module: str, op: str):  # noqa: ANN202 - the op's function
        mod = _module(module)
        return getattr(mod, op if self._triton else f"{op}_ref")

    def select_attention(
        self,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
        v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        seq_lens: torch.Tensor,  # [B] int32
        head_table: torch.Tensor,  # [B, k_max] int32, -1 = none
        scale: float,
        out: torch.Tensor | None = None,  # [B, Hq, D]
        plan: AttentionPlan | None = None,  # the step's work plan (kernels/attention_plan.py)
    ) -> torch.Tensor:  # [B, Hq, D]; heads of unselected KV groups are exactly 0
        """Head-selective paged decode attention; see kernels/select_attention.py."""
        fn = self._pick("select_attention", "select_attention")
        return fn(q, k_cache, v_cache, block_tables, seq_lens, head_table, scale, out, plan, **self._launch)

    def gather_fc1(
        self,
        x: torch.Tensor,  # [M, d]
        w1: torch.Tensor,  # [N, d]
        idx: torch.Tensor,  # [k] int32
        b1: torch.Tensor | None,  # [N]
        activation: str = "relu",
    ) -> torch.Tensor:  # [M, k]
        """h = act(x @ w1[idx].T + b1[idx]); see kernels/gather_gemm.py."""
        return self._pick("gather_gemm", "gather_fc1")(x, w1, idx, b1, activation)

    def gather_fc2(
        self,
        h: torch.Tensor,  # [M, k]
        w2t: torch.Tensor,  # [N, d]
        idx: torch.Tensor,  # [k] int32
        b2: torch.Tensor | None,  # [d]
    ) -> torch.Tensor:  # [M, d]
        """y = h @ w2t[idx] + b2; see kernels/gather_gemm.py."""
        return self._pick("gather_gemm", "gather_fc2")(h, w2t, idx, b2)

    def sparse_mlp(
        self,
        x: torch.Tensor,  # [M, d]
        w1: torch.Tensor,  # [N, d]
        b1: torch.Tensor | None,  # [N]
        w2t: torch.Tensor,  # [N, d]
        idx: torch.Tensor,  # [k] int32, distinct neuron ids
    ) -> torch.Tensor:  # [M, d], without the fc2 bias
        """y = relu(x @ w1[idx].T + b1[idx]) @ w2t[idx], by the gather-GEMM pair or dense cuBLAS on
        masked weights, whichever the device measured faster for this (shape, M bucket, k); at
        k = N always dense. The torch backend runs the references (dense at k = N); see
        kernels/mlp_dispatch.py."""
        mlp_dispatch = _module("mlp_dispatch")
        plan = self.mlp_plan(x, w1, b1, w2t, idx.shape[0])
        if not self._triton and plan.path is mlp_dispatch.MlpPath.GATHER:
            gather_gemm = _module("gather_gemm")
            return gather_gemm.gather_fc2_ref(gather_gemm.gather_fc1_ref(x, w1, idx, b1), w2t, idx, None)
        return mlp_dispatch.run_plan(plan, x, w1, b1, w2t, idx, **self._launch)

    def mlp_plan(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor,
                 k: int) -> MlpPlan:
        """The plan sparse_mlp runs for M = x.shape[0] rows and k of w1's N neurons: DENSE at k = N;
        else on CUDA the measured plan (timed on the first call of its key), elsewhere GATHER."""
        mlp_dispatch = _module("mlp_dispatch")
        if not self._triton:
            path = mlp_dispatch.MlpPath.DENSE if k >= w1.shape[0] else mlp_dispatch.MlpPath.GATHER
            return mlp_dispatch.MlpPlan(path)
        if self._mlp_dispatch is None:
            self._mlp_dispatch = mlp_dispatch.MlpDispatch()
        return self._mlp_dispatch.plan(x, w1, b1, w2t, k)

    def route_heads(
        self,
        x: torch.Tensor,  # [B, d]
        weight: torch.Tensor,  # [G, d]
        bias: torch.Tensor,  # [G]
        k: int,
        group_start: int,
        num_groups_local: int,
        local_scope: bool = False,
    ) -> torch.Tensor:  # [B, G_local] (global scope) or [B, k] (local scope) int32
        """Head router + per-sequence top-k + this rank's head table; see kernels/route_heads.py."""
        fn = self._pick("route_heads", "route_heads")
        return fn(x, weight, bias, k, group_start, num_groups_local, local_scope, **self._launch)

    def select_groups(
        self,
        scores: torch.Tensor,  # [B, G] x @ router weight^T
        bias: torch.Tensor,  # [G]
        k: int,
        group_start: int,
        num_groups_local: int,
        local_scope: bool = False,
    ) -> torch.Tensor:  # [B, G_local] (global scope) or [B, k] (local scope) int32
        """route_heads from router scores computed elsewhere (the QKV GEMM's extra columns)."""
        fn = self._pick("route_heads", "select_groups")
        return fn(scores, bias, k, group_start, num_groups_local, local_scope, **self._launch)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [T, d] -> [T, d]
        """weight * x / rms(x); see kernels/norms.py."""
        return self._pick("norms", "rms_norm")(x, weight, eps, **self._launch)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # [T, d] x 2 -> ([T, d], [T, d])
        """(rms_norm(x + residual), x + residual); see kernels/norms.py."""
        return self._pick("norms", "add_rms_norm")(x, residual, weight, eps, **self._launch)

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:  # [T, d] -> [T, d]
        """weight * (x - mean) / std + bias; see kernels/norms.py."""
        return self._pick("norms", "layer_norm")(x, weight, bias, eps, **self._launch)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # [T, d] x 2 -> ([T, d], [T, d])
        """(layer_norm(x + residual), x + residual); see kernels/norms.py."""
        return self._pick("norms", "add_layer_norm")(x, residual, weight, bias, eps, **self._launch)

    def sample_tokens(
        self,
        logits: torch.Tensor,  # [R, V] float32
        temperature: torch.Tensor,  # [R] float32, 0 = greedy
        top_k: torch.Tensor,  # [R] int32, 0 = off
        top_p: torch.Tensor,  # [R] float32
        min_p: torch.Tensor,  # [R] float32, 0 = off
        seeds: torch.Tensor,  # [R] int64
        counters: torch.Tensor,  # [R] int64
        **hints: bool,  # any_hot / any_top_k / any_top_p: launches the Triton draw may skip
    ) -> torch.Tensor:  # [R] int64, -1 for a row without a finite logit
        """Filtered, seeded Gumbel-max draw per row; see kernels/sample_tokens.py."""
        fn = self._pick("sample_tokens", "sample_tokens")
        if not self._triton:
            return fn(logits, temperature, top_k, top_p, min_p, seeds, counters)
        return fn(logits, temperature, top_k, top_p, min_p, seeds, counters, **hints)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        """silu(gate) * up of the fused gate/up projection's output; see kernels/silu_mul.py."""
        return self._pick("silu_mul", "silu_mul")(gate_up, **self._launch)

    def rotary_store_kv(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        slots: torch.Tensor,  # [T] int: cache slot (block * block_size + offset) of each token
        k_cache: torch.Tensor,  # (num_blocks, Hkv, block_size, D), written in place
        v_cache: torch.Tensor,
        cos: torch.Tensor | None = None,  # [P, D/2] float32; None: no rotation (learned positions)
        sin: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,  # [T] int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # q, k rotated: [T, Hq, D], [T, Hkv, D] contiguous
        """Rotary embedding of q and k (half-split layout) and the store of k, v into the paged
        cache, in one launch; see kernels/rotary.py."""
        return self._pick("rotary", "rotary_store_kv")(q, k, v, slots, k_cache, v_cache, cos, sin, positions,
                                                       **self._launch)
