"""Pass 13: a correction that feeds one NormProp module goes inside that module.

A correction that passes 11 and 12 leave in the graph is a call of a
:class:`~normprop_fx.standardize.Standardize` between a value and the NormProp module that needs
it standardized. As a call of its own it is a new operation in the forward of the module that
calls the consumer, and pass 14 (``hierarchy``) can only express that by rebuilding that forward
as a GraphModule: every block of a ResNet or an EfficientNet, and the root of every EfficientNet
(the input correction of ``conv_head``) or pre-activation ResNet (of the final ``norm``), whose
class, methods (``forward_features``) and per-block FSDP sharding are then lost.

When the correction's only reader is a NormProp layer, affine or standalone normalized
activation called once (and held at one path), it becomes that module's ``input_correction``
child, which its forward applies first (:func:`~normprop_fx.standardize.attach_input_correction`):
the graph then calls the consumer on the uncorrected value, as the original called the module it
replaced, and pass 14 swaps it in at its name. The ops and their order are the same, so the
outputs are the same to the bit; the correction's buffers move under the consumer's name
(``conv_head.input_correction.mean``), and the report names it there. ``fold`` takes the
correction out again as a node of its own.

Left as they are: corrections with several readers, readers that are not NormProp modules (the
``_uncorrected`` value a residual add reads back), and consumers called at several places (one
module, several corrections).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import fx, nn

from normprop_fx.module_types import NORMPROP_CONSUMERS
from normprop_fx.normalized_activation import NormalizedActivation
from normprop_fx.records import Correction
from normprop_fx.standardize import INPUT_CORRECTION, Standardize, attach_input_correction, input_correction

from .graph_utils import has_submodule, module_uses

#: The modules whose forward applies an ``input_correction`` child first.
_CORRECTABLE = (*NORMPROP_CONSUMERS, NormalizedActivation)


def attach_corrections(gm: fx.GraphModule, corrections: list[Correction]) -> tuple[fx.GraphModule, list[Correction]]:
    """Move every correction of ``gm`` (modified, returned) that feeds one NormProp module called
    once into that module, and return the records with the moved ones renamed."""
    uses = module_uses(gm)
    owners = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
    records = list(corrections)
    # a Standardize's path names one record (an absorbed correction's path, the activation's, may repeat)
    index = {c.path: i for i, c in enumerate(records)
             if has_submodule(gm, c.path) and isinstance(gm.get_submodule(c.path), Standardize)}
    moved = 0
    for node in list(gm.graph.nodes):
        consumer = _sole_consumer(gm, node, uses, owners, index)
        if consumer is None:
            continue
        module = gm.get_submodule(consumer.target)
        attach_input_correction(module, gm.get_submodule(node.target))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        i = index[node.target]
        records[i] = dataclasses.replace(records[i], path=f"{consumer.target}.{INPUT_CORRECTION}",
                                         reason=f"{records[i].reason}; applied by {consumer.target} to its input")
        moved += 1
    if moved:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm, records


def _sole_consumer(
    gm: fx.GraphModule, node: fx.Node, uses: Counter[str], owners: Counter[int], records: dict[str, int]
) -> fx.Node | None:
    """The call of the NormProp module that is the only reader of ``node``, when ``node`` is a
    correction of this conversion called once and that module can take it; else None."""
    if node.op != "call_module" or node.target not in records or uses[node.target] != 1:
        return None
    correction = gm.get_submodule(node.target)
    if not isinstance(correction, Standardize) or owners[id(correction)] != 1 or len(node.users) != 1:
        return None
    (consumer,) = node.users
    if consumer.op != "call_module" or uses[consumer.target] != 1 or consumer.args[:1] != (node,):
        return None
    if node in consumer.args[1:] or node in consumer.kwargs.values():
        return None
    module: nn.Module = gm.get_submodule(consumer.target)
    if not isinstance(module, _CORRECTABLE) or owners[id(module)] != 1 or input_correction(module) is not None:
        return None
    return consumer
