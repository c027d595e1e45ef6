"""Gather-GEMM pair for batch-union MLP neuron sparsity (ReLU models, e.g. OPT).

    h = gather_fc1(x, w1, idx, b1)   # [M, k] = relu(x @ w1[idx].T + b1[idx])
    y = gather_fc2(h, w2t, idx, b2)  # [M, d] = h @ w2t[idx] + b2

Only the k selected neurons' weights are read. Both weights are indexed by row, and each
selected row (w1[n, :] and w2t[n, :], w2t = fc2.weight.T made contiguous once at load) is
contiguous, so a gathered tile is still read in long coalesced segments. The row gather
happens in-kernel: no torch gather, no scatter, and the compact h [M, k] needs none either,
since fc2 indexes w2t with the same idx. Block sizes come from a heuristic keyed on M, k and
d (static shapes), so a call never syncs with the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_ACTIVATIONS = ("relu", "identity")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4  # cp.async depth: the weight stream needs several tiles in flight
    split_k: int = 1  # > 1: fp32 partials over K slices + an epilogue kernel (more programs)


@triton.jit
def _gather_fc1_kernel(
    x_ptr, w1_ptr, idx_ptr, b1_ptr, h_ptr, ws_ptr,
    M, K_SEL, D_IN, split_len,
    stride_xm, stride_w1n, stride_hm,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # selected-neuron tile (many): axis 0 has no 65535 limit
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)  # slice [pid_k * split_len, +split_len) of d
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # slots in idx
    k_lo = pid_k * split_len
    k_hi = tl.minimum(k_lo + split_len, D_IN)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < K_SEL
    neuron = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N] rows of w1
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w1_ptr + neuron[:, None] * stride_w1n + offs_k[None, :]  # [BLOCK_N, BLOCK_K] gathered
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = (k0 - k_lo + offs_k) < k_hi
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 on raw bit patterns (env.md section 2)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # fp32 partial [pid_k, M, K_SEL]; _split_k_epilogue_kernel adds bias and activation
        ws_ptrs = ws_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * K_SEL + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b1_ptr + neuron, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gather_fc2_kernel(
    h_ptr, w2t_ptr, idx_ptr, b2_ptr, y_ptr, ws_ptr,
    M, K_SEL, D_OUT, split_len,
    stride_hm, stride_w2n, stride_ym,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # output-column tile
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)  # slice [pid_k * split_len, +split_len) of the selected neurons
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    offs_k = tl.arange(0, BLOCK_K)  # slots in idx
    m_mask = offs_m < M
    n_mask = offs_n < D_OUT
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
    k_lo = pid_k * split_len
    k_hi = tl.minimum(k_lo + split_len, K_SEL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        slots = k0 + offs_k
        k_mask = slots < k_hi
        neuron = tl.load(idx_ptr + slots, mask=k_mask, other=0).to(tl.int64)  # [BLOCK_K] rows of w2t
        h = tl.load(h_rows + slots[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w2t_ptr + neuron[:, None] * stride_w2n + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N] gathered
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # fp32 partial [pid_k, M, D_OUT]; _split_k_epilogue_kernel adds the bias
        ws_ptrs = ws_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * D_OUT + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_epilogue_kernel(
    ws_ptr, idx_ptr, bias_ptr, out_ptr,
    M, N_OUT, num_splits,
    stride_om,
    HAS_BIAS: tl.constexpr, BIAS_BY_IDX: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = act(sum over splits of ws[s] + bias); ws [num_splits, M, N_OUT] fp32."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N_OUT
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N_OUT + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(ws_ptrs + s * M * N_OUT, mask=mask, other=0.0)
    if HAS_BIAS:
        if BIAS_BY_IDX:  # fc1: the bias of each selected neuron
            cols = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            cols = offs_n.to(tl.int64)
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_m(m: int) -> int:
    # tl.dot needs >= 16 rows; past 64 rows a 128-row tile halves the weight re-reads.
    return min(128, max(16, triton.next_power_of_2(m)))


def _gpu_config(m: int, n_out: int, k_loop: int, num_sms: int, programs_per_sm: int = 2) -> GemmConfig:
    """Weight-streaming config for an [m, n_out] output summed over k_loop.

    When the output has too few tiles, split K into s slices (one program each, fp32 partials
    summed by an epilogue kernel). How many programs per SM reach HBM bandwidth is measured,
    not modelled (H100, OPT shapes; benchmarks/KERNELS_NOTES.md, "Rules in the code"):
    * fc2 (w2t row gather, 128 B segments), programs_per_sm=2: split until the grid reaches 2
      programs per SM, overshooting if need be (1 per SM is ~20% slower);
    * fc1 (w1 rows, 256 B segments), programs_per_sm=1: split only while the grid stays within
      1 program per SM (past it, the extra partials cost more than the programs gain).
    The fp32 partials cost 8 * s * m * n_out bytes against 2 * n_out * k_loop bytes of weights,
    so s is capped to keep that ratio (4 s m / k_loop) under 15%, and every split keeps >= 4 K
    tiles.
    """
    block_m = _block_m(m)
    if block_m >= 128:  # m > 64: enough FLOPs per byte that wider tiles and 8 warps pay
        block_n, block_k, warps, stages = 128, 64, 8, 3
    else:  # 64-wide rows: 128 B segments of w2t rows; (BM + BN) x BK x 2 B x 4 stages <= 128 KiB
        block_n, block_k, warps, stages = 64, 128, 4, 4
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n_out, block_n)
    split = 1
    target = programs_per_sm * num_sms
    while ((tiles * split < target if programs_per_sm > 1 else tiles * (split + 1) <= target) and split < 8 and 4 * (split + 1) * m <= 0.15 * k_loop
           and k_loop // (split + 1) >= 4 * block_k):
        split += 1
    return GemmConfig(block_m, block_n, block_k, num_warps=warps, num_stages=stages, split_k=split)


def _interpreter_config(m: int) -> GemmConfig:
    # The interpreter costs about one numpy pass per program and tile: use big tiles.
    return GemmConfig(_block_m(m), 64, 128, num_warps=4, num_stages=1)


def _split_plan(config: GemmConfig, k_loop: int) -> tuple[int, int]:
    """(splits, split_len): K slices that are whole multiples of BLOCK_K, none empty."""
    split_len = triton.cdiv(triton.cdiv(k_loop, config.split_k), config.block_k) * config.block_k
    return max(1, triton.cdiv(k_loop, split_len)), split_len


def _launch(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            k_loop: int, config: GemmConfig | None, fc1: bool, relu: bool = False) -> None:
    """Launch fc1 or fc2 into out [m, n_out], summing over k_loop (fc1: d; fc2: the k selected
    neurons), and the split-K epilogue when the config splits K. Both kernels take the same
    arguments; fc1 also takes its activation, and its bias is indexed by neuron."""
    m, n_out = out.shape
    interpret = a.device.type != "cuda"
    if config is None:
        config = (_interpreter_config(m) if interpret
                  else _gpu_config(m, n_out, k_loop, _num_sms(a.device), programs_per_sm=1 if fc1 else 2))
    splits, split_len = _split_plan(config, k_loop)
    ws = torch.empty(splits, m, n_out, device=a.device, dtype=torch.float32) if splits > 1 else out
    kernel = _gather_fc1_kernel if fc1 else _gather_fc2_kernel
    kernel[(triton.cdiv(n_out, config.block_n), triton.cdiv(m, config.block_m), splits)](
        a, w, idx, a if bias is None else bias, out, ws,
        m, idx.shape[0], w.shape[1], split_len,  # M, K_SEL, d (D_IN of fc1, D_OUT of fc2)
        a.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, UPCAST=interpret, SPLIT=splits > 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"RELU": relu} if fc1 else {}),
    )
    if splits > 1:
        _split_k_epilogue_kernel[(triton.cdiv(n_out, 128), triton.cdiv(m, 16))](
            ws, idx, out if bias is None else bias, out,
            m, n_out, splits, out.stride(0),
            HAS_BIAS=bias is not None, BIAS_BY_IDX=fc1, RELU=relu,  # fc1's columns are the selected neurons
            BLOCK_M=16, BLOCK_N=128, num_warps=4,
        )


def _check_common(name: str, a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, kernel: bool) -> None:
    if a.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{name}: activations and weight must be 2-D, got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.dtype != w.dtype:
        raise ValueError(f"{name}: activation dtype {a.dtype} != weight dtype {w.dtype}; cast one of them")
    if kernel and a.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{name}: dtype {a.dtype} is not supported by the kernel; use fp16/bf16 or the _ref")
    if idx.dim() != 1 or idx.dtype != torch.int32:
        raise ValueError(f"{name}: idx must be a 1-D int32 tensor of neuron ids, got {idx.dtype} {tuple(idx.shape)}")
    if idx.shape[0] % 16:
        raise ValueError(f"{name}: idx length ({idx.shape[0]}) must be a multiple of 16; pad the selection")
    if idx.shape[0] > w.shape[0]:
        raise ValueError(f"{name}: idx selects {idx.shape[0]} neurons but the weight has {w.shape[0]}")
    if kernel:
        for tname, t in (("activations", a), ("weight", w), ("idx", idx)):
            if not t.is_contiguous():
                raise ValueError(f"{name}: {tname} must be contiguous; make it so once at load")
            if t.device != a.device:
                raise ValueError(f"{name}: {tname} is on {t.device} but the activations are on {a.device}")


def _check_bias(name: str, bias: torch.Tensor | None, length: int, a: torch.Tensor) -> None:
    if bias is not None and (bias.shape != (length,) or bias.dtype != a.dtype or bias.device != a.device):
        raise ValueError(
            f"{name}: bias must be [{length}] {a.dtype} on {a.device}, got {tuple(bias.shape)} {bias.dtype}"
        )


def _check_fc1(x, w1, idx, b1, activation, kernel: bool) -> None:
    _check_common("gather_fc1", x, w1, idx, kernel)
    if x.shape[1] != w1.shape[1]:
        raise ValueError(f"gather_fc1: x has d={x.shape[1]} but w1 [N, d] has d={w1.shape[1]}")
    _check_bias("gather_fc1", b1, w1.shape[0], x)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"gather_fc1: activation {activation!r} is not one of {_ACTIVATIONS}")


def _check_fc2(h, w2t, idx, b2, kernel: bool) -> None:
    _check_common("gather_fc2", h, w2t, idx, kernel)
    if h.shape[1] != idx.shape[0]:
        raise ValueError(f"gather_fc2: h has {h.shape[1]} columns but idx has {idx.shape[0]} neurons")
    _check_bias("gather_fc2", b2, w2t.shape[1], h)


def gather_fc1(x: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor, b1: torch.Tensor | None,
               activation: str = "relu", config: GemmConfig | None = None) -> torch.Tensor:
    """h [M, k] = act(x [M, d] @ w1[idx].T + b1[idx]); w1 [N, d] is the nn.Linear weight."""
    _check_fc1(x, w1, idx, b1, activation, kernel=True)
    h = torch.empty(x.shape[0], idx.shape[0], device=x.device, dtype=x.dtype)
    if h.numel():
        _launch(x, w1, idx, b1, h, x.shape[1], config, fc1=True, relu=activation == "relu")
    return h


def gather_fc2(h: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor, b2: torch.Tensor | None,
               config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, d] = h [M, k] @ w2t[idx] + b2; w2t [N, d] = fc2.weight.T made contiguous once at load."""
    _check_fc2(h, w2t, idx, b2, kernel=True)
    m, k = h.shape
    y = torch.empty(m, w2t.shape[1], device=h.device, dtype=h.dtype)
    if m == 0:
        return y
    if k == 0:  # no neuron selected: only the bias is left
        return y.copy_((torch.zeros((), dtype=y.dtype, device=y.device) if b2 is None else b2).expand_as(y))
    _launch(h, w2t, idx, b2, y, k, config, fc1=False)
    return y


def gather_fc1_ref(x: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor, b1: torch.Tensor | None,
                   activation: str = "relu") -> torch.Tensor:
    """Pure-PyTorch reference in x's dtype; any device."""
    _check_fc1(x, w1, idx, b1, activation, kernel=False)
    rows = idx.long()
    h = torch.nn.functional.linear(x, w1[rows], None if b1 is None else b1[rows])  # (M, k)
    return torch.relu(h) if activation == "relu" else h


def gather_fc2_ref(h: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch reference in h's dtype; any device."""
    _check_fc2(h, w2t, idx, b2, kernel=False)
    y = h @ w2t[idx.long()]  # (M, d)
    return y if b2 is None else y + b2
