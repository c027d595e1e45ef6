"""Polar Sparsity kernels: head-selective paged decode attention and the gather-GEMM MLP pair.

Import from here; `kernels.dispatch` picks Triton (CUDA tensors) or the PyTorch reference.
"""

from kernels.dispatch import gather_fc1, gather_fc2, select_attention

__all__ = ["gather_fc1", "gather_fc2", "select_attention"]
