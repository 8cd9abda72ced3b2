"""Measured output statistics of NormProp layers (the audit's 'measured' side)."""

from __future__ import annotations

import math
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


def measure_layer_statistics(model: nn.Module, *inputs: Any, batch_size: int | None = None) -> list[LayerStatistics]:
    """Run ``model(*inputs)`` without gradients and return every NormProp layer's output
    statistics, in call order. The model's train/eval mode is left as it is.

    With ``batch_size``, the inputs are run ``batch_size`` samples at a time (dim 0 of every
    tensor input; the model must be batch independent, as an eval-mode one is) and each layer's
    sums are accumulated in float64 over the runs: the statistics of many samples at a native
    resolution without holding all of their activations at once."""
    if batch_size is not None:
        return _measure_in_batches(model, inputs, batch_size)
    stats: list[LayerStatistics] = []

    def record(path: str, out: torch.Tensor) -> None:
        out = out.detach().float()
        stats.append(LayerStatistics(path, out.mean().item(), out.std().item()))

    _run_with_hooks(model, inputs, record)
    return stats


def _run_with_hooks(model: nn.Module, inputs: tuple[Any, ...], record: Any) -> None:
    """``model(*inputs)`` without gradients, ``record(path, output)`` called for every NormProp layer call."""
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, NORMPROP_CONSUMERS):
            def hook(_m: nn.Module, _args: Any, out: torch.Tensor, path: str = path) -> None:
                record(path, out)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()


def _measure_in_batches(model: nn.Module, inputs: tuple[Any, ...], batch_size: int) -> list[LayerStatistics]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor))
    paths: list[str] = []
    sums: list[torch.Tensor] = []  # per layer call: count, sum, sum of squares (float64)
    for start in range(0, total, batch_size):
        chunk = tuple(x[start:start + batch_size] if isinstance(x, torch.Tensor) else x for x in inputs)
        calls: list[tuple[str, torch.Tensor]] = []

        def record(path: str, out: torch.Tensor) -> None:
            out = out.detach()
            var, mean = torch.var_mean(out, correction=0)
            n = out.numel()
            calls.append((path, torch.tensor([n, n * float(mean), n * (float(var) + float(mean) ** 2)], dtype=torch.float64)))

        _run_with_hooks(model, chunk, record)
        if not paths:
            paths, sums = [p for p, _ in calls], [t for _, t in calls]
        elif [p for p, _ in calls] != paths:
            raise ValueError("the NormProp layers ran in another order on another batch: measure in one batch")
        else:
            sums = [a + b for a, (_, b) in zip(sums, calls)]
    stats = []
    for path, (n, total_sum, squares) in zip(paths, (t.tolist() for t in sums)):
        mean = total_sum / n
        var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)  # unbiased, as Tensor.std
        stats.append(LayerStatistics(path, mean, math.sqrt(var)))
    return stats


def correction_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every correction's scale in ``model``, flat, float64, by path: each ``Standardize``'s, and
    each one a ``NormalizedActivation`` absorbed (``passes.absorb_corrections``: its path
    ``<activation>.correction_scale``), which otherwise leaves no Standardize behind where the
    activation's output has no other reader."""
    from .normalized_activation import NormalizedActivation
    from .standardize import Standardize

    scales = {}
    for p, m in model.named_modules():
        if isinstance(m, Standardize):
            scales[p] = m.scale.double().flatten()
        elif isinstance(m, NormalizedActivation) and m.has_correction:
            scales[f"{p}.correction_scale"] = m.correction_scale.double().flatten()
    return scales


def correction_spread(models: list[nn.Module] | list[dict[str, torch.Tensor]]) -> tuple[float, str | None]:
    """The largest relative spread (max - min) / mean of any correction constant (a
    ``Standardize``'s scale, per element) over conversions of one model, e.g. with other
    calibration seeds, and the correction's path (None when the models have no correction).
    Takes the conversions or their :func:`correction_scales`."""
    found = [m if isinstance(m, dict) else correction_scales(m) for m in models]
    worst, where = 0.0, None
    for path, first in found[0].items():
        s = torch.stack([torch.broadcast_to(f[path], first.shape) for f in found])
        spread = float(((s.max(0).values - s.min(0).values) / s.mean(0)).max())
        if where is None or spread > worst:
            worst, where = spread, path
    return worst, where
