"""The NormProp replacement of a BatchNorm that has no Conv/Linear in front of it.

A BatchNorm after a concat, an add, a reshape or a plain layer (pre-activation DenseNets and
ResNets) keeps its learned per-channel affine and its activation, but loses the batch
statistics: its input is standardized by the constant correction that moment propagation
puts in front of it (:class:`~normprop_fx.standardize.Standardize`), so

    o = (f(gamma * x + beta) - c_mean) / c_std      on channel dim 1, as BatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activation_functions import ActivationSpec, activation
from .layers import GammaInit, init_gamma_beta_activation


class NormPropAffine(nn.Module):
    """Per-channel ``gamma * x + beta`` on dim 1, then the normalized activation."""

    gamma: torch.Tensor
    beta: torch.Tensor

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

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, **options: Any) -> NormPropAffine:
        """A NormPropAffine with ``bn``'s width, device, dtype and affine flag (gamma/beta start
        at their NormProp initial values, like every NormProp layer)."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        return cls(bn.num_features, affine=bn.affine, **factory, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return self.activation(torch.addcmul(self.beta.reshape(shape), x, self.gamma.reshape(shape)))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, activation={self.activation.spec}, gamma_init={self.gamma_init:.6g}, "
                f"affine={self.affine}")


def _activation(act: ActivationSpec | str) -> ActivationSpec:
    return activation(act) if isinstance(act, str) else act
