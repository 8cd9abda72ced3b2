"""How nominal moments (mean, variance) travel through each kind of graph node (docs/method.md section 6).

Moments are kept compact: per channel (dim 1) as tensors of shape ``(1, C, 1, ...)`` of the
value's rank, or per whole tensor as ``(1, ..., 1)``. A rule sees them expanded to the value's
real shape, so structural ops (reshape, cat, slicing, padding) can simply be applied to the
mean and variance tensors themselves. Independence between distinct values is assumed, as the
spec says.

Rules are data: tables from module types / functions / method names to a rule kind; the
propagation pass looks nodes up here and never tests types itself.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normprop_fx.moments import activation_constants

from .graph_utils import channel_reduce_dims
from .moment_shape import activation_moments_of, activation_shape, particles
from .trace import mode_dependent_modules


@dataclass(frozen=True)
class Moments:
    """Nominal mean and variance of a value, compact (see the module docstring).

    ``structural``: derived from standardized sources by data-independent rules only. False
    once a weighted plain layer or a Gaussian probe was on the way (then the moments depend on
    weights and are estimates).
    """

    mean: torch.Tensor
    var: torch.Tensor
    structural: bool = True
    constant: bool = False  #: a get_attr / Python constant: mean is its value, var 0
    #: Standardized particles of one element's distribution (see moment_shape); None: Gaussian.
    shape: torch.Tensor | None = None

    @staticmethod
    def standard(rank: int) -> Moments:
        shape = (1,) * rank
        return Moments(torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64))

    @staticmethod
    def normalized_activation(rank: int, spec: Any, input_shape: torch.Tensor | None = None) -> Moments:
        """Moments of (f(x) - c_mean) / c_std for a standardized x of the given shape: (0, 1)
        exactly when x is Gaussian, else computed on the particles."""
        ones = (1,) * rank
        if spec is None or spec.is_identity:
            return Moments(torch.zeros(ones, dtype=torch.float64), torch.ones(ones, dtype=torch.float64), shape=input_shape)
        c = activation_constants(spec)
        shape = activation_shape(spec, input_shape, 0.0, 1.0)
        if input_shape is None:
            return Moments(torch.zeros(ones, dtype=torch.float64), torch.ones(ones, dtype=torch.float64), shape=shape)
        m, v = activation_moments_of(spec, particles(input_shape), torch.zeros(ones), torch.ones(ones))
        return Moments((m - c.mean) / c.std, v / c.std**2, shape=shape)

    @property
    def average_std(self) -> float:
        return float(self.var.mean().sqrt())

    @property
    def average_mean(self) -> float:
        return float(self.mean.mean())

    @staticmethod
    def of_constant(value: Any) -> Moments:
        mean = torch.as_tensor(value).detach().to("cpu", torch.float64)
        return Moments(mean, torch.zeros_like(mean), structural=True, constant=True)

    def full(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance expanded to ``shape`` (views, no copy)."""
        return self.mean.expand(shape), self.var.expand(shape)

    def is_standard(self, tol: float = 1e-3) -> bool:
        return bool((self.mean.abs() <= tol).all() and ((self.var - 1).abs() <= tol).all())


def compact(mean: torch.Tensor, var: torch.Tensor, structural: bool, shape: torch.Tensor | None = None) -> Moments:
    """Moments of a value from elementwise moments: the mixture over every dim except 1."""
    mean = mean.double()
    var = var.double()
    dims = channel_reduce_dims(mean.dim())
    if not dims:
        return Moments(mean, var, structural, shape=shape)
    m = mean.mean(dims, keepdim=True)
    v = ((var + mean * mean).mean(dims, keepdim=True) - m * m).clamp_min(0.0)
    return Moments(m, v, structural, shape=shape)


def per_channel(moments: Moments, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact mean and variance as tensors of ``rank`` dims (1, C, 1, ...)."""
    if moments.mean.dim() == rank:
        return moments.mean, moments.var
    shape = (1,) * rank
    return moments.mean.reshape(-1).mean().reshape(shape), moments.var.reshape(-1).mean().reshape(shape)


# --- rule kinds --------------------------------------------------------------------------------

PASS = "pass"  # moments unchanged (identity in expectation: dropout, drop-path, dtype casts)
STRUCTURAL = "structural"  # apply the op itself to the mean and variance tensors
ADD = "add"
SUB = "sub"
MUL = "mul"
DIV = "div"
NEG = "neg"
AVG_POOL = "avg_pool"
MAX_POOL = "max_pool"
LINEAR = "linear"  # a plain weighted layer: mean through W, variance through W^2

_STRUCTURAL_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.roll,
    torch.flip, torch.narrow, torch.unbind, torch.movedim, torch.tensor_split, operator.getitem,
    F.pad, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, torch.swapaxes,
)
_STRUCTURAL_METHODS = (
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
    "expand", "expand_as", "repeat", "roll", "flip", "narrow", "unflatten", "unbind", "movedim",
    "view_as", "reshape_as", "swapaxes", "tensor_split", "mT",
)
_PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_PASS_METHODS = ("contiguous", "clone", "detach", "float", "to", "type_as", "type", "half", "bfloat16", "double")

FUNCTION_RULES: dict[Any, str] = {
    **{f: STRUCTURAL for f in _STRUCTURAL_FUNCTIONS},
    **{f: PASS for f in _PASS_FUNCTIONS},
    operator.add: ADD, operator.iadd: ADD, torch.add: ADD,
    operator.sub: SUB, operator.isub: SUB, torch.sub: SUB,
    operator.mul: MUL, operator.imul: MUL, torch.mul: MUL,
    operator.truediv: DIV, operator.itruediv: DIV, torch.div: DIV,
    operator.neg: NEG, torch.neg: NEG,
    F.avg_pool1d: AVG_POOL, F.avg_pool2d: AVG_POOL, F.avg_pool3d: AVG_POOL,
    F.adaptive_avg_pool1d: AVG_POOL, F.adaptive_avg_pool2d: AVG_POOL, F.adaptive_avg_pool3d: AVG_POOL,
    torch.mean: AVG_POOL,
    F.max_pool1d: MAX_POOL, F.max_pool2d: MAX_POOL, F.max_pool3d: MAX_POOL,
    F.adaptive_max_pool1d: MAX_POOL, F.adaptive_max_pool2d: MAX_POOL, F.adaptive_max_pool3d: MAX_POOL,
    torch.amax: MAX_POOL,
    F.conv1d: LINEAR, F.conv2d: LINEAR, F.conv3d: LINEAR, F.linear: LINEAR,
}
METHOD_RULES: dict[str, str] = {
    **{m: STRUCTURAL for m in _STRUCTURAL_METHODS},
    **{m: PASS for m in _PASS_METHODS},
    "add": ADD, "add_": ADD, "sub": SUB, "sub_": SUB, "mul": MUL, "mul_": MUL,
    "div": DIV, "div_": DIV, "neg": NEG, "mean": AVG_POOL, "amax": MAX_POOL,
}


MODULE_RULES: dict[type, str] = {
    nn.Identity: PASS, nn.Dropout: PASS, nn.Dropout1d: PASS, nn.Dropout2d: PASS, nn.Dropout3d: PASS,
    nn.AlphaDropout: PASS, nn.FeatureAlphaDropout: PASS,
    nn.Flatten: STRUCTURAL, nn.Unflatten: STRUCTURAL, nn.ChannelShuffle: STRUCTURAL,
    nn.PixelShuffle: STRUCTURAL, nn.PixelUnshuffle: STRUCTURAL, nn.ZeroPad1d: STRUCTURAL,
    nn.ZeroPad2d: STRUCTURAL, nn.ZeroPad3d: STRUCTURAL,
    nn.AvgPool1d: AVG_POOL, nn.AvgPool2d: AVG_POOL, nn.AvgPool3d: AVG_POOL,
    nn.AdaptiveAvgPool1d: AVG_POOL, nn.AdaptiveAvgPool2d: AVG_POOL, nn.AdaptiveAvgPool3d: AVG_POOL,
    nn.MaxPool1d: MAX_POOL, nn.MaxPool2d: MAX_POOL, nn.MaxPool3d: MAX_POOL,
    nn.AdaptiveMaxPool1d: MAX_POOL, nn.AdaptiveMaxPool2d: MAX_POOL, nn.AdaptiveMaxPool3d: MAX_POOL,
    nn.Conv1d: LINEAR, nn.Conv2d: LINEAR, nn.Conv3d: LINEAR, nn.Linear: LINEAR,
    **{cls: PASS for cls in mode_dependent_modules()},
}


def pooled_count(kind_args: dict[str, Any], in_shape: torch.Size, out_shape: torch.Size) -> int:
    """How many input values each pooled output combines: the kernel's size when given, else
    the ratio of input to output elements per channel (global and adaptive pooling, mean)."""
    kernel = kind_args.get("kernel_size")
    if kernel is not None:
        return int(math.prod(kernel if isinstance(kernel, (tuple, list)) else [kernel] * (len(in_shape) - 2)))
    return max(1, round(math.prod(in_shape) / max(1, math.prod(out_shape))))
