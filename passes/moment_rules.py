"""How nominal moments (mean, variance) travel through each kind of graph node (docs/method.md section 6).

Moments are kept compact: per channel (dim 1) as tensors of shape ``(1, C, 1, ...)`` of the
value's rank, or per whole tensor as ``(1, ..., 1)``. A rule sees them expanded to the value's
real shape, so structural ops (reshape, cat, slicing, padding) can simply be applied to the
mean and variance tensors themselves. Independence between distinct values is assumed
(docs/method.md section 6).

Rules are data: tables from module types / functions / method names to a rule kind, and one
function per kind, registered with :func:`rule` next to its tables (so a new rule is one edit,
here). The moment interpreter (passes/propagate.py) looks nodes up here and never tests types
itself; a rule that does not apply raises :class:`NoRule` and the interpreter probes the op.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from normprop_fx.moments import activation_constants, max_of_normals

from .describe import average_estimate, describe_node, max_estimate
from .graph_utils import channel_moments, channel_reduce_dims
from .moment_particles import (
    MAX_EXPLICIT_AVERAGE,
    activation_moments_of,
    activation_particles,
    average_of,
    max_of,
    mixture_particles,
    particles_or_gaussian,
    product_particles,
    sum_particles,
)
from .trace import mode_dependent_modules

if TYPE_CHECKING:
    from .propagate import MomentInterpreter


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
    #: Standardized particles of one element's distribution (see moment_particles); None: Gaussian.
    particles: torch.Tensor | None = None

    @staticmethod
    def standard(rank: int) -> Moments:
        shape = (1,) * rank
        return Moments(torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64))

    @staticmethod
    def normalized_activation(rank: int, spec: Any, input_particles: torch.Tensor | None = None) -> Moments:
        """Moments of (f(x) - c_mean) / c_std for a standardized x with the given particles: (0, 1)
        exactly when x is Gaussian, else computed on the particles."""
        ones = (1,) * rank
        if spec is None or spec.is_identity:
            return Moments(torch.zeros(ones, dtype=torch.float64), torch.ones(ones, dtype=torch.float64), particles=input_particles)
        c = activation_constants(spec)
        particles = activation_particles(spec, input_particles, 0.0, 1.0)
        if input_particles is None:
            return Moments(torch.zeros(ones, dtype=torch.float64), torch.ones(ones, dtype=torch.float64), particles=particles)
        m, v = activation_moments_of(spec, particles_or_gaussian(input_particles), torch.zeros(ones), torch.ones(ones))
        return Moments((m - c.mean) / c.std, v / c.std**2, particles=particles)

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


def compact(mean: torch.Tensor, var: torch.Tensor, structural: bool, particles: torch.Tensor | None = None) -> Moments:
    """Moments of a value from elementwise moments: the mixture over every dim except 1."""
    mean = mean.double()
    var = var.double()
    dims = channel_reduce_dims(mean.dim())
    if not dims:
        return Moments(mean, var, structural, particles=particles)
    m = mean.mean(dims, keepdim=True)
    v = ((var + mean * mean).mean(dims, keepdim=True) - m * m).clamp_min(0.0)
    return Moments(m, v, structural, particles=particles)


def per_channel(moments: Moments, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact mean and variance as tensors of ``rank`` dims (1, C, 1, ...)."""
    if moments.mean.dim() == rank:
        return moments.mean, moments.var
    shape = (1,) * rank
    return moments.mean.reshape(-1).mean().reshape(shape), moments.var.reshape(-1).mean().reshape(shape)


# --- rule kinds --------------------------------------------------------------------------------

#: A rule: (the interpreter, node, its value on the sample, its module or None) -> the node's
#: moments. It reads the interpreter's ``module``, ``env``, ``moments`` and ``apply``, and adds
#: what it measured on the sample to ``estimated``.
Rule = Callable[..., Any]

#: Rule kind -> its rule, filled by :func:`rule`.
RULES: dict[str, Rule] = {}


def rule(kind: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of ``kind``."""

    def register(fn: Rule) -> Rule:
        RULES[kind] = fn
        return fn

    return register


class NoRule(Exception):
    """The rule does not apply to this node; the interpreter estimates it by a probe."""


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


# --- the rules -----------------------------------------------------------------------------------


def _env_value(ctx: MomentInterpreter, a: Any) -> Any:
    return ctx.env[a] if isinstance(a, fx.Node) else a


@rule(STRUCTURAL)
def _structural(ctx: MomentInterpreter, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
    inputs = [m for m in flat_moments([ctx.moments.get(a) for a in tensor_args(n)]) if m is not None]
    structural = all(m.structural for m in inputs)
    means = ctx.apply(n, module, lambda m, s: m.full(s)[0].contiguous())
    variances = ctx.apply(n, module, lambda m, s: m.full(s)[1].contiguous())
    return _pair_up(means, variances, structural, mixture_particles([m.particles for m in inputs if not m.constant]))


@rule(PASS)
def _pass(ctx: MomentInterpreter, n: fx.Node, value: Any, module: nn.Module | None) -> Any:
    return ctx.moments[tensor_args(n)[0]]


def _binary(ctx: MomentInterpreter, n: fx.Node) -> tuple[Moments, Moments, bool]:
    args = list(n.args) + list(n.kwargs.values())
    a, b = args[0], args[1]
    ma = ctx.moments.get(a) if isinstance(a, fx.Node) else Moments.of_constant(a)
    mb = ctx.moments.get(b) if isinstance(b, fx.Node) else Moments.of_constant(b)
    if not isinstance(ma, Moments) or not isinstance(mb, Moments) or n.kwargs.get("alpha", 1) != 1:
        raise NoRule
    return ma, mb, a is b


@rule(ADD)
def _add(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None, sign: float = 1.0) -> Moments:
    ma, mb, same = _binary(ctx, n)
    if same:
        return _scaled(ma, 1.0 + sign, value)
    particles = sum_particles(ma.particles, _signed(mb.particles, sign), ma.average_std, mb.average_std)
    return _fit(ma.mean + sign * mb.mean, ma.var + mb.var, ma.structural and mb.structural, value, particles)


@rule(SUB)
def _sub(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    return _add(ctx, n, value, module, sign=-1.0)


@rule(MUL)
def _mul(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    ma, mb, same = _binary(ctx, n)
    if same:
        raise NoRule
    return _product(ma, mb, value)


@rule(DIV)
def _div(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    ma, mb, _ = _binary(ctx, n)
    if not mb.constant or (mb.mean == 0).any() or n.kwargs.get("rounding_mode") is not None:
        raise NoRule
    particles = _signed(ma.particles, -1.0 if bool((mb.mean < 0).all()) else 1.0)
    return _fit(ma.mean / mb.mean, ma.var / mb.mean**2, ma.structural, value, particles)


@rule(NEG)
def _neg(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    m = ctx.moments[tensor_args(n)[0]]
    return Moments(-m.mean, m.var, m.structural, particles=_signed(m.particles, -1.0))


@rule(AVG_POOL)
def _avg_pool(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    source = tensor_args(n)[0]
    k = pooled_count(_pool_args(n, module), ctx.env[source].shape, value.shape)
    src = ctx.moments[source]
    nominal = _averaged(ctx, n, module, source, src, k)
    # The rule assumes the k values independent; the sample says how much variance their
    # correlation keeps, relative to that.
    sample = sample_moments(ctx.env[source])
    predicted = _averaged(ctx, n, module, source, sample, k)
    measured = sample_moments(value, center=predicted.mean)
    total = float(predicted.var.sum())
    inflation = float(measured.var.sum()) / total if total > 0 else 1.0
    inflation = min(max(inflation, 1.0 / k), float(k))
    # Each channel's mean also differs from its nominal mean by a weight-dependent offset
    # (small next to a unit variance, but averaging keeps it while it shrinks the variance,
    # so after a global pool it can dominate): its spread over channels, on the sample.
    nominal_mean = per_channel(src, sample.mean.dim())[0]
    offsets = float(((sample.mean - nominal_mean) ** 2).mean()) if sample.mean.dim() == nominal_mean.dim() else 0.0
    ctx.estimated.append(average_estimate(describe_node(n, ctx.module), k, inflation, offsets))
    k_independent = max(1, round(k / inflation))
    var = nominal.var * inflation + offsets
    return Moments(nominal.mean, var, src.structural, particles=average_of(src.particles, k_independent))


def _averaged(ctx: MomentInterpreter, n: fx.Node, module: nn.Module | None, source: fx.Node, moments: Moments, k: int) -> Moments:
    """The average pool's moments for independent inputs of the given moments."""
    override = {source: moments}
    mean = ctx.apply(n, module, lambda m, s: m.full(s)[0].contiguous(), override)
    var = ctx.apply(n, module, lambda m, s: m.full(s)[1].contiguous(), override)
    return compact(mean, var / k, moments.structural)


@rule(MAX_POOL)
def _max_pool(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    source = tensor_args(n)[0]
    if isinstance(value, tuple) or _pool_args(n, module).get("return_indices"):
        raise NoRule
    k = pooled_count(_pool_args(n, module), ctx.env[source].shape, value.shape)
    src = ctx.moments[source]
    mean, var = per_channel(src, value.dim())
    if src.particles is None and k > MAX_EXPLICIT_AVERAGE:
        e_max, v_max = max_of_normals(k)
        particles = None
    else:
        e_max, v_max, particles = max_of(src.particles, min(k, 4 * MAX_EXPLICIT_AVERAGE))
    # Correlated neighbours have a smaller and wider max than k independent values: take the
    # standardized max's mean and variance from the sample instead, averaged over channels.
    inputs, outputs = sample_moments(ctx.env[source]), sample_moments(value)
    spread = float(inputs.var.sqrt().sum())
    if spread > 0 and inputs.mean.shape == outputs.mean.shape:
        e_max = float((outputs.mean - inputs.mean).sum()) / spread
        v_max = float(outputs.var.sum() / inputs.var.sum())
        ctx.estimated.append(max_estimate(describe_node(n, ctx.module), k, e_max, v_max))
    return Moments(mean + var.sqrt() * e_max, var * v_max, src.structural, particles=particles)


@rule(LINEAR)
def _linear(ctx: MomentInterpreter, n: fx.Node, value: torch.Tensor, module: nn.Module | None) -> Moments:
    if module is not None:
        weight, bias = module.weight, module.bias
        if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
            raise NoRule
        source = n.args[0]
        call = module._conv_forward if isinstance(module, nn.modules.conv._ConvNd) else None

        def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return call(x, w, b) if call is not None else torch.nn.functional.linear(x, w, b)
    else:
        # F.conv2d(x, w, b, stride, ...) / F.linear(x, w, b), any argument possibly by keyword
        # (timm's BlurPool2d passes stride= and groups=).
        args, kwargs = list(n.args), dict(n.kwargs)
        source = args.pop(0) if args else kwargs.pop("input")
        weight = _env_value(ctx, args.pop(0) if args else kwargs.pop("weight"))
        bias = _env_value(ctx, args.pop(0) if args else kwargs.pop("bias", None))
        rest = [_env_value(ctx, a) for a in args]
        options = {k: _env_value(ctx, v) for k, v in kwargs.items()}

        def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            return n.target(x, w, b, *rest, **options)
    m = ctx.moments.get(source)
    if not isinstance(m, Moments):
        raise NoRule
    shape = ctx.env[source].shape
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    x_mean, x_var = (t.double().contiguous() for t in m.full((1, *shape[1:])))
    with torch.no_grad():
        return compact(run(x_mean, w, b), run(x_var, w * w, None), structural=False)


# --- helpers -------------------------------------------------------------------------------------


def sample_moments(t: torch.Tensor, center: torch.Tensor | None = None) -> Moments:
    """Per-channel mean and variance of a sample tensor (over every dim but 1), compact; with
    ``center`` (compact, like the result), the mean square around it instead of the variance."""
    mean, var = channel_moments(t, center)
    return Moments(mean.cpu(), var.cpu(), structural=False)


def _product(ma: Moments, mb: Moments, value: torch.Tensor) -> Moments:
    """Moments of a * b for independent a and b."""
    second_a = ma.var + ma.mean**2
    second_b = mb.var + mb.mean**2
    mean = ma.mean * mb.mean
    if ma.constant or mb.constant:
        random, constant = (mb, ma) if ma.constant else (ma, mb)
        particles = _signed(random.particles, -1.0 if bool((constant.mean < 0).all()) else 1.0)
    else:
        particles = product_particles(ma.particles, mb.particles, ma.average_mean, ma.average_std, mb.average_mean, mb.average_std)
    return _fit(mean, second_a * second_b - mean**2, ma.structural and mb.structural, value, particles)


def tensor_args(n: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def flat_moments(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (tuple, list)):
            out.extend(flat_moments(list(item)))
        else:
            out.append(item)
    return out


def _pair_up(means: Any, variances: Any, structural: bool, particles: torch.Tensor | None) -> Any:
    if isinstance(means, torch.Tensor):
        return compact(means, variances, structural, particles) if means.is_floating_point() else None
    if isinstance(means, (tuple, list)):
        return tuple(_pair_up(m, v, structural, particles) for m, v in zip(means, variances))
    return None


def _fit(
    mean: torch.Tensor, var: torch.Tensor, structural: bool, value: torch.Tensor, particles: torch.Tensor | None = None
) -> Moments:
    full = torch.Size((1, *value.shape[1:])) if value.dim() >= 1 else value.shape
    return compact(mean.expand(full), var.clamp_min(0.0).expand(full), structural, particles)


def _scaled(m: Moments, factor: float, value: torch.Tensor) -> Moments:
    return _fit(m.mean * factor, m.var * factor * factor, m.structural, value, _signed(m.particles, factor))


def _signed(particles: torch.Tensor | None, sign: float) -> torch.Tensor | None:
    return particles if particles is None or sign >= 0 else -particles


def _pool_args(n: fx.Node, module: nn.Module | None) -> dict[str, Any]:
    if module is not None:
        return {k: getattr(module, k) for k in ("kernel_size", "return_indices") if hasattr(module, k)}
    if n.target in (torch.mean, torch.amax) or n.op == "call_method":
        return {}
    name = getattr(n.target, "__name__", "")
    if name.startswith("adaptive"):
        return {"return_indices": n.kwargs.get("return_indices", False)}
    kernel = n.args[1] if len(n.args) > 1 else n.kwargs.get("kernel_size")
    return {"kernel_size": kernel, "return_indices": n.kwargs.get("return_indices", False)}
