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
