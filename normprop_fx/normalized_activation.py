"""The parametric post-activation normalization: o = (f(u) - c_mean) / c_std."""

from __future__ import annotations

import torch
from torch import nn

from .activation_functions import ActivationSpec, activation
from .moments import activation_constants
from .piecewise_linear import PIECEWISE_LINEAR, normalized_piecewise_linear


class NormalizedActivation(nn.Module):
    """Applies an activation, then subtracts and divides by its N(0, 1) mean and std.

    The constants are plain Python floats fixed at construction (not buffers): they are
    data-independent, keep the state_dict free of non-learned entries, and let torch.compile
    fuse ``f(u) * (1/c_std) - c_mean/c_std`` into one pointwise kernel. Piecewise-linear
    activations (ReLU and kin) take their gradient from the output (``piecewise_linear.py``), so
    a compiled training step saves no mask for the backward.
    """

    def __init__(self, spec: ActivationSpec | str = "relu") -> None:
        super().__init__()
        self.spec = activation(spec) if isinstance(spec, str) else spec
        constants = activation_constants(self.spec)
        self.mean = constants.mean
        self.std = constants.std
        self._scale = 1.0 / constants.std
        self._shift = -constants.mean / constants.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_identity:
            return x
        if self.spec.name in PIECEWISE_LINEAR:
            return normalized_piecewise_linear(x, self.spec, self._scale, self._shift)
        return self.spec(x) * self._scale + self._shift

    def extra_repr(self) -> str:
        return f"{self.spec}, mean={self.mean:.6g}, std={self.std:.6g}"
