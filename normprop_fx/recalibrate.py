"""Recalibration of an exactly converted network on new data: AdaBN for NormProp layers
(docs/method.md section 8, "Recalibration on new data").

A trained BatchNorm standardizes its input with statistics measured on the data it was trained
on; on data from another domain its outputs no longer have the moments (per channel mean ``t``,
standard deviation ``|g|``, ``g``/``t`` its affine) that the layers after it were trained to
expect. AdaBN (Li et al. 2016) re-estimates the running statistics on the new data. An exactly
converted NormProp layer (section 8) has no statistics to re-estimate: they are folded into gamma
and beta. :func:`recalibrate` measures each layer's pre-activation ``u`` on the given batches and
replaces gamma and beta so that ``u`` gets the moments the checkpoint's BatchNorm intended:

    u' = k * (u - m) + t,   k = |g| / s        (m, s: the measured per-channel mean and std of u)
    gamma' = k * gamma,     beta' = t + k * (beta - m)

an affine map of ``u`` folded exactly into the layer (``u = gamma * z + beta`` with z the
normalized response, so the weight is untouched and no division by gamma is needed; the sign of
gamma is kept). A channel whose ``u`` is constant on the data (s = 0) keeps its gamma and only
has its mean moved to ``t``. Layers are recalibrated one after another in forward order (found
by running the model, not from the module tree), each one measured with every earlier layer
already recalibrated, as AdaBN's statistics are measured through the re-estimated layers before
them; so every layer gets one pass over the batches, each pass stopping at that layer.

The model is changed in place (gamma and beta of its NormProp layers, nothing else; the
function returns a per-layer report); statistics are measured in eval mode (no dropout) and every module's
train/eval flag is restored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import NormPropError
from .layers import NormPropLayer, NormPropLinear
from .normalized_activation import NormalizedActivation
from .records import TRAINED_INIT


class RecalibrationError(NormPropError):
    """The model or the batches cannot be recalibrated; the message says why."""


@dataclass(frozen=True)
class LayerRecalibration:
    """What :func:`recalibrate` measured and did at one NormProp layer."""

    path: str  #: the layer's qualified name in ``model.named_modules()``
    channels: int
    images: int  #: samples its statistics were measured on
    mean_shift: float  #: max |m - t| over channels before: how far the means had drifted
    std_ratio_range: tuple[float, float]  #: (min, max) of s / |g| over channels before
    constant_channels: int  #: channels with s = 0 (gamma kept, mean moved only)


class _Stop(Exception):
    """Raised by the measuring hook to end a forward pass at the layer being recalibrated."""


def _inputs(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (inputs, labels, ...) as a DataLoader yields them
    raise RecalibrationError(f"a batch must be a tensor or a (tensor, ...) tuple, got {type(batch).__name__}")


def _channel_dim(layer: NormPropLayer, u: torch.Tensor) -> int:
    return u.dim() - 1 if isinstance(layer, NormPropLinear) else 1


def _trained_layers(model: nn.Module) -> dict[str, NormPropLayer]:
    layers = {path: m for path, m in model.named_modules() if isinstance(m, NormPropLayer)}
    if not layers:
        raise RecalibrationError(
            f"{type(model).__name__} has no NormProp layers: convert it first "
            "(normprop_fx.convert(model, init='trained'))")
    untrained = [p for p, m in layers.items() if m.init != TRAINED_INIT or m.batchnorm_affine is None]
    if untrained:
        raise RecalibrationError(
            f"recalibration needs layers converted from trained BatchNorms (init='trained'), whose "
            f"intended output moments it restores; these have the NormProp initialization instead: "
            f"{', '.join(untrained)}")
    for path, layer in layers.items():
        if not isinstance(layer.activation, NormalizedActivation):
            raise RecalibrationError(f"{path}: its activation is {type(layer.activation).__name__}, not the "
                                     "NormalizedActivation whose input recalibrate measures")
    return layers


def _forward_order(model: nn.Module, layers: dict[str, NormPropLayer], first: torch.Tensor) -> list[str]:
    """The layers' paths in the order one forward pass calls them."""
    calls: list[str] = []
    handles = [layer.activation.register_forward_pre_hook(lambda _m, _a, path=path: calls.append(path))
               for path, layer in layers.items()]
    try:
        model(first)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({p for p in calls if calls.count(p) > 1})
    if repeated:
        raise RecalibrationError(f"layers called more than once per forward pass cannot be given one set of "
                                 f"moments: {', '.join(repeated)}")
    missing = [p for p in layers if p not in calls]
    if missing:
        raise RecalibrationError(f"layers the forward pass never reached (no statistics to measure): "
                                 f"{', '.join(missing)}")
    return calls


def _measure(model: nn.Module, path: str, layer: NormPropLayer, batches: Sequence[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel float64 mean and population variance of ``layer``'s pre-activation over all
    ``batches`` (each forward stops there), and the number of samples."""
    sums: dict[str, Any] = {"n": 0, "count": 0}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        u = args[0].detach()
        dim = _channel_dim(layer, u)
        u = u.movedim(dim, -1).reshape(-1, u.shape[dim]).double()
        if "shift" not in sums:  # sums around the first batch's mean: no cancellation
            sums["shift"], sums["s1"], sums["s2"] = u.mean(0), torch.zeros_like(u[0]), torch.zeros_like(u[0])
        centered = u - sums["shift"]
        sums["s1"] += centered.sum(0)
        sums["s2"] += centered.pow(2).sum(0)
        sums["count"] += u.shape[0]
        raise _Stop

    handle = layer.activation.register_forward_pre_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                sums["n"] += x.shape[0]
                continue
            raise RecalibrationError(f"{path}: a forward pass did not reach the layer")
    finally:
        handle.remove()
    count = sums["count"]
    mean_c = sums["s1"] / count
    var = (sums["s2"] / count - mean_c.pow(2)).clamp(min=0)
    mean = sums["shift"] + mean_c
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        bad = int((~(torch.isfinite(mean) & torch.isfinite(var))).sum())
        raise RecalibrationError(f"{path}: non-finite statistics in {bad} of {mean.numel()} channels on the "
                                 "given batches (non-finite inputs, or values that overflow)")
    return mean, var, sums["n"]


@torch.no_grad()
def _fold(layer: NormPropLayer, mean: torch.Tensor, var: torch.Tensor) -> tuple[float, tuple[float, float], int]:
    g, t = (v.to(mean.device) for v in layer.batchnorm_affine)
    target_std = g.abs()
    std = var.sqrt()
    constant = std == 0
    k = torch.where(constant, torch.ones_like(std), target_std / torch.where(constant, torch.ones_like(std), std))
    gamma = layer.gamma.detach().double().to(mean.device)
    beta = layer.beta.detach().double().to(mean.device)
    layer.gamma.copy_((k * gamma).to(layer.gamma))
    layer.beta.copy_((t + k * (beta - mean)).to(layer.beta))
    ratio = torch.where(target_std > 0, std / target_std.clamp(min=1e-300), torch.full_like(std, float("nan")))
    finite = ratio[torch.isfinite(ratio)]
    ratio_range = (finite.min().item(), finite.max().item()) if finite.numel() else (float("nan"), float("nan"))
    return (mean - t).abs().max().item(), ratio_range, int(constant.sum())


def recalibrate(model: nn.Module, batches: Iterable[Any]) -> list[LayerRecalibration]:
    """Re-estimate every NormProp layer's input statistics on ``batches`` and fold them into its
    gamma and beta, so that each layer's pre-activation has, on those batches, the per-channel mean
    ``t`` and standard deviation ``|g|`` of the trained BatchNorm it replaced (``g``, ``t``: that
    BatchNorm's affine): AdaBN for an exactly converted network (docs/method.md section 8).

    ``model``: a network converted with ``init="trained"`` (every NormProp layer must come from a
    trained BatchNorm; found by walking ``model.modules()``, recalibrated in the order a forward
    pass calls them). It is changed **in place** (gamma and beta only) and keeps its train/eval
    state. ``batches``: tensors, or ``(inputs, ...)`` tuples such as a DataLoader yields; they
    are read into a list once and passed through the model once per layer (moved to the device
    of the model's first parameter). Returns one :class:`LayerRecalibration` per layer, in
    forward order. Raises :class:`RecalibrationError` for a model without (trained) NormProp
    layers, no or empty batches, a layer the forward pass does not reach or calls twice, and
    non-finite statistics.
    """
    layers = _trained_layers(model)
    device = next(model.parameters()).device
    xs = [_inputs(b).to(device) for b in batches]
    xs = [x for x in xs if x.shape[0] > 0]
    if not xs:
        raise RecalibrationError("no data to recalibrate on: the batches are empty")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            order = _forward_order(model, layers, xs[0])
            report = []
            for path in order:
                layer = layers[path]
                mean, var, images = _measure(model, path, layer, xs)
                shift, ratio_range, constant = _fold(layer, mean, var)
                report.append(LayerRecalibration(path, mean.numel(), images, shift, ratio_range, constant))
    finally:
        for module, training in modes.items():
            module.training = training
    return report
