"""normprop-fx: turn batch-normalized PyTorch networks into Normalization Propagation networks.

    import normprop_fx
    converted = normprop_fx.convert(model)      # a torch.fx.GraphModule, model untouched
    print(normprop_fx.summary(converted))       # audit table of every rewrite
"""

from .activation_functions import ACTIVATION_FUNCTIONS, ActivationSpec, activation
from .affine import NormPropAffine
from .convert import NormPropWarning, conversion_report, convert
from .errors import (
    InvalidOptionError,
    NormPropError,
    UnsupportedActivationError,
    UntraceableModelError,
)
from .layers import (
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropLayer,
    NormPropLinear,
    normalized_weight,
)
from .model_check import ModelCheck, check_model
from .moments import ActivationConstants, activation_constants, gaussian_moments
from .normalized_activation import NormalizedActivation
from .records import ConversionReport, LeftBatchNorm, Rewrite
from .standardize import Standardize
from .statistics import LayerStatistics, measure_layer_statistics
from .summary import summary

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ActivationConstants",
    "ActivationSpec",
    "ConversionReport",
    "InvalidOptionError",
    "LayerStatistics",
    "LeftBatchNorm",
    "ModelCheck",
    "NormPropAffine",
    "NormPropConv1d",
    "NormPropConv2d",
    "NormPropConv3d",
    "NormPropError",
    "NormPropLayer",
    "NormPropLinear",
    "NormPropWarning",
    "NormalizedActivation",
    "Rewrite",
    "Standardize",
    "UnsupportedActivationError",
    "UntraceableModelError",
    "activation",
    "activation_constants",
    "check_model",
    "conversion_report",
    "convert",
    "gaussian_moments",
    "measure_layer_statistics",
    "normalized_weight",
    "summary",
]
