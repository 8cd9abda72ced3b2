"""The patterns the matcher looks for, as data.

Adding a layer type, a norm class or an activation form is one row here; the matching code
never tests types or functions itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normprop_fx.batchnorm_state import batchnorm_types, frozen_batchnorm_types, plain_frozen_batchnorm_types
from normprop_fx.conv_same import NormPropConv2dSame
from normprop_fx.layers import (
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLayer,
    NormPropLinear,
)


@dataclass(frozen=True)
class ProducerPattern:
    """A layer that can feed a BatchNorm and the NormProp layer that replaces the pair."""

    producer: type[nn.Module]
    norms: tuple[type[nn.Module], ...]
    replacement: type[NormPropLayer]
    out_features: Callable[[nn.Module], int]
    #: The only input rank for which the norm normalizes the producer's output features, checked
    #: at run time (Linear -> BatchNorm1d: on (N, L, C) input BatchNorm1d normalizes dim 1).
    input_dim: int | None = None


def _out_channels(m: nn.Module) -> int:
    return m.out_channels  # type: ignore[return-value]


def _out_features(m: nn.Module) -> int:
    return m.out_features  # type: ignore[return-value]


#: The norms that normalize a 2-D conv's output per channel: BatchNorm2d and its subclasses
#: (timm's BatchNormAct2d), SyncBatchNorm, and the frozen BatchNorms (all 2-D).
_NORMS_2D: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.SyncBatchNorm, *frozen_batchnorm_types())


def _timm_conv_same() -> tuple[ProducerPattern, ...]:
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return ()
    return (ProducerPattern(Conv2dSame, _NORMS_2D, NormPropConv2dSame, _out_channels),)


PRODUCERS: tuple[ProducerPattern, ...] = (
    ProducerPattern(nn.Linear, (nn.BatchNorm1d, nn.SyncBatchNorm), NormPropLinear, _out_features, input_dim=2),
    ProducerPattern(nn.Conv1d, (nn.BatchNorm1d, nn.SyncBatchNorm), NormPropConv1d, _out_channels),
    ProducerPattern(nn.Conv2d, _NORMS_2D, NormPropConv2d, _out_channels),
    ProducerPattern(nn.Conv3d, (nn.BatchNorm3d, nn.SyncBatchNorm), NormPropConv3d, _out_channels),
    *_timm_conv_same(),
)

#: Every BatchNorm flavour counts as "found" (the report accounts for each one): torch's
#: ``_BatchNorm`` family and the frozen BatchNorms.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = batchnorm_types()

#: The BatchNorm classes whose forward is plain batch normalization over dim 1 (torchvision's
#: FrozenBatchNorm2d: its eval-mode function in every mode): they can be replaced by a NormProp
#: layer (after a Conv/Linear) or by NormPropAffine (anywhere else).
PLAIN_BATCH_NORMS: dict[type, type] = {
    cls: cls for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                         *plain_frozen_batchnorm_types())
}


@dataclass(frozen=True)
class NormActUnit:
    """A BatchNorm subclass that applies dropout and an activation of its own after normalizing
    (timm's ``BatchNormAct2d``): one BN + drop + activation unit, kept a leaf by the tracer."""

    drop: str  #: attribute holding the drop module (nn.Identity when off)
    act: str  #: attribute holding the activation module


@cache
def norm_act_units() -> dict[type, NormActUnit]:
    """One row per norm-activation class of the installed libraries."""
    units: dict[type, NormActUnit] = {}
    try:
        from timm.layers import norm_act
    except ImportError:
        return units
    for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"):
        cls = getattr(norm_act, name, None)
        if cls is not None:
            units[cls] = NormActUnit(drop="drop", act="act")
    return units


@dataclass(frozen=True)
class ActivationForm:
    """One way an activation shows up in an FX graph.

    op: the FX node op ("call_module", "call_function", "call_method").
    target: the module type, the function, or the method name.
    name: the activation's row in normprop_fx.activation_functions.ACTIVATION_FUNCTIONS.
    params: for modules, the attribute names that hold the parameters; for functions and
        methods, the parameter names in positional order after the input ("inplace" is
        accepted and ignored: the NormProp layer produces a fresh tensor).
    fixed: parameters the form always has ((name, value) pairs: timm's ``GELUTanh`` is
        ``gelu`` with ``approximate='tanh'`` and no attribute that says so).
    """

    op: str
    target: Any
    name: str
    params: tuple[str, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()


def _module(t: type[nn.Module], name: str, *params: str, **fixed: Any) -> ActivationForm:
    return ActivationForm("call_module", t, name, params, tuple(fixed.items()))


def _timm_activations() -> tuple[ActivationForm, ...]:
    """timm's own activation modules (``timm.layers.activations``), each of which computes a row
    of the table: ``timm.layers.get_act_layer('gelu')`` is timm's ``GELU``, not ``nn.GELU``, and
    a ``BatchNormAct2d`` holds it as its ``act``. The tracer does not enter a norm-act unit, so
    only this table can tell what its activation computes. (QuickGELU and HardMish have no row.)"""
    try:
        from timm.layers import activations as timm_act
    except ImportError:
        return ()
    return (
        _module(timm_act.GELU, "gelu"),
        _module(timm_act.GELUTanh, "gelu", approximate="tanh"),
        _module(timm_act.Sigmoid, "sigmoid"),
        _module(timm_act.Tanh, "tanh"),
        _module(timm_act.Swish, "silu"),
        _module(timm_act.Mish, "mish"),
        _module(timm_act.HardSwish, "hardswish"),
        _module(timm_act.HardSigmoid, "hardsigmoid"),
    )


def _functions(targets: tuple[Any, ...], name: str, *params: str) -> list[ActivationForm]:
    return [ActivationForm("call_function", t, name, params) for t in targets if t is not None]


def _methods(methods: tuple[str, ...], name: str) -> list[ActivationForm]:
    return [ActivationForm("call_method", m, name) for m in methods]


_nn = torch._C._nn

ACTIVATION_FORMS: tuple[ActivationForm, ...] = (
    _module(nn.Identity, "identity"),
    _module(nn.ReLU, "relu"),
    _module(nn.ReLU6, "relu6"),
    _module(nn.LeakyReLU, "leaky_relu", "negative_slope"),
    _module(nn.Hardtanh, "hardtanh", "min_val", "max_val"),
    _module(nn.ELU, "elu", "alpha"),
    _module(nn.CELU, "celu", "alpha"),
    _module(nn.SELU, "selu"),
    _module(nn.SiLU, "silu"),
    _module(nn.Mish, "mish"),
    _module(nn.GELU, "gelu", "approximate"),
    _module(nn.Hardswish, "hardswish"),
    _module(nn.Hardsigmoid, "hardsigmoid"),
    _module(nn.Softplus, "softplus", "beta", "threshold"),
    _module(nn.Tanh, "tanh"),
    _module(nn.Sigmoid, "sigmoid"),
    *_timm_activations(),
    *_functions((F.relu,), "relu", "inplace"),
    *_functions((torch.relu, torch.relu_), "relu"),
    *_functions((F.relu6,), "relu6", "inplace"),
    *_functions((F.leaky_relu,), "leaky_relu", "negative_slope", "inplace"),
    *_functions((F.leaky_relu_, getattr(_nn, "leaky_relu", None)), "leaky_relu", "negative_slope"),
    *_functions((F.hardtanh,), "hardtanh", "min_val", "max_val", "inplace"),
    *_functions((F.hardtanh_,), "hardtanh", "min_val", "max_val"),
    *_functions((F.elu,), "elu", "alpha", "inplace"),
    *_functions((F.elu_,), "elu", "alpha"),
    *_functions((F.celu,), "celu", "alpha", "inplace"),
    *_functions((F.celu_, torch.celu), "celu", "alpha"),
    *_functions((F.selu,), "selu", "inplace"),
    *_functions((torch.selu, torch.selu_), "selu"),
    *_functions((F.silu,), "silu", "inplace"),
    *_functions((F.mish,), "mish", "inplace"),
    *_functions((F.gelu,), "gelu", "approximate"),
    *_functions((F.hardswish,), "hardswish", "inplace"),
    *_functions((F.hardsigmoid,), "hardsigmoid", "inplace"),
    *_functions((F.softplus,), "softplus", "beta", "threshold"),
    *_functions((torch.tanh, torch.tanh_), "tanh"),
    *_functions((torch.sigmoid, torch.sigmoid_), "sigmoid"),
    *_methods(("relu", "relu_"), "relu"),
    *_methods(("tanh", "tanh_"), "tanh"),
    *_methods(("sigmoid", "sigmoid_"), "sigmoid"),
)

#: Activations that follow a BatchNorm but have no fixed Gaussian moments: the Conv/Linear->BN
#: pair is still converted, the activation stays as it is, and the report says so.
UNSUPPORTED_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.PReLU: "its slope is learned, so its output moments are not fixed",
    nn.RReLU: "its slope is random in training",
    nn.Softmax: "it normalizes across channels",
    nn.LogSoftmax: "it normalizes across channels",
}


def nearest_table_class(table: dict[type, Any], module: nn.Module) -> type | None:
    """``type(module)`` or its nearest base class that has a row in ``table``."""
    return next((cls for cls in type(module).__mro__ if cls in table), None)


def lookup_by_type(table: dict[type, Any], module: nn.Module) -> Any:
    """The row of ``module``'s nearest table class, provided the module computes what that class
    computes: a subclass with a forward of its own (timm's Conv2dSame, an activation subclass)
    does something the row does not describe, so it gets None."""
    cls = nearest_table_class(table, module)
    if cls is None or type(module).forward is not cls.forward:
        return None
    return table[cls]


def own_forward_reason(table: dict[type, Any], module: nn.Module) -> str | None:
    """Why a module that subclasses a table class is not handled as that class, or None."""
    cls = nearest_table_class(table, module)
    if cls is None or type(module).forward is cls.forward:
        return None
    return f"{type(module).__name__} subclasses {cls.__name__} with a forward of its own"


MODULE_ACTIVATION_FORMS: dict[type, ActivationForm] = {
    f.target: f for f in ACTIVATION_FORMS if f.op == "call_module"
}
FUNCTION_ACTIVATION_FORMS: dict[tuple[str, Any], ActivationForm] = {
    (f.op, f.target): f for f in ACTIVATION_FORMS if f.op != "call_module"
}
PRODUCER_PATTERNS: dict[type, ProducerPattern] = {p.producer: p for p in PRODUCERS}


@dataclass(frozen=True)
class TrainingFlag:
    """Where a function takes its train/eval flag: the trace records that flag as the constant it
    had at trace time, so the call no longer follows ``train()``/``eval()``."""

    index: int  #: positional index
    keyword: str  #: keyword name


#: Functions with a train/eval flag, torch.nn.functional's and torch's own (``torch.dropout(x, p,
#: train)``: the flag is positional, and named ``train``).
TRAINING_FLAGS: dict[Any, TrainingFlag] = {
    **{fn: TrainingFlag(2, "training") for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                                  F.feature_alpha_dropout)},
    **{fn: TrainingFlag(2, "train") for fn in (torch.dropout, torch.feature_dropout, torch.alpha_dropout,
                                               torch.feature_alpha_dropout)},
    F.batch_norm: TrainingFlag(5, "training"),
    torch.batch_norm: TrainingFlag(5, "training"),
    F.rrelu: TrainingFlag(3, "training"),
}


def training_flag(node: Any) -> Any:
    """The train/eval flag a call node passes (a bool when the trace froze it), or None."""
    if node.op == "call_function" and node.target in TRAINING_FLAGS:
        where = TRAINING_FLAGS[node.target]
        if where.keyword in node.kwargs:
            return node.kwargs[where.keyword]
        return node.args[where.index] if len(node.args) > where.index else None
    if node.op in ("call_function", "call_method"):
        return node.kwargs.get("training")
    return None
