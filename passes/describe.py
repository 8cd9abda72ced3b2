"""Human-readable names for FX nodes, and the report text of the moment passes: what the
records and error messages say, written in one place."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from normprop_fx.standardize import NEAR_CONSTANT_VARIANCE


def describe_target(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module in ("torch", "torch._C._VariableFunctions") or module.startswith("torch._C"):
        return f"torch.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name


def describe_node(node: Any, gm: fx.GraphModule | None = None) -> str:
    """'layer1.0.conv1 (Conv2d)', 'F.relu', '.relu_()', "the input 'x'", ..."""
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "call_module":
        if gm is not None:
            try:
                return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
            except AttributeError:
                pass
        return str(node.target)
    if node.op == "call_function":
        return describe_target(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    if node.op == "get_attr":
        return f"the attribute '{node.target}'"
    return node.op


def owner_module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


# --- report text of the moment passes (propagate, insert_corrections, moment_rules) -------------


def value_range(t: torch.Tensor) -> str:
    """'0.5' for a constant tensor, else 'min..max' (4 significant digits)."""
    t = t.detach().double().flatten()
    lo, hi = t.min().item(), t.max().item()
    return f"{lo:.4g}" if math.isclose(lo, hi, rel_tol=1e-6, abs_tol=1e-9) else f"{lo:.4g}..{hi:.4g}"


def correction_reason(source: str, mean: torch.Tensor, var: torch.Tensor, note: str | None, structural: bool) -> str:
    """Why a correction is there: the nominal moments of its input ``source``, and how they were found."""
    reason = f"{source} has nominal mean {value_range(mean)}, variance {value_range(var)}"
    if note is not None:
        reason += f" ({note})"
    elif not structural:
        reason += " (estimated: depends on weights or a probe)"
    return reason


def near_constant_line(count: int, channels: int) -> str:
    """What a correction's reason adds when some of its channels were nearly constant on the sample."""
    return (f"{count} of {channels} channels nearly constant on the calibration sample: scaled as "
            f"if their variance were {NEAR_CONSTANT_VARIANCE:g} of the median channel's")


def calibration_estimate(consumer: str, structural: bool, ratio: float) -> str:
    """The estimated-ops line of a correction whose variance the Gaussian sample rescaled."""
    why = "estimated moments" if not structural else "structural moments off on the sample"
    return (
        f"input of {consumer} ({why}: on the Gaussian sample the variance around the "
        f"nominal mean is x{ratio:.3g} the nominal one, which is scaled by that)"
    )


def calibration_note(structural: bool, ratio: float, nominal: float) -> str:
    """The note a rescaled correction's reason carries."""
    return f"calibrated on the Gaussian sample: x{ratio:.3g} the {'structural' if structural else 'estimated'} variance {nominal:.4g}"


def average_estimate(op: str, k: int, inflation: float, offsets: float) -> str:
    """The estimated-ops line of an average pooling."""
    return (
        f"{op} (averages {k} values; on the Gaussian sample their correlation keeps "
        f"x{inflation:.3g} the variance of independent values, and channel-mean offsets add {offsets:.3g})"
    )


def max_estimate(op: str, k: int, e_max: float, v_max: float) -> str:
    """The estimated-ops line of a max pooling."""
    return (
        f"{op} (max of {k} values; on the Gaussian sample it shifts the mean by "
        f"{e_max:.3g} std and scales the variance x{v_max:.3g})"
    )


def opaque_unmeasured(path: str, attempted: bool) -> str:
    """The unknown-moments line of an opaque module that measured no correction."""
    why = "its input on the Gaussian sample was not finite" if attempted else "it did not run on the Gaussian sample"
    return f"{path}: {why}, so its input is not corrected"
