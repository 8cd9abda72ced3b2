"""What a BatchNorm computes in eval mode, whether it was trained, and the NormProp parameters
that compute the same function (docs/method.md section 8).

A BatchNorm with running statistics computes, in eval mode, a per-channel affine map

    y_i = g_i * (x_i - mu_i) / sqrt(var_i + eps_bn) + t_i

(g, t: its affine, 1 and 0 when it has none; mu, var: its running statistics). A NormProp
layer ``u_i = gamma_i * (W_i . x) / sqrt(||W_i||^2 + eps) + beta_i`` in front of which the
BatchNorm sat (with x_i = W_i . x + b_i, b the conv bias) computes the same values when

    gamma_i = g_i * sqrt(||W_i||^2 + eps) / sqrt(var_i + eps_bn)
    beta_i  = t_i + g_i * (b_i - mu_i) / sqrt(var_i + eps_bn)

and W is kept as it is. Frozen BatchNorms (torchvision's ``FrozenBatchNorm2d``, which timm uses
too, and timm's ``FrozenBatchNormAct2d``) compute that map in train mode as well; they keep
their statistics and affine as buffers.

Everything is computed in float64 and returned in float64; the caller casts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from .errors import NormPropError


@cache
def plain_frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Frozen BatchNorms that only normalize: torchvision's ``FrozenBatchNorm2d`` (timm uses it
    too). Empty when torchvision is not installed."""
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:
        return ()
    return (FrozenBatchNorm2d,)


@cache
def frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Every frozen BatchNorm class of the installed libraries (not ``_BatchNorm`` subclasses:
    their statistics and affine are buffers): the plain ones and timm's ``FrozenBatchNormAct2d``
    (a norm-activation unit)."""
    try:
        from timm.layers.norm_act import FrozenBatchNormAct2d
    except ImportError:
        return plain_frozen_batchnorm_types()
    return (*plain_frozen_batchnorm_types(), FrozenBatchNormAct2d)


def batchnorm_types() -> tuple[type[nn.Module], ...]:
    """Every class that counts as a BatchNorm: torch's ``_BatchNorm`` family and the frozen ones."""
    return (nn.modules.batchnorm._BatchNorm, *frozen_batchnorm_types())


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, batchnorm_types())


def is_frozen(module: nn.Module) -> bool:
    return isinstance(module, frozen_batchnorm_types())


@dataclass(frozen=True)
class BatchNormState:
    """The eval-mode function of one BatchNorm-like module, as read from it."""

    num_features: int
    eps: float
    frozen: bool
    #: the module normalizes by running statistics in eval mode (False: batch statistics always)
    tracks_running_stats: bool
    affine: bool  #: it has a learned (or, frozen, a stored) affine
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None  #: None when affine is False
    bias: torch.Tensor | None
    num_batches_tracked: int | None


def batchnorm_state(module: nn.Module) -> BatchNormState:
    """Read ``module`` (a ``_BatchNorm`` or a frozen BatchNorm) without changing it."""
    frozen = is_frozen(module)
    weight = getattr(module, "weight", None)
    running_mean = getattr(module, "running_mean", None)
    tracked = getattr(module, "num_batches_tracked", None)
    if frozen:
        affine = bool(getattr(module, "affine", True))
        tracks = True
    else:
        affine = bool(module.affine) and weight is not None
        tracks = bool(module.track_running_stats) and running_mean is not None
    features = getattr(module, "num_features", None)
    if features is None:
        features = (weight if weight is not None else running_mean).numel()
    return BatchNormState(
        num_features=int(features),
        eps=float(module.eps),
        frozen=frozen,
        tracks_running_stats=tracks,
        affine=affine,
        running_mean=running_mean,
        running_var=getattr(module, "running_var", None),
        weight=weight if affine else None,
        bias=getattr(module, "bias", None) if affine else None,
        num_batches_tracked=int(tracked) if isinstance(tracked, torch.Tensor) else None,
    )


def trained_evidence(state: BatchNormState) -> str | None:
    """Why the BatchNorm counts as trained (docs/method.md section 8), or None when it does not: a frozen
    BatchNorm always; else batches tracked, or running statistics that differ from their initial
    values (0, 1). An affine that differs from (1, 0) is reported with them, but does not count
    alone: model constructors set it themselves (timm's and torchvision's zero-init of a residual
    branch's last BatchNorm weight), while any training in train mode moves the statistics."""
    if state.frozen:
        return "a frozen BatchNorm: always trained"
    if not state.tracks_running_stats:
        return None
    found = []
    if state.num_batches_tracked:
        found.append(f"{state.num_batches_tracked} batches tracked")
    if _differs(state.running_mean, 0.0) or _differs(state.running_var, 1.0):
        found.append("running statistics differ from their initial values")
    if not found:
        return None
    if not state.affine:
        return "; ".join(found)
    if affine_at_initial_values(state):
        # statistics alone move in a few train-mode forward passes (a shape check): say so
        found.append("its affine is still at its initial values")
    else:
        found.append("affine differs from its initial values")
    return "; ".join(found)


def affine_at_initial_values(state: BatchNormState) -> bool:
    """The BatchNorm has an affine and it is still (1, 0): only its statistics can show training."""
    return state.affine and not (_differs(state.weight, 1.0) or _differs(state.bias, 0.0))


def _differs(t: torch.Tensor | None, initial: float) -> bool:
    return t is not None and bool((t.detach() != initial).any())


def output_affine(state: BatchNormState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, t)``, float64 vectors on the BatchNorm's device: its affine (1 and 0 without one).
    A BatchNorm's output on the data its statistics describe has per-channel mean ``t`` and
    standard deviation ``|g|``: the moments :func:`normprop_fx.recalibrate` restores on new data."""
    reference = state.weight if state.weight is not None else state.running_mean
    device = reference.device if reference is not None else None
    ones = torch.ones(state.num_features, dtype=torch.float64, device=device)
    g = state.weight.detach().double() if state.weight is not None else ones
    t = state.bias.detach().double() if state.bias is not None else torch.zeros_like(ones)
    return g, t


def eval_affine(state: BatchNormState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, float64 vectors: the BatchNorm's eval-mode function is
    ``x * scale + shift`` per channel."""
    if not state.tracks_running_stats:
        raise ValueError("a BatchNorm without running statistics has no eval-mode affine")
    mean = state.running_mean.detach().double()
    inv_std = (state.running_var.detach().double() + state.eps).rsqrt()
    g, t = output_affine(state)
    scale = g * inv_std
    return scale, t - mean * scale


def normprop_gamma_beta(
    state: BatchNormState, weight: torch.Tensor, conv_bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 gamma and beta of a NormProp layer with ``weight`` (kept as it is; ``eps`` is
    the layer's weight-normalization epsilon) that computes exactly what ``conv_bias`` + the
    BatchNorm computed after it in eval mode."""
    scale, shift = eval_affine(state)
    w = weight.detach().double().flatten(1)
    norm = (w.pow(2).sum(1) + eps).sqrt().to(scale.device)
    bias = conv_bias.detach().double().to(scale.device) if conv_bias is not None else torch.zeros_like(scale)
    return scale * norm, shift + scale * bias


def check_finite_in(values: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> None:
    """Raise NormPropError naming ``where`` when a value is not finite once cast to ``dtype``
    (fp16 overflows at 65504: a tiny running variance can give a huge gamma)."""
    for name, value in values.items():
        if not bool(torch.isfinite(value.to(dtype)).all()):
            worst = float(value.abs().max())
            raise NormPropError(
                f"{where}: the exact {name} reaches {worst:.3g}, which {dtype} cannot hold "
                f"(largest finite value {torch.finfo(dtype).max:.3g}); convert the model in float32 "
                "and cast it afterwards"
                if math.isfinite(worst) else f"{where}: the BatchNorm's statistics give a non-finite {name}"
            )


def follow_requires_grad(replacement: nn.Module, state: BatchNormState, conv_weight: torch.Tensor | None) -> None:
    """Train the replacement's gamma and beta as the BatchNorm's weight and bias were trained,
    so that a frozen part of a network stays frozen. A frozen BatchNorm's replacement follows the
    weight of its conv (torchvision freezes a detection backbone's early layers by their conv
    weights), and is trainable when there is no conv in front. Buffers (affine=False) stay buffers."""
    if state.frozen:
        flags = (bool(conv_weight.requires_grad) if conv_weight is not None else True,) * 2
    elif state.affine:
        flags = (bool(state.weight.requires_grad), bool(state.bias.requires_grad))
    else:
        return
    for name, flag in zip(("gamma", "beta"), flags):
        value = getattr(replacement, name)
        if isinstance(value, nn.Parameter):
            value.requires_grad_(flag)
