"""Pass 5: merge a scalar correction into the normalized activation whose output it corrects.

Moment propagation puts a :class:`~normprop_fx.standardize.Standardize` in front of a consumer.
When its input is the output of a NormProp layer (or a NormPropAffine, or a standalone
NormalizedActivation) that nothing else reads, and the correction is one scalar mean and scale,
it is the same affine map applied right after that activation's own ``(f(u) - c_mean) / c_std``:
the two are merged into one (:meth:`NormalizedActivation.absorb_correction`) and the Standardize
node is removed. The outputs are the same up to rounding; what changes is the cost. The
forward has one pointwise op less, and a compiled training step saves one tensor for the
backward where it saved two: the activation's own output (its backward reads it) and the
corrected value (the next layer's backward reads that). On mobilenet_v3_large, 10 corrections
are merged this way (``docs/bench.md`` has the measured effect).

Per-channel corrections, corrections of values with several readers, and activations called
from several places are left as they are: merging those would change what the other readers see.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import fx, nn

from normprop_fx.affine import NormPropAffine
from normprop_fx.layers import NormPropLayer
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.records import Correction
from normprop_fx.standardize import Standardize

from .module_uses import module_uses


def absorb_corrections(gm: fx.GraphModule, corrections: list[Correction]) -> tuple[fx.GraphModule, list[Correction]]:
    """Merge every absorbable scalar correction of ``gm`` (modified, returned) into the
    activation before it. The records of merged corrections get the activation's path and a
    reason that says where the correction now lives."""
    uses = module_uses(gm)
    owners = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    moved: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Standardize):
            continue
        correction = gm.get_submodule(node.target)
        source = node.args[0]
        path = _activation_path(gm, source)
        if path is None or correction.mean.numel() != 1 or correction.scale.numel() != 1:
            continue
        act = gm.get_submodule(path)
        if (
            act.spec.is_identity
            or act.has_correction
            or len(source.users) != 1
            or uses[source.target] != 1
            or uses[node.target] != 1
            or owners[id(act)] != 1
        ):
            continue
        act.absorb_correction(correction.mean, correction.scale, correction.reason)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        moved[node.target] = path
    if moved:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    records = [
        dataclasses.replace(c, path=moved[c.path], reason=f"{c.reason}; applied by {moved[c.path]}'s output affine")
        if c.path in moved else c
        for c in corrections
    ]
    return gm, records


def _activation_path(gm: fx.GraphModule, source: object) -> str | None:
    """The qualified name of the NormalizedActivation that computes ``source``, or None."""
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return None
    module: nn.Module = gm.get_submodule(source.target)
    if isinstance(module, NormalizedActivation):
        return str(source.target)
    if isinstance(module, (NormPropLayer, NormPropAffine)) and isinstance(module.activation, NormalizedActivation):
        return f"{source.target}.activation"
    return None
