"""Measured output statistics of NormProp layers (the audit's 'measured' side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .module_types import NORMPROP_CONSUMERS


@dataclass(frozen=True)
class LayerStatistics:
    """Mean and standard deviation of one layer's output over all of its elements."""

    path: str
    mean: float
    std: float


def measure_layer_statistics(model: nn.Module, *inputs: Any) -> list[LayerStatistics]:
    """Run ``model(*inputs)`` without gradients and return every NormProp layer's output
    statistics, in call order. The model's train/eval mode is left as it is."""
    stats: list[LayerStatistics] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, NORMPROP_CONSUMERS):
            def hook(_m: nn.Module, _args: Any, out: torch.Tensor, path: str = path) -> None:
                out = out.detach().float()
                stats.append(LayerStatistics(path, out.mean().item(), out.std().item()))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def correction_spread(models: list[nn.Module]) -> tuple[float, str | None]:
    """The largest relative spread (max - min) / mean of any correction constant (a
    ``Standardize``'s scale, per element) over conversions of one model, e.g. with other
    calibration seeds, and the correction's path (None when the models have no correction)."""
    from .standardize import Standardize

    found = [{p: m.scale.double().flatten() for p, m in model.named_modules() if isinstance(m, Standardize)}
             for model in models]
    worst, where = 0.0, None
    for path, first in found[0].items():
        s = torch.stack([torch.broadcast_to(f[path], first.shape) for f in found])
        spread = float(((s.max(0).values - s.min(0).values) / s.mean(0)).max())
        if where is None or spread > worst:
            worst, where = spread, path
    return worst, where
