"""Tap: a named point in the model whose forward hooks see the tensor passing through.

Calibration registers hooks on taps (every layer's router input, per-head attention output,
ReLU MLP activations). Without hooks a tap is a Python call that returns its input: nothing
is launched and CUDA graphs capture nothing for it.
"""

from __future__ import annotations

from torch import nn


class Tap(nn.Identity):
    pass
