"""The NormProp module classes as tuples for ``isinstance`` checks, named once for the passes,
``compile``, ``fold`` and the statistics hooks."""

from __future__ import annotations

from torch import nn

from .affine import NormPropAffine
from .layers import NormPropLayer
from .normalized_activation import NormalizedActivation
from .standardize import Standardize

#: Every module a conversion inserts (torch.fx keeps them opaque; fold expands them).
NORMPROP_MODULES: tuple[type[nn.Module], ...] = (NormPropLayer, NormalizedActivation, NormPropAffine, Standardize)

#: The modules with a learned gamma and beta that expect a standardized input: what a moment
#: correction feeds, and what the statistics target measures.
NORMPROP_CONSUMERS: tuple[type[nn.Module], ...] = (NormPropLayer, NormPropAffine)
