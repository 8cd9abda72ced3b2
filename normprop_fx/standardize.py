"""The constant scale correction that moment propagation inserts (docs/method.md section 6).

    y = (x - mean) * scale,   scale = 1 / sqrt(nominal variance)

``mean`` and ``scale`` are fixed at conversion from the *nominal* moments of ``x`` (computed
with gamma = 1, independent of data), per channel or scalar. They are buffers, so a saved
state_dict restores them exactly, but they are not learned and never change in training.
"""

from __future__ import annotations

import torch
from torch import nn

from .eager import has_hooks, is_compiling, tensor_affine

#: A channel whose variance on the calibration sample is below this fraction of the median
#: channel's is taken as nearly constant there (docs/method.md section 6). Its 1/sqrt(variance)
#: would be a gain the sample does not support: in timm's efficientvit_b1 at 64 px, calibrated on
#: 2 samples (8 values a channel at 2x2), hardswish channels that were 0 on all 8 values got
#: scale 1e6 (1/sqrt of the 1e-12 clamp), and on other inputs those gains compounded over the
#: blocks to inf. Measured corrections of the zoo stay far inside it: on the default sample the
#: largest per-channel scale is at most ~8x the median channel's (variance ratio ~1/64).
NEAR_CONSTANT_VARIANCE = 1e-3
#: the variance a scalar (or wholly constant) correction is clamped at
MIN_VARIANCE = 1e-12


def standardizing_scale(var: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``1 / sqrt(var)``, the scale of a correction whose input has variance ``var`` (scalar or per
    channel), and the number of near-constant channels: those below ``NEAR_CONSTANT_VARIANCE`` of
    the median channel's variance are scaled as if their variance were that floor, so no channel
    gets more than ~32x the median channel's gain. Moment propagation applies it to its sample
    and the inserted correction is built from it, so both agree."""
    var = var.clamp_min(MIN_VARIANCE)
    if var.numel() <= 1:
        return var.rsqrt(), 0
    floor = NEAR_CONSTANT_VARIANCE * float(var.flatten().median())
    near_constant = int((var < floor).sum())
    return var.clamp_min(floor).rsqrt(), near_constant


class Standardize(nn.Module):
    """Subtract a constant mean and multiply by a constant scale.

    Args:
        mean, scale: tensors broadcastable against the input without its batch dimension,
            e.g. shape ``()`` for a scalar correction or ``(C, 1, 1)`` for a per-channel one on
            (N, C, H, W) input.
        reason: one line for the audit (why the correction is there).
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, reason: str = "") -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not torch.isfinite(mean).all() or not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("Standardize needs a finite mean and a finite positive scale")
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.reason = reason
        #: Fixed at construction (a Python bool, so forward has no data-dependent branch).
        self.subtracts_mean = bool((mean != 0).any())

    @property
    def is_scalar(self) -> bool:
        return self.mean.numel() == 1 and self.scale.numel() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        if not self.subtracts_mean:
            return x * scale
        if is_compiling():
            return (x - self.mean.to(x.dtype)) * scale
        # eager (normprop_fx/eager.py): the shift -mean * scale is O(channels)
        return tensor_affine(x, scale, -self.mean.to(x.dtype) * scale)

    def extra_repr(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            if t.numel() == 1:
                return f"{t.item():.4g}"
            return f"[{t.min().item():.4g}..{t.max().item():.4g}] x{tuple(t.shape)}"

        return f"mean={fmt(self.mean)}, scale={fmt(self.scale)}"


#: The child name under which a NormProp module holds the correction of its own input.
INPUT_CORRECTION = "input_correction"


def attach_input_correction(module: nn.Module, correction: Standardize) -> None:
    """Make ``correction`` the first thing ``module`` (a NormProp layer, affine or normalized
    activation) computes on its input, as its child ``input_correction``
    (passes/attach_corrections.py). Refused when it has one already."""
    if input_correction(module) is not None:
        raise ValueError(f"{type(module).__name__} already has an input correction")
    module.add_module(INPUT_CORRECTION, correction)


def input_correction(module: nn.Module) -> Standardize | None:
    """The correction ``module`` applies to its input first, or None."""
    return module._modules.get(INPUT_CORRECTION)  # type: ignore[return-value]


def absorbable_correction(module: nn.Module, x: torch.Tensor) -> Standardize | None:
    """``module``'s input correction when its eager form may compute it inside its own affine
    instead of as a pass of its own over ``x``: in eager mode (the compiled form fuses it
    anyway), on a tensor (a torch.fx trace records the correction as a module), and with no
    hooks on the correction (a hook sees the correction's output, so it is computed). Whether
    ``module`` can absorb it exactly is the caller's question (a scalar correction into a
    normalized activation's affine; into a layer's weight and bias where no zero padding is
    added after it, or where the correction only scales)."""
    correction = input_correction(module)
    if correction is None or is_compiling() or isinstance(x, torch.fx.Proxy) or has_hooks(correction):
        return None
    return correction


def corrected_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``module``'s input correction, or ``x`` itself when it has none."""
    correction = input_correction(module)
    return x if correction is None else correction(x)
