"""The decode attention kernel's builds (kernels/select_attention.py): how a head dim is tiled,
the launch config by tile, and how many programs of each build one SM holds, which the work plan
(kernels/attention_plan.py) cuts its waves for. Figures from the H200 runs and from ptxas for
sm_90a (benchmarks/attention_ptx.py --check keeps the table within what the builds fit).
"""

from __future__ import annotations

from dataclasses import dataclass

# Attention programs one SM holds at once, by (tile width, query heads per group padded to
# a power of two >= 16), for the kernel's default build there (kernels/select_attention.py,
# default_config). Groups of <= 16 heads, measured on the H200: 64 wide, 3 stages of a 64-token
# K and V tile, 36 KiB of shared memory and 72 registers: 6; 128 wide, 2 stages, 38 KiB and 128
# registers: 4, the registers binding (runs 48 and 72, benchmarks/KERNELS_NOTES.md). Wider
# groups hold more rows of q, the scores and the output per program: read with ptxas
# (benchmarks/attention_ptx.py, no GPU), 32 heads take 84-188 registers, 64 heads 127-255. A
# plan cut for more programs than fit runs in part-empty extra waves (1.24x at a 1.2-wave cut,
# run 72).
RESIDENT_PER_SM = {  # by tile_width; 16, 32, 96, 160, 192 wide: ptxas only (registers bind)
    (16, 16): 5, (32, 16): 9, (64, 16): 6, (96, 16): 4, (128, 16): 4, (160, 16): 3, (192, 16): 3, (256, 16): 3,
    (16, 32): 5, (32, 32): 4, (64, 32): 5, (96, 32): 2, (128, 32): 3, (160, 32): 2, (192, 32): 2, (256, 32): 2,
    (16, 64): 5, (32, 64): 5, (64, 64): 4, (96, 64): 2, (128, 64): 2, (160, 64): 2, (192, 64): 2, (256, 64): 1,
}
# The split widths (tile_split) hold the fewest programs any head dim and group they serve
# compiles to: 96 wide (64 + 32) at head dims 72-80, 3 stages: 96-116 registers, 53 KiB (4 per
# SM); at 96, 2 stages: 88-96 registers, 29 KiB (5 by ptxas; cut for 4 it ran 0.77-1.00x of a cut
# for 5, H200 run 79). 160 and 192 wide 94-128 registers (4 per SM) up to 8 heads a group,
# 139-142 (3) at 9-16.


def padded_head_dim(head_dim: int) -> int:
    """The next power of two of a head dim, at least 16: the width of the kernel's fp32 partials
    and of its merge (kernels/select_attention.py)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tile_split(head_dim: int) -> tuple[int, int]:
    """The decode kernel's K/V tile columns for a head dim as (main, tail): a power-of-two main
    tile and, where one tile would carry many padded columns, a power-of-two tail tile of at least
    32 columns (tl.arange needs powers of two; 16-wide tails compile to 143-185 registers, 2-3
    programs an SM, where 32-wide ones take 96: benchmarks/attention_ptx.py). 80 -> (64, 32) masked
    to 16 tail columns, 96 -> (64, 32), 160 -> (128, 32), 192 -> (128, 64); a split no narrower
    than the padded tile keeps that tile (48 -> 64, 112 -> 128). The tail's masked columns are
    never read from memory; a 128-wide tile at head dim 80 also moves them through shared memory
    and the MMAs (1.6x the head's columns)."""
    pad = padded_head_dim(head_dim)
    main = pad // 2
    tail = max(32, 1 << (head_dim - main - 1).bit_length())
    return (pad, 0) if pad == head_dim or main + tail >= pad else (main, tail)


def tile_width(head_dim: int) -> int:
    """Columns of the kernel's K/V tiles at a head dim: main + tail of tile_split."""
    return sum(tile_split(head_dim))


def resident_per_sm(head_dim: int, group: int = 1) -> int:
    """Attention programs an SM holds at once at this head dim and this many query heads per KV
    group: the kernel's tiles are tile_width(head_dim) wide (80 -> 64 + 32 columns) and max(16,
    next power of two of group) rows tall; past the table's 64 rows, 1."""
    rows = max(16, 1 << (max(1, group) - 1).bit_length())
    return RESIDENT_PER_SM.get((tile_width(head_dim), rows), 1)


@dataclass(frozen=True)
class AttentionConfig:
    block_n: int = 64  # tokens per K/V tile; 64 x 128 fp16 = 16 KiB per tile and stage
    num_warps: int = 4
    # Pipeline depth asked of Triton. Compiled for a real launch (every stride divisible by 16
    # marked so), the K/V tiles are 16-byte cp.async copies into a shared-memory pipeline of this
    # depth. 128-wide heads, 64-token tiles: 2 stages take 38 KiB and 127-128 registers, so 4
    # programs per SM (the registers bind), against 3 stages' 70 KiB and 3; with the plan cut for
    # 4 per SM it is 0.93-0.99x of 3 stages' time at every measured shape, B 1 to 128, MHA and
    # GQA, equal and mixed lengths (H200 runs 72-73, benchmarks/attention_stages_ab.py): fewer
    # part-empty last waves. 64-wide heads keep 3 stages (36 KiB, 6 per SM; 2 stages there
    # 1.00x at the median, up to 1.06x slower). No other config wins across shapes (runs 28, 42,
    # 72-73): 8 warps, 32- or 128-token tiles, register caps that buy a fifth program per SM
    # (they spill: 1.16x) are slower at most rows.
    num_stages: int = 2
    # ptxas register cap (None: Triton's own, see above).
    maxnreg: int | None = None
    # Persistent grid: this many programs per SM stride over the plan's real work; None: one
    # program per work item of the plan's capacity, whose empty rows exit at once.
    resident_per_sm: int | None = None
    # K/V tile columns as (main, tail); None: attention_builds.tile_split(head_dim). (padded, 0)
    # is the one masked tile every head dim ran before the split (benchmarks/head_tiles_ab.py).
    tiles: tuple[int, int] | None = None


def default_config(head_dim: int) -> AttentionConfig:
    """The measured config by K/V tile (attention_builds.tile_split; see AttentionConfig.num_stages):
    up to 64 wide, 3 stages; 64 + 32 wide, 3 stages where the tail is masked (80: 0.91x of 2
    stages' time at B 64, 0.86-0.99x across run 79's cases) and 2 where it is full (96: 3 stages
    1.02-1.04x at equal lengths); 128 (and the head dims 97-127 padded to it), 2 stages; wider
    (160-256), 32-token K/V tiles in 3 stages, the shared memory of 64-token tiles at 128 in 3
    stages (not tuned)."""
    main, tail = tile_split(head_dim)
    width = main + tail
    if width > 128:
        return AttentionConfig(block_n=32, num_stages=3)
    masked_tail = tail > 0 and width > head_dim
    return AttentionConfig(num_stages=3 if width <= 64 or masked_tail else 2)
