"""Training stabilizers for converted (NormProp) models: optimizer parameter groups and
adaptive gradient clipping.

Why NormProp needs them: no later layer re-normalizes the scale, so a network's output scale is
the product of its layers' gammas. A learning rate that BatchNorm tolerates can grow the gammas
geometrically within a few steps (0.83 -> 8 -> NaN has been measured on Fashion-MNIST at lr
0.05). Two measured remedies, both usable on BatchNorm models too:

- :func:`param_groups`: weight decay on conv/linear weights, and on gamma, beta and biases only
  with ``decay_scale_params=True``. A NormProp weight is scale-invariant (only its direction
  W/||W|| is used), so decay on it acts as an effective learning-rate schedule. Decay on gamma and
  beta pulls each layer's output scale and offset back towards 0; measured on Fashion-MNIST
  (docs/training.md, docs/training/seeds.md) that is what keeps NormProp's layer output std within
  [0.5, 2] during training (the std otherwise grows to 3 as the inputs of the later layers become
  correlated), at a cost of up to 2 accuracy points at batch 8. tools/train.py's stabilizers use
  ``decay_scale_params=True``; the default stays False, the usual convention for BatchNorm models.
- :func:`adaptive_clip_grad_`: unit-wise adaptive gradient clipping (Brock et al. 2021, as in
  ``timm.utils.agc``) with NormProp's units handled deliberately: a weight row is clipped
  relative to its own norm (bounding the angle it turns per step, since the gradient of a
  normalized weight is orthogonal to it), each channel's ``(gamma_i, beta_i)`` pair is clipped
  *jointly* relative to its joint norm (beta starts at 0, so clipping it alone, as timm does,
  would freeze it), and the classifier is left unclipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import InvalidOptionError
from .layers import NormPropLayer
from .module_types import NORMPROP_CONSUMERS

#: Clip factor for :func:`adaptive_clip_grad_` (the value measured on Fashion-MNIST).
DEFAULT_CLIP_FACTOR = 0.01
#: Floor on a unit's norm in :func:`adaptive_clip_grad_` (as in timm and NFNets): a zero-initialized
#: unit can still move by ``clip_factor * eps`` per unit of gradient norm.
DEFAULT_CLIP_EPS = 1e-3


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the model's last plain ``nn.Linear`` (not a NormProp layer), the
    classifier head by convention; None if there is none."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, NormPropLayer):
            found = name
    return found


def param_groups(model: nn.Module, weight_decay: float, *, decay_scale_params: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``"decay"`` holds every parameter with two or more dimensions
    (conv and linear weights, NormProp weights included) with ``weight_decay``; ``"no_decay"``
    holds gamma, beta, BatchNorm affines and biases with no weight decay
    (``decay_scale_params=True`` decays them too, for comparison). Pass the result to any
    ``torch.optim`` optimizer: ``torch.optim.SGD(param_groups(m, 5e-4), lr=0.1, momentum=0.9)``.
    Each group also carries ``"name"`` and ``"param_names"`` for logging."""
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise InvalidOptionError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    decay: dict[str, list[Any]] = {"params": [], "param_names": []}
    no_decay: dict[str, list[Any]] = {"params": [], "param_names": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = decay if param.dim() >= 2 or decay_scale_params else no_decay
        group["params"].append(param)
        group["param_names"].append(name)
    if not decay["params"] and not no_decay["params"]:
        raise InvalidOptionError(f"{type(model).__name__} has no trainable parameters")
    groups = [
        {"name": "decay", "weight_decay": float(weight_decay), **decay},
        {"name": "no_decay", "weight_decay": 0.0, **no_decay},
    ]
    return [g for g in groups if g["params"]]


def _scale_pairs(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel (scale, shift) parameters of a NormProp layer, a NormPropAffine or an
    affine BatchNorm; None when the module has none that are learned."""
    if isinstance(module, NORMPROP_CONSUMERS):
        scale, shift = module.gamma, module.beta
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        scale, shift = module.weight, module.bias
    else:
        return None
    if isinstance(scale, nn.Parameter) and isinstance(shift, nn.Parameter):
        return scale, shift
    return None


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each output unit (row of dim 0) for 2+-D tensors; the whole norm otherwise."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def _clip_units(grads: list[torch.Tensor], param_norm: torch.Tensor, grad_norm: torch.Tensor,
                clip_factor: float, eps: float) -> None:
    max_norm = param_norm.clamp(min=eps) * clip_factor
    scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
    for g in grads:
        g.mul_(scale)  # scale has the unit shape: (C,), (C, 1, ...) or ()


@torch.no_grad()
def adaptive_clip_grad_(
    model: nn.Module,
    clip_factor: float = DEFAULT_CLIP_FACTOR,
    *,
    eps: float = DEFAULT_CLIP_EPS,
    exclude: Iterable[str] | None = None,
) -> None:
    """Clip gradients in place, unit by unit: ``||g_u|| <= clip_factor * max(||p_u||, eps)``.

    Units: each output row of a weight; each channel's ``(gamma_i, beta_i)`` pair of a NormProp
    layer, NormPropAffine or BatchNorm, clipped jointly; every other parameter as timm does.
    ``exclude`` lists module name prefixes left unclipped; by default the classifier
    (:func:`classifier_name`). Call it between ``loss.backward()`` and ``optimizer.step()``.
    """
    if not (math.isfinite(clip_factor) and clip_factor > 0):
        raise InvalidOptionError(f"clip_factor must be a finite positive number, got {clip_factor!r}")
    if exclude is None:
        head = classifier_name(model)
        exclude = () if head is None else (head,)
    prefixes = tuple(exclude)

    def excluded(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    paired: set[int] = set()
    for name, module in model.named_modules():
        pair = _scale_pairs(module)
        if pair is None:
            continue
        paired.update(id(p) for p in pair)
        scale, shift = pair
        if excluded(name) or scale.grad is None or shift.grad is None:
            continue
        param_norm = torch.sqrt(scale.pow(2) + shift.pow(2))
        grad_norm = torch.sqrt(scale.grad.pow(2) + shift.grad.pow(2))
        _clip_units([scale.grad, shift.grad], param_norm, grad_norm, clip_factor, eps)
    for name, param in model.named_parameters():
        if param.grad is None or id(param) in paired or excluded(name.rpartition(".")[0]):
            continue
        _clip_units([param.grad], _unitwise_norm(param), _unitwise_norm(param.grad), clip_factor, eps)
