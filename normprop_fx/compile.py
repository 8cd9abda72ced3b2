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

``compile`` checks its argument, says (through ``logging``) what it found, and calls
``torch.compile``; every keyword goes to ``torch.compile`` unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .affine import NormPropAffine
from .errors import NormPropError
from .layers import NormPropLayer
from .normalized_activation import NormalizedActivation
from .standardize import Standardize

logger = logging.getLogger(__name__)

NORMPROP_MODULES: tuple[type[nn.Module], ...] = (NormPropLayer, NormalizedActivation, NormPropAffine, Standardize)


def compile(model: nn.Module, **torch_compile_kwargs: Any) -> nn.Module:
    """``torch.compile(model, **torch_compile_kwargs)`` for a converted (or folded) network.

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
    return torch.compile(model, **torch_compile_kwargs)
