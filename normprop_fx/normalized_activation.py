"""The parametric post-activation normalization: o = (f(u) - c_mean) / c_std."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activation_functions import ActivationSpec, activation
from .eager import clamp_fresh, is_compiling, plain_tensor, records_gradient, scalar_affine, scalar_affine_
from .moments import activation_constants
from .piecewise_linear import PIECEWISE_LINEAR, clamp_bounds, normalized_piecewise_linear, positively_homogeneous
from .standardize import absorbable_correction, corrected_input

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
        correction = absorbable_correction(self, x)
        if correction is not None and correction.is_scalar and not (self.spec.is_identity or self.is_plain):
            # eager: the scalar input correction ``(x - m) * s`` and the input affine ``v * a + c``
            # are one affine, one pass over x instead of two
            scale, shift = self.eager_input_affine()
            s = correction.scale.to(x.dtype).reshape(()) * scale
            c = shift - correction.mean.to(x.dtype).reshape(()) * s
            if x.device.type == "cpu" and plain_tensor(x):  # as Python numbers (read without a sync on CPU)
                v = scalar_affine(x, float(s), float(c))  # (its binary kernel: 0.55x addcmul's time)
                return self.eager_from_input_affine(v, inplace=v is not x)
            return self.eager_from_input_affine(torch.addcmul(c, x, s), inplace=True)
        x = corrected_input(self, x)  # a moment correction of a standalone activation's input, if any
        if self.spec.is_identity:
            return x
        if self.is_plain:
            return self.spec(x)  # not standardized: the plain activation (ReLU's backward reads its output too)
        if is_compiling():
            if self.spec.name in PIECEWISE_LINEAR:
                return normalized_piecewise_linear(x, self.spec, self._scale, self._shift)
            return self.spec(x) * self._scale + self._shift
        scale, shift = self.eager_input_affine()
        v = scalar_affine(x, scale, shift)
        return self.eager_from_input_affine(v, inplace=v is not x)

    # --- the eager form (normprop_fx/eager.py): the output as ``g(u * a + c)`` --------------------

    def eager_input_affine(self) -> tuple[float, float]:
        """``(a, c)``, ``a > 0``: the eager form computes the output from ``v = u * a + c``
        (:meth:`eager_from_input_affine`), an affine that a weighted layer in front computes for
        free, in its weight and bias. For the clamp family it is the whole output affine, for
        LeakyReLU its scale (the activation commutes with it), else none."""
        if self.spec.is_identity or self.is_plain:
            return 1.0, 0.0
        if clamp_bounds(self.spec) is not None:
            return self._scale, self._shift
        if positively_homogeneous(self.spec):
            return self._scale, 0.0
        return 1.0, 0.0

    def output_clamp(self) -> tuple[float, float] | None:
        """For a standardized clamp-family activation, the bounds ``(lo, hi)`` (``hi`` may be
        inf) of ``f(u) * a + c = clamp(u * a + c, lo, hi)``; None otherwise."""
        bounds = clamp_bounds(self.spec)
        if bounds is None or self.is_plain:
            return None
        lo, hi = bounds
        return lo * self._scale + self._shift, math.inf if hi is None else hi * self._scale + self._shift

    def eager_from_input_affine(self, v: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """The output, from ``v = u * a + c`` with ``(a, c)`` = :meth:`eager_input_affine`: one
        clamp for the clamp family, else the activation and what is left of the affine (one
        ``addcmul`` or one add).

        ``inplace=True`` (the caller's ``v`` is a fresh tensor nothing else reads, a layer's
        output) applies the activation to ``v`` itself, as ``nn.ReLU(inplace=True)`` after a
        BatchNorm does: no new activation-sized tensor is allocated, and on CPU a fresh
        allocation of that size costs more than the pass (its pages are mapped and zeroed on
        first touch). The clamp family does so in training too (:func:`~normprop_fx.eager.clamp_fresh`:
        an autograd.Function whose backward reads the clamp's output; the native ``hardtanh_``
        would have autograd clone ``v``, its backward reads the input). Other activations (SiLU...)
        stay out of place while autograd records: their in-place forms' backward needs the input.

        The affine after any other activation is written into the activation's fresh output
        (:func:`~normprop_fx.eager.scalar_affine_`) unless autograd records and the
        activation's backward reads that output (tanh, sigmoid)."""
        if self.spec.is_identity:
            return v
        fresh = inplace
        inplace = inplace and not (isinstance(v, torch.fx.Proxy) or records_gradient(v))
        if self.is_plain:
            return self.spec(v, inplace=inplace)
        clamp = self.output_clamp()
        if clamp is not None:
            # hardtanh is the clamp with the fast backward: torch.clamp's takes a mask and a
            # where, 3-4x a ReLU's; F.threshold is as fast but has no ONNX export.
            if not isinstance(v, torch.fx.Proxy) and v.dtype in (torch.float16, torch.bfloat16):
                # the bounds in v's precision: the kernel compares in float32, so a value on the
                # flat piece (a zero filter's output, the shift rounded to fp16) would otherwise
                # sit just above the float32 bound and take the gradient of the sloped piece
                clamp = tuple(float(torch.tensor(b, dtype=v.dtype)) for b in clamp)
            return clamp_fresh(v, *clamp, fresh=fresh)
        scale = 1.0 if positively_homogeneous(self.spec) else self._scale  # (its scale went in front)
        y = self.spec(v, inplace=inplace)
        if isinstance(y, torch.fx.Proxy) or (self.spec.function.backward_reads_output and records_gradient(y)):
            return scalar_affine(y, scale, self._shift)
        return scalar_affine_(y, scale, self._shift)

    def extra_repr(self) -> str:
        s = f"{self.spec}, mean={self.mean:.6g}, std={self.std:.6g}" if self.standardize else f"{self.spec}, not standardized"
        if self.has_correction:
            s += f", then (o - {float(self.correction_mean):.4g}) * {float(self.correction_scale):.4g}"
        return s


def _set_affine_after_load(module: NormalizedActivation, _incompatible_keys: object) -> None:
    module._set_affine()
