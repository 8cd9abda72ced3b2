"""Pass 3: replace each matched pattern by one NormProp layer at the producer's qualified name.

The producer's call_module node stays (now calling the NormProp layer), the BatchNorm and
activation nodes go, their users read the NormProp layer's output, and the graph is linted and
recompiled. State-dict keys stay readable: ``layer1.0.conv1.weight``, ``.gamma``, ``.beta``.
"""

from __future__ import annotations

from torch import fx, nn

from normprop_fx.layers import DEFAULT_EPS, GammaInit, NormPropLayer
from normprop_fx.moments import activation_constants
from normprop_fx.records import Rewrite

from .describe import describe_node
from .match import PatternMatch


def set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent_path), name, module)


def rewrite_patterns(
    gm: fx.GraphModule,
    matches: list[PatternMatch],
    *,
    gamma_init: GammaInit = "paper",
    eps: float = DEFAULT_EPS,
) -> tuple[fx.GraphModule, list[Rewrite]]:
    """Rewrite ``matches`` in ``gm`` (modified and returned).

    Each NormProp layer takes the producer's weight Parameter itself, so weights tied between
    layers (or with modules that stay) stay tied; ``convert`` has already deep-copied the model
    unless it was asked to work in place. A computed weight (a parametrization or an old-style
    weight_norm/spectral_norm hook) cannot be shared: the layer gets a plain copy and a note.
    """
    records = []
    for match in matches:
        path = str(match.producer.target)
        producer = gm.get_submodule(path)
        norm = gm.get_submodule(str(match.norm.target))
        original = tuple(describe_node(n, gm) for n in (match.producer, match.norm, match.activation) if n is not None)
        layer: NormPropLayer = match.pattern.replacement.from_module(
            producer, share_weight=True, activation=match.spec, gamma_init=gamma_init, affine=norm.affine, eps=eps
        )
        notes = match.notes
        if layer.weight is not producer.weight:
            notes = (*notes, f"the weight of {path} is computed (parametrization or hook): "
                             "the NormProp layer holds a plain copy of its current value")
        layer.required_input_dim = match.pattern.input_dim
        layer.train(producer.training)
        set_submodule(gm, path, layer)

        last = match.activation if match.activation is not None else match.norm
        last.replace_all_uses_with(match.producer)
        if match.activation is not None:
            gm.graph.erase_node(match.activation)
        gm.graph.erase_node(match.norm)

        constants = activation_constants(match.spec)
        records.append(
            Rewrite(
                path=path,
                original=original,
                replacement=type(layer).__name__,
                activation=str(match.spec),
                gamma_init=layer.gamma_init,
                c_mean=constants.mean,
                c_std=constants.std,
                jacobian_gain=constants.jacobian_gain,
                notes=notes,
            )
        )
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, records
