"""Gather-GEMM pair for batch-union MLP neuron sparsity (ReLU models, e.g. OPT).

    h = gather_fc1(x, w1, idx, b1)   # [M, k] = relu(x @ w1[idx].T + b1[idx])
    y = gather_fc2(h, w2t, idx, b2)  # [M, d] = h @ w2t[idx] + b2

Only the k selected neurons' weights are read, for any k (the last tile is masked). Both
weights are indexed by row, and each selected row (w1[n, :] and w2t[n, :], w2t = fc2.weight.T
made contiguous once at load) is contiguous, so a gathered tile is still read in long coalesced
segments. The gather happens in-kernel: no torch gather or scatter, and the compact h [M, k]
needs none either, since fc2 indexes w2t with the same idx.

Work split. Decode has M = 1..256 rows against thousands of weight rows, so a program owns
BLOCK_N weight-side columns (fc1: selected neurons; fc2: output columns) and every row of M:
BLOCK_M is M rounded up to a power of two (16..256, the tile table `_M_TILES`), so each weight
tile crosses HBM once whatever M is (M > 256 adds M tiles, each re-reading the weights). The
product is computed transposed, acc[BLOCK_N, BLOCK_M] = W_tile @ act_tile^T ("swap AB"): the
weight side is the MMA's M dimension, 64 rows per warpgroup as Hopper's wgmma needs, and the
batch is its N dimension, which may be as small as 16, so M = 1 pads to 16 columns, not 64 rows.
The K loop reads whole BLOCK_K tiles with no K mask, which is what lets Triton issue 16-byte
cp.async loads and multi-buffer them (in the previous version a mask against a runtime K bound
made all of fc1's loads and fc2's h loads scalar 2-byte loads, unpipelined: read from its PTX);
a masked tail in 16-wide steps ends the loop, so any d and any k work. When the grid has too
few tiles to occupy the GPU, K is split over programs (fp32 partials + an epilogue kernel), by
the cost model in `choose_split`. Or stream-K (`GemmConfig.stream`): a fixed number of programs
per SM each take the same number of BLOCK_K steps of the tiles laid end to end, so no SM idles
while others finish a second tile; the last program holding a piece of a cut tile sums the
pieces in the same launch (kernels/arrivals.py). Which split wins is timed per shape by the
dispatch (benchmarks/KERNELS_NOTES.md, runs 23-26: stream-K at the large OPT shapes).

Block sizes and splits depend only on static shapes (M, k, d), so a call never syncs with the
host and can be captured in a CUDA graph. Which of this pair or dense cuBLAS to run for a
shape is decided in kernels/mlp_dispatch.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from kernels import arrivals
from kernels.pdl import launch_options
from kernels.gather_gemm_kernels import _gather_kernel, _gather_stream_kernel, _split_k_epilogue_kernel

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_ACTIVATIONS = ("relu", "identity")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows of M per program: M rounded up to a power of two, 16..256
    block_n: int  # weight-side columns per program; the wgmma M dimension (64 per warpgroup)
    block_k: int
    num_warps: int = 4
    num_stages: int = 4  # cp.async depth: the weight stream needs several tiles in flight
    split_k: int = 1  # > 1: fp32 partials over K slices + an epilogue kernel (more programs)
    stream: int = 0  # > 0: stream-K with this many programs per SM (split_k unused)


@dataclass(frozen=True)
class Tile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tiles by M range: (largest M, BLOCK_M, fc1's tile, fc2's tile).
# Read with ptxas for sm_90a, no GPU needed (benchmarks/gather_gemm_ptx.py, Triton 3.7): every
# entry compiles to wgmma with 16-byte cp.async loads in the K loop, 40-196 registers and no
# spills (but the stream-K build of fc1's 256-row tile: 255 registers, 248 bytes spilled; the
# dispatch times it like the rest). Shared memory: fc1 keeps `stages` [BLOCK_N + BLOCK_M,
# BLOCK_K] tiles (80, 96, 96, 96, 144 KiB), so up to 96 KiB two programs fit per SM (228 KiB);
# fc2's weight rows are an indirect load (idx first), which the pipeliner buffers stages - 2
# deep, so fc2 asks one stage more for 3 buffers (61, 73, 97, 73, 121 KiB). Past 64 rows the
# tile holds 128-256 batch columns: 8 warps (two warpgroups) halve the per-thread share of the
# fp32 accumulator [BLOCK_N, BLOCK_M], and BLOCK_K 64 keeps the 256-row stages within shared
# memory. At 129-256 rows fc1 takes 128 neurons a program (half the activation bytes per weight
# byte; 0.71-1.07x the 64-neuron tile's time, 0.85x at the median, H200 runs 62-63).
_M_TILES = (
    (16, 16, Tile(64, 128, 4, 4), Tile(64, 128, 4, 5)),
    (32, 32, Tile(64, 128, 4, 4), Tile(64, 128, 4, 5)),
    (64, 64, Tile(64, 128, 4, 3), Tile(64, 128, 4, 5)),
    (128, 128, Tile(64, 64, 8, 4), Tile(64, 64, 8, 5)),
    (256, 256, Tile(128, 64, 8, 3), Tile(64, 64, 8, 5)),
)
# Tiles the dispatch (kernels/mlp_dispatch.py) also times, by the largest M of their range:
# neither tile wins at every shape there (runs 62-63: fc2 with 128 columns and BLOCK_K 32
# 0.81-0.91x at OPT-30B/66B M 192, 1.07-1.22x at OPT-13B/30B M 256).
_ALTERNATE_TILES = {  # largest M: (fc1's alternates, fc2's)
    256: ((Tile(64, 64, 8, 3),), (Tile(128, 32, 8, 5),)),
}
MAX_BLOCK_M = 256

# Split-K cost model (static shapes only). Per candidate split count s:
#   t(s) = max(bytes(s) / HBM, flops / MMA) / min(1, programs(s) / SMs) + (s > 1) * epilogue
# bytes = the gathered weights + the fp32 partials (written and read back, 8 s M n_out);
# flops = 2 x BLOCK_M-padded M x n_out x K; a grid of fewer programs than SMs leaves that
# fraction of the GPU idle. Constants of an H100 / H200-class GPU (copy bandwidth 3.0-4.3 TB/s,
# cuBLAS reaches 630-730 TFLOP/s); only their ratios matter to the choice. The model replaces
# version 3's two measured rules (fc1 <= 1 program per SM, fc2 >= 2), fit to a kernel whose
# loads were scalar; kernels/mlp_dispatch.py times the model's split next to others on the
# device, so a wrong guess here costs only the direct callers.
_HBM_BYTES_PER_S = 4.0e12
_MMA_FLOP_PER_S = 650e12
_EPILOGUE_S = 3e-6  # one more graph node: launch, ramp, a read of the partials' first bytes
_MAX_SPLITS = 8
_MIN_SPLIT_K_TILES = 2  # a split shorter than 2 K tiles is all prologue
_MIN_STREAM_STEPS = 4  # BLOCK_K steps per stream-K program, at least
# With PDL, fc2's programs ask L2 for the weight rows of this many of their first BLOCK_K steps
# before waiting for fc1 (0: none; kernels/gather_gemm_kernels.py).
FC2_PREFETCH_STEPS = 2


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pad16(n: int) -> int:
    # Row strides padded to 16 elements: Triton then knows every row starts 32-byte aligned and
    # issues vector loads and stores along the row.
    return -(-n // 16) * 16


def _config(block_m: int, tile: Tile) -> GemmConfig:
    return GemmConfig(block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages)


def tile_config(m: int, fc1: bool) -> GemmConfig:
    """The tile of `_M_TILES` for M rows, unsplit."""
    for max_m, block_m, fc1_tile, fc2_tile in _M_TILES:
        if m <= max_m:
            return _config(block_m, fc1_tile if fc1 else fc2_tile)
    return tile_config(MAX_BLOCK_M, fc1)  # more M tiles of 256 rows


def tile_candidates(m: int, fc1: bool) -> list[GemmConfig]:
    """tile_config's tile, then those `_ALTERNATE_TILES` adds for M's range (unsplit)."""
    table = tile_config(m, fc1)
    max_m = next((row[0] for row in _M_TILES if m <= row[0]), MAX_BLOCK_M)
    alternates = _ALTERNATE_TILES.get(max_m, ((), ()))[0 if fc1 else 1]
    return [table] + [_config(table.block_m, tile) for tile in alternates]


def _model_seconds(m: int, n_out: int, k_loop: int, config: GemmConfig, splits: int, num_sms: int) -> float:
    m_tiles = triton.cdiv(m, config.block_m)
    programs = triton.cdiv(n_out, config.block_n) * m_tiles * splits
    bytes_ = 2 * n_out * k_loop * m_tiles + (8 * splits * m * n_out if splits > 1 else 0)
    flops = 2 * m_tiles * config.block_m * n_out * k_loop
    busy = min(1.0, programs / num_sms)
    return max(bytes_ / _HBM_BYTES_PER_S, flops / _MMA_FLOP_PER_S) / busy + (_EPILOGUE_S if splits > 1 else 0.0)


def choose_split(m: int, n_out: int, k_loop: int, config: GemmConfig, num_sms: int) -> int:
    """The split count in 1.._MAX_SPLITS that the cost model above times fastest (ties: fewer), for
    an [m, n_out] output summed over k_loop with config's tile (fc1: n_out = k selected neurons,
    k_loop = d; fc2: n_out = d, k_loop = k)."""
    allowed = [s for s in range(1, _MAX_SPLITS + 1) if s == 1 or k_loop // s >= _MIN_SPLIT_K_TILES * config.block_k]
    return min(allowed, key=lambda s: (_model_seconds(m, n_out, k_loop, config, s, num_sms), s))


def gpu_config(m: int, n_out: int, k_loop: int, num_sms: int, fc1: bool) -> GemmConfig:
    """The table's tile for M and the cost model's split count (choose_split)."""
    config = tile_config(m, fc1)
    return replace(config, split_k=choose_split(m, n_out, k_loop, config, num_sms))


def _interpreter_config(m: int) -> GemmConfig:
    # The interpreter costs about one numpy pass per program and tile: the table's BLOCK_M, one stage.
    return replace(tile_config(m, fc1=True), block_k=128, num_warps=4, num_stages=1)


def _split_plan(config: GemmConfig, k_loop: int) -> tuple[int, int]:
    """(splits, split_len): K slices that are whole multiples of BLOCK_K, none empty."""
    split_len = triton.cdiv(triton.cdiv(k_loop, config.split_k), config.block_k) * config.block_k
    return max(1, triton.cdiv(k_loop, split_len)), split_len


def _launch(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            k_loop: int, config: GemmConfig | None, fc1: bool, relu: bool = False, pdl: bool = False) -> None:
    """Launch fc1 or fc2 into out [m, n_out], summing over k_loop (fc1: d; fc2: the k selected
    neurons): the stream-K kernel when the config asks for it, else the tile grid and, when the
    config splits K, the split-K epilogue. fc1's bias is indexed by neuron. pdl: every launch
    with programmatic dependent launch (see gather_fc2 for what fc2 reads before its wait)."""
    m, n_out = out.shape
    interpret = a.device.type != "cuda"
    if config is None:
        config = _interpreter_config(m) if interpret else gpu_config(m, n_out, k_loop, _num_sms(a.device), fc1)
    if config.stream and k_loop >= config.block_k:
        _launch_stream(a, w, idx, bias, out, k_loop, config, fc1, relu, pdl)
        return
    splits, split_len = _split_plan(config, k_loop)
    ws_stride = _pad16(n_out)
    ws = torch.empty(splits, m, ws_stride, device=a.device, dtype=torch.float32) if splits > 1 else out
    _gather_kernel[(triton.cdiv(n_out, config.block_n), triton.cdiv(m, config.block_m), splits)](
        a, w, idx, a if bias is None else bias, out, ws,
        m, idx.shape[0], w.shape[1], split_len,  # M, K_SEL, d (D_IN of fc1, D_OUT of fc2)
        a.stride(0), w.stride(0), out.stride(0), ws_stride,
        FC1=fc1, HAS_BIAS=bias is not None, RELU=relu, UPCAST=interpret, SPLIT=splits > 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        PREFETCH=FC2_PREFETCH_STEPS * config.block_k if pdl and not fc1 else 0, ROW_MASK=m % config.block_m != 0,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl),
    )
    if splits > 1:
        _split_k_epilogue_kernel[(triton.cdiv(n_out, 128), triton.cdiv(m, 16))](
            ws, idx, out if bias is None else bias, out,
            m, n_out, splits, ws_stride, out.stride(0),
            HAS_BIAS=bias is not None, BIAS_BY_IDX=fc1, RELU=relu,  # fc1's columns are the selected neurons
            BLOCK_M=16, BLOCK_N=128, PDL=pdl, num_warps=4, **launch_options(pdl),
        )


def stream_plan(m: int, n_out: int, k_loop: int, config: GemmConfig, num_sms: int) -> tuple[int, int, int, int]:
    """(programs, steps per program, total steps, tiles) of a stream-K launch: config.stream
    programs per SM, each at least _MIN_STREAM_STEPS whole BLOCK_K steps (shorter pieces cost more
    in partials and merges than they gain), the steps split as evenly as whole steps allow."""
    tiles = triton.cdiv(n_out, config.block_n) * triton.cdiv(m, config.block_m)
    total = tiles * (k_loop // config.block_k)
    programs = max(1, min(config.stream * num_sms, total // _MIN_STREAM_STEPS))
    per = triton.cdiv(total, programs)
    return triton.cdiv(total, per), per, total, tiles


def _launch_stream(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor, k_loop: int, config: GemmConfig, fc1: bool, relu: bool, pdl: bool) -> None:
    m, n_out = out.shape
    interpret = a.device.type != "cuda"
    programs, per, total, tiles = stream_plan(m, n_out, k_loop, config, 4 if interpret else _num_sms(a.device))
    ws = torch.empty(2 * programs, config.block_n * config.block_m, device=a.device, dtype=torch.float32)
    _gather_stream_kernel[(programs,)](
        a, w, idx, a if bias is None else bias, out, ws, arrivals.counters(a.device, tiles),
        m, idx.shape[0], w.shape[1], k_loop // config.block_k, per, total, triton.cdiv(m, config.block_m),
        a.stride(0), w.stride(0), out.stride(0),
        FC1=fc1, HAS_BIAS=bias is not None, RELU=relu, UPCAST=interpret,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        PREFETCH=FC2_PREFETCH_STEPS * config.block_k if pdl and not fc1 else 0, ROW_MASK=m % config.block_m != 0,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl),
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
    if idx.shape[0] > w.shape[0]:
        raise ValueError(f"{name}: idx selects {idx.shape[0]} neurons but the weight has {w.shape[0]}")
    if kernel:
        if a.shape[1] > 1 and a.stride(1) != 1:
            raise ValueError(f"{name}: activation rows must be contiguous (stride(1) == 1), got strides {a.stride()}")
        for tname, t in (("weight", w), ("idx", idx)):
            if not t.is_contiguous():
                raise ValueError(f"{name}: {tname} must be contiguous; make it so once at load")
        for tname, t in (("weight", w), ("idx", idx)):
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
               activation: str = "relu", config: GemmConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """h [M, k] = act(x [M, d] @ w1[idx].T + b1[idx]); w1 [N, d] is the nn.Linear weight.

    h is a view whose row stride is k rounded up to 16 (so gather_fc2 reads it with vector
    loads): contiguous when k is a multiple of 16. pdl: launched with programmatic dependent
    launch (kernels/pdl.py), waiting before any access."""
    _check_fc1(x, w1, idx, b1, activation, kernel=True)
    m, k = x.shape[0], idx.shape[0]
    h = torch.empty(m, _pad16(k), device=x.device, dtype=x.dtype)[:, :k]
    if h.numel():
        _launch(x, w1, idx, b1, h, x.shape[1], config, fc1=True, relu=activation == "relu", pdl=pdl)
    return h


def gather_fc2(h: torch.Tensor, w2t: torch.Tensor, idx: torch.Tensor, b2: torch.Tensor | None,
               config: GemmConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """y [M, d] = h [M, k] @ w2t[idx] + b2; w2t [N, d] = fc2.weight.T made contiguous once at load.

    pdl: launched with programmatic dependent launch (kernels/pdl.py). Before its wait each
    program reads idx and asks L2 for its first weight rows, so idx must not be written by the
    kernel launched just before this one (in gather_fc1 -> gather_fc2 it is written before fc1)."""
    _check_fc2(h, w2t, idx, b2, kernel=True)
    m, k = h.shape
    y = torch.empty(m, w2t.shape[1], device=h.device, dtype=h.dtype)
    if m == 0:
        return y
    if k == 0:  # no neuron selected: only the bias is left
        return y.copy_((torch.zeros((), dtype=y.dtype, device=y.device) if b2 is None else b2).expand_as(y))
    _launch(h, w2t, idx, b2, y, k, config, fc1=False, pdl=pdl)
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
