"""normprop-fx: turn batch-normalized PyTorch networks into Normalization Propagation networks.

    import normprop_fx
    converted = normprop_fx.convert(model)      # a torch.fx.GraphModule, model untouched
    print(normprop_fx.summary(converted))       # audit table of every rewrite
"""

from .activation_functions import ACTIVATION_FUNCTIONS, ActivationSpec, activation
from .affine import NormPropAffine
from .compile import compile
from .convert import NormPropWarning, conversion_report, convert
from .errors import (
    InvalidOptionError,
    NormPropError,
    UnsupportedActivationError,
    UntraceableModelError,
)
from .fold import ConstantAffine, fold
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
from .recalibrate import LayerRecalibration, RecalibrationError, recalibrate
from .records import ConversionReport, LayerInit, LeftBatchNorm, Rewrite
from .standardize import Standardize
from .statistics import LayerStatistics, measure_layer_statistics
from .summary import summary
from .training import adaptive_clip_grad_, classifier_name, param_groups

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ActivationConstants",
    "ActivationSpec",
    "ConstantAffine",
    "ConversionReport",
    "InvalidOptionError",
    "LayerInit",
    "LayerRecalibration",
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
    "RecalibrationError",
    "Rewrite",
    "Standardize",
    "UnsupportedActivationError",
    "UntraceableModelError",
    "activation",
    "activation_constants",
    "compile",
    "adaptive_clip_grad_",
    "classifier_name",
    "check_model",
    "conversion_report",
    "convert",
    "fold",
    "gaussian_moments",
    "measure_layer_statistics",
    "normalized_weight",
    "param_groups",
    "recalibrate",
    "summary",
]
