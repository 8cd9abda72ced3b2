"""The parametric post-activation normalization: o = (f(u) - c_mean) / c_std."""

from __future__ import annotations

import torch
from torch import nn

from .activation_functions import ActivationSpec, activation
from .moments import activation_constants
from .piecewise_linear import PIECEWISE_LINEAR, normalized_piecewise_linear

# A leaf function of torch.fx: a plain symbolic trace of this module would otherwise trace into
# the autograd.Function's forward and record ``f(u) * scale + shift`` with plain autograd, whose
# gradient is not the one taken from the output (piecewise_linear.py). (``wrap`` patches this
# module's global name, the one forward calls.)
torch.fx.wrap("normalized_piecewise_linear")


class NormalizedActivation(nn.Module):
    """Applies an activation, then subtracts and divides by its N(0, 1) mean and std.

    The constants are plain Python floats fixed at construction (not buffers): they are
    data-independent, keep the state_dict free of non-learned entries, and let torch.compile
    fuse ``f(u) * (1/c_std) - c_mean/c_std`` into one pointwise kernel. Piecewise-linear
    activations (ReLU and kin) take their gradient from the output (``piecewise_linear.py``), so
    a compiled training step saves no mask for the backward.

    A scalar moment-propagation correction that reads only this activation's output can be
    merged into it (:meth:`absorb_correction`): the output is then
    ``((f(u) - c_mean) / c_std - correction_mean) * correction_scale``, still one affine.

    ``standardize=False`` applies ``f`` alone (c_mean 0, c_std 1): the activation of a layer that
    keeps a trained BatchNorm's function, whose readers expect the raw values (docs/method.md section 8).
    """

    def __init__(self, spec: ActivationSpec | str = "relu", *, standardize: bool = True) -> None:
        super().__init__()
        self.spec = activation(spec) if isinstance(spec, str) else spec
        constants = activation_constants(self.spec)
        self.standardize = standardize
        self.mean = constants.mean if standardize else 0.0
        self.std = constants.std if standardize else 1.0
        self.correction_reason = ""
        self._set_affine()
        self.register_load_state_dict_post_hook(_set_affine_after_load)  # (a lambda would not pickle)

    @property
    def has_correction(self) -> bool:
        return hasattr(self, "correction_mean")

    def absorb_correction(self, mean: torch.Tensor, scale: torch.Tensor, reason: str = "") -> None:
        """Apply the constant ``(o - mean) * scale`` (scalars, ``scale > 0``) to the output too.

        The correction is kept as the buffers ``correction_mean`` and ``correction_scale`` (a
        saved state_dict restores them, as it does a Standardize's) and folded into the Python
        float constants of the forward. Refused for the identity (it has no affine to merge
        into) and for an activation that already has a correction.
        """
        mean, scale = torch.as_tensor(mean), torch.as_tensor(scale)
        if self.spec.is_identity:
            raise ValueError("the identity activation has no affine to absorb a correction into")
        if self.has_correction:
            raise ValueError("this activation already absorbed a correction")
        if mean.numel() != 1 or scale.numel() != 1:
            raise ValueError(f"only a scalar correction can be absorbed, got mean {tuple(mean.shape)}, scale {tuple(scale.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("a correction needs a finite mean and a finite positive scale")
        self.register_buffer("correction_mean", mean.detach().reshape(()).float().clone())
        self.register_buffer("correction_scale", scale.detach().reshape(()).float().clone())
        self.correction_reason = reason
        self._set_affine()

    def _set_affine(self) -> None:
        """``_scale``, ``_shift``: the output affine of ``f(u)``, correction included."""
        scale, shift = 1.0 / self.std, -self.mean / self.std
        if self.has_correction:
            mean, factor = float(self.correction_mean), float(self.correction_scale)
            scale, shift = scale * factor, (shift - mean) * factor
        self._scale, self._shift = scale, shift

    @property
    def is_plain(self) -> bool:
        """Its output is ``f(u)`` itself: no standardization and no correction to apply."""
        return (self._scale, self._shift) == (1.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_identity:
            return x
        if self.is_plain:
            return self.spec(x)  # not standardized: the plain activation (ReLU's backward reads its output too)
        if self.spec.name in PIECEWISE_LINEAR:
            return normalized_piecewise_linear(x, self.spec, self._scale, self._shift)
        return self.spec(x) * self._scale + self._shift

    def extra_repr(self) -> str:
        s = f"{self.spec}, mean={self.mean:.6g}, std={self.std:.6g}" if self.standardize else f"{self.spec}, not standardized"
        if self.has_correction:
            s += f", then (o - {float(self.correction_mean):.4g}) * {float(self.correction_scale):.4g}"
        return s


def _set_affine_after_load(module: NormalizedActivation, _incompatible_keys: object) -> None:
    module._set_affine()
