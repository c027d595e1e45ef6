"""Polar Sparsity kernels: head-selective paged decode attention and the gather-GEMM MLP pair.

Call them through `kernels.dispatch` (Triton for CUDA tensors, the PyTorch reference
otherwise). The ops are not re-exported here: `kernels.select_attention` is the module of
that name, and a re-exported function would be replaced by it once the module is imported.
"""
