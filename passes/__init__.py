"""The torch.fx passes behind normprop_fx.convert, one pass a module:

trace (model -> GraphModule), inventory (account for every BatchNorm of the original model),
initialization (per BatchNorm: keep its trained function or the paper's init), match (find
patterns), rewrite (NormProp layers in place), opaque (BatchNorms inside opaque modules),
propagate (moment corrections), absorb_corrections (merge scalar corrections into the activation
before them).
"""

from .inventory import batchnorm_modules, batchnorms_outside_graph
from .match import PatternMatch, match_patterns
from .rewrite import rewrite_patterns
from .trace import NormPropTracer, trace

__all__ = [
    "NormPropTracer",
    "PatternMatch",
    "batchnorm_modules",
    "batchnorms_outside_graph",
    "match_patterns",
    "rewrite_patterns",
    "trace",
]
