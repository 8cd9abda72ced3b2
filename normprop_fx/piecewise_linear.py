"""``f(u) * scale + shift`` for piecewise-linear activations, with a gradient taken from the output.

For ReLU, LeakyReLU, ReLU6 and Hardtanh the slope ``f'(u)`` is known from which piece ``u`` is on,
and a normalized activation ``y = f(u) * scale + shift`` (``scale > 0``) is monotone, so the piece
can be read off ``y`` itself: ``u > 0`` exactly when ``y > shift`` for ReLU. The backward then
needs only ``y``, which the next conv saves for its own backward anyway.

Written with plain autograd, ``relu(u) * scale + shift`` would need ``u <= 0`` in the backward.
torch.compile's partitioner saves that as a bool mask (one byte per activation, smaller than
``u``), and inductor's CPU code writes bool masks slowly: a training-mode ReLU kernel over 524k
activations took 7 ms instead of 0.1 ms on the development machine, which made a compiled
NormProp train step slower than BatchNorm's. (BatchNorm + ReLU and the plain ReLU save the ReLU
output, not a mask.)

Rounding: when ``f(u) * scale`` is below half an ulp of ``shift``, ``y`` rounds to ``shift`` and the
gradient is taken as that of the flat piece. For float32 that is ``0 < u < ~3e-8``; for bfloat16,
``0 < u < ~1e-3``, a negligible share of activations.
"""

from __future__ import annotations

import torch

from .activation_functions import ActivationSpec

#: Activations whose piece is readable from a monotone affine of their output.
PIECEWISE_LINEAR = frozenset({"relu", "leaky_relu", "relu6", "hardtanh"})


def _pieces(spec: ActivationSpec) -> tuple[float | None, float | None, float, float]:
    """``(lo, hi, inside_slope, outside_slope)``: ``f'(u)`` is ``inside_slope`` for lo < u < hi
    (None: unbounded) and ``outside_slope`` elsewhere."""
    params = spec.kwargs
    if spec.name == "relu":
        return 0.0, None, 1.0, 0.0
    if spec.name == "leaky_relu":
        return 0.0, None, 1.0, params["negative_slope"]
    if spec.name == "relu6":
        return 0.0, 6.0, 1.0, 0.0
    if spec.name == "hardtanh":
        return params["min_val"], params["max_val"], 1.0, 0.0
    raise ValueError(f"{spec} is not one of {sorted(PIECEWISE_LINEAR)}")


def clamp_bounds(spec: ActivationSpec) -> tuple[float, float | None] | None:
    """``(lo, hi)`` when ``spec`` is a clamp, ``f(u) = clamp(u, lo, hi)`` (ReLU, ReLU6, Hardtanh;
    ``hi`` None: unbounded), else None. Then for ``scale > 0``

        f(u) * scale + shift = clamp(u * scale + shift, lo * scale + shift, hi * scale + shift)

    so a normalized clamp is one clamp of an affine of its input (normprop_fx/eager.py, fold)."""
    if spec.name not in PIECEWISE_LINEAR:
        return None
    lo, hi, inside, outside = _pieces(spec)
    if (inside, outside) != (1.0, 0.0):
        return None
    return lo, hi


def positively_homogeneous(spec: ActivationSpec) -> bool:
    """``f(a * u) = a * f(u)`` for every ``a > 0`` (ReLU, LeakyReLU), so an output scale can be
    moved in front of ``f``."""
    return spec.name in ("relu", "leaky_relu")


class _NormalizedPiecewiseLinear(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap (per-sample gradients) works through it

    @staticmethod
    def forward(u: torch.Tensor, spec: ActivationSpec, scale: float, shift: float) -> torch.Tensor:
        return spec(u) * scale + shift

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        _, spec, scale, shift = inputs
        ctx.save_for_backward(output)
        ctx.spec, ctx.scale, ctx.shift = spec, scale, shift

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        lo, hi, inside, outside = _pieces(ctx.spec)
        # on_piece is 1 where lo < u < hi, else 0, computed in float arithmetic: a comparison
        # would give torch.compile's partitioner a bool to save instead of y (see above).
        on_piece = torch.sign(y - (lo * ctx.scale + ctx.shift)).clamp(min=0)
        if hi is not None:
            on_piece = on_piece * torch.sign((hi * ctx.scale + ctx.shift) - y).clamp(min=0)
        slope = on_piece * ((inside - outside) * ctx.scale) + outside * ctx.scale
        return grad * slope, None, None, None


def normalized_piecewise_linear(u: torch.Tensor, spec: ActivationSpec, scale: float, shift: float) -> torch.Tensor:
    """``spec(u) * scale + shift`` (``scale > 0``), differentiated through its output."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return _NormalizedPiecewiseLinear.apply(u, spec, scale, shift)
