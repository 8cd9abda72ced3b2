"""``normprop_fx.compile``: torch.compile for NormProp networks.

The NormProp modules are written for inductor already (see ``layers.py``): the per-channel
``gamma / ||W||`` multiplies the weight, so it is one small reduction over each filter that
inductor fuses into a kernel over the weights, O(#weights); ``beta`` is added after the conv
(under torch.compile; the conv bias in eager mode); and ``f(u) * (1/c_std) - c_mean/c_std`` has
Python-float constants, so beta, the activation and the post-activation normalization become one
pointwise kernel over the activations. The ReLU family differentiates through its output
(``piecewise_linear.py``), so the training graph saves no bool mask. Nothing in a NormProp forward
reduces over the activations, where a training-mode BatchNorm needs a statistics pass in the
forward and two reductions in the backward.

Inductor option: on CPU, a network with NormProp layers is compiled with
``reorder_for_peak_memory=False`` (:data:`CPU_TRAINING_OPTIONS`) unless the caller chose a ``mode``
or that option. Each learned ``beta`` has a gradient that is a sum over the activations. Inductor
computes it right after the kernel that produces that gradient, while the gradient is still in
cache. Its peak-memory reordering pass then moves every such sum to the end of the backward, into
one kernel that reads all of those gradients again, from memory rather than cache.
The option is the caller's to override (``options={"reorder_for_peak_memory": True}``).
What it does to step time and peak memory, and the runs that measured it: docs/bench-runs.md,
"The compile option".
On CUDA inductor's default is kept (not measured there).

``compile`` checks its argument, says (through ``logging``) what it found, and calls
``torch.compile`` with the caller's keywords (plus that option where it applies).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import NormPropError
from .layers import NormPropLayer
from .module_types import NORMPROP_MODULES

logger = logging.getLogger(__name__)

#: Inductor options ``compile`` adds for a CPU network with NormProp layers (module docstring).
CPU_TRAINING_OPTIONS: dict[str, Any] = {"reorder_for_peak_memory": False}


def _with_normprop_options(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus :data:`CPU_TRAINING_OPTIONS` where they apply: a model with NormProp layers
    whose tensors are all on the CPU, compiled without a ``mode`` (torch.compile takes a mode or
    options, not both) and without those options set by the caller, who always wins."""
    has_layers = any(isinstance(m, NormPropLayer) for m in model.modules())
    tensors = [*model.parameters(), *model.buffers()]
    on_cpu = bool(tensors) and all(t.device.type == "cpu" for t in tensors)
    if not has_layers or not on_cpu or kwargs.get("mode") is not None:
        return kwargs
    options = dict(kwargs.get("options") or {})
    added = {k: v for k, v in CPU_TRAINING_OPTIONS.items() if k not in options}
    if not added:
        return kwargs
    logger.info("compile: inductor options %s for NormProp layers on CPU (normprop_fx/compile.py)", added)
    return {**kwargs, "options": {**options, **added}}


def compile(model: nn.Module, **torch_compile_kwargs: Any) -> nn.Module:
    """``torch.compile(model, **torch_compile_kwargs)`` for a converted (or folded) network.

    On CPU a network with NormProp layers also gets :data:`CPU_TRAINING_OPTIONS` as inductor
    ``options`` unless the caller set a ``mode`` or those options (module docstring).

    Use it for training (``convert(model)`` then ``compile``) or inference (``fold`` then
    ``compile``). The result is the optimized module torch.compile returns; its parameters are
    ``model``'s. A model with no NormProp module and no BatchNorm is compiled all the same; a
    model that still has BatchNorms is compiled too (the log says so: convert it first for the
    speed-up).

    Raises NormPropError when ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise NormPropError(f"compile() takes an nn.Module, got {type(model).__name__}")
    counts: dict[str, int] = {}
    batchnorms = 0
    for module in model.modules():
        if isinstance(module, NORMPROP_MODULES):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            batchnorms += 1
    if batchnorms:
        logger.info(
            "compile: %s still has %d BatchNorm modules; normprop_fx.convert() it first",
            type(model).__name__, batchnorms,
        )
    logger.info("compile: %s with %s", type(model).__name__, counts or "no NormProp module")
    return torch.compile(model, **_with_normprop_options(model, torch_compile_kwargs))
