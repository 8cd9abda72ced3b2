"""The NormProp replacement of a BatchNorm that has no Conv/Linear in front of it.

A BatchNorm after a concat, an add, a reshape or a plain layer (pre-activation DenseNets and
ResNets) keeps its learned per-channel affine and its activation, but loses the batch
statistics: its input is standardized by the constant correction that moment propagation
puts in front of it (:class:`~normprop_fx.standardize.Standardize`), so

    o = (f(gamma * x + beta) - c_mean) / c_std      on channel dim 1, as BatchNorm.

A trained BatchNorm keeps its function instead (docs/method.md section 8,
:meth:`NormPropAffine.keep_batchnorm_function`): its input is standardized by its running
statistics, constants kept as the buffers ``input_mean`` and ``input_scale``, then its own
affine (g, t) becomes gamma and beta, and the activation's output is not standardized:

    o = f(gamma * (x - input_mean) * input_scale + beta)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activation_functions import ActivationSpec, activation
from .batchnorm_state import BatchNormState, batchnorm_state
from .eager import has_hooks, is_compiling, tensor_affine
from .layers import GammaInit, init_gamma_beta_activation
from .normalized_activation import NormalizedActivation
from .records import TRAINED_INIT
from .standardize import corrected_input


class NormPropAffine(nn.Module):
    """Per-channel ``gamma * x + beta`` on dim 1, then the normalized activation."""

    gamma: torch.Tensor
    beta: torch.Tensor
    input_mean: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        *,
        activation: ActivationSpec | str = "identity",
        gamma_init: GammaInit = "paper",
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = _activation(activation)
        self.num_features = num_features
        init_gamma_beta_activation(self, num_features, spec, gamma_init, affine, {"device": device, "dtype": dtype})
        self.register_buffer("input_mean", None)
        self.register_buffer("input_scale", None)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any) -> NormPropAffine:
        """A NormPropAffine with the width, device, dtype and affine flag of ``bn`` (a BatchNorm
        or a frozen one); gamma/beta start at their NormProp initial values, like every NormProp
        layer."""
        state = batchnorm_state(bn)
        ref = state.weight if state.weight is not None else state.running_mean
        if ref is None:
            ref = next(iter(bn.buffers()), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        return cls(state.num_features, affine=state.affine, **factory, **options)

    def keep_batchnorm_function(self, state: BatchNormState) -> None:
        """Compute exactly the BatchNorm ``state``'s eval-mode function (docs/method.md section 8): its
        running statistics standardize the input (constant buffers), its affine becomes gamma and
        beta, and the activation's output is not standardized."""
        factory = {"device": self.gamma.device, "dtype": self.gamma.dtype}
        mean = state.running_mean.detach().double()
        self.input_mean = mean.to(**factory)
        self.input_scale = (state.running_var.detach().double() + state.eps).rsqrt().to(**factory)
        with torch.no_grad():
            if state.weight is not None:
                self.gamma.copy_(state.weight.detach())
                self.beta.copy_(state.bias.detach())
            else:
                self.gamma.fill_(1.0)
                self.beta.zero_()
        self.activation = NormalizedActivation(self.activation.spec, standardize=False)
        self.init = TRAINED_INIT

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` per channel: the module computes ``f(x * scale + shift)`` then its
        activation's standardization. With an input standardization,
        ``gamma * (x - m) * s + beta = x * (gamma * s) + (beta - m * gamma * s)``: O(C) work."""
        if self.input_scale is None:
            return self.gamma, self.beta
        scale = self.gamma * self.input_scale
        return scale, self.beta - self.input_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = corrected_input(self, x)  # a moment correction attached to this module, if any
        shape = (-1,) + (1,) * (x.dim() - 2)
        scale, shift = self.channel_affine()
        if is_compiling() or has_hooks(self.activation):
            return self.activation(torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)))
        # eager: the activation's input affine joins the per-channel one (normprop_fx/eager.py)
        a, c = self.activation.eager_input_affine()
        if (a, c) != (1.0, 0.0):
            scale, shift = scale * a, shift * a + c
        return self.activation.eager_from_input_affine(tensor_affine(x, scale.reshape(shape), shift.reshape(shape)), inplace=True)

    def extra_repr(self) -> str:
        init = f"gamma_init={self.gamma_init:.6g}" if self.input_scale is None else "init=trained (running statistics kept)"
        return f"{self.num_features}, activation={self.activation.spec}, {init}, affine={self.affine}"


def _activation(act: ActivationSpec | str) -> ActivationSpec:
    return activation(act) if isinstance(act, str) else act
