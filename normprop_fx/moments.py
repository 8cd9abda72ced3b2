"""Gaussian moments of activations: the one place the NormProp constants are computed.

For an activation f and z ~ N(0, 1) (docs/method.md section 4):

    c_mean = E[f(z)],  c_std = Std[f(z)],  jacobian_gain = sqrt(E[f'(z)^2]) / c_std,
    gamma_init = 1 / jacobian_gain.

ReLU has a closed form. Every other activation is integrated numerically: the interval
[-12, 12] (in standard deviations) is split at the activation's kinks and into pieces of at
most a quarter standard deviation, each integrated by 16-node Gauss-Legendre quadrature in
float64. No node sits on a kink, so one-sided derivatives never leak into the integral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .activation_functions import ActivationSpec
from .errors import UnsupportedActivationError

_Z_RANGE = 12.0
_PIECE_WIDTH = 0.25
_NODES_PER_PIECE = 16


@dataclass(frozen=True)
class ActivationConstants:
    """Normalization constants of one activation under a standard normal input."""

    mean: float
    std: float
    jacobian_gain: float

    @property
    def gamma_init(self) -> float:
        """The paper's gamma initialization, 1 / jacobian_gain (1/1.21 for ReLU)."""
        return 1.0 / self.jacobian_gain


@dataclass(frozen=True)
class GaussianMoments:
    """E[f(x)], Std[f(x)] and sqrt(E[f'(x)^2]) for x ~ N(mean, std^2)."""

    mean: float
    std: float
    rms_derivative: float


def relu_constants() -> ActivationConstants:
    """The closed form: mean 1/sqrt(2 pi), std sqrt((1 - 1/pi)/2), gain 1/sqrt(1 - 1/pi)."""
    mean = 1.0 / math.sqrt(2.0 * math.pi)
    std = math.sqrt((1.0 - 1.0 / math.pi) / 2.0)
    return ActivationConstants(mean=mean, std=std, jacobian_gain=math.sqrt(0.5) / std)


@cache
def _standard_normal_quadrature(breakpoints: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z and weights w (including the N(0,1) density) over [-12, 12], split at breakpoints."""
    edges = sorted({-_Z_RANGE, _Z_RANGE, *(b for b in breakpoints if -_Z_RANGE < b < _Z_RANGE)})
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(_NODES_PER_PIECE)
    nodes, weights = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        pieces = max(1, math.ceil((hi - lo) / _PIECE_WIDTH))
        bounds = np.linspace(lo, hi, pieces + 1)
        for a, b in zip(bounds[:-1], bounds[1:]):
            half = (b - a) / 2.0
            nodes.append(a + half * (unit_nodes + 1.0))
            weights.append(half * unit_weights)
    z = np.concatenate(nodes)
    w = np.concatenate(weights) * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return torch.from_numpy(z), torch.from_numpy(w)


def gaussian_moments(spec: ActivationSpec, mean: float = 0.0, std: float = 1.0) -> GaussianMoments:
    """Moments of spec(x) and of its derivative for x ~ N(mean, std^2), by quadrature.

    Used for the activation constants (mean 0, std 1) and, by the propagation pass, for an
    activation applied to a value whose nominal moments are not standard.
    """
    if not (std > 0.0 and math.isfinite(std) and math.isfinite(mean)):
        raise ValueError(f"gaussian_moments needs a finite mean and a positive std, got {mean}, {std}")
    z_kinks = tuple((k - mean) / std for k in spec.kinks())
    z, w = _standard_normal_quadrature(z_kinks)
    x = (mean + std * z).requires_grad_(True)
    with torch.enable_grad():
        y = spec(x)
        (dy,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    y = y.detach()
    dy = torch.zeros_like(x) if dy is None else dy
    first = float((w * y).sum())
    second = float((w * (y - first) ** 2).sum())
    return GaussianMoments(
        mean=first, std=math.sqrt(max(second, 0.0)), rms_derivative=math.sqrt(float((w * dy * dy).sum()))
    )


@cache
def activation_constants(spec: ActivationSpec) -> ActivationConstants:
    """c_mean, c_std and the Jacobian gain of ``spec`` under N(0, 1) input."""
    if spec.name == "relu":
        return relu_constants()
    if spec.is_identity:
        return ActivationConstants(mean=0.0, std=1.0, jacobian_gain=1.0)
    moments = gaussian_moments(spec)
    if not (moments.std > 1e-12 and math.isfinite(moments.mean) and math.isfinite(moments.rms_derivative)):
        raise UnsupportedActivationError(
            f"activation {spec} has no usable moments under N(0, 1) input (mean {moments.mean:.3g}, "
            f"std {moments.std:.3g}): it cannot be normalized"
        )
    return ActivationConstants(
        mean=moments.mean, std=moments.std, jacobian_gain=moments.rms_derivative / moments.std
    )


@cache
def max_of_normals(k: int) -> tuple[float, float]:
    """Mean and variance of the maximum of ``k`` independent N(0, 1) values (max pooling), by
    quadrature of x * k phi(x) Phi(x)^(k-1)."""
    if k < 1:
        raise ValueError(f"max_of_normals needs k >= 1, got {k}")
    z, w = _standard_normal_quadrature(())
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    density = w * k * cdf.pow(k - 1)  # w already holds phi(z) dz
    mean = float((density * z).sum())
    var = float((density * (z - mean) ** 2).sum())
    return mean, var


def activation_moments(spec: ActivationSpec, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise E[f(x)] and Var[f(x)] for x ~ N(mean, var), for tensors of means and variances
    (one pair per channel). Each distinct pair is integrated once by :func:`gaussian_moments`;
    a zero variance gives f(mean) exactly."""
    mean64, var64 = torch.broadcast_tensors(mean.double(), var.double())
    out_mean = torch.empty_like(mean64)
    out_var = torch.empty_like(var64)
    seen: dict[tuple[float, float], tuple[float, float]] = {}
    for index, (m, v) in enumerate(zip(mean64.flatten().tolist(), var64.flatten().tolist())):
        key = (round(m, 9), round(v, 9))
        if key not in seen:
            if v <= 1e-18:
                y = float(spec(torch.tensor(m, dtype=torch.float64)))
                seen[key] = (y, 0.0)
            else:
                g = gaussian_moments(spec, m, math.sqrt(v))
                seen[key] = (g.mean, g.std**2)
        out_mean.view(-1)[index], out_var.view(-1)[index] = seen[key]
    return out_mean, out_var

