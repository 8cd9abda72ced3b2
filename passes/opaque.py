"""Pass 8: BatchNorms inside modules torch.fx keeps opaque are replaced in place.

A leaf module (timm's not-traceable registry, ``leaf_modules``) is one node of the graph, so the
pattern passes never see the BatchNorms inside it. Each one becomes an
:class:`~normprop_fx.opaque_affine.OpaqueNormPropAffine` at its own qualified name: no batch
statistics, a learned affine, and an input correction that moment propagation measures on its
Gaussian sample (nothing structural is known inside the module); a trained BatchNorm's
replacement keeps its eval-mode function instead and measures nothing (docs/method.md section 8). A BatchNorm subclass with a
forward of its own stays, as everywhere else.
"""

from __future__ import annotations

from torch import fx, nn

from normprop_fx.affine import NormPropAffine
from normprop_fx.batchnorm_state import batchnorm_state, follow_requires_grad
from normprop_fx.layers import GammaInit
from normprop_fx.moments import activation_constants
from normprop_fx.opaque_affine import OpaqueNormPropAffine
from normprop_fx.records import LayerInit, LeftBatchNorm, Rewrite

from .graph_utils import set_submodule
from .patterns import PLAIN_BATCH_NORMS, lookup_by_type, norm_act_units

#: LeftBatchNorm reasons (passes.inventory) of a BatchNorm inside an opaque module.
_INSIDE = ("inside leaf module", "inside '")


def replace_opaque_batchnorms(
    gm: fx.GraphModule, hidden: list[LeftBatchNorm], inits: dict[str, LayerInit], gamma_init: GammaInit
) -> tuple[list[Rewrite], list[LeftBatchNorm]]:
    """Replace the BatchNorms of ``hidden`` that sit inside an opaque module of ``gm``; return
    their records and the BatchNorms still left."""
    rewrites: list[Rewrite] = []
    left: list[LeftBatchNorm] = []
    units = norm_act_units()
    for record in hidden:
        try:
            bn = gm.get_submodule(record.path)
        except AttributeError:
            left.append(record)
            continue
        unit = lookup_by_type(units, bn)
        if not record.reason.startswith(_INSIDE) or (unit is None and lookup_by_type(PLAIN_BATCH_NORMS, bn) is None):
            left.append(record)
            continue
        after = None
        if unit is not None:
            after = nn.Sequential(getattr(bn, unit.drop), getattr(bn, unit.act))
        choice = inits[record.path]
        state = batchnorm_state(bn)
        affine = NormPropAffine.from_batchnorm(bn, gamma_init=gamma_init)
        if choice.trained:
            affine.keep_batchnorm_function(state)
        follow_requires_grad(affine, state, None)
        replacement = OpaqueNormPropAffine(affine, after, calibrate=not choice.trained)
        set_submodule(gm, record.path, replacement)
        constants = activation_constants(affine.activation.spec)
        how = ("it keeps its trained function (running statistics and affine)" if choice.trained
               else "its input correction is measured on the Gaussian sample")
        rewrites.append(Rewrite(
            path=record.path,
            original=(f"{record.path} ({record.type})",),
            replacement=type(replacement).__name__,
            activation=str(affine.activation.spec),
            gamma_init=affine.gamma_init,
            c_mean=affine.activation.mean,
            c_std=affine.activation.std,
            jacobian_gain=constants.jacobian_gain,
            notes=(f"{record.reason}: replaced in place; {how}"
                   + ("; its drop and activation are kept as they are" if unit is not None else ""),),
            init=choice.init,
        ))
    return rewrites, left
