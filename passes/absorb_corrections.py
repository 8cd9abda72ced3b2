"""Pass 12: merge a scalar correction into the normalized activation whose output it corrects.

Moment propagation puts a :class:`~normprop_fx.standardize.Standardize` in front of a consumer.
When its input is the output of a NormProp layer (or a NormPropAffine, or a standalone
NormalizedActivation) and the correction is one scalar mean and scale, it is the same affine map
applied right after that activation's own ``(f(u) - c_mean) / c_std``: the two are merged into
one (:meth:`NormalizedActivation.absorb_correction`) and the Standardize node is removed. The
outputs are the same up to rounding; what changes is the cost. The forward has one pointwise op
less, and a compiled training step saves one tensor for the backward where it saved two: the
activation's own output (its backward reads it) and the corrected value (the next layer's
backward reads that). On mobilenet_v3_large, 10 corrections are merged this way; on a ResNet,
the one after every block's output ReLU, whose other reader, the next residual add, then takes
the uncorrected value back inside its own kernel.

Per-channel corrections, activations called from several places, and outputs with a reader
that would need the uncorrected value materialized (a conv, a concat...) are left as they are.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import Counter

import torch
from torch import fx, nn

from normprop_fx.affine import NormPropAffine
from normprop_fx.layers import NormPropLayer
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.records import Correction
from normprop_fx.standardize import Standardize

from .describe import describe_node, owner_module_path
from .graph_utils import adopt_owner, free_module_name, hand_over, module_uses


#: Readers that can take the uncorrected value back as ``z / scale + mean`` inside their own
#: pointwise kernel (a residual add), at no extra memory pass once compiled.
_POINTWISE_READERS = (operator.add, operator.sub, torch.add, torch.sub)


def absorb_corrections(gm: fx.GraphModule, corrections: list[Correction]) -> tuple[fx.GraphModule, list[Correction]]:
    """Merge every absorbable scalar correction of ``gm`` (modified, returned) into the
    activation before it, and return the records updated: a merged correction's record names
    the activation, and every reader of the uncorrected value gets it back (see below).

    The activation's output may have other readers: a residual add, or another scalar correction
    (a downsampling block corrects the same value for two convs). A residual add then reads
    ``z / scale + mean``, the uncorrected value (a new Standardize, fused into the add's kernel
    when compiled); a second correction is composed with that inverse into one Standardize, or
    dropped when it was the same correction. Values with any other reader are left as they are:
    a conv reading the uncorrected value would need it materialized again.
    """
    uses = module_uses(gm)
    owners = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    records = {c.path: c for c in corrections}
    order = [c.path for c in corrections]
    removed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        correction = _scalar_correction(gm, node, uses, records)
        if node in removed or correction is None:
            continue
        source = node.args[0]
        path = _activation_path(gm, source)
        if path is None:
            continue
        act = gm.get_submodule(path)
        others = [u for u in source.users if u is not node]
        if (
            act.spec.is_identity
            or act.has_correction
            or uses[source.target] != 1
            or owners[id(act)] != 1
            or not all(_takes_uncorrected(gm, u, uses, records) for u in others)
        ):
            continue
        mean, scale = float(correction.mean), float(correction.scale)
        act.absorb_correction(correction.mean, correction.scale, correction.reason)
        hand_over(node, source)
        gm.graph.erase_node(node)
        removed.add(node)
        moved = f"{source.target}'s correction for {records[node.target].consumer} moved into {path}"
        records[node.target] = dataclasses.replace(
            records[node.target], path=path, reason=f"{records[node.target].reason}; applied by {path}'s output affine"
        )
        for reader in others:
            if _scalar_correction(gm, reader, uses, records) is not None:  # a second correction
                second = gm.get_submodule(reader.target)
                m2, s2 = float(second.mean), float(second.scale)
                composed_mean, composed_scale = (m2 - mean) * scale, s2 / scale
                record = records.pop(reader.target)
                if math.isclose(composed_scale, 1.0, rel_tol=1e-6) and abs(composed_mean) < 1e-7:
                    hand_over(reader, source)
                    gm.graph.erase_node(reader)
                    removed.add(reader)
                    records[reader.target] = dataclasses.replace(record, path=path, reason=f"{record.reason}; the same correction: applied by {path}'s output affine")
                    continue
                reason = f"{record.reason}; composed with the inverse of {moved}"
                gm.add_submodule(reader.target, Standardize(torch.tensor(composed_mean), torch.tensor(composed_scale), reason=reason))
                records[reader.target] = dataclasses.replace(record, reason=reason, mean=f"{composed_mean:.4g}", scale=f"{composed_scale:.4g}")
            else:
                target = free_module_name(gm, _uncorrected_name(path, owner_module_path(reader)))
                reason = f"restores the uncorrected output of {source.target} for {describe_node(reader, gm)}: {moved}"
                gm.add_submodule(target, Standardize(torch.tensor(-mean * scale), torch.tensor(1.0 / scale), reason=reason))
                with gm.graph.inserting_before(reader):
                    restored = adopt_owner(gm.graph.call_module(target, (source,)), reader)
                reader.replace_input_with(source, restored)
                records[target] = Correction(
                    path=target, consumer=describe_node(reader, gm), source=path, reason=reason,
                    mean=f"{-mean * scale:.4g}", scale=f"{1.0 / scale:.4g}", estimated=False,
                )
                order.append(target)
    if removed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm, [records[p] for p in order]


def _scalar_correction(gm: fx.GraphModule, node: fx.Node, uses: Counter[str], records: dict[str, Correction]) -> Standardize | None:
    """The Standardize ``node`` calls, when it is a correction of this conversion (it has a
    record: a Standardize the user's model brought along is not touched), is scalar, and is
    called only there."""
    if node.op != "call_module" or uses[node.target] != 1 or node.target not in records:
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, Standardize) or module.mean.numel() != 1 or module.scale.numel() != 1:
        return None
    return module


def _uncorrected_name(path: str, owner: str) -> str:
    """``<activation>_uncorrected``, under the module whose forward reads it (the next block's
    residual add), so that the block that runs it can hold it: ``layer1.1.layer1_0_relu_uncorrected``."""
    if not owner or path.startswith(f"{owner}."):
        return f"{path}_uncorrected"
    return f"{owner}.{path.replace('.', '_')}_uncorrected"


def _takes_uncorrected(gm: fx.GraphModule, reader: fx.Node, uses: Counter[str], records: dict[str, Correction]) -> bool:
    if reader.op == "call_function" and reader.target in _POINTWISE_READERS:
        return True
    return _scalar_correction(gm, reader, uses, records) is not None


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
