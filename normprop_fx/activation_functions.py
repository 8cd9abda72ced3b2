"""The activations normprop-fx knows, as data: one row an activation.

An :class:`ActivationSpec` names an activation and its parameters (``leaky_relu`` with
``negative_slope=0.2``). It is hashable, so its normalization constants can be cached, and it
applies the activation with the same ``torch.nn.functional`` call the original model used.
Adding an activation is one row in :data:`ACTIVATION_FUNCTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UnsupportedActivationError


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class ActivationFunction:
    """One row of the activation table.

    fn: ``fn(x, **params)``, the functional form.
    defaults: every parameter the activation takes, with its default value.
    kinks: the inputs where ``fn`` is not smooth, given the parameters; numerical
        integration splits its domain there.
    backward_reads_output: autograd's backward of ``fn`` reads its output (ReLU, tanh,
        sigmoid), so that output must not be overwritten in place while a gradient is
        recorded; the others read their input only.
    takes_inplace: ``fn`` takes ``inplace=True`` (and then overwrites its input).
    gate: ``fn``'s range is (0, 1): when its output only multiplies other values it is a gate
        (GhostNetV2/V3's DFC attention, CBAM), and it stays raw (``passes.graph_utils.is_gate``).
        Normalized to (0, 1) moments it would be ~1.2x its centred input, and the product
        quadratic in each sample's scale: over a stack of gated blocks the samples' scales
        spread apart (timm ghostnetv3_130: one sample's variance 0.01-34 by block 8).
    """

    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    kinks: Callable[[Mapping[str, Any]], tuple[float, ...]] = lambda p: ()
    backward_reads_output: bool = False
    takes_inplace: bool = False
    gate: bool = False


ACTIVATION_FUNCTIONS: dict[str, ActivationFunction] = {
    "identity": ActivationFunction(_identity),
    "relu": ActivationFunction(F.relu, kinks=lambda p: (0.0,), backward_reads_output=True, takes_inplace=True),
    "relu6": ActivationFunction(F.relu6, kinks=lambda p: (0.0, 6.0), takes_inplace=True),
    "leaky_relu": ActivationFunction(F.leaky_relu, {"negative_slope": 0.01}, lambda p: (0.0,), takes_inplace=True),
    "hardtanh": ActivationFunction(
        F.hardtanh, {"min_val": -1.0, "max_val": 1.0}, lambda p: (p["min_val"], p["max_val"]), takes_inplace=True
    ),
    "elu": ActivationFunction(F.elu, {"alpha": 1.0}, lambda p: (0.0,), takes_inplace=True),
    "celu": ActivationFunction(F.celu, {"alpha": 1.0}, lambda p: (0.0,), takes_inplace=True),
    "selu": ActivationFunction(F.selu, kinks=lambda p: (0.0,), takes_inplace=True),
    "silu": ActivationFunction(F.silu, takes_inplace=True),
    "mish": ActivationFunction(F.mish, takes_inplace=True),
    "gelu": ActivationFunction(F.gelu, {"approximate": "none"}),
    "hardswish": ActivationFunction(F.hardswish, kinks=lambda p: (-3.0, 3.0), takes_inplace=True),
    "hardsigmoid": ActivationFunction(F.hardsigmoid, kinks=lambda p: (-3.0, 3.0), takes_inplace=True, gate=True),
    "softplus": ActivationFunction(
        F.softplus, {"beta": 1.0, "threshold": 20.0}, lambda p: (p["threshold"] / p["beta"],)
    ),
    "tanh": ActivationFunction(torch.tanh, backward_reads_output=True),
    "sigmoid": ActivationFunction(torch.sigmoid, backward_reads_output=True, gate=True),
}


@dataclass(frozen=True)
class ActivationSpec:
    """An activation with all of its parameters filled in. Build it with :func:`activation`."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def function(self) -> ActivationFunction:
        return ACTIVATION_FUNCTIONS[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def kinks(self) -> tuple[float, ...]:
        return tuple(float(k) for k in self.function.kinks(self.kwargs))

    def __call__(self, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """The activation of ``x``; ``inplace=True`` overwrites ``x`` where ``fn`` can."""
        if inplace and self.function.takes_inplace:
            return self.function.fn(x, **self.kwargs, inplace=True)
        return self.function.fn(x, **self.kwargs)

    def __str__(self) -> str:
        defaults = self.function.defaults
        shown = [f"{k}={v!r}" for k, v in self.params if defaults.get(k) != v]
        return f"{self.name}({', '.join(shown)})" if shown else self.name


def activation(name: str, **params: Any) -> ActivationSpec:
    """The :class:`ActivationSpec` for ``name`` with ``params`` over the defaults.

    Raises UnsupportedActivationError for an unknown name or parameter.
    """
    row = ACTIVATION_FUNCTIONS.get(name)
    if row is None:
        raise UnsupportedActivationError(
            f"unknown activation '{name}'; supported: {', '.join(sorted(ACTIVATION_FUNCTIONS))}"
        )
    unknown = set(params) - set(row.defaults)
    if unknown:
        raise UnsupportedActivationError(
            f"activation '{name}' takes no parameter {sorted(unknown)}; "
            f"it takes {sorted(row.defaults) or 'none'}"
        )
    merged = {**row.defaults, **params}
    for key, value in merged.items():
        default = row.defaults[key]
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UnsupportedActivationError(
                    f"activation '{name}': parameter {key}={value!r} must be a number "
                    "fixed at conversion time"
                )
            merged[key] = float(value)
        elif not isinstance(value, type(default)):
            raise UnsupportedActivationError(
                f"activation '{name}': parameter {key}={value!r} must be a {type(default).__name__}"
            )
    if name == "gelu" and merged["approximate"] not in ("none", "tanh"):
        raise UnsupportedActivationError(f"gelu approximate={merged['approximate']!r} is not 'none' or 'tanh'")
    spec = ActivationSpec(name, tuple(sorted(merged.items())))
    try:
        kinks = spec.kinks()
    except ArithmeticError as err:
        raise UnsupportedActivationError(f"activation {spec}: invalid parameters ({err})") from err
    if not all(math.isfinite(k) for k in kinks):
        raise UnsupportedActivationError(f"activation {spec}: invalid parameters")
    return spec
